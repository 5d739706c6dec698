"""Model selection during fine-tuning: a dev split evaluated from step 0, the best dev step shipped."""

import json

import pytest

from mote_jax.data.finetune import SamplingConfig
from mote_jax.jobs.finetune import DevSelection, ModelSource, finetune
from mote_jax.objectives.contrastive import ContrastiveConfig
from mote_jax.partitioning import MeshConfig
from mote_jax.retrieval.beir import load_beir, write_subset
from mote_jax.retrieval.encode import EncodeOptions
from mote_jax.training.optimizer import OptimizerConfig
from mote_jax.training.trainer import TrainerConfig


def _write_beir(out, data_dir, num_queries=24, num_dev=8, extra_docs=100):
  """A small BEIR dataset cut from SciFact train: its first queries, their judged documents and `extra_docs`
  others; the last `num_dev` queries are the dataset's own dev split (qrels/dev.tsv)."""
  train = load_beir(data_dir / "scifact", "train")
  queries = list(train.queries)[:num_queries]
  keep = {d for q in queries for d in train.qrels[q]}
  keep |= set([d for d in train.corpus.ids if d not in keep][:extra_docs])
  return write_subset(train, out, {"train": queries[:-num_dev], "dev": queries[-num_dev:]}, keep)


@pytest.mark.slow  # about 10 minutes on the shared 2-core machine (MiniLM compile and 3 corpus encodings)
def test_a_run_whose_dev_metric_falls_ships_the_step_0_params(tmp_path, data_dir, minilm_path):
  data = str(_write_beir(tmp_path / "data", data_dir))
  model_dir = tmp_path / "run"
  # all-MiniLM-L6-v2 retrieves this small corpus well from the start; a learning rate of 0.3 wrecks it in a step.
  result = finetune(
      str(model_dir), model=ModelSource(checkpoint=minilm_path), train_data=data, batch_size=8,
      sampling=SamplingConfig(negatives=1, query_max_len=32, passage_max_len=64),
      contrastive=ContrastiveConfig(temperature=0.05),
      optimizer=OptimizerConfig(learning_rate=0.3, total_steps=2),
      trainer=TrainerConfig(num_steps=2, eval_every=1, checkpoint_every=100, log_every=1, progress_bar=False),
      mesh=MeshConfig(data=-1), eval_data=data, eval_split="dev",
      encode_options=EncodeOptions(max_length=64, batch_size=32, progress=False), export_hf=False,
      dev=DevSelection(split="dev"))
  selection = result["selection"]
  curve = {row["step"]: row["metrics"]["nDCG@10"] for row in selection["curve"]}
  assert sorted(curve) == [0, 1, 2]
  assert curve[0] > 0.5 and curve[1] < curve[0] - 0.1 and curve[2] < curve[0] - 0.1  # it really fell
  assert selection["chosen_step"] == 0 and selection["step0_won"] and selection["final_step"] == 2
  assert selection["dev_split"].endswith("qrels/dev.tsv")  # the dataset's own dev split
  # The shipped params are step 0's: evaluated again on the dev split by the final evaluation, they score what
  # step 0 scored (the last params score curve[2]).
  assert result["eval"]["metrics"]["nDCG@10"] == pytest.approx(curve[0], abs=1e-6)
  report = (model_dir / "report.md").read_text()
  assert "Chosen step: **0**" in report and "step 0, the starting model, won" in report
  assert json.loads((model_dir / "report.json").read_text())["selection"]["chosen_step"] == 0
  logged = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged if "dev/nDCG@10" in r] == [0, 1, 2]
  # Only the chosen step keeps its corpus encoding.
  assert (model_dir / "dev" / "step-0" / "corpus").exists()
  assert not (model_dir / "dev" / "step-1" / "corpus").exists()
