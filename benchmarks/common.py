"""Shared helpers: machine description, load checks, interleaved timing, peak memory, section subprocesses."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MOTE_DATA_DIR", REPO.parent / "shared" / "data"))


def load1() -> float:
  """The 1-minute load average."""
  return round(os.getloadavg()[0], 2)


def wait_for_quiet(max_load: float, timeout: float, poll: float = 15.0, log=print) -> dict:
  """Waits (up to `timeout` s) until the 1-min load is below `max_load`; returns what it saw."""
  start = time.time()
  seen = load1()
  while seen >= max_load and time.time() - start < timeout:
    log(f"[bench] load {seen:.2f} >= {max_load}: waiting (up to {timeout - (time.time() - start):.0f}s more)")
    time.sleep(poll)
    seen = load1()
  return {"load1": seen, "waited_s": round(time.time() - start, 1), "quiet": seen < max_load}


def _cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model = fields.get("Model name", platform.processor())
    extra = []
    if "CPU family" in fields:
      extra.append(f"family {fields['CPU family']} model {fields.get('Model', '?')}")
    if "Hypervisor vendor" in fields:
      extra.append(f"{fields['Hypervisor vendor']} VM")
    return f"{model} ({', '.join(extra)})" if extra else model
  except OSError:
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("flags"):
          flags = line.split(":", 1)[1].split()
          return sorted(x for x in flags if x.startswith(("avx512", "amx", "avx_vnni", "fma")) or x == "avx2")
  except OSError:
    pass
  return []


def _mem_gb() -> float:
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemTotal"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return float("nan")


def _version(name: str) -> str:
  try:
    from importlib.metadata import version
    return version(name)
  except Exception:  # noqa: BLE001
    return "n/a"


def machine() -> dict:
  """CPU model, cores, memory, ISA flags, library versions and the load now."""
  return {
      "cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gb": _mem_gb(), "isa": _cpu_flags(),
      "python": platform.python_version(),
      "versions": {name: _version(name) for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers",
                                                     "sentence-transformers", "scann", "faiss-cpu", "numpy")},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load1": load1(),
  }


def peak_rss_mb() -> float:
  """This process's peak resident set size so far (MiB)."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def summary(times: Sequence[float]) -> dict:
  """Median, min, max (seconds) and the number of timed runs."""
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times),
          "times_s": [round(t, 5) for t in times]}


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, warmup: int, repeats: int,
                     log=print) -> dict[str, dict]:
  """Times every fn `repeats` times after `warmup` calls, round-robin (A B C A B C ...), so a change of the
  machine's background load during the measurement affects every contender alike. Each fn must block until its
  work is done. Returns {name: summary} plus the load before and after."""
  for name, fn in fns.items():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  loads = [load1()]
  for r in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
    loads.append(load1())
    log(f"[bench] round {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items())
        + f" (load {loads[-1]})")
  out = {name: summary(t) for name, t in times.items()}
  for name in out:
    out[name]["load1_during"] = [min(loads), max(loads)]
  return out


def paired_speedup(base: dict, other: dict) -> dict:
  """How many times faster `base` is than `other`, from round-robin timings (`time_interleaved` summaries): the
  median over rounds of other_r / base_r (each round's two runs saw the same machine load, so the per-round ratio
  cancels the drift that a ratio of medians keeps), with scipy's bootstrap 95% interval of that median."""
  import numpy as np
  from scipy import stats
  ratios = np.asarray(other["times_s"]) / np.asarray(base["times_s"])
  out = {"median": float(np.median(ratios)), "rounds": int(ratios.size)}
  if ratios.size >= 3 and np.ptp(ratios) > 0:
    ci = stats.bootstrap((ratios,), np.median, n_resamples=5000, confidence_level=0.95, method="percentile",
                         rng=np.random.default_rng(0)).confidence_interval
    out["ci95"] = [float(ci.low), float(ci.high)]
  return out


def ratio_of_medians(a: dict, b: dict) -> float:
  """How many times faster a is than b (b's median time / a's median time)."""
  return b["median_s"] / a["median_s"]


# --- section subprocesses -----------------------------------------------------------------------------------


def section_main(name: str, run: Callable[..., dict], argv=None) -> None:
  """`python -m benchmarks.<name> --json OUT [--quick]`: runs one section and writes its result dict."""
  parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}")
  parser.add_argument("--json", required=True)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--options", default="{}", help="JSON dict of keyword arguments for run()")
  args = parser.parse_args(argv)
  started = time.time()
  result = run(quick=args.quick, **json.loads(args.options))
  result.setdefault("section", name)
  result["seconds"] = round(time.time() - started, 1)
  result["peak_rss_mb"] = peak_rss_mb()
  Path(args.json).write_text(json.dumps(result, indent=1, default=float))


def clean_env(xla_flags: str | None = None, extra: dict | None = None, repo: Path = REPO) -> dict:
  """The environment for a benchmark subprocess: one CPU device (no emulated device count), chosen XLA flags,
  the glibc malloc settings `mote_jax.launch` runs with (`extra` may override them), and `repo` (this tree, or
  another revision's worktree) first on the module path."""
  from mote_jax import host_malloc
  env = host_malloc.environment()
  env["XLA_FLAGS"] = xla_flags or ""
  for name, value in (extra or {}).items():  # None: unset
    if value is None:
      env.pop(name, None)
    else:
      env[name] = value
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("HF_HUB_OFFLINE", "1")
  env.setdefault("TRANSFORMERS_OFFLINE", "1")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.setdefault("TOKENIZERS_PARALLELISM", "false")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH", "")]))
  return env


def run_module(module: str, out_json: Path, *, quick: bool, options: dict | None = None,
               xla_flags: str | None = None, env: dict | None = None, timeout: float | None = None,
               log=print, repo: Path = REPO) -> dict:
  """Runs `python -m <module> --json out_json` in a fresh process and returns its result (or an error dict).
  `repo`: the tree whose `benchmarks` and `mote_jax` the process imports (default this one)."""
  cmd = [sys.executable, "-m", module, "--json", str(out_json), "--options", json.dumps(options or {})]
  if quick:
    cmd.append("--quick")
  log(f"[bench] $ {' '.join(cmd)}" + (f"  (XLA_FLAGS={xla_flags})" if xla_flags else "") + (f" {env}" if env else ""))
  started = time.time()
  try:
    proc = subprocess.run(cmd, cwd=repo, env=clean_env(xla_flags, env, repo), timeout=timeout, text=True,
                          stdout=sys.stdout, stderr=subprocess.PIPE, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout}s", "seconds": round(time.time() - started, 1)}
  if proc.returncode != 0 or not out_json.exists():
    tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
    log(tail)
    return {"error": f"exit status {proc.returncode}: {tail[-2000:]}", "seconds": round(time.time() - started, 1)}
  return json.loads(out_json.read_text())
