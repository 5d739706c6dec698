"""The quickstart's pre-training input: the SciFact corpus -> records by the Beam job (made once, reused), then
span pairs from the records through the online pipeline of the recipe."""

import functools
import json

import numpy as np
import pytest


def test_quickstart_pretrains_from_records_made_once(tmp_path, data_dir, minilm_path):
  from mote_jax.data.online import RecordPairTask, register_records_task
  from mote_jax.jobs import preprocess as preprocess_job
  from mote_jax.jobs import quickstart

  corpus = tmp_path / "corpus.jsonl"
  with open(data_dir / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
    lines = [next(f) for _ in range(40)]
  corpus.write_text("".join(lines))
  calls = []

  def preprocess_fn(model_dir, **kwargs):
    calls.append(kwargs)
    return preprocess_job.preprocess(model_dir, input_format="beir_jsonl", direct_num_workers=1,
                                     direct_running_mode="in_memory", **kwargs)

  out = tmp_path / "records"
  made = quickstart.corpus_records(out, str(corpus), tokenizer=minilm_path, max_len=128,
                                   preprocess_fn=preprocess_fn)
  stats = json.loads((out / "stats.json").read_text())
  assert len(calls) == 1 and stats["documents"] == 40 and stats["records"] > 30
  before = sorted(p.stat().st_mtime_ns for p in out.glob("records-*"))
  assert quickstart.corpus_records(out, str(corpus), tokenizer=minilm_path, max_len=128,
                                   preprocess_fn=preprocess_fn) == made
  assert len(calls) == 1 and sorted(p.stat().st_mtime_ns for p in out.glob("records-*")) == before  # reused
  quickstart.corpus_records(out, str(corpus), tokenizer=minilm_path, max_len=96, preprocess_fn=preprocess_fn)
  assert len(calls) == 2 and json.loads((out / "stats.json").read_text())["settings"]["max_len"] == 96
  # Records of an older format are neither reused nor read.
  stats = json.loads((out / "stats.json").read_text())
  del stats["settings"]["record_format"]
  (out / "stats.json").write_text(json.dumps(stats))
  with pytest.raises(ValueError, match="records of format 1"):
    register_records_task("test.quickstart.old", str(out), vocab=minilm_path, max_len=96)
  quickstart.corpus_records(out, str(corpus), tokenizer=minilm_path, max_len=96, preprocess_fn=preprocess_fn)
  assert len(calls) == 3

  # What the quickstart builds from them: the recipe's span task, 8 rows (4 pairs, both directions) of 96 ids.
  task = functools.partial(register_records_task, vocab=minilm_path, overwrite=True)(
      "test.quickstart.spans", str(out), max_len=96)
  assert isinstance(task, RecordPairTask) and task.rows_per_example == 2
  batch = task.batch_at(0, batch_size=8, seed=0)
  assert batch["anchor_input_ids"].shape == (8, 96)
  # Row 2k + 1 is row 2k's pair reversed: its anchor is row 2k's context (before masking: same attention).
  np.testing.assert_array_equal(batch["anchor_attention_mask"][1::2], batch["context_attention_mask"][0::2])


def test_quickstart_config_binds_the_records_path():
  import gin
  from conftest import REPO
  from mote_jax import jobs  # noqa: F401
  gin.clear_config()
  gin.add_config_file_search_path(str(REPO / "t5x_configs"))
  try:
    gin.parse_config_files_and_bindings([str(REPO / "t5x_configs" / "runs" / "quickstart_scifact.gin")],
                                        ["MODEL_DIR='/tmp/x'"], finalize_config=False)
    assert gin.query_parameter("quickstart.span_task_fn").selector.endswith("register_records_task")
    assert gin.query_parameter("preprocess.input_format") == "beir_jsonl"
    assert gin.query_parameter("spans/register_records_task.both_directions") is True
    try:
      gin.query_parameter("pretrain.streams")
      bound = True
    except ValueError:
      bound = False
    assert not bound  # the quickstart passes the records stream itself
  finally:
    gin.clear_config()
