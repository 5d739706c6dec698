"""gs:// against a real GCS JSON API: `gcp-storage-emulator` on 127.0.0.1 (see tests/gcs_emulator.py for how TF's,
tensorstore's and google-cloud-storage's GCS clients are pointed at it).

* TF's gfile (and so etils.epath) round trip: write, read, rename, glob, listdir, against objects checked through
  the emulator's own API;
* the start-up check: a configured gs:// input that does not exist stops a job, naming it, before any work;
* Tevatron's two-stage recipe on the TREC DL 2019 subset through the launcher with MODEL_DIR, the data, the
  pretrained model and the stage-1 negatives all on gs://.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("cryptography")
from gcs_emulator import GcsEmulator  # noqa: E402


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator (bucket 'bucket') with this process's environment pointed at it (module scope: TF reads the
  credentials variable once per process)."""
  emulator = GcsEmulator(tmp_path_factory.mktemp("gcs"))
  saved = {k: os.environ.get(k) for k in emulator.env}
  os.environ.update(emulator.env)
  yield emulator
  emulator.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def test_gfile_round_trip_against_the_emulator(gcs):
  import tensorflow as tf
  from etils import epath
  gfile = tf.io.gfile
  payload = os.urandom(3 << 20)  # over one upload chunk
  with gfile.GFile("gs://bucket/rt/a/big.bin", "wb") as f:
    f.write(payload)
  with gfile.GFile("gs://bucket/rt/a/x.txt", "w") as f:
    f.write("hello\nworld\n")
  assert gcs.download("gs://bucket/rt/a/big.bin") == payload  # what TF uploaded, read back by the emulator's API
  assert gfile.GFile("gs://bucket/rt/a/big.bin", "rb").read() == payload
  gfile.rename("gs://bucket/rt/a/x.txt", "gs://bucket/rt/b/y.txt")
  names = set(gcs.object_names("bucket"))
  assert {"rt/a/big.bin", "rt/b/y.txt"} <= names and "rt/a/x.txt" not in names
  assert sorted(gfile.glob("gs://bucket/rt/*/*")) == ["gs://bucket/rt/a/big.bin", "gs://bucket/rt/b/y.txt"]
  assert gfile.isdir("gs://bucket/rt/b") and gfile.listdir("gs://bucket/rt/b") == ["y.txt"]
  path = epath.Path("gs://bucket/rt/b/y.txt")  # epath's gs:// backend is TF's gfile
  assert path.read_text() == "hello\nworld\n" and path.exists() and not epath.Path("gs://bucket/rt/nope").exists()
  gcs.upload("bucket", "rt/c/z.json", b'{"k": 1}')  # written by the emulator's API, read by TF
  assert json.loads(epath.Path("gs://bucket/rt/c/z.json").read_text()) == {"k": 1}


def test_beir_and_atomic_writes_on_gs(gcs, data_dir):
  """BEIR loading, runs and embedding-store files on gs:// equal their local counterparts."""
  import numpy as np
  from mote_jax.retrieval import beir, files, metrics
  local = data_dir / "msmarco-dl19-subset"
  gcs.upload_tree(local, "gs://bucket/beir/dl19")
  remote, expected = beir.load_beir("gs://bucket/beir/dl19", "test"), beir.load_beir(local, "test")
  assert (remote.corpus, remote.queries, remote.qrels) == (expected.corpus, expected.queries, expected.qrels)
  run = {"q1": {"d1": 1.5, "d2": 0.25}, "q2": {"d3": -1.0}}
  metrics.write_run("gs://bucket/out/run.trec", run, tag="t")
  assert metrics.read_run("gs://bucket/out/run.trec") == run
  assert gcs.download("gs://bucket/out/run.trec").decode().splitlines()[0] == "q1 Q0 d1 1 1.5 t"
  array = np.arange(12, dtype=np.float32).reshape(3, 4)
  files.write_npy("gs://bucket/out/e.npy", array)
  np.testing.assert_array_equal(files.load_npy("gs://bucket/out/e.npy"), array)
  assert not [n for n in gcs.object_names("bucket") if n.startswith("out/") and n.endswith(".tmp")]
  # Run and mined-negatives files are streamed piece by piece (retrieval.evaluate.StreamedText); an aborted one
  # leaves nothing behind.
  from etils import epath
  from mote_jax.retrieval.evaluate import StreamedText
  streamed = StreamedText(epath.Path("gs://bucket/out/streamed.trec"), True)
  for line in ("q1 Q0 d1 1 1.5 t\n", "q1 Q0 d2 2 0.25 t\n"):
    streamed.write(line)
  streamed.close()
  assert gcs.download("gs://bucket/out/streamed.trec").decode() == "q1 Q0 d1 1 1.5 t\nq1 Q0 d2 2 0.25 t\n"
  aborted = StreamedText(epath.Path("gs://bucket/out/aborted.trec"), True)
  aborted.write("partial\n")
  aborted.abort()
  assert not [n for n in gcs.object_names("bucket") if "streamed.trec." in n or "aborted.trec" in n]


def test_missing_gs_input_is_named_before_any_work(gcs, data_dir, monkeypatch):
  """finetune / evaluate_job / export_job with a gs:// input that does not exist: FileNotFoundError naming the
  config key and the path, raised before the model is loaded (ModelSource.load never runs)."""
  from mote_jax.jobs import finetune as job
  gcs.upload_tree(data_dir / "msmarco-dl19-subset", "gs://bucket/ok/dl19")

  def no_work(self):
    raise AssertionError("ModelSource.load ran: the job started work before checking its inputs")

  monkeypatch.setattr(job.ModelSource, "load", no_work)
  model = job.ModelSource(towers="gs://bucket/missing/hf")
  with pytest.raises(FileNotFoundError, match=r"ModelSource\.towers: gs://bucket/missing/hf"):
    job.export_job("gs://bucket/ok/export", model=model)
  checkpoint = job.ModelSource(checkpoint="gs://bucket/missing/bert")
  with pytest.raises(FileNotFoundError) as error:
    job.finetune("gs://bucket/ok/ft", model=checkpoint, train_data="gs://bucket/ok/dl19", train_split="train",
                 eval_data="gs://bucket/nope/dl19", eval_split="test")
  message = str(error.value)
  assert "ModelSource.checkpoint: gs://bucket/missing/bert" in message
  assert "finetune.train_data: gs://bucket/ok/dl19/qrels/train.tsv" in message  # the split has no qrels file
  assert "finetune.eval_data: gs://bucket/nope/dl19/corpus.jsonl" in message
  assert "gs://bucket/ok/dl19/corpus.jsonl" not in message  # what exists is not reported
  with pytest.raises(FileNotFoundError, match=r"evaluate_job.data: gs://bucket/ok/dl20/corpus\.jsonl"):
    job.evaluate_job("gs://bucket/ok/ev", model=job.ModelSource(checkpoint=str(data_dir)),
                     data=["gs://bucket/ok/dl19", "gs://bucket/ok/dl20"], split="test")
  with pytest.raises(FileNotFoundError, match=r"training_groups.negatives: gs://bucket/s1/mined\.jsonl"):
    job.training_groups("gs://bucket/ok/dl19", "test", negatives=("bm25", "gs://bucket/s1/mined.jsonl"))
  assert not [n for n in gcs.object_names("bucket") if n.startswith(("ok/ft", "ok/ev", "ok/export"))]


def _launch(gcs, tmp_path, *args):
  """The launcher with the emulator's environment; orbax checkpoints go to tmp_path/checkpoints (gcs_launch.py)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", MOTE_JAX_CACHE=str(tmp_path / "cache"), MOTE_JAX_MALLOC_TUNING="0",
             MOTE_TEST_LOCAL_CHECKPOINTS=str(tmp_path / "checkpoints"), PYTHONPATH=str(REPO), **gcs.env)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, str(REPO / "tests" / "gcs_launch.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, result.stderr[-6000:]
  return result


@pytest.mark.slow
def test_two_stage_recipe_all_on_gs(gcs, tmp_path, data_dir, random_bert_dir):
  """runs/msmarco_dl19_smoke.gin (+ _stage2) as their headers say, with MODEL_DIR, MSMARCO, the pretrained model
  and STAGE1_NEGATIVES on gs://: both stages train, evaluate and export there; stage 1 mines its negatives there;
  the pretrained model is read through the local cache; nothing lands on a local 'gs:' path. Orbax's checkpoint
  arrays are the one part kept on the local disk (tests/gcs_launch.py says why)."""
  subset = data_dir / "msmarco-dl19-subset"
  gcs.upload_tree(subset, "gs://bucket/data/dl19")
  gcs.upload_tree(random_bert_dir, "gs://bucket/models/bert")
  cache = tmp_path / "cache"
  checkpoints = tmp_path / "checkpoints" / "bucket"
  common = ["--gin.MSMARCO=gs://bucket/data/dl19", "--gin.ModelSource.checkpoint=gs://bucket/models/bert",
            "--gin.EncodeOptions.max_length=64", "--gin.SamplingConfig.passage_max_len=64"]
  _launch(gcs, tmp_path, "--gin_file=runs/msmarco_dl19_smoke.gin", "--gin.MODEL_DIR=gs://bucket/s1", *common)
  names = set(gcs.object_names("bucket"))
  report = json.loads(gcs.download("gs://bucket/s1/eval/report-test-exact.json"))
  assert set(report["metrics"]) == {"RR@10", "R@50", "R@1000", "nDCG@10"} and report["num_queries"] == 43
  assert {"s1/config.gin", "s1/operative_config.gin", "s1/metrics.jsonl", "s1/hf/query/model.safetensors",
          "s1/hf/mote_config.json", "s1/report.json"} <= names
  assert (checkpoints / "s1" / "checkpoints" / "6").is_dir()
  # The pretrained model was read from a local copy in MOTE_JAX_CACHE (HF and safetensors read local files).
  copies = list((cache / "remote").iterdir())
  assert len(copies) == 1 and (copies[0] / "model.safetensors").read_bytes() == \
      (random_bert_dir / "model.safetensors").read_bytes()
  mined = [json.loads(line) for line in gcs.download("gs://bucket/s1/mined_negatives.jsonl").decode().splitlines()]
  assert len(mined) == 43 and all(len(m["negative_document_ids"]) == 30 for m in mined)
  # Negatives files hold ids, never passage text.
  assert all(set(m) == {"query_id", "positive_document_ids", "negative_document_ids", "judged_document_ids"}
             for m in mined)
  with open(subset / "corpus.jsonl", encoding="utf-8") as f:  # lines end at "\n" only (texts hold U+2028)
    corpus_ids = {json.loads(line)["_id"] for line in f}
  assert all(set(m["negative_document_ids"]) <= corpus_ids for m in mined)

  result = _launch(gcs, tmp_path, "--gin_file=runs/msmarco_dl19_smoke.gin",
                   "--gin_file=runs/msmarco_dl19_smoke_stage2.gin", "--gin.MODEL_DIR=gs://bucket/s2",
                   "--gin.STAGE1_NEGATIVES=gs://bucket/s1/mined_negatives.jsonl", *common)
  assert "negatives from ['bm25', 'gs://bucket/s1/mined_negatives.jsonl']" in result.stderr
  report = json.loads(gcs.download("gs://bucket/s2/eval/report-test-exact.json"))
  assert report["num_queries"] == 43 and report["num_documents"] == 5000
  assert "s2/hf/passage/model.safetensors" in set(gcs.object_names("bucket"))
  assert (checkpoints / "s2" / "checkpoints" / "6").is_dir()
  assert not (REPO / "gs:").exists()


def test_negatives_files_of_a_gin_macro_are_checked(tmp_path):
  """Stage 2 binds `training_groups.negatives = ['bm25', %STAGE1_NEGATIVES]`: the start-up check resolves the
  macro and names the missing file."""
  import gin
  from mote_jax.jobs import finetune as job
  missing = tmp_path / "s1" / "mined_negatives.jsonl"
  gin.clear_config()
  try:
    gin.parse_config([f"STAGE1_NEGATIVES = '{missing}'", "training_groups.negatives = ['bm25', %STAGE1_NEGATIVES]"])
    assert job._negatives_files(job.training_groups) == [str(missing)]
    with pytest.raises(FileNotFoundError, match=f"training_groups.negatives: {missing}"):
      job.check_inputs({"training_groups.negatives": job._negatives_files(job.training_groups)}, "finetune")
  finally:
    gin.clear_config()


def test_local_copy_of_a_gs_model_directory(gcs, tmp_path, monkeypatch):
  """A gs:// directory is copied once into $MOTE_JAX_CACHE, reused while unchanged and copied again when a file
  changes; a gs:// path that is not a directory is named."""
  from mote_jax import hf_interop
  monkeypatch.setenv("MOTE_JAX_CACHE", str(tmp_path / "cache"))
  gcs.upload("bucket", "lc/model/config.json", b'{"a": 1}')
  gcs.upload("bucket", "lc/model/sub/vocab.txt", b"x\ny\n")
  first = hf_interop.local_copy("gs://bucket/lc/model")
  assert first.parent == tmp_path / "cache" / "remote"
  assert (first / "config.json").read_bytes() == b'{"a": 1}' and (first / "sub" / "vocab.txt").read_text() == "x\ny\n"
  stamp = (first / "config.json").stat().st_mtime_ns
  assert hf_interop.local_copy("gs://bucket/lc/model") == first and (first / "config.json").stat().st_mtime_ns == stamp
  gcs.upload("bucket", "lc/model/config.json", b'{"a": 22}')
  time.sleep(6)  # TF's GCS client caches object metadata for 5 s (GCS_STAT_CACHE_MAX_AGE)
  assert (hf_interop.local_copy("gs://bucket/lc/model") / "config.json").read_bytes() == b'{"a": 22}'
  assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporaries or stale copies left
  with pytest.raises(FileNotFoundError, match="gs://bucket/lc/nothing"):
    hf_interop.local_copy("gs://bucket/lc/nothing")
