"""The recipe's stream structure trains both experts: a few steps of runs/pretrain_cotmote.gin with a tiny model
(span pairs + pseudo-query pairs in both directions, QUERY_PAIR_SHARE) change the query expert's FFN, the passage
expert's FFN and the shared attention; with spans only the query expert stays exactly as initialised."""

import json
from pathlib import Path
from types import SimpleNamespace

import gin
import jax
import numpy as np
import pytest

from mote_jax import jobs  # noqa: F401  (registers the gin configurables)
from mote_jax.jobs.preprocess import preprocess
from mote_jax.jobs.pretrain import mixed_streams, pretrain

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "t5x_configs"
QUERY, PASSAGE = 0, 1  # expert index on the FFN's leading axis (model.config.EXPERTS)


@pytest.fixture(scope="module")
def corpus_and_queries(tmp_path_factory, data_dir, minilm_path):
  root = tmp_path_factory.mktemp("experts")
  docs = []
  with open(data_dir / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      if doc["text"].count(". ") >= 4:
        docs.append(doc)
      if len(docs) == 24:
        break
  (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  # Pseudo-queries in the generation job's output form: the title and two fragments stand in for T5 samples.
  queries = [{"id": d["_id"], "text": d["text"][:300],
              "predicted_queries": [d["title"].lower(), " ".join(d["text"].split()[:6]),
                                    " ".join(d["text"].split()[6:12])]} for d in docs]
  (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
  # The recipe reads records: the offline preprocessing job writes them, as a user would run it.
  for name, input_format in (("docs", "beir_jsonl"), ("queries", "query_jsonl")):
    preprocess(str(root / name), input=str(root / f"{name if name == 'queries' else 'corpus'}.jsonl"),
               output=str(root / name), input_format=input_format, tokenizer=minilm_path, max_len=32,
               min_pair_share=0.5, num_shards=2, direct_num_workers=1, direct_running_mode="in_memory")
  return root


def _run(root: Path, model_dir: Path, steps: int, share: float):
  bindings = [
      f"MODEL_DIR = '{model_dir}'", f"DOC_RECORDS = '{root / 'docs'}'", f"QUERY_RECORDS = '{root / 'queries'}'",
      f"NUM_STEPS = {steps}", "MAX_LEN = 32", "TEXTS_PER_STEP = 32", f"QUERY_PAIR_SHARE = {share}",
      "pretrain.init_checkpoint = None", "pretrain.export_hf = False",
      "spans/register_records_task.name = 'test_experts_spans'",
      "p2q/register_records_task.name = 'test_experts_queries.passage_to_query'",
      "q2p/register_records_task.name = 'test_experts_queries.query_to_passage'",
      "ObjectiveConfig.encoder_max_predictions = 16", "ObjectiveConfig.decoder_max_predictions = 24",
      "OptimizerConfig.warmup_steps = 1", "OptimizerConfig.learning_rate = 1e-3",
      "TrainerConfig.log_every = 1", "TrainerConfig.checkpoint_every = 100", "TrainerConfig.progress_bar = False",
  ]
  if share == 0:
    bindings.append("mixed_streams.query_tasks = []")
  gin.clear_config()
  gin.add_config_file_search_path(str(RUNS))
  try:
    gin.parse_config_files_and_bindings([str(RUNS / "runs" / "pretrain_cotmote.gin"), str(RUNS / "models" / "tiny.gin")],
                                        bindings, finalize_config=False)
    state = pretrain(str(model_dir))
  finally:
    gin.clear_config()
  return jax.device_get(state.params)


def _layers(params):
  return params["encoder"]["tower"]["encoder"]


def _changed(before, after):
  return not np.array_equal(np.asarray(before), np.asarray(after))


def test_mixed_streams_split_the_batch():
  spans, p2q, q2p = (SimpleNamespace(name=n) for n in ("spans", "p2q", "q2p"))
  streams = mixed_streams(spans, [p2q, q2p], texts_per_step=1024, query_pair_share=0.5)
  assert [(s.task, s.batch_size) for s in streams] == [(spans, 512), (p2q, 256), (q2p, 256)]
  streams = mixed_streams(spans, [p2q, q2p], texts_per_step=1024, query_pair_share=0.25)
  assert [s.batch_size for s in streams] == [768, 128, 128]
  assert [s.batch_size for s in mixed_streams(spans, [], texts_per_step=1024, query_pair_share=0.0)] == [1024]
  with pytest.raises(ValueError, match="no query_tasks"):
    mixed_streams(spans, [], texts_per_step=1024, query_pair_share=0.5)
  with pytest.raises(ValueError, match="without rows"):
    mixed_streams(spans, [p2q, q2p], texts_per_step=4, query_pair_share=0.1)  # one query row for two streams
  assert [s.task for s in mixed_streams(spans, [p2q, q2p], texts_per_step=8, query_pair_share=1.0)] == [p2q, q2p]


@pytest.fixture(scope="module")
def initial(corpus_and_queries, tmp_path_factory):
  """The parameters the job starts from (a 0-step run of the same config)."""
  return _run(corpus_and_queries, tmp_path_factory.mktemp("init"), 0, 0.5)


@pytest.mark.slow  # Beam-preprocessed records and a recipe-shaped run: ~60 s on 2 cores
def test_recipe_streams_train_both_experts_and_shared_attention(corpus_and_queries, initial, tmp_path):
  trained = _run(corpus_and_queries, tmp_path, 2, 0.5)
  metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  streams = {k.split("/")[0] for m in metrics for k in m if "/" in k}
  assert {"test_experts_spans", "test_experts_queries.passage_to_query",
          "test_experts_queries.query_to_passage"} <= streams, streams
  assert not any("mfu" in m for m in metrics)  # automatic peak lookup: the table has no CPU figure
  for layer in ("layer_0", "layer_1"):
    before, after = _layers(initial)[layer], _layers(trained)[layer]
    for name in ("intermediate_kernel", "output_kernel"):
      assert _changed(before["ffn"][name][QUERY], after["ffn"][name][QUERY]), (layer, name, "query expert")
      assert _changed(before["ffn"][name][PASSAGE], after["ffn"][name][PASSAGE]), (layer, name, "passage expert")
    for name in ("query_kernel", "key_kernel", "value_kernel", "output_kernel"):
      assert _changed(before["attention"][name], after["attention"][name]), (layer, name, "attention")


@pytest.mark.slow
def test_spans_only_leave_the_query_expert_untrained(corpus_and_queries, initial, tmp_path):
  """The control: the recipe before the query streams were on trains the passage expert only."""
  spans_only = _run(corpus_and_queries, tmp_path, 2, 0.0)
  for layer in ("layer_0", "layer_1"):
    before, after = _layers(initial)[layer]["ffn"], _layers(spans_only)[layer]["ffn"]
    assert not _changed(before["intermediate_kernel"][QUERY], after["intermediate_kernel"][QUERY])
    assert _changed(before["intermediate_kernel"][PASSAGE], after["intermediate_kernel"][PASSAGE])
