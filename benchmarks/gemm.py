"""The machine's measured GEMM peak: large square matmuls in JAX (XLA:CPU), NumPy and PyTorch; best of each.

The fp32 best over all libraries is the denominator of model FLOPs utilisation (MFU) in the pre-training section.
bf16 figures are reported too (this CPU has AVX512-BF16), for the dtype experiments.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import load1, section_main


def best_rate(fn, flops: float, repeats: int) -> float:
  """`flops` over the best of `repeats` timed calls of the blocking `fn`, after one untimed call."""
  fn()  # warm-up (and compile)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return flops / best


def measure(sizes=(2048, 4096), repeats: int = 5, libraries=("jax", "numpy", "torch")) -> dict:
  """GFLOP/s per (library, dtype, n): the best of `repeats` n x n @ n x n products."""
  rates = {}
  rng = np.random.default_rng(0)
  for n in sizes:
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3
    if "jax" in libraries:
      import jax
      import jax.numpy as jnp
      dot = jax.jit(jnp.dot)
      for dtype in ("float32", "bfloat16"):
        x, y = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        rates[f"jax/{dtype}/{n}"] = best_rate(lambda: dot(x, y).block_until_ready(), flops, repeats) / 1e9
    if "numpy" in libraries:
      rates[f"numpy/float32/{n}"] = best_rate(lambda: a @ b, flops, repeats) / 1e9
    if "torch" in libraries:
      import torch
      for dtype in (torch.float32, torch.bfloat16):
        x, y = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
        name = str(dtype).split(".")[-1]
        rates[f"torch/{name}/{n}"] = best_rate(lambda: x @ y, flops, repeats) / 1e9
  fp32 = {k: v for k, v in rates.items() if "/float32/" in k}
  bf16 = {k: v for k, v in rates.items() if "/bfloat16/" in k}
  best32 = max(fp32, key=fp32.get)
  best16 = max(bf16, key=bf16.get) if bf16 else None
  return {"gflops": {k: round(v, 1) for k, v in rates.items()},
          "peak_fp32_gflops": round(fp32[best32], 1), "peak_fp32_source": best32,
          "peak_bf16_gflops": round(bf16[best16], 1) if best16 else None, "peak_bf16_source": best16}


def run(quick: bool = False) -> dict:
  load_before = load1()
  result = measure(sizes=(512,) if quick else (2048, 4096), repeats=2 if quick else 5)
  result.update(load1_before=load_before, load1_after=load1())
  return result


if __name__ == "__main__":
  section_main("gemm", run)
