"""Section 5: the MiniLM-L6 pre-training step (production objective, fp32) vs batch size and sequence length.

Each configuration runs in its own process so that its peak RSS (`getrusage` maxrss) is its own; XLA's memory
analysis of the compiled step (arguments, outputs, temporaries) is reported beside it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import load1, peak_rss_mb, run_module, section_main, time_interleaved

FULL = [(4, 128), (8, 128), (16, 128), (32, 128), (8, 64), (8, 256), (8, 512)]
QUICK = [(2, 32), (4, 32)]


def one(batch_size: int, length: int, shape: str, model_overrides: dict | None = None, warmup: int = 1,
        repeats: int = 5) -> dict:
  from benchmarks import jax_step

  step, batch = jax_step.production_step(shape, batch_size, length, model_overrides=model_overrides)
  p_enc, p_dec = step.objective.encoder_max_predictions, step.objective.decoder_max_predictions
  rss_before = peak_rss_mb()
  step.compile(batch)
  xla_memory = step.memory_analysis()
  step(batch)
  t = time_interleaved({"step": lambda: step(batch)}, warmup=warmup, repeats=repeats)["step"]
  return dict(t, batch_size=batch_size, length=length, tokens_per_s=2 * batch_size * length / t["median_s"],
              pairs_per_s=batch_size / t["median_s"], rss_before_compile_mb=rss_before,
              peak_rss_mb=peak_rss_mb(), xla_memory=xla_memory, compile_s=round(step.compile_s, 1),
              model_gflops_per_s=step.flops / t["median_s"] / 1e9, max_predictions=[p_enc, p_dec])


def run(quick: bool = False, single: list | None = None, shape: str | None = None,
        model_overrides: dict | None = None) -> dict:
  shape = shape or ("tiny" if quick else "minilm")
  if single is not None:
    return one(*single, shape=shape, model_overrides=model_overrides, warmup=1, repeats=2 if quick else 5)
  configs = QUICK if quick else FULL
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, (batch_size, length) in enumerate(configs):
      out = run_module("benchmarks.scaling", Path(tmp) / f"{i}.json", quick=quick,
                       options={"single": [batch_size, length], "shape": shape})
      out.setdefault("batch_size", batch_size)
      out.setdefault("length", length)
      rows.append(out)
  return {"shape": shape, "rows": rows, "load1_after": load1()}


if __name__ == "__main__":
  section_main("scaling", run)
