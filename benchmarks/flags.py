"""Section "flags": XLA:CPU flags and JAX settings for the JAX MiniLM-L6 pre-training step, one process each.

Each setting runs the production step (B=8, L=128, fp32, masked-position logits) and a 2048^3 matmul in a fresh
process with its XLA_FLAGS / environment (on top of `mote_jax.host_malloc`'s malloc settings, as every section). Processes run one after another, so the default is run first and
last to bracket any drift of the background load.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import load1, run_module, section_main, time_interleaved

SETTINGS = [
    ("default", "", {}),
    ("multi_thread_eigen=false", "--xla_cpu_multi_thread_eigen=false", {}),
    ("oneDNN dot fusion", "--xla_cpu_experimental_onednn_fusion_type=dot", {}),
    ("no YNNPACK reduce fusion", "--xla_cpu_experimental_ynn_fusion_type=-reduce", {}),
    ("fast math", "--xla_cpu_enable_fast_math=true", {}),
    ("PRNG unsafe_rbg", "", {"JAX_DEFAULT_PRNG_IMPL": "unsafe_rbg"}),
    # glibc's defaults instead of mote_jax.host_malloc's settings (which every other row runs with)
    ("malloc heap without huge pages", "", {"GLIBC_TUNABLES": None}),
    ("glibc malloc defaults", "", {name: None for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
                                                           "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}),
]


def one(quick: bool) -> dict:
  import os
  import resource

  import jax

  from benchmarks import gemm, jax_step

  shape = "tiny" if quick else "minilm"
  batch_size, length = (2, 32) if quick else (8, 128)
  step, batch = jax_step.production_step(shape, batch_size, length)
  loss = step(batch)
  warmup, repeats = 1, (2 if quick else 5)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  t = time_interleaved({"step": lambda: step(batch)}, warmup=warmup, repeats=repeats)["step"]
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (warmup + repeats)
  matmul = gemm.measure(sizes=(256,) if quick else (2048,), repeats=2 if quick else 5, libraries=("jax",))
  return dict(t, compile_s=round(step.compile_s, 1), first_loss=loss, gemm_gflops=matmul["gflops"],
              minor_page_faults_per_step=round(faults),
              prng_impl=str(jax.config.jax_default_prng_impl), xla_flags=os.environ.get("XLA_FLAGS", ""))


def run(quick: bool = False, single: bool = False, settings=None) -> dict:
  if single:
    return one(quick)
  chosen = [s for s in SETTINGS if settings is None or s[0] in settings]
  if not quick:
    chosen = chosen + [("default (again)", "", {})]
  else:
    chosen = chosen[:2]
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, flags, env) in enumerate(chosen):
      rows[name] = run_module("benchmarks.flags", Path(tmp) / f"{i}.json", quick=quick, options={"single": True},
                              xla_flags=flags, env=env)
      rows[name]["flags"] = flags
      rows[name]["env"] = env
  base = [rows[n]["median_s"] for n in ("default", "default (again)") if "median_s" in rows.get(n, {})]
  if base:
    reference = sum(base) / len(base)
    for row in rows.values():
      if "median_s" in row:
        row["speedup_vs_default"] = reference / row["median_s"]
  return {"rows": rows, "load1_after": load1()}


if __name__ == "__main__":
  section_main("flags", run)
