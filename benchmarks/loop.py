"""Section: the quickstart's pre-training loop with its input pipeline against its jitted step alone.

At the quickstart's pre-training shape (all-MiniLM-L6-v2 as a MoTE encoder, 8 rows of 128 ids a step = 4 span
pairs in both directions, 2-layer decoder, 48 / 72 masked predictions; runs/quickstart_scifact.gin):

  step   the jitted `Trainer` step (`benchmarks.jax_step.JaxStep`) on one batch held in host memory, dispatched
         `timed` times back to back (no input pipeline): the step's own rate
  loop   the real job: `jobs.pretrain.pretrain` (Trainer.train) reading the records through the online pipeline
         (`data.online.RecordBatches`), as the quickstart does; steps/s of the steps after `warmup`, from the
         trainer's own `steps_per_sec` rows in metrics.jsonl (the first window holds the compilation)

  input  the records pipeline alone (`RecordBatches`, numpy batches, no model): the host work the loop adds
         per step, which the trainer overlaps with the running step (it reads step t - 1's counter only after
         dispatching step t)

Records: the first `documents` of the SciFact corpus, preprocessed by the Beam job (`jobs.preprocess`, one
in-memory worker) into a temporary directory. Reported: both rates and loop / step (the target is >= 0.90).
The step rounds run before and after the loop, so a load change during the section shows in their spread.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import DATA_DIR, load1, section_main


def _corpus_subset(directory: Path, documents: int) -> str:
  path = directory / "corpus.jsonl"
  with open(DATA_DIR / "scifact" / "corpus.jsonl", encoding="utf-8") as src, open(path, "w",
                                                                                   encoding="utf-8") as dst:
    for k, line in enumerate(src):
      if k >= documents:
        break
      dst.write(line)
  return str(path)


def _step_rate(step, batch, rounds: int, timed: int) -> list[float]:
  import jax
  rates = []
  for _ in range(rounds):
    started = time.perf_counter()
    for _ in range(timed):
      metrics = step.dispatch(batch)
    jax.block_until_ready(metrics)
    rates.append(timed / (time.perf_counter() - started))
  return rates


def run(quick: bool = False) -> dict:
  from benchmarks import jax_step
  from benchmarks.data import minilm_path
  from mote_jax.data.online import register_records_task
  from mote_jax.jobs import preprocess as preprocess_job
  from mote_jax.jobs import pretrain as pretrain_job
  from mote_jax.objectives import ObjectiveConfig
  from mote_jax.training.optimizer import OptimizerConfig
  from mote_jax.training.trainer import TrainerConfig

  rows, length = 8, 128
  documents, warmup, timed, rounds = (200, 2, 4, 1) if quick else (400, 10, 20, 2)
  result = {"load1_before": load1(), "rows_per_step": rows, "max_len": length, "documents": documents,
            "warmup_steps": warmup, "timed_steps": timed, "model": "all-MiniLM-L6-v2 (mote)"}
  with tempfile.TemporaryDirectory(prefix="mote_loop_bench_") as tmp:
    tmp = Path(tmp)
    started = time.perf_counter()
    stats = preprocess_job.preprocess(
        str(tmp / "records"), input=_corpus_subset(tmp, documents), output=str(tmp / "records"),
        input_format="beir_jsonl", tokenizer=minilm_path(), max_len=length, direct_num_workers=1,
        direct_running_mode="in_memory")
    result["preprocess_s"] = time.perf_counter() - started
    result["records"] = stats["records"]
    task = register_records_task("bench.loop.spans", str(tmp / "records"), vocab=minilm_path(), max_len=length,
                                 overwrite=True)
    objective = jax_step.production_objective(length)
    optimizer = OptimizerConfig(learning_rate=2e-5, warmup_steps=4, total_steps=warmup + timed)

    shape = jax_step.build_shape("minilm", tmp)
    step = jax_step.JaxStep(shape, jax_step.decoder_params(shape, objective), objective=objective,
                            batch_size=rows, length=length, optimizer=optimizer)
    batch = task.batch_at(0, batch_size=rows, seed=0)
    step.compile(batch)
    _step_rate(step, batch, 1, warmup)
    step_rates = _step_rate(step, batch, rounds, timed)

    # The input alone: the host work the loop adds per step (batches from the records, as numpy).
    from mote_jax.data.online import RecordBatches
    with RecordBatches(task, batch_size=rows, seed=0) as stream:
      next(stream)
      started = time.perf_counter()
      for _ in range(10 * timed):
        next(stream)
      input_rate = 10 * timed / (time.perf_counter() - started)

    run_dir = tmp / "run"
    started = time.perf_counter()
    pretrain_job.pretrain(
        str(run_dir), streams=[pretrain_job.PretrainStream(task, rows)], init_checkpoint=minilm_path(),
        tower_mode="mote", objective=objective, optimizer=optimizer,
        trainer=TrainerConfig(num_steps=warmup + timed, log_every=warmup, eval_every=0,
                              checkpoint_every=10**9, async_checkpointing=False, progress_bar=False),
        export_hf=False)
    result["loop_job_s"] = time.perf_counter() - started
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in logged if "steps_per_sec" in r and r["step"] > warmup]
    loop_seconds = sum(warmup / r["steps_per_sec"] for r in windows)
    loop_rate = warmup * len(windows) / loop_seconds
    step_rates += _step_rate(step, batch, rounds, timed)

  step_rate = statistics.median(step_rates)
  result.update(input_alone_steps_per_s=input_rate, step_steps_per_s=step_rate, step_steps_per_s_all=step_rates, loop_steps_per_s=loop_rate,
                loop_windows_steps_per_s=[r["steps_per_sec"] for r in windows],
                loop_vs_step=loop_rate / step_rate, load1_after=load1())
  return result


if __name__ == "__main__":
  section_main("loop", run)
