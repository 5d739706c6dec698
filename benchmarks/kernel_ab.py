"""Section "kernel_ab": a fresh A/B of each CPU kernel choice against plain XLA, and whether the CPU set is right.

`python -m benchmarks --only kernel_ab` (run it on a quiet machine). Two steps the jobs run, each with
`KernelConfig.for_platform('cpu')` as the baseline, timed round-robin in one process against the same step with
the whole plain-XLA set (`kernels-xla`) and with each operation switched to its other implementation
(`benchmarks.variants`: `dense-*`, `dropout-*`, `clip-*`):
  pretrain   the MiniLM-L6 pre-training step (B=8, L=128, the production objective; `benchmarks.variants`)
  finetune   the contrastive fine-tuning step at `runs/finetune_scifact_cpu.gin`'s shape (16 queries x 64 tokens,
             2 passages each x 256 tokens; `benchmarks.finetune_step`), each alternative timed in its own pair
             against the baseline so that at most two compiled steps are held at once
Each comparison is the median over rounds of the per-round ratio (the two runs of a round saw the same load), with
a bootstrap 95% interval. For each operation the verdict takes the geometric mean of that ratio over the two steps:
a choice that differs from plain XLA belongs in the CPU set only if it is at least `KEEP` (2%) faster; where the
CPU set already uses XLA's choice, the alternative would belong in it only at that gain.
"""

from __future__ import annotations

import gc
import math

from benchmarks import variants as variants_lib
from benchmarks.common import load1, paired_speedup, section_main, time_interleaved

KEEP = 1.02
KERNEL_VARIANTS = ("kernels-xla", "dense", "dropout", "clip")
FIELDS = {"dense": "dense", "dropout": "dropout", "clip": "grad_clip"}
STEPS = ("pretrain", "finetune")


def verdicts(steps: dict[str, dict]) -> dict[str, dict]:
  """Per operation: the CPU set's choice, the alternative, the CPU choice's speed over the alternative on each
  step and their geometric mean (> 1: the CPU choice is faster), and whether the set is consistent with the
  >= 2% rule. `steps`: {step name: {"rows": {variant row name: row with `paired_speedup_vs_baseline`}}}."""
  from mote_jax import kernels
  out = {}
  for name, field in [*FIELDS.items(), ("whole set", None)]:
    prefix = "kernels-xla" if field is None else f"{name}-"
    per_step = {}
    for step, result in steps.items():
      row = next(((n, r) for n, r in result.get("rows", {}).items() if n.startswith(prefix)), None)
      if row is not None:
        p = row[1]["paired_speedup_vs_baseline"]
        per_step[step] = {"alternative": row[0].split("-", 1)[1], "gain": 1.0 / p["median"],
                          "ci95": [1.0 / p["ci95"][1], 1.0 / p["ci95"][0]] if "ci95" in p else None}
    if not per_step:
      continue
    gain = math.exp(sum(math.log(s["gain"]) for s in per_step.values()) / len(per_step))
    alternative = next(iter(per_step.values()))["alternative"]
    if field is None:
      chosen, plain, ok, rule = "CPU", "XLA", None, "reference row"
    else:
      chosen, plain = getattr(kernels.CPU, field), getattr(kernels.XLA, field)
      if chosen != plain:  # a CPU-specific kernel: it must earn its place
        ok, rule = gain >= KEEP, f"{chosen} kept only if >= {KEEP}x faster than {plain}"
      else:  # the CPU set uses plain XLA's choice: the alternative must not be >= 2% faster
        ok, rule = 1.0 / gain < KEEP, f"{alternative} would be added only if >= {KEEP}x faster than {plain}"
    out[name] = {"cpu_set": chosen, "plain_xla": plain, "alternative": alternative, "per_step": per_step,
                 "cpu_choice_speed_over_alternative": gain, "consistent": ok, "rule": rule}
  return out


def finetune_ab(quick: bool = False, variants=KERNEL_VARIANTS, repeats: int | None = None, log=print) -> dict:
  """The fine-tuning step with the baseline kernel set against each variant, one pair at a time."""
  import jax

  from benchmarks import finetune_step
  from mote_jax.kernels import resolve
  shape = "tiny" if quick else "scifact"
  repeats = repeats or (2 if quick else 7)
  dims = finetune_step.SHAPES[shape]
  directory = finetune_step.checkpoint_dir(shape)
  batch = finetune_step.finetune_batch(**dims, max_groups=finetune_step.MAX_GROUPS.get(shape))
  baseline = resolve(None)
  base = finetune_step.JaxFinetuneStep(directory, dims, kernels=baseline)
  result = {"shape": shape, **dims, "repeats": repeats, "rows": {}, "baseline_kernels": vars(baseline)}
  result["first_loss"] = base(batch)  # compiles
  for requested in variants:
    name, options = variants_lib.variant_options(requested, baseline)
    step = finetune_step.JaxFinetuneStep(directory, dims, kernels=options["kernels"])
    first_loss = step(batch)
    timings = time_interleaved({"baseline": lambda: base(batch), name: lambda: step(batch)}, warmup=1,
                               repeats=repeats, log=log)
    result["rows"][name] = dict(timings[name], baseline=timings["baseline"], first_loss=first_loss,
                                speedup_vs_baseline=timings["baseline"]["median_s"] / timings[name]["median_s"],
                                paired_speedup_vs_baseline=paired_speedup(timings[name], timings["baseline"]))
    log(f"[bench] finetune {name}: {result['rows'][name]['paired_speedup_vs_baseline']}")
    del step
    gc.collect()
  del base
  gc.collect()
  result["platform"] = jax.default_backend()
  return result


def run(quick: bool = False, shape: str | None = None, repeats: int | None = None, finetune_repeats=None,
        steps=STEPS) -> dict:
  """`repeats`: rounds of the pre-training A/B (default 15); `finetune_repeats`: rounds of each fine-tuning pair
  (default 7); `steps`: which of `STEPS` to measure."""
  import jax
  if "pretrain" in steps:
    result = variants_lib.run(quick=quick, variants=KERNEL_VARIANTS, shape=shape, loop=False,
                              repeats=repeats or (2 if quick else 15))
  else:
    from mote_jax.kernels import resolve
    result = {"rows": {}, "baseline_kernels": vars(resolve(None)), "load1_before": load1()}
  result["platform"] = jax.default_backend()
  if "finetune" in steps:
    result["finetune"] = finetune_ab(quick=quick, repeats=finetune_repeats)
  measured = {"pretrain": result} if "pretrain" in steps else {}
  if "finetune" in steps:
    measured["finetune"] = result["finetune"]
  result["verdicts"] = verdicts(measured)
  result["load1_after"] = load1()
  return result


if __name__ == "__main__":
  section_main("kernel_ab", run)
