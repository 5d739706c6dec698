"""Section "profile": where the JAX MiniLM-L6 pre-training step's time goes (production config, B=8, L=128).

A `jax.profiler` trace of a few steps of the compiled `Trainer` step, read back with `jax.profiler.ProfileData`:
every XLA thunk's time, joined with the compiled HLO (the thunk's fusion, its dot shapes, its source `op_name`),
summed by kind (GEMM = thunks holding dots; dropout = the threefry bits and masks; other = elementwise,
reductions, copies, gathers) and by model part. Eigen `dot` thunks that run asynchronously show only their
dispatch in the trace: they are counted apart (`summarize_trace`). The GEMM rate (dot FLOPs / GEMM time) against the measured
matmul peak, and the time outside GEMMs, are what bound MFU. XLA's cost analysis FLOPs are reported beside the
hand count of `model_flops_per_step`.
"""

from __future__ import annotations

import collections
import glob
import math
import re
import shutil
import tempfile
import time

from benchmarks.common import load1, section_main

_INSTR = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>\(.*?\)|\S+) (?P<op>[\w\-]+)\((?P<args>.*?)\)(?P<rest>.*)$")
_SHAPE = re.compile(r"\w+\[(?P<dims>[\d,]*)\]")


_CONTAINERS = ("while", "call", "conditional", "async-start", "async-done")


def _dims(shape: str) -> list[int]:
  m = _SHAPE.match(shape)
  return [int(x) for x in m.group("dims").split(",") if x] if m else []


def _dot_signature(ins: dict, shape_of) -> tuple | None:
  """(dtype, lhs dims, rhs dims, (lhs contracting, rhs contracting), (lhs batch, rhs batch)) of a parsed dot;
  `shape_of(name)` gives an operand's shape text."""
  lhs, rhs = (arg.strip().split(" ")[-1].lstrip("%") for arg in ins["args"].split(",")[:2])
  lhs_dims, rhs_dims = _dims(shape_of(lhs)), _dims(shape_of(rhs))
  if not (lhs_dims and rhs_dims):
    return None
  dims = {key: tuple(int(i) for i in value.split(",") if i)
          for key, value in re.findall(r"(\w+_(?:batch|contracting)_dims)=\{([\d,]*)\}", ins["rest"])}
  return (ins["shape"].split("[")[0], tuple(lhs_dims), tuple(rhs_dims),
          (dims.get("lhs_contracting_dims", ()), dims.get("rhs_contracting_dims", ())),
          (dims.get("lhs_batch_dims", ()), dims.get("rhs_batch_dims", ())))


def _signature_flops(signature: tuple) -> float:
  """2 x (every lhs dim) x (the rhs dims that are neither contracted nor batch)."""
  _, lhs, rhs, contract, batch = signature
  return 2.0 * math.prod(lhs) * math.prod(rhs) / math.prod(rhs[i] for i in contract[1] + batch[1])


def parse_hlo(text: str) -> dict[str, dict]:
  """{instruction name: {op, op_name, shape, dot_flops, dot_signature}} of every instruction of the compiled
  module; a fusion's dot FLOPs are those of the dots in the computation it calls (recursively), a dot's
  signature is `_dot_signature`'s (None for other instructions)."""
  computations, shapes, current = {}, {}, None
  for line in text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      words = line.split()
      current = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
      computations[current] = []
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      computations[current].append(m.groupdict())
      shapes[(current, m.group("name"))] = m.group("shape")

  def signature_of(ins: dict, comp: str) -> tuple | None:
    return _dot_signature(ins, lambda name: shapes.get((comp, name), "")) if ins["op"] == "dot" else None

  def flops_of(ins: dict, comp: str) -> float:
    if ins["op"] == "dot":
      signature = signature_of(ins, comp)
      return _signature_flops(signature) if signature else 0.0
    called = re.search(r"calls=%([\w.\-]+)", ins["rest"])
    if called and called.group(1) in computations:
      return sum(flops_of(inner, called.group(1)) for inner in computations[called.group(1)])
    return 0.0

  out = {}
  for comp, instrs in computations.items():
    for ins in instrs:
      op_name = re.search(r'op_name="([^"]*)"', ins["rest"])
      out[ins["name"]] = {"op": ins["op"], "op_name": op_name.group(1) if op_name else "",
                          "dot_flops": flops_of(ins, comp), "shape": ins["shape"],
                          "dot_signature": signature_of(ins, comp)}
  return out


def dot_signatures(text: str) -> collections.Counter:
  """{dot signature (see `_dot_signature`): count} of every dot of a compiled module (inside fusions too): the
  GEMMs one execution of it runs."""
  return collections.Counter(info["dot_signature"] for info in parse_hlo(text).values() if info["dot_signature"])


def gemm_bound(text: str, repeats: int = 5) -> dict:
  """The step's GEMMs timed one by one, alone: each distinct dot of the compiled module as a jitted
  `lax.dot_general` of the same shapes and dimension numbers on random operands (median of `repeats`).

  Their sum is what the step would take if everything else (elementwise work, softmax, LayerNorm, dropout
  bits, the optimizer, copies) were free and each GEMM ran as fast as it does alone: a lower bound on the step
  time, so model FLOPs / that sum is an upper bound on MFU for these shapes on this machine.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  rows, total_s, total_flops = [], 0.0, 0.0
  for (hlo_dtype, lhs, rhs, contract, batch), count in dot_signatures(text).items():
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "f64": jnp.float64}[hlo_dtype]
    a = jnp.asarray(rng.standard_normal(lhs, dtype=np.float32), dtype)
    b = jnp.asarray(rng.standard_normal(rhs, dtype=np.float32), dtype)
    fn = jax.jit(lambda a, b, dn=(contract, batch): jax.lax.dot_general(a, b, dn))
    fn(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn(a, b).block_until_ready()
      times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    flops = _signature_flops((hlo_dtype, lhs, rhs, contract, batch))
    total_s += count * seconds
    total_flops += count * flops
    rows.append({"lhs": list(lhs), "rhs": list(rhs), "contracting": [list(c) for c in contract], "count": count,
                 "ms_each": round(seconds * 1e3, 3), "gflops_per_s": round(flops / seconds / 1e9, 1),
                 "ms_total": round(count * seconds * 1e3, 2)})
  rows.sort(key=lambda r: -r["ms_total"])
  return {"gemm_alone_s": round(total_s, 4), "gflop": round(total_flops / 1e9, 2),
          "gflops_per_s": round(total_flops / total_s / 1e9, 1), "dots": sum(r["count"] for r in rows),
          "distinct": len(rows), "top": rows[:12]}


def _part(op_name: str) -> str:
  if any(key in op_name for key in ("threefry", "random_bits", "Dropout", "_bernoulli", "_uniform")):
    return "dropout (RNG, masks)"
  if "mlm_head" in op_name or "mlm_logits" in op_name:
    return "MLM head"
  if "CotMaeDecoder" in op_name:
    return "decoder layers"
  if "embeddings" in op_name or "embed_tokens" in op_name:
    return "embeddings"
  if "/attention/" in op_name:
    return "encoder attention"
  if "/ffn/" in op_name:
    return "encoder FFN"
  if "jvp(" in op_name or "transpose(" in op_name:
    return "loss / other fwd-bwd"
  return "optimizer / step logic"


def summarize_trace(path: str, hlo: dict[str, dict], steps: int, peak_gflops: float | None = None) -> dict:
  """Thunk times per step by kind and model part, and the in-step GEMM rate.

  Plain `dot` thunks (Eigen contractions, e.g. the TN weight-gradient GEMMs) can run asynchronously: their
  trace event then covers only the dispatch, and their work overlaps later thunks. A GEMM thunk whose apparent
  rate exceeds 1.5x `peak_gflops` is counted as such ("GEMM (async, untimed)"): its FLOPs are reported apart and
  left out of the in-step GEMM rate, which is then that of the timed GEMMs only.
  """
  from jax.profiler import ProfileData
  data = ProfileData.from_file(path)
  per_name, calls = collections.Counter(), collections.Counter()
  for plane in data.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if line.name.startswith("python"):
        continue
      for event in line.events:
        name = event.name
        # Leaf thunks only: a while/call/conditional thunk's time is that of the thunks inside it.
        if name in hlo and hlo[name]["op"] not in _CONTAINERS:
          per_name[name] += event.duration_ns
          calls[name] += 1
  total = sum(per_name.values())
  by_kind, by_part, by_fusion = collections.Counter(), collections.Counter(), collections.Counter()
  gemm_flops, async_flops, async_thunks = 0.0, 0.0, 0
  rows = []
  for name, ns in per_name.items():
    info = hlo[name]
    is_gemm = info["dot_flops"] > 0
    flops = info["dot_flops"] * calls[name]
    untimed = is_gemm and peak_gflops and flops / max(ns, 1) > 1.5 * peak_gflops
    kind = ("GEMM (async, untimed)" if untimed else "GEMM") if is_gemm else (
        "dropout" if _part(info["op_name"]).startswith("dropout") else "other")
    by_kind[kind] += ns
    by_part[_part(info["op_name"])] += ns
    if untimed:
      async_flops += flops
      async_thunks += 1
    elif is_gemm:
      gemm_flops += flops
    if not is_gemm:  # XLA names fusions by their ops (copy_bitcast_fusion.80 ...): the families of non-GEMM work
      by_fusion[re.sub(r"\.\d+$", "", name)] += ns
    rows.append((name, ns))
  rows.sort(key=lambda r: -r[1])
  top = []
  for name, ns in rows[:15]:
    info = hlo[name]
    ms = ns / 1e6 / steps
    top.append({"thunk": name, "ms_per_step": round(ms, 2), "shape": info["shape"],
                "op_name": info["op_name"].replace("jit(traced)/", "")[-110:],
                "gflops_per_s": round(info["dot_flops"] / (ns / steps) , 1) if info["dot_flops"] else None})
  gemm_s = by_kind["GEMM"] / 1e9 / steps
  return {"thunk_ms_per_step": round(total / 1e6 / steps, 1),
          "async_gemm_gflop_per_step": round(async_flops / steps / 1e9, 2), "async_gemm_thunks": async_thunks,
          "by_kind_ms": {k: round(v / 1e6 / steps, 1) for k, v in by_kind.most_common()},
          "by_part_ms": {k: round(v / 1e6 / steps, 1) for k, v in by_part.most_common()},
          "non_gemm_by_fusion_ms": {k: round(v / 1e6 / steps, 1) for k, v in by_fusion.most_common(12)},
          "gemm_gflop_per_step": round(gemm_flops / steps / 1e9, 2),
          "gemm_gflops_per_s": round(gemm_flops / steps / 1e9 / gemm_s, 1) if gemm_s else None,
          "top_thunks": top}


def run(quick: bool = False, shape: str | None = None, steps: int | None = None) -> dict:
  import jax

  from benchmarks import gemm, jax_step

  shape = shape or ("tiny" if quick else "minilm")
  batch_size, length = (2, 32) if quick else (8, 128)
  steps = steps or (2 if quick else 3)
  step, batch = jax_step.production_step(shape, batch_size, length)
  global_batch = step.global_batch(batch)
  compiled = step.compile(batch)
  cost = step.cost_analysis()
  hlo = parse_hlo(compiled.as_text())
  # The matmul peak first: it also bounds which GEMM thunks' trace events can be real (see summarize_trace).
  peak = gemm.measure(sizes=(256,) if quick else (2048,), repeats=2 if quick else 3, libraries=("jax",))
  state = step.state
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, global_batch)
    float(metrics["loss"])
  times = []
  trace_dir = tempfile.mkdtemp(prefix="bench_trace_")
  jax.profiler.start_trace(trace_dir)
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, global_batch)
    float(metrics["loss"])
    times.append(time.perf_counter() - start)
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  summary = summarize_trace(path, hlo, steps, peak_gflops=max(peak["gflops"].values()))
  shutil.rmtree(trace_dir, ignore_errors=True)
  wall = sorted(times)[len(times) // 2]
  bound = gemm_bound(compiled.as_text(), repeats=2 if quick else 5)
  peak_gflops = max(peak["gflops"].values())
  # The MFU this step could reach if only its GEMMs took time, each at its rate alone (see gemm_bound).
  bound["mfu_ceiling"] = round(step.flops / bound["gemm_alone_s"] / 1e9 / peak_gflops, 3)
  return dict(summary, shape=shape, batch_size=batch_size, length=length, traced_steps=steps,
              step_wall_s_median=wall, model_flops_per_step=step.flops,
              xla_cost_flops=cost.get("flops", float("nan")), compile_s=round(step.compile_s, 1),
              xla_cost_bytes=cost.get("bytes accessed", float("nan")),
              jax_matmul_gflops=peak["gflops"], gemm_bound=bound, load1=load1())


if __name__ == "__main__":
  section_main("profile", run)
