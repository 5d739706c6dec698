"""Section "variants": kernel sets and other choices on the JAX MiniLM-L6 pre-training step (B=8, L=128), in process.

Every variant is the real `Trainer` step (built by `training.builder.build_trainer`, as the jobs build it) with one
change, selected through `KernelConfig` or a configuration field (nothing is patched), timed round-robin against
the baseline: this platform's default kernel set (`KernelConfig.for_platform`), mote, fp32, MLM logits at masked
positions 48/72, dropout 0.1 on hidden states and attention probabilities.

  kernels-xla            the plain-XLA kernel set (`kernels.XLA`: autodiff products, `jax.random` dropout,
                         `optax` clip, einsum attention), i.e. the accelerators' set without the fused attention
  dense-xla / dense-cpu_gemm       the dense products the other way than the baseline
  dropout-jax_random / dropout-hashed   the dropout bits the other way
  clip-optax / clip-scalar         the gradient clip the other way
  dynamic-expert-freeze  dynamic routing: AdamW over every parameter, then experts whose gradient is all zero frozen
                         (baseline: static routing, AdamW on the routed slices only)
  no-attention-dropout   attention_dropout=0 (the reference for the attention-kernel variant)
  attention-dot_product  `jax.nn.dot_product_attention` (attention dropout 0: the fused call has none)
  no-dropout             hidden_dropout=attention_dropout=0: what the dropout masks still cost
  bf16                   compute dtype bfloat16 (params and optimizer fp32, logits/softmax/LayerNorm fp32)
  remat                  rematerialise each layer in the backward pass
  scan                   `nn.scan` over layers instead of a Python loop
and the training-loop overlap experiment: K steps that each wait for the step's result vs K steps dispatched
back to back with the next host batch prepared while the previous step runs (what `Trainer.train` does between
log and checkpoint steps).
"""

from __future__ import annotations

import gc
import time

import jax

from benchmarks.common import load1, paired_speedup, section_main, summary, time_interleaved

ALL = ("kernels-xla", "dense", "dropout", "clip", "dynamic-expert-freeze", "no-attention-dropout",
       "attention-dot_product", "no-dropout", "bf16", "remat", "scan")
_OTHER = {"dense": ("xla", "cpu_gemm"), "dropout": ("jax_random", "hashed"), "clip": ("optax", "scalar")}


def variant_options(name: str, baseline) -> tuple[str, dict]:
  """(row name, `JaxStep` keyword arguments) of variant `name` against the `baseline` KernelConfig."""
  from mote_jax import kernels
  if name == "baseline":
    return name, {"kernels": baseline}
  if name == "kernels-xla":
    return name, {"kernels": kernels.XLA}
  if name in _OTHER:
    field = "grad_clip" if name == "clip" else name
    a, b = _OTHER[name]
    other = b if getattr(baseline, field) == a else a
    return f"{name}-{other}", {"kernels": baseline.replace(**{field: other})}
  if name == "dynamic-expert-freeze":
    return name, {"kernels": baseline, "static_routing": False}
  if name.startswith("attention-"):
    return name, {"kernels": baseline.replace(attention=name.split("-", 1)[1]),
                  "model_overrides": {"attention_dropout": 0.0}}
  overrides = {"no-attention-dropout": {"attention_dropout": 0.0},
               "no-dropout": {"attention_dropout": 0.0, "hidden_dropout": 0.0}, "bf16": {"dtype": "bfloat16"},
               "remat": {"remat": True}, "scan": {"scan_layers": True}}
  if name not in overrides:
    raise ValueError(f"variant {name!r}: expected one of {ALL}")
  return name, {"kernels": baseline, "model_overrides": overrides[name]}


def run(quick: bool = False, variants=None, shape: str | None = None, loop: bool = True,
        repeats: int | None = None) -> dict:
  """`repeats`: timed rounds (default 2 with `quick`, else 5)."""
  from benchmarks import data, jax_step

  shape = shape or ("tiny" if quick else "minilm")
  batch_size, length = (2, 32) if quick else (8, 128)
  warmup, repeats = 1, repeats or (2 if quick else 5)
  variants = list(variants or ALL)
  built = jax_step.build_shape(shape)
  decoder = jax_step.decoder_params(built)
  batch = data.pair_batch(batch_size, length)
  objective = jax_step.production_objective(length)
  from mote_jax.kernels import resolve
  baseline = resolve(None)
  result = {"shape": shape, "batch_size": batch_size, "length": length, "load1_before": load1(), "rows": {},
            "baseline_kernels": vars(baseline)}
  fns, info = {}, {}
  for requested in ["baseline"] + variants:
    name, options = variant_options(requested, baseline)
    step = jax_step.JaxStep(built, decoder, objective=objective, batch_size=batch_size, length=length, **options)
    loss = step(batch)
    info[name] = {"compile_s": round(step.compile_s, 2), "first_loss": loss}
    fns[name] = (lambda s: lambda: s(batch))(step)
    print(f"[bench] variant {name}: compile {step.compile_s:.1f}s, loss {loss:.4f}", flush=True)
  timings = time_interleaved(fns, warmup=warmup, repeats=repeats)
  base = timings["baseline"]["median_s"]
  for name, t in timings.items():
    result["rows"][name] = dict(t, **info[name], speedup_vs_baseline=base / t["median_s"],
                                paired_speedup_vs_baseline=paired_speedup(t, timings["baseline"]))
  if "attention-dot_product" in timings and "no-attention-dropout" in timings:
    result["dpa_vs_einsum_same_dropout"] = (timings["no-attention-dropout"]["median_s"]
                                            / timings["attention-dot_product"]["median_s"])
  del fns
  gc.collect()
  if not loop:
    result["load1_after"] = load1()
    return result

  # Training-loop overlap: per-step sync (Trainer.train) vs back-to-back dispatch.
  step = jax_step.JaxStep(built, decoder, objective=objective, batch_size=batch_size, length=length,
                          kernels=baseline)
  step(batch)
  host_batches = [data.pair_batch(batch_size, length, seed=s) for s in range(2)]
  prep = []
  for s in range(5):
    start = time.perf_counter()
    data.pair_batch(batch_size, length, seed=100 + s)
    prep.append(time.perf_counter() - start)
  k = 3 if quick else 5

  def synced():
    for i in range(k):
      float(step.dispatch(host_batches[i % 2])["finite"])

  def pipelined():
    metrics = [step.dispatch(host_batches[i % 2]) for i in range(k)]
    jax.block_until_ready(metrics)
    [float(m["finite"]) for m in metrics]

  loop = time_interleaved({"sync_every_step": synced, "dispatch_ahead": pipelined}, warmup=1,
                          repeats=2 if quick else 3)
  result["loop"] = {name: dict(t, per_step_s=t["median_s"] / k) for name, t in loop.items()}
  result["loop"]["steps_per_call"] = k
  result["host_batch_prep"] = summary(prep)  # numpy masking of a fresh batch (the benchmark's own pipeline)
  start = time.perf_counter()
  for _ in range(20):
    jax.block_until_ready(step.global_batch(host_batches[0]))
  result["global_batch_s"] = (time.perf_counter() - start) / 20
  result["load1_after"] = load1()
  return result


if __name__ == "__main__":
  section_main("variants", run)
