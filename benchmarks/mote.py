"""Section 2: the MoTE overhead, the same `Trainer` step in `mote` vs `siamese` tower mode (target <= 1.05x).

A `mote` call computes one expert, so the forward/backward FLOPs equal siamese's (XLA's cost analysis of both
compiled steps is reported); what differs is the parameter/optimiser state, which is larger. AdamW runs on the
routed expert only (`routing.skip_unrouted`, static routing; the variants section times the dynamic freeze).
"""

from __future__ import annotations

import gc

import jax

from benchmarks.common import load1, section_main, time_interleaved


def run(quick: bool = False, shape: str | None = None) -> dict:
  from benchmarks import data, jax_step

  shape_name = shape or ("tiny" if quick else "minilm")
  batch_size, length = (2, 32) if quick else (8, 128)
  warmup, repeats = (1, 2) if quick else (2, 9)
  result = {"shape": shape_name, "batch_size": batch_size, "length": length, "load1_before": load1()}
  built = jax_step.build_shape(shape_name)
  decoder = jax_step.decoder_params(built)
  batch = data.pair_batch(batch_size, length)
  objective = jax_step.production_objective(length)
  steps, info = {}, {}
  for mode in ("mote", "siamese"):
    step = jax_step.JaxStep(built, decoder, tower_mode=mode, objective=objective, batch_size=batch_size,
                            length=length)
    step(batch)
    params = sum(x.size for x in jax.tree.leaves(step.state.params))
    info[mode] = {"compile_s": round(step.compile_s, 2), "params_m": round(params / 1e6, 2),
                  "xla_cost": step.cost_analysis()}
    steps[mode] = (lambda s: lambda: s(batch))(step)
  timings = time_interleaved(steps, warmup=warmup, repeats=repeats)
  for mode in steps:
    info[mode].update(timings[mode])
  result["rows"] = info
  result["mote_over_siamese"] = timings["mote"]["median_s"] / timings["siamese"]["median_s"]
  per_round = [m / s for m, s in zip(timings["mote"]["times_s"], timings["siamese"]["times_s"])]
  result["mote_over_siamese_per_round_median"] = sorted(per_round)[len(per_round) // 2]
  result["load1_after"] = load1()
  del steps
  gc.collect()
  return result


if __name__ == "__main__":
  section_main("mote", run)
