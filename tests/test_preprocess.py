"""Offline preprocessing (mote_jax/data/preprocess.py, jobs/preprocess.py): the Beam pipeline against an
independent computation (blingfire + the HF tokenizer + the reference's greedy packing written here), the pair
gate on real corpora, bad input, interrupted runs and worker-count determinism."""

import json
import math
from pathlib import Path

import blingfire
import pytest

from mote_jax.data import preprocess as pp
from mote_jax.data import readers, records
from mote_jax.jobs import preprocess as job


# ------------------------------------------------------------------------------------------ independent reference


def ref_sentences(text):
  """Every non-blank line through blingfire (title line = own sentence)."""
  out = []
  for line in text.split("\n"):
    if line.strip():
      out += [s for s in blingfire.text_to_sentences(line.strip()).split("\n") if s.strip()]
  return out


def ref_ids(tokenizer, texts):
  return [tokenizer.encode(t, add_special_tokens=False) for t in texts] if texts else []


def ref_num_spans(lengths, target):
  """The reference's `_base_encode_one_span` at a fixed target (no short targets): number of spans."""
  spans, span = [], []
  total = 0
  for n in lengths:
    if n == 0:
      continue
    span.append(n)
    total += n
    if total > target:
      spans.append(span)
      span, total = [], 0
  if span:
    spans.append(span)
  return len(spans)


def beir_text(doc):
  title = (doc.get("title") or "").strip()
  return f"{title}\n{doc['text']}" if title else doc["text"]


def in_memory():
  return job.beam_options("DirectRunner", 1, "in_memory", [])


def run(tmp, inputs, file_format, tokenizer_path, **kwargs):
  kwargs.setdefault("pair_kind", "spans")
  options = kwargs.pop("options", None) or in_memory()
  config = pp.PreprocessConfig(output=str(tmp), tokenizer=tokenizer_path, **kwargs)
  return pp.run([str(p) for p in inputs], file_format, config, options)


def launch(args):
  """`python -m mote_jax.launch ARGS` in this process; gin's (global, finalized) config is cleared afterwards."""
  import gin
  from mote_jax import launch as launcher
  try:
    return launcher.main(args)
  finally:
    gin.clear_config()


def shard_bytes(out):
  return {p.name: p.read_bytes() for p in sorted(Path(out).glob("records-*"))}


def write_jsonl(path, docs):
  path.write_text("".join(json.dumps(d) + "\n" for d in docs))
  return path


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scifact_docs(data_dir):
  with open(data_dir / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def scifact_out(tmp_path_factory, data_dir, minilm_path):
  out = tmp_path_factory.mktemp("scifact_records")
  stats = run(out, [data_dir / "scifact" / "corpus.jsonl"], readers.BEIR_CORPUS, minilm_path, num_shards=4)
  return out, stats


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, scifact_docs):
  return write_jsonl(tmp_path_factory.mktemp("small") / "corpus.jsonl", scifact_docs[:150])


# ---------------------------------------------------------------------------------------------------------- tests


def test_msmarco_passages_stop_at_the_pair_gate(tmp_path, data_dir, minilm_path, tokenizer):
  """The recipe's settings (max_len 128) on MS MARCO passages: the launch stops with the counts and the fix."""
  corpus = data_dir / "msmarco-dl19-subset" / "corpus.jsonl"
  with open(corpus, encoding="utf-8") as f:
    docs = [json.loads(line) for line in f]
  docs = [d for d in docs if d["text"].strip()]
  ids = ref_ids(tokenizer, [s for d in docs for s in ref_sentences(beir_text(d))])
  it = iter(ids)
  pairs = sum(ref_num_spans([len(next(it)) for _ in ref_sentences(beir_text(d))], 128) >= 2 for d in docs)
  out = tmp_path / "out"
  with pytest.raises(pp.PairShareError) as error:
    launch(["--gin_file=runs/preprocess_scifact.gin", f"--gin.INPUT={corpus}", f"--gin.OUTPUT={out}",
            "--gin.preprocess.direct_num_workers=1", "--gin.preprocess.direct_running_mode='in_memory'",
            "--gin.preprocess.preflight_documents=0"])  # the gate after the whole pass
  message = str(error.value)
  assert f"only {pairs} of {len(docs)} documents ({pairs / len(docs):.1%})" in message, (message, pairs, len(docs))
  assert "min_pair_share=0.5" in message and "msmarco-docs.tsv" in message and "pre-flight" not in message
  assert pairs / len(docs) < 0.5
  assert not (out / "stats.json").exists() and not list(out.glob("records-*")) and not (out / pp.TMP_DIR).exists()


def test_msmarco_passages_stop_in_the_preflight_before_any_beam_stage(tmp_path, data_dir, minilm_path, tokenizer,
                                                                      monkeypatch):
  """With the recipe's settings the pre-flight reads the first 500 passages, finds too few pairs and stops in
  seconds: no pipeline is built, nothing is left in OUTPUT."""
  import time
  corpus = data_dir / "msmarco-dl19-subset" / "corpus.jsonl"
  with open(corpus, encoding="utf-8") as f:
    docs = [d for d in (json.loads(line) for line in f) if d["text"].strip()][:500]
  ids = iter(ref_ids(tokenizer, [s for d in docs for s in ref_sentences(beir_text(d))]))
  pairs = sum(ref_num_spans([len(next(ids)) for _ in ref_sentences(beir_text(d))], 128) >= 2 for d in docs)

  def no_pipeline(*args, **kwargs):
    raise AssertionError("the pipeline was built")

  monkeypatch.setattr(pp, "make_pipeline", no_pipeline)
  monkeypatch.setattr(pp, "build_pipeline", no_pipeline)
  out = tmp_path / "out"
  started = time.perf_counter()
  with pytest.raises(pp.PairShareError) as error:
    launch(["--gin_file=runs/preprocess_scifact.gin", f"--gin.INPUT={corpus}", f"--gin.OUTPUT={out}",
            "--gin.preprocess.preflight_documents=500"])
  assert time.perf_counter() - started < 60
  message = str(error.value)
  assert message.startswith("pre-flight (the first 500 documents"), message
  assert f"only {pairs} of 500 documents ({pairs / 500:.1%}) give >= 2 spans at max_len=128" in message, message
  assert "min_pair_share=0.5" in message and "the pipeline was not started" in message
  assert "msmarco-docs.tsv" in message  # the fix
  assert not (out / pp.TMP_DIR).exists() and not list(out.glob("records-*")) and not (out / "stats.json").exists()


def test_scifact_share_and_stats(scifact_out, scifact_docs, tokenizer):
  out, stats = scifact_out
  on_disk = json.loads((out / "stats.json").read_text())
  assert on_disk["fingerprint"] == stats["fingerprint"]
  assert on_disk["documents"] == len(scifact_docs) == 5183
  assert on_disk["pair_share"] >= 0.90
  assert on_disk["documents_with_pair"] + on_disk["documents_without_pair"] == on_disk["documents"]
  assert sum(s["records"] for s in on_disk["shards"]) == on_disk["records"] == len(list(pp.iter_records(str(out))))
  assert sum(on_disk["span_length_histogram"]["counts"]) == on_disk["spans"]
  assert on_disk["settings"]["vocab_sha256"] == pp.vocab_hash(tokenizer)
  assert on_disk["settings"]["max_len"] == 128 and on_disk["num_shards"] == 4
  assert sorted(p.name for p in out.glob("records-*")) == [f"records-0000{i}-of-00004.array_record" for i in range(4)]


def test_records_round_trip(scifact_out, scifact_docs, tokenizer):
  """Decoded records equal the independent computation; dropped documents are exactly those with < 2 spans."""
  out, stats = scifact_out
  decoded = {}
  for payload in pp.iter_records(str(out)):
    record = records.parse_numpy(payload)
    decoded[record["doc_id"]] = record
  assert len(decoded) == stats["records"]
  sample = scifact_docs[:400]
  kept = 0
  for doc in sample:
    sentences = [ids for ids in ref_ids(tokenizer, ref_sentences(beir_text(doc))) if ids]
    gives_pair = ref_num_spans([len(s) for s in sentences], 128) >= 2
    assert (doc["_id"] in decoded) == gives_pair, doc["_id"]
    if not gives_pair:
      continue
    kept += 1
    record = decoded[doc["_id"]]
    assert record["tokens"].tolist() == [t for s in sentences for t in s]
    assert record["sentence_lengths"].tolist() == [len(s) for s in sentences]
    assert record["sentence_lengths"].sum() == len(record["tokens"])
    assert record["query_lengths"].size == 0
  assert kept > 300
  # The TF batch decoder sees the same ids.
  import tensorflow as tf
  first = next(pp.iter_records(str(out)))
  parsed = records.parse(tf.constant([first]))
  assert parsed["tokens"][0].numpy().tolist() == records.parse_numpy(first)["tokens"].tolist()


def test_msmarco_docs_tsv_and_bad_input(tmp_path, minilm_path, tokenizer, scifact_docs):
  long_docs = [d for d in scifact_docs if len(d["text"]) > 1500][:6]
  lines = [f"D{i}\thttp://x/{i}\t{d['title']}\t{d['text']}" for i, d in enumerate(long_docs)]
  good = tmp_path / "docs.tsv"
  good.write_text("\n".join(lines) + "\n")
  stats = run(tmp_path / "good", [good], readers.MsMarcoDocsFormat(), minilm_path)
  decoded = {records.parse_numpy(p)["doc_id"]: records.parse_numpy(p) for p in pp.iter_records(str(tmp_path / "good"))}
  assert stats["documents"] == 6 and set(decoded) == {f"D{i}" for i in range(6)}
  sentences = [s for s in ref_ids(tokenizer, ref_sentences(f"{long_docs[2]['title']}\n{long_docs[2]['text']}")) if s]
  assert decoded["D2"]["tokens"].tolist() == [t for s in sentences for t in s]  # url dropped, title first

  bad = tmp_path / "bad.tsv"
  bad.write_text("\n".join(lines[:2] + ["D9\thttp://x\tonly three columns"] + lines[2:]) + "\n")
  with pytest.raises(Exception, match=rf"{bad}:3: expected 4 tab-separated columns .* found 3"):
    run(tmp_path / "bad_out", [bad], readers.MsMarcoDocsFormat(), minilm_path)
  assert not (tmp_path / "bad_out" / "stats.json").exists()
  skipped = run(tmp_path / "skip_out", [bad], readers.MsMarcoDocsFormat(skip_malformed=True), minilm_path)
  assert skipped["read"]["malformed_skipped"] == 1 and skipped["documents"] == 6
  assert shard_bytes(tmp_path / "skip_out") == shard_bytes(tmp_path / "good")

  empty = tmp_path / "empty.tsv"
  empty.write_text("\n")
  with pytest.raises(pp.EmptyCorpusError, match="no documents in"):
    run(tmp_path / "empty_out", [empty], readers.MsMarcoDocsFormat(), minilm_path)
  with pytest.raises(FileNotFoundError, match="no file matches"):
    job.preprocess(model_dir=None, input=str(tmp_path / "missing*.tsv"), output=str(tmp_path / "o"),
                   input_format="msmarco_docs_tsv", tokenizer=minilm_path)
  with pytest.raises(FileExistsError, match="already holds a complete preprocessing output"):
    run(tmp_path / "good", [good], readers.MsMarcoDocsFormat(), minilm_path)


def test_interrupted_run_leaves_nothing_and_rerun_is_identical(tmp_path, small_corpus, minilm_path, monkeypatch):
  reference = run(tmp_path / "ref", [small_corpus], readers.BEIR_CORPUS, minilm_path, num_shards=3)
  real_write, calls = pp.write_array_record, []

  def failing_write(path, payloads):
    calls.append(path)
    result = real_write(path, payloads)
    if len(calls) == 2:  # after a shard is on disk
      raise RuntimeError("injected failure")
    return result

  out = tmp_path / "out"
  monkeypatch.setattr(pp, "write_array_record", failing_write)
  with pytest.raises(Exception, match="injected failure"):
    run(out, [small_corpus], readers.BEIR_CORPUS, minilm_path, num_shards=3)
  assert len(list((out / pp.TMP_DIR).glob("records-*"))) >= 1  # it had started writing
  assert not (out / "stats.json").exists() and not list(out.glob("records-*"))
  monkeypatch.setattr(pp, "write_array_record", real_write)
  again = run(out, [small_corpus], readers.BEIR_CORPUS, minilm_path, num_shards=3)
  assert shard_bytes(out) == shard_bytes(tmp_path / "ref") and len(shard_bytes(out)) == 3
  assert again["fingerprint"] == reference["fingerprint"] and not (out / pp.TMP_DIR).exists()


def test_auto_shard_count_and_overwrite(tmp_path, small_corpus, minilm_path):
  first = run(tmp_path / "o", [small_corpus], readers.BEIR_CORPUS, minilm_path, records_per_shard=40)
  assert first["num_shards"] == math.ceil(first["records"] / 40) >= 3
  second = run(tmp_path / "o", [small_corpus], readers.BEIR_CORPUS, minilm_path, num_shards=2, overwrite=True)
  assert sorted(p.name for p in (tmp_path / "o").glob("records-*")) == [
      "records-00000-of-00002.array_record", "records-00001-of-00002.array_record"]  # stale shards removed
  assert second["records"] == first["records"] and second["fingerprint"] != first["fingerprint"]


@pytest.mark.slow
def test_one_and_two_workers_give_identical_shards(tmp_path, small_corpus, minilm_path):
  one = run(tmp_path / "one", [small_corpus], readers.BEIR_CORPUS, minilm_path, num_shards=3)
  two = run(tmp_path / "two", [small_corpus], readers.BEIR_CORPUS, minilm_path, num_shards=3, batch_size=16,
            options=job.beam_options("DirectRunner", 2, "multi_processing", []))
  assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
  assert one["fingerprint"] == two["fingerprint"]


def test_pseudo_query_inputs(tmp_path, minilm_path, tokenizer):
  passages = ["The cat sat on the mat. It was warm.", "Rivers flow to the sea.", "Solar panels convert light."]
  queries = [["where did the cat sit", "was the mat warm"], ["where do rivers flow"], []]
  # jsonl form (what the generation job writes): "id"/"_id", "text"/"contents", "predicted_queries".
  jsonl = write_jsonl(tmp_path / "d2q.jsonl", [
      {"id": "p0", "text": passages[0], "predicted_queries": queries[0]},
      {"_id": "p1", "contents": passages[1], "predicted_queries": queries[1]},
      {"id": "p2", "text": passages[2], "predicted_queries": []}])
  # the published docTTTTTquery layout: collection TSV + one expansion file per sample, joined by line number.
  collection = tmp_path / "collection.tsv"
  collection.write_text("".join(f"p{i}\t{p}\n" for i, p in enumerate(passages)))
  for k in range(2):
    (tmp_path / f"predicted_queries_topk_sample{k:03d}.txt").write_text(
        "".join((q[k] if k < len(q) else "") + "\n" for q in queries))
  expansions = str(tmp_path / "predicted_queries_topk_sample0*.txt")
  for name, inputs, fmt_name, kwargs in [("jsonl", jsonl, "query_jsonl", {}),
                                         ("d2q", collection, "doctttttquery", {"expansions": expansions})]:
    file_format, kind = job.make_format(fmt_name, **kwargs)
    assert kind == "queries"
    stats = run(tmp_path / name, [inputs], file_format, minilm_path, pair_kind="queries")
    assert (stats["documents"], stats["records"], stats["documents_without_pair"]) == (3, 2, 1), name
    decoded = {records.parse_numpy(p)["doc_id"]: records.parse_numpy(p) for p in pp.iter_records(str(tmp_path / name))}
    assert set(decoded) == {"p0", "p1"}
    for i in (0, 1):
      expected = ref_ids(tokenizer, queries[i])
      assert decoded[f"p{i}"]["query_tokens"].tolist() == [t for q in expected for t in q], name
      assert decoded[f"p{i}"]["query_lengths"].tolist() == [len(q) for q in expected], name
      sentences = ref_ids(tokenizer, ref_sentences(passages[i]))
      assert decoded[f"p{i}"]["tokens"].tolist() == [t for s in sentences for t in s], name
  (tmp_path / "predicted_queries_topk_sample001.txt").write_text("only one line\n")
  file_format, _ = job.make_format("doctttttquery", expansions=expansions)
  with pytest.raises(Exception, match=r"sample001.txt:2: ends before the collection"):
    run(tmp_path / "short", [collection], file_format, minilm_path, pair_kind="queries")


def test_text_and_tfds_inputs(tmp_path, minilm_path, tokenizer, monkeypatch, scifact_docs):
  docs = [d for d in scifact_docs if len(d["text"]) > 1500][:3]
  blocks = tmp_path / "blocks.txt"
  blocks.write_text("\n\n".join(f"{d['title']}\n{d['text']}" for d in docs) + "\n")
  file_format, _ = job.make_format("text_blocks")
  stats = run(tmp_path / "blocks", [blocks], file_format, minilm_path)
  assert stats["documents"] == 3 and stats["records"] == 3

  import tensorflow as tf
  import tensorflow_datasets as tfds
  dataset = tf.data.Dataset.from_tensor_slices({"text": [d["text"] for d in docs] + [""],
                                                "title": [d["title"] for d in docs] + ["t"]})
  monkeypatch.setattr(tfds, "load", lambda name, split, data_dir, shuffle_files: dataset)
  file_format, _ = job.make_format("tfds", tfds_title_key="title")
  stats = run(tmp_path / "tfds", ["wiki/x:1.0.0"], file_format, minilm_path)
  assert stats["documents"] == 3 and stats["read"]["empty_skipped"] == 1
  decoded = [records.parse_numpy(p) for p in pp.iter_records(str(tmp_path / "tfds"))]
  by_id = {d["doc_id"]: d for d in decoded}
  sentences = [s for s in ref_ids(tokenizer, ref_sentences(f"{docs[1]['title']}\n{docs[1]['text']}")) if s]
  assert by_id["wiki/x:1.0.0/train:1"]["tokens"].tolist() == [t for s in sentences for t in s]


def test_dry_run_builds_a_dataflow_pipeline(tmp_path, minilm_path, small_corpus, capsys):
  result = job.preprocess(model_dir=None, input=str(small_corpus), output="gs://bucket/records",
                          input_format="beir_jsonl", tokenizer=minilm_path, runner="DataflowRunner",
                          pipeline_args=["--project=p", "--region=us-central1", "--temp_location=gs://bucket/tmp",
                                         "--setup_file=./setup.py"], dry_run=True)
  assert result["dry_run"] and result["options"]["runner"] == "DataflowRunner"
  assert result["options"]["project"] == "p" and result["options"]["temp_location"] == "gs://bucket/tmp"
  assert {"Read", "Encode", "WriteShards", "WriteCounts"} <= set(result["transforms"])


def test_object_store_paths(tmp_path, small_corpus, minilm_path):
  """Input, tokenizer and output on a non-local filesystem (TF's ram://, standing in for gs://) give the same
  shards as local paths: ArrayRecord goes through a local file and tf.io.gfile, the tokenizer is copied."""
  import tensorflow as tf
  root = f"ram://preprocess_{tmp_path.name}"
  tf.io.gfile.copy(str(small_corpus), f"{root}/in/corpus.jsonl")
  for name in tf.io.gfile.listdir(minilm_path):
    if not tf.io.gfile.isdir(f"{minilm_path}/{name}"):
      tf.io.gfile.copy(f"{minilm_path}/{name}", f"{root}/tokenizer/{name}")
  local = run(tmp_path / "local", [small_corpus], readers.BEIR_CORPUS, minilm_path, num_shards=2)
  remote = pp.run([f"{root}/in/corpus.jsonl"], readers.BEIR_CORPUS,
                  pp.PreprocessConfig(output=f"{root}/out", tokenizer=f"{root}/tokenizer", num_shards=2), in_memory())
  assert remote["fingerprint"] == local["fingerprint"]
  assert sorted(tf.io.gfile.listdir(f"{root}/out")) == sorted(p.name for p in (tmp_path / "local").iterdir())
  for name in shard_bytes(tmp_path / "local"):
    with tf.io.gfile.GFile(f"{root}/out/{name}", "rb") as f:
      assert f.read() == (tmp_path / "local" / name).read_bytes()


def test_benchmark_section_renders():
  from benchmarks import preprocess as section
  from benchmarks import report
  row = {"workers": 2, "mode": "multi_processing", "seconds": 10.0, "fixed_seconds": 4.0, "documents_per_s": 10.0,
         "steady_documents_per_s": 100 / 6, "tokens_per_s": 1.0, "steady_tokens_per_s": 2.0}
  result = {"num_docs": 100, "documents": {"mean_words": 1200, "min_words": 1000, "max_words": 1500},
            "rows": {"multi_processing/2": row}, "identical_output": True}
  text = report.render({"preprocess": result}, "python -m benchmarks --only preprocess")
  assert "Offline preprocessing" in text and "| multi_processing | 2 | 10.0 | 4.0 | 10.0 | 16.7 |" in text
  assert "10.0 / 16.7" in text  # the targets row


def test_synthetic_documents_have_msmarco_length(tmp_path, data_dir):
  from benchmarks.preprocess import synthetic_msmarco_docs
  words = synthetic_msmarco_docs(tmp_path / "d.tsv", 20)
  assert 1000 <= words["min_words"] and words["max_words"] <= 1500 + 200
  lines = (tmp_path / "d.tsv").read_text().splitlines()
  assert len(lines) == 20 and all(len(line.split("\t")) == 4 for line in lines)


@pytest.mark.slow
def test_sigkilled_launch_leaves_no_output_and_rerun_is_identical(tmp_path, small_corpus):
  """The job as a user starts it, killed with SIGKILL once its pipeline has started writing, then run again."""
  import os
  import signal
  import subprocess
  import sys
  import time
  repo = Path(__file__).resolve().parents[1]

  def command(out):
    return [sys.executable, "-m", "mote_jax.launch", "--gin_file=runs/preprocess_scifact.gin",
            f"--gin.INPUT={small_corpus}", f"--gin.OUTPUT={out}", "--gin.preprocess.num_shards=3",
            "--gin.preprocess.batch_size=8", "--gin.preprocess.direct_num_workers=1",
            "--gin.preprocess.direct_running_mode='in_memory'"]

  env = {**os.environ, "MOTE_JAX_MALLOC_TUNING": "0"}
  subprocess.run(command(tmp_path / "ref"), cwd=repo, env=env, check=True, capture_output=True, timeout=600)
  out = tmp_path / "out"
  proc = subprocess.Popen(command(out), cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (out / pp.TMP_DIR).exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(1.0)  # inside the pipeline
  assert proc.poll() is None, "the job finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "stats.json").exists() and not list(out.glob("records-*"))
  subprocess.run(command(out), cwd=repo, env=env, check=True, capture_output=True, timeout=600)
  assert shard_bytes(out) == shard_bytes(tmp_path / "ref") and len(shard_bytes(out)) == 3
  assert json.loads((out / "stats.json").read_text())["fingerprint"] == \
      json.loads((tmp_path / "ref" / "stats.json").read_text())["fingerprint"]


@pytest.mark.parametrize("run_file,input_name,extra", [
    ("preprocess_msmarco_docs.gin", "docs.tsv", []),
    ("preprocess_scifact.gin", "corpus.jsonl", []),
    ("preprocess_pseudo_queries.gin", "d2q.jsonl", []),
    ("preprocess_pseudo_queries.gin", "collection.tsv",
     ["--gin.preprocess.input_format='doctttttquery'", "--gin.preprocess.expansions=EXP"]),
])
def test_run_files_dry_run(tmp_path, run_file, input_name, extra):
  """Every preprocessing run file builds its pipeline through the launcher (dry run: nothing is executed)."""
  (tmp_path / input_name).write_text("x\n")
  (tmp_path / "predicted_queries_topk_sample000.txt").write_text("q\n")
  extra = [e.replace("EXP", str(tmp_path / "predicted_queries_topk_sample*.txt")) for e in extra]
  result = launch([f"--gin_file=runs/{run_file}", f"--gin.INPUT={tmp_path / input_name}",
                   f"--gin.OUTPUT={tmp_path / 'out'}", "--gin.preprocess.dry_run=True", *extra])
  assert result["dry_run"] and "Encode" in result["transforms"]
  assert result["options"]["direct_num_workers"] == 2
  assert result["options"]["direct_running_mode"] == "multi_processing"
  assert not (tmp_path / "out" / "stats.json").exists()
