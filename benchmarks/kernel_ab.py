"""Section "kernel_ab": a fresh A/B of each CPU kernel choice against plain XLA, and whether the CPU set is right.

`python -m benchmarks --only kernel_ab` (run it on a quiet machine). The MiniLM-L6 pre-training step (B=8, L=128,
the production objective) with `KernelConfig.for_platform('cpu')` as the baseline, timed round-robin in one
process against the same step with the whole plain-XLA set (`kernels-xla`) and with each operation switched to
its other implementation (`benchmarks.variants`: `dense-*`, `dropout-*`, `clip-*`). For each operation the verdict
compares the CPU set's choice with the alternative: a choice that differs from plain XLA belongs in the CPU set only
if it is at least `KEEP` (2%) faster; where the CPU set already uses XLA's choice, the alternative would belong in
it only at that gain.
"""

from __future__ import annotations

from benchmarks import variants
from benchmarks.common import section_main

KEEP = 1.02
KERNEL_VARIANTS = ("kernels-xla", "dense", "dropout", "clip")
FIELDS = {"dense": "dense", "dropout": "dropout", "clip": "grad_clip"}


def verdicts(result: dict) -> dict[str, dict]:
  """Per operation: the CPU set's choice, the alternative, the CPU choice's speed over the alternative (> 1: the
  CPU choice is faster) and whether the set is consistent with the >= 2% rule."""
  from mote_jax import kernels
  out = {}
  for name, field in FIELDS.items():
    chosen, plain = getattr(kernels.CPU, field), getattr(kernels.XLA, field)
    row = next((r for n, r in result["rows"].items() if n.startswith(f"{name}-")), None)
    if row is None:
      continue
    alternative = next(n for n in result["rows"] if n.startswith(f"{name}-")).split("-", 1)[1]
    gain = 1.0 / row["speedup_vs_baseline"]  # baseline (the CPU choice) over the alternative
    if chosen != plain:  # a CPU-specific kernel: it must earn its place
      ok, rule = gain >= KEEP, f"{chosen} kept only if >= {KEEP}x faster than {plain}"
    else:  # the CPU set uses plain XLA's choice: the alternative must not be >= 2% faster
      ok, rule = 1.0 / gain < KEEP, f"{alternative} would be added only if >= {KEEP}x faster than {plain}"
    out[name] = {"cpu_set": chosen, "plain_xla": plain, "alternative": alternative,
                 "cpu_choice_speed_over_alternative": gain, "consistent": ok, "rule": rule}
  if "kernels-xla" in result["rows"]:
    out["whole set"] = {"cpu_set": "CPU", "plain_xla": "XLA", "alternative": "XLA",
                        "cpu_choice_speed_over_alternative": 1.0 / result["rows"]["kernels-xla"]["speedup_vs_baseline"],
                        "consistent": None, "rule": "reference row"}
  return out


def run(quick: bool = False, shape: str | None = None) -> dict:
  import jax
  result = variants.run(quick=quick, variants=KERNEL_VARIANTS, shape=shape, loop=False)
  result["platform"] = jax.default_backend()
  result["verdicts"] = verdicts(result)
  return result


if __name__ == "__main__":
  section_main("kernel_ab", run)
