"""Section 6: the CoT-MoTE pre-training step in bfloat16 on a GPU, with MFU against the GPU's bf16 dense peak.

The same production step as section 1 (`jax_step.JaxStep`: `Trainer`'s jitted step, AdamW, masked-position caps),
built with `MoteConfig(dtype="bfloat16")` (bf16 compute; parameters, optimizer state, logits, softmax and
LayerNorm statistics stay fp32) and timed round-robin against the same step in fp32. MFU is the hand-counted
model FLOPs (`model_flops_per_step`) per second over two denominators: the datasheet's dense (no sparsity) bf16
tensor-core peak of the device (the library's table, `mote_jax.training.flops.PEAK_TFLOPS`, matched on
`device_kind`, the one training reports MFU against) and a bf16 matmul measured in the same process.

It runs only where JAX sees a GPU, which needs a CUDA build of jaxlib at the pinned version (JAX's installation
guide: the `jax[cuda...]` extras); elsewhere the section records why it did not run. `--options '{"platform":
"cpu"}'` runs the same code on the CPU (the tests do, at the tiny shape), and `{"peak_tflops": X}` supplies the
datasheet peak of a device the table does not list. PyTorch is not timed here: the project pins a CPU-only torch
wheel.
"""

from __future__ import annotations

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import load1, machine, section_main, time_interleaved
from benchmarks.gemm import best_rate
from mote_jax.training.flops import peak_flops_per_device

GPU_SHAPES = ("minilm", "bert-base")
DTYPES = ("bfloat16", "float32")


def datasheet_peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of a device kind ('NVIDIA H200', 'NVIDIA A100-SXM4-80GB', ...) in TFLOP/s, from the
  library's table (`mote_jax.training.flops`), or None if unlisted."""
  peak = peak_flops_per_device(device_kind, "bfloat16")
  return None if peak is None else peak / 1e12


def measured_matmul_tflops(device, n: int, repeats: int = 5) -> float:
  """Best of `repeats` n x n @ n x n bf16 matmuls (fp32 accumulation, bf16 result) on `device`, in TFLOP/s."""
  rng = np.random.default_rng(0)
  a, b = (jax.device_put(jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), jnp.bfloat16), device)
          for _ in range(2))
  dot = jax.jit(jnp.dot)
  return best_rate(lambda: dot(a, b).block_until_ready(), 2.0 * n ** 3, repeats) / 1e12


def run(quick: bool = False, platform: str = "gpu", shapes: list | None = None, batch_size: int | None = None,
        length: int | None = None, peak_tflops: float | None = None, matmul_n: int | None = None,
        attentions: list | None = None) -> dict:
  """Times each shape's step in bf16 and fp32 on the first `platform` device; {"skipped": why} without one.

  The steps use the platform's kernel set (`KernelConfig.for_platform`); `attentions` (e.g. ["einsum",
  "dot_product"]) adds a bf16 row per attention implementation ("bfloat16 einsum attention", ...), with
  attention dropout 0 in those rows (the fused kernels have none)."""
  try:
    devices = jax.devices(platform)
  except RuntimeError as error:  # no backend for the platform (a CPU-only jaxlib has no "gpu")
    return {"skipped": f"no {platform} device visible to JAX ({error}); the backends it has: "
                       f"{sorted({d.platform for d in jax.devices()})}"}
  device = devices[0]
  if device != jax.devices()[0]:
    # JaxStep builds its mesh from jax.devices(); the default backend must be the one measured.
    return {"skipped": f"JAX's default device is {jax.devices()[0]}, not a {platform} device"}
  from benchmarks import data, jax_step

  shapes = list(shapes or (["tiny"] if quick else GPU_SHAPES))
  length = length or (32 if quick else 128)
  batch_size = batch_size or (2 if quick else 64)
  warmup, repeats = (1, 2) if quick else (3, 10)
  datasheet = peak_tflops or datasheet_peak_tflops(device.device_kind)
  host = machine()
  matmul_n = matmul_n or (256 if quick or platform == "cpu" else 8192)
  result = {"device": str(device), "device_kind": device.device_kind, "platform": device.platform,
            "device_count": len(devices), "batch_size": batch_size, "length": length,
            "datasheet_bf16_tflops": datasheet,
            "datasheet_source": ("--options peak_tflops" if peak_tflops
                                 else "mote_jax.training.flops.PEAK_TFLOPS"),
            "host": {key: host[key] for key in ("cpu", "cores", "memory_gb", "versions")},
            "load1_before": load1(), "shapes": {}}
  result["matmul_bf16_tflops"] = measured_matmul_tflops(device, matmul_n)
  result["matmul_n"] = matmul_n
  batch = data.pair_batch(batch_size, length)
  for shape_name in shapes:
    built = jax_step.build_shape(shape_name)
    decoder = jax_step.decoder_params(built)
    objective = jax_step.production_objective(length)
    steps, rows = {}, {}
    from mote_jax.kernels import resolve
    kernel_set = resolve(None, device.platform)
    variants = {dtype: (kernel_set, {"dtype": dtype}) for dtype in DTYPES}
    for attention in attentions or ():
      variants[f"bfloat16 {attention} attention"] = (kernel_set.replace(attention=attention),
                                                     {"dtype": "bfloat16", "attention_dropout": 0.0})
    for dtype, (kernels, overrides) in variants.items():
      step = jax_step.JaxStep(built, decoder, objective=objective, batch_size=batch_size, length=length,
                              model_overrides=overrides, kernels=kernels)
      start = time.perf_counter()
      loss = step(batch)
      rows[dtype] = {"first_step_s": round(time.perf_counter() - start, 2), "first_loss": loss,
                     "flops_per_step": step.flops, "memory": step.memory_analysis()}
      steps[dtype] = (lambda s: lambda: s(batch))(step)
    timings = time_interleaved(steps, warmup=warmup, repeats=repeats)
    for dtype, row in rows.items():
      t = timings[dtype]
      tflops = row["flops_per_step"] / t["median_s"] / 1e12
      row.update(t, pairs_per_s=batch_size / t["median_s"], model_tflops_per_s=tflops,
                 mfu_vs_datasheet=tflops / datasheet if datasheet else None,
                 mfu_vs_measured_matmul=tflops / result["matmul_bf16_tflops"])
    rows["bfloat16"]["speedup_over_float32"] = timings["float32"]["median_s"] / timings["bfloat16"]["median_s"]
    result["shapes"][shape_name] = rows
    del steps
    gc.collect()
  result["load1_after"] = load1()
  return result


if __name__ == "__main__":
  section_main("gpu", run)
