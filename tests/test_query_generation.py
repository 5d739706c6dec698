"""docT5query generation on Beam: N sampled queries per passage with the docT5query sampling settings, identical
output for 1 and 2 workers and on re-runs, file:line errors. The model is a tiny random T5 saved by the test."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mote_jax.data import DataFormatError
from mote_jax.data.query_generation import GenerationConfig, Passage, parse_line, run_pipeline

REPO = Path(__file__).resolve().parents[1]

PASSAGES = [
    ("d1", "Vitamin D", "Vitamin D deficiency is common in winter at high latitudes."),
    ("d2", "", "Aspirin reduces the risk of a second heart attack."),
    ("d3", "", "Statins lower LDL cholesterol in most patients."),
    ("d4", "Sleep", "Short sleep is associated with higher blood pressure."),
    ("d5", "", "Exercise improves insulin sensitivity within days."),
]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory, minilm_path) -> str:
  """A randomly initialised 2-layer T5 (d_model 32) over the bert-base-uncased vocabulary, with that tokenizer."""
  import torch
  from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration
  tokenizer = AutoTokenizer.from_pretrained(minilm_path)
  config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id)
  torch.manual_seed(0)
  model = T5ForConditionalGeneration(config)
  path = tmp_path_factory.mktemp("tiny_t5")
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return str(path)


def _write_corpus(path: Path, passages=PASSAGES) -> Path:
  path.write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in passages))
  return path


def _read_output(directory: Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(directory.glob("queries-*.jsonl"))}


def _records(directory: Path) -> list[dict]:
  return [json.loads(line) for blob in _read_output(directory).values() for line in blob.decode().splitlines()]


def _config(model, **kwargs) -> GenerationConfig:
  return GenerationConfig(model=model, **{"num_queries": 3, "max_new_tokens": 6, "batch_size": 2, "seed": 7,
                                          **kwargs})


ONE_WORKER = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def test_queries_are_model_generate_with_docT5query_sampling(tmp_path, tiny_t5):
  import torch
  from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
  corpus = _write_corpus(tmp_path / "corpus.jsonl")
  stats = run_pipeline(str(corpus), str(tmp_path / "out"), _config(tiny_t5), passages_per_shard=3,
                       pipeline_args=ONE_WORKER)
  assert stats == {"shards_written": 2, "shards_reused": 0, "passages": 5, "queries": 15, "empty_skipped": 0}
  records = _records(tmp_path / "out")
  assert [r["id"] for r in records] == [p[0] for p in PASSAGES]
  assert all(len(r["predicted_queries"]) == 3 for r in records)
  assert records[0]["title"] == "Vitamin D" and "title" not in records[1]
  assert [r["text"] for r in records] == [p[2] for p in PASSAGES]

  # The reference: model.generate called directly with docT5query's sampling on the same batches (two passages,
  # cut at the shard boundary after three), the torch RNG seeded from (seed, batch ids) as documented.
  tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
  model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()

  def direct(batch, **sampling):
    inputs = tokenizer([f"{t} {x}" if t else x for _, t, x in batch], padding=True, truncation=True,
                       max_length=512, return_tensors="pt")
    seed = int.from_bytes(hashlib.sha256("\0".join(["7", *[i for i, _, _ in batch]]).encode()).digest()[:8],
                          "little") & (2 ** 63 - 1)
    torch.manual_seed(seed)
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], num_return_sequences=3, max_new_tokens=6, **sampling)
    texts = [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return [texts[k * 3:(k + 1) * 3] for k in range(len(batch))]

  batches = [PASSAGES[0:2], PASSAGES[2:3], PASSAGES[3:5]]
  expected = [q for b in batches for q in direct(b, do_sample=True, top_k=25, top_p=0.95)]
  assert [r["predicted_queries"] for r in records] == expected
  # The sampling settings matter at this size: other top-k / top-p draw other queries from the same seed.
  other = [q for b in batches for q in direct(b, do_sample=True, top_k=50, top_p=1.0)]
  assert other != expected
  assert len({q for r in records for q in r["predicted_queries"]}) > 5  # sampled, not one greedy string


@pytest.mark.slow  # three Beam runs, one with two worker processes: ~35 s on 2 cores
def test_same_output_for_one_and_two_workers_and_after_an_interruption(tmp_path, tiny_t5):
  tsv = tmp_path / "collection.tsv"
  tsv.write_text("".join(f"{100 + k}\tpassage number {k} about topic {k % 3} and its findings\n" for k in range(9)))
  config = _config(tiny_t5, num_queries=2)
  run_pipeline(str(tsv), str(tmp_path / "one"), config, passages_per_shard=4, pipeline_args=ONE_WORKER)
  one = _read_output(tmp_path / "one")
  assert list(one) == ["queries-0000-000000.jsonl", "queries-0000-000001.jsonl", "queries-0000-000002.jsonl"]
  assert [r["id"] for r in _records(tmp_path / "one")] == [str(100 + k) for k in range(9)]

  # The job through the launcher, two DirectRunner worker processes.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, "-m", "mote_jax.launch", "--gin_file=runs/generate_queries.gin",
             f"--gin.INPUT={tsv}", f"--gin.OUTPUT={tmp_path / 'two'}", f"--gin.QG_MODEL={tiny_t5}",
             "--gin.GenerationConfig.num_queries=2", "--gin.GenerationConfig.max_new_tokens=6",
             "--gin.GenerationConfig.batch_size=2", "--gin.GenerationConfig.seed=7",
             "--gin.generate_queries.passages_per_shard=4", "--gin.generate_queries.num_workers=2",
             "--gin.GenerationConfig.torch_threads=1"]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert _read_output(tmp_path / "two") == one
  assert json.loads((tmp_path / "two" / "stats.json").read_text())["queries"] == 18

  # An interrupted run: one shard missing, a stray temporary file. The re-run writes that shard only.
  (tmp_path / "one" / "queries-0000-000001.jsonl").unlink()
  (tmp_path / "one" / "queries-0000-000002.jsonl.tmp-dead").write_text("partial")
  stats = run_pipeline(str(tsv), str(tmp_path / "one"), config, passages_per_shard=4, pipeline_args=ONE_WORKER)
  assert stats == {"shards_written": 1, "shards_reused": 2, "passages": 9, "queries": 18, "empty_skipped": 0}
  assert _read_output(tmp_path / "one") == one

  # Other settings into the same directory: an error naming the setting.
  with pytest.raises(ValueError, match="num_queries: 2 then, 3 now"):
    run_pipeline(str(tsv), str(tmp_path / "one"), _config(tiny_t5), passages_per_shard=4, pipeline_args=ONE_WORKER)


def test_bad_input_names_file_and_line(tmp_path, tiny_t5):
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text('{"_id": "e", "text": " "}\n{"_id": "a", "text": "fine"}\n')
  stats = run_pipeline(str(corpus), str(tmp_path / "ok"), _config(tiny_t5), pipeline_args=ONE_WORKER)
  assert (stats["passages"], stats["empty_skipped"]) == (1, 1)
  assert [r["id"] for r in _records(tmp_path / "ok")] == ["a"]
  corpus.write_text('{"_id": "a", "text": "fine"}\n\n{"_id": "b", "text": "broken"\n')
  with pytest.raises(Exception, match=r"corpus\.jsonl:3: invalid JSON"):
    run_pipeline(str(corpus), str(tmp_path / "out"), _config(tiny_t5), pipeline_args=ONE_WORKER)
  assert not list((tmp_path / "out").glob("queries-*"))
  with pytest.raises(DataFormatError, match=r"c\.tsv:4: expected 'pid<TAB>passage'"):
    parse_line(b"no tab here\n", "msmarco_tsv", "c.tsv:4")
  with pytest.raises(DataFormatError, match=r"c\.jsonl:2: missing field 'text'"):
    parse_line(b'{"_id": "x", "body": "y"}', "beir_jsonl", "c.jsonl:2")
  with pytest.raises(DataFormatError, match=r"c\.jsonl:5: field 'text' is a int, expected str"):
    parse_line(b'{"_id": "x", "text": 3}', "beir_jsonl", "c.jsonl:5")
  with pytest.raises(DataFormatError, match=r"c\.jsonl:6: missing field '_id' or 'id'"):
    parse_line(b'{"text": "y"}', "beir_jsonl", "c.jsonl:6")
  assert parse_line(b'{"id": 7, "title": " T ", "text": " y "}', "beir_jsonl", "c.jsonl:7") == \
      Passage("7", "T", "y")
  (tmp_path / "empty.jsonl").write_text("\n\n")
  with pytest.raises(ValueError, match="empty corpus"):
    run_pipeline(str(tmp_path / "empty.jsonl"), str(tmp_path / "out2"), _config(tiny_t5), pipeline_args=ONE_WORKER)
  with pytest.raises(FileNotFoundError, match="no file matches"):
    run_pipeline(str(tmp_path / "missing*.tsv"), str(tmp_path / "out3"), _config(tiny_t5), pipeline_args=ONE_WORKER)
