"""Renders the benchmark results (a dict of section results) as RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from benchmarks import preprocess as _preprocess

ANALYSIS = Path(__file__).with_name("analysis.md")


def _f(x, digits=2, unit=""):
  if x is None:
    return "n/a"
  if isinstance(x, (int, float)):
    if x != x:  # NaN
      return "n/a"
    return f"{x:,.{digits}f}{unit}"
  return str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return out + [""]


def _spread(t: dict) -> str:
  return f"{_f(t['min_s'], 3)}-{_f(t['max_s'], 3)}"


def _error(section: dict) -> list[str]:
  return [f"**Not measured: {section['error'][:600]}**", ""]


def _meta(section: dict) -> str:
  parts = []
  if "load1_before" in section:
    parts.append(f"1-min load {section['load1_before']} before")
  if "load1_after" in section:
    parts.append(f"{section['load1_after']} after")
  if "seconds" in section:
    parts.append(f"section wall time {section['seconds']:.0f}s")
  if "measured_at" in section:
    parts.append(f"measured {section['measured_at']}")
  return "_" + ", ".join(parts) + "_" if parts else ""


# --- sections -------------------------------------------------------------------------------------------------


def gemm_lines(g: dict) -> list[str]:
  rows = [[k, _f(v, 1)] for k, v in sorted(g["gflops"].items())]
  return (["Best of 5 square matmuls per library, dtype and size (n x n @ n x n, all cores):", ""]
          + _table(["library/dtype/n", "GFLOP/s"], rows)
          + [f"fp32 peak (MFU denominator): **{_f(g['peak_fp32_gflops'], 1)} GFLOP/s** ({g['peak_fp32_source']}); "
             f"bf16 best: {_f(g.get('peak_bf16_gflops'), 1)} GFLOP/s ({g.get('peak_bf16_source')}).", ""])


MACHINE_NOTE = ("The JAX/PyTorch step ratios depend on the machine: they follow how fast each library's fp32 GEMM runs on that CPU. `python -m benchmarks --only pretrain` gave MiniLM 1.83x eager / 2.18x torch.compile and bert-base 1.48x eager on a Zen 4 machine where XLA and PyTorch both reached ~190 GFLOP/s fp32 GEMM (JAX at 79-80% MFU, PyTorch eager at 64%), against 2.89x / 2.44x on a Zen 5 machine where PyTorch's fp32 GEMM ran at 185 of XLA's 407 GFLOP/s. Compare the MFU columns across machines, not the ratios.")


def pretrain_lines(p: dict) -> list[str]:
  lines = [MACHINE_NOTE, ""]
  lines += ["GEMM peak measured at the start of this section:", ""] + gemm_lines(p["gemm"])
  for shape, s in p["shapes"].items():
    lines += [f"### {shape} ({s['params_m']}M params in the HF model; batch {s['batch_size']} pairs x "
              f"{s['length']} tokens; masked-position caps {s['max_predictions']}; "
              f"{s['warmup']} warm-up + {s['repeats']} timed steps each, round-robin)", ""]
    rows = []
    for name, r in s["rows"].items():
      rows.append([name, _f(r["median_s"], 3), _spread(r), _f(r["pairs_per_s"], 2), _f(r["seq_per_s"], 2),
                   _f(r["flops_per_step"] / 1e9, 1), _f(r["model_gflops_per_s"], 1), _f(100 * r["mfu"], 1, "%"),
                   _f(r["first_step_s"], 1)])
    lines += _table(["contender", "median s/step", "min-max s", "pairs/s", "seq/s (2 per pair)",
                     "model GFLOP/step", "model GFLOP/s", "MFU", "first step s (compile)"], rows)
    if "peak_in_rounds" in s:  # absent from results measured before it was added
      q = s["peak_in_rounds"]
      mfu = ", ".join(f"{name} {_f(100 * r['mfu_vs_peak_in_rounds'], 1, '%')}" for name, r in s["rows"].items()
                      if name.startswith("jax"))
      lines += [f"GEMM peak inside these rounds (a {q['n']} x {q['n']} fp32 JAX matmul timed between the "
                f"contenders, best of {q['runs']}; median {_f(q['median_gflops'], 1)}): **{_f(q['gflops'], 1)} "
                f"GFLOP/s**. MFU against it, under the same load as the steps: {mfu}.", ""]
    lines += ["Speed ratios (torch median time / JAX median time; > 1 means JAX is faster):", ""]
    lines += _table(["JAX vs PyTorch", "ratio"], [[k, _f(v, 2, "x")] for k, v in s["ratios"].items()])
    diffs = ", ".join(f"{k} {_f(v, 6)}" for k, v in s["loss_abs_diff_vs_torch_full"].items() if k != "torch/full")
    lines += [f"Same objective, same weights: deterministic loss of torch/full = {_f(s['eval_losses']['torch/full'], 5)}; "
              f"|difference| of the others: {diffs}.", ""]
  return lines


def finetune_lines(p: dict) -> list[str]:
  lines = [MACHINE_NOTE, ""]
  lines += ["GEMM peak measured at the start of this section:", ""] + gemm_lines(p["gemm"])
  for shape, s in p["shapes"].items():
    lines += [f"### {shape} ({s['tower_mode']}; {s['batch_size']} queries x {s['query_len']} tokens, "
              f"1 + {s['negatives']} passages each x {s['passage_len']} tokens; pooling {s['pooling']}, normalize "
              f"{s['normalize']}, temperature {s['temperature']}; judged passages masked: {s['masked_judged']}; "
              f"{s['warmup']} warm-up + {s['repeats']} timed steps each, round-robin)", ""]
    rows = [[name, _f(1000 * r["median_s"], 0), _spread(r), _f(r["queries_per_s"], 2),
             _f(r["flops_per_step"] / 1e9, 1), _f(r["model_gflops_per_s"], 1), _f(100 * r["mfu"], 1, "%"),
             _f(r["first_step_s"], 1), _f(r.get("step_temp_gb"), 2)]
            for name, r in s["rows"].items()]
    lines += _table(["contender", "median ms/step", "min-max s", "queries/s", "model GFLOP/step", "model GFLOP/s",
                     "MFU", "first step s (compile)", "step temporaries GB (XLA)"], rows)
    lines += _table(["ratio (median times; > 1: the first is faster)", "value"],
                    [[k, _f(v, 2, "x")] for k, v in s["ratios"].items()])
    diffs = ", ".join(f"{k} {_f(v, 7)}" for k, v in s["loss_abs_diff_vs_torch"].items())
    lines += [f"Same weights, same batch, dropout off: torch loss {_f(s['eval_losses']['torch/eager'], 5)}; "
              f"|JAX - torch|: {diffs}.", ""]
  return lines


def mote_lines(m: dict) -> list[str]:
  lines = []
  rows = []
  for mode, r in m["rows"].items():
    cost = r.get("xla_cost", {})
    rows.append([mode, _f(r["median_s"], 3), _spread(r), r["runs"], _f(r["params_m"], 1),
                 _f(cost.get("flops", float("nan")) / 1e9, 2), _f(r["compile_s"], 1)])
  lines += _table(["tower mode", "median s/step", "min-max s", "runs", "params (M)", "XLA cost GFLOP",
                   "compile s"], rows)
  lines += [f"**mote / siamese step time: {_f(m['mote_over_siamese'], 3)}x** (ratio of medians; median of "
            f"per-round ratios {_f(m['mote_over_siamese_per_round_median'], 3)}x). Target <= 1.05x. "
            f"Shape {m['shape']}, batch {m['batch_size']} x {m['length']}, production objective.", ""]
  return lines


def encode_lines(e: dict) -> list[str]:
  lines = []
  lines += [f"{e['passages']} SciFact passages (title + text), max_length {e['max_length']} "
            f"(mean {e['mean_tokens']:.0f} tokens, {100 * e['truncated_fraction']:.0f}% truncated), pooling "
            f"{e['pooling']}, normalize {e['normalize']}; {e['warmup']} warm-up + {e['repeats']} timed passes each, "
            f"round-robin, tokenisation included.", ""]
  rows = [[name, _f(r["median_s"], 2), _spread(r), _f(r["passages_per_s"], 1), _f(r["min_cosine_vs_st"], 6),
           _f(r["max_abs_diff_vs_st"], 7)] for name, r in e["rows"].items()]
  lines += _table(["contender", "median s/pass", "min-max s", "passages/s", "min cosine vs st/bs32",
                   "max abs diff"], rows)
  lines += [f"**JAX / sentence-transformers (default batch 32): {_f(e['jax_over_st'], 2)}x; vs the best "
            f"sentence-transformers setting: {_f(e['jax_over_best_st'], 2)}x** (target >= 1.5x).", ""]
  pad = e.get("padding", {})
  if "encode_texts_tokens" in pad:
    lines += [f"Token positions computed per pass: real tokens {pad['real_tokens']:,}; `encode_texts` (length-sorted "
              f"batches of {e['jax_batch_size']} padded to multiples of 32) {pad['encode_texts_tokens']:,}; "
              f"sentence-transformers batch 32 (padded to each batch's longest) {pad['st_bs32_tokens']:,}.", ""]
  return lines


def search_lines(s: dict) -> list[str]:
  lines = []
  best_exact = max(m["queries_per_s"] for n, m in s["methods"].items() if n.startswith("exact/"))
  lines += [f"{s['rows']:,} x {s['dim']} clustered unit vectors ({s['clusters']:,} clusters), {s['queries']} queries, "
            f"top-{s['k']}; generation {s['generate_s']}s; {s['warmup']} warm-up + {s['repeats']} timed searches "
            f"of all queries per row.", ""]
  rows = []
  for name, m in s["methods"].items():
    rows.append([name, _f(m["queries_per_s"], 0), _f(m["median_s"], 3), _spread(m), _f(m["recall"], 4),
                 _f(m["build_s"], 1), _f(m["index_mb"], 0), _f(m.get("rss_growth_mb"), 0)])
  lines += _table(["method", "queries/s", "median s", "min-max s", "recall@10", "build s", "index MB (serialised)",
                   "RSS growth MB"], rows)
  lines += ["ScaNN search-time sweeps (leaves searched, candidates reordered) on the default index and on an index "
            "tuned for speed (more leaves, their k-means trained on every row, spherical, 4 dimensions per AH block), "
            "reordering from a "
            "bfloat16 copy of the rows (top-10 rescored exactly) or, round-robin with it near recall 0.95, "
            "from float32; and the same float32 index with query-adaptive leaf selection (`ScannConfig."
            "leaf_score_margin`: each query searches the leaves whose centre scores within the margin of its best "
            "centre's, up to the cap; the mean is counted from the index's centres), its caps timed round-robin:", ""]
  default_build = s["methods"]["scann/default"]["build_s"]
  default_mb = s["methods"]["scann/default"]["index_mb"]
  lines += _table(["setting", "queries/s", "x best exact", "recall@10", "leaves searched (mean)", "index build s",
                   "index MB (serialised)"],
                  [[k, _f(v["queries_per_s"], 0), _f(v["queries_per_s"] / best_exact, 1), _f(v["recall"], 4),
                    _f(v.get("leaves_searched_mean"), 1), _f(v.get("build_s", default_build), 0),
                    _f(v.get("index_mb", None if k.startswith("tuned") else default_mb), 0)]
                   for k, v in s["scann_sweep"].items()])
  lines += [f"**ScaNN (default config) / best exact: {_f(s['scann_default_speedup_vs_best_exact'], 1)}x queries/s**; "
            f"fastest sweep setting with recall@10 >= 0.95: {s['scann_best_at_095']} at "
            f"{_f(s['scann_best_at_095_speedup_vs_best_exact'], 1)}x (target >= 20x at recall@10 >= 0.95).", ""]
  return lines


def scaling_lines(s: dict) -> list[str]:
  lines = []
  rows = []
  for r in s["rows"]:
    if "error" in r:
      rows.append([r["batch_size"], r["length"], "error", r["error"][:80], "", "", "", "", ""])
      continue
    mem = r.get("xla_memory", {})
    rows.append([r["batch_size"], r["length"], _f(r["median_s"], 3), _f(r["pairs_per_s"], 2),
                 _f(r["tokens_per_s"], 0), _f(r["model_gflops_per_s"], 1), _f(r["peak_rss_mb"], 0),
                 _f(mem.get("temp_size_mb"), 0), _f(mem.get("argument_size_mb"), 0)])
  lines += _table(["batch (pairs)", "length", "median s/step", "pairs/s", "tokens/s", "model GFLOP/s",
                   "peak RSS MB (process)", "XLA temp MB", "XLA args MB"], rows)
  return lines


def variants_lines(v: dict) -> list[str]:
  lines = []
  paired = any("paired_speedup_vs_baseline" in r for r in v["rows"].values())
  rows = [[name, _f(r["median_s"], 3), _spread(r), _f(r["speedup_vs_baseline"], 3, "x")]
          + ([_paired(r.get("paired_speedup_vs_baseline")) if name != "baseline" else "-"] if paired else [])
          + [_f(r["compile_s"], 1), _f(r["first_loss"], 4)] for name, r in v["rows"].items()]
  lines += _table(["variant (MiniLM step)", "median s/step", "min-max s", "speed vs baseline (medians)"]
                  + (["speed vs baseline (paired) [95%]"] if paired else []) + ["compile s", "first-step loss"], rows)
  if "dpa_vs_einsum_same_dropout" in v:
    lines += [f"`jax.nn.dot_product_attention` vs the einsum attention at the same (zero) attention dropout: "
              f"{_f(v['dpa_vs_einsum_same_dropout'], 3)}x.", ""]
  loop = v.get("loop", {})
  if loop:
    k = loop["steps_per_call"]
    lines += [f"Loop overlap ({k} steps per timed call): wait for every step (as `Trainer.train` did) "
              f"{_f(loop['sync_every_step']['per_step_s'], 3)} s/step; dispatch ahead "
              f"{_f(loop['dispatch_ahead']['per_step_s'], 3)} s/step (as `Trainer.train` does between log and "
              f"checkpoint steps). Host work per step: a fresh masked batch "
              f"{_f(1000 * v['host_batch_prep']['median_s'], 1)} ms (this benchmark's numpy masking), "
              f"`global_batch` {_f(1000 * v['global_batch_s'], 2)} ms.", ""]
  return lines


def kernel_ab_lines(k: dict) -> list[str]:
  lines = [f"Platform {k.get('platform')}; baseline: the CPU kernel set {k['baseline_kernels']}."
           " Speed vs baseline: the median over rounds of the per-round ratio, with its bootstrap 95% interval.", ""]
  if k.get("rows"):
    lines += [f"Pre-training step: shape {k['shape']}, batch {k['batch_size']} x {k['length']}, "
              f"{k['rows']['baseline']['runs']} rounds.", ""]
    lines += variants_lines(k)
  f = k.get("finetune")
  if f:
    lines += [f"Fine-tuning step: {f['batch_size']} queries x {f['query_len']} tokens, 1 + {f['negatives']} "
              f"passages each x {f['passage_len']} tokens; each alternative in its own pair with the baseline, "
              f"{f['repeats']} rounds.", ""]
    rows = [[name, _f(r["baseline"]["median_s"], 3), _f(r["median_s"], 3), _spread(r),
             _paired(r["paired_speedup_vs_baseline"])] for name, r in f["rows"].items()]
    lines += _table(["variant (fine-tuning step)", "baseline median s/step", "variant median s/step",
                     "variant min-max s", "variant speed vs baseline (paired)"], rows)
  rows = []
  for name, v in k["verdicts"].items():
    steps = "; ".join(f"{step} {_f(s['gain'], 3, 'x')}" + (f" [{_f(s['ci95'][0], 3)}, {_f(s['ci95'][1], 3)}]"
                                                           if s.get("ci95") else "")
                      for step, s in v.get("per_step", {}).items())
    rows.append([name, v["cpu_set"], v["plain_xla"], v["alternative"], steps,
                 _f(v["cpu_choice_speed_over_alternative"], 3, "x"), v["rule"],
                 {True: "yes", False: "**no**", None: "-"}[v["consistent"]]])
  lines += _table(["operation", "CPU set", "plain XLA", "alternative timed",
                   "CPU choice / alternative speed per step [95%]", "geometric mean", "rule (>= 2%)",
                   "CPU set consistent"], rows)
  return lines


def _paired(p: dict | None) -> str:
  if not p:
    return "-"
  return _f(p["median"], 3, "x") + (f" [{_f(p['ci95'][0], 3)}, {_f(p['ci95'][1], 3)}]" if p.get("ci95") else "")


def flags_lines(f: dict) -> list[str]:
  lines = []
  rows = []
  for name, r in f["rows"].items():
    env = " ".join(f"{k}={v}" if v is not None else f"unset {k}" for k, v in r.get("env", {}).items())
    setting = " ".join(filter(None, [r.get("flags", ""), env]))
    if "error" in r:
      rows.append([name, f"`{setting}`", "error: " + r["error"][:100], "", "", "", "", ""])
      continue
    g = r.get("gemm_gflops", {})
    rows.append([name, f"`{setting}`" if setting else "", _f(r["median_s"], 3), _f(r.get("speedup_vs_default"), 3, "x"),
                 _f(r["compile_s"], 1), _f(g.get("jax/float32/2048"), 0), _f(g.get("jax/bfloat16/2048"), 0),
                 _f(r.get("minor_page_faults_per_step"), 0)])
  lines += _table(["setting", "XLA_FLAGS / env", "median s/step", "speed vs default", "compile s",
                   "jax fp32 matmul 2048 GFLOP/s", "jax bf16 matmul GFLOP/s", "minor page faults per step"], rows)
  return lines


def profile_lines(p: dict) -> list[str]:
  lines = []
  lines += [f"_load {p.get('load1')}; {p['traced_steps']} traced steps; step wall time (median) "
            f"{_f(p['step_wall_s_median'], 3)} s; XLA thunk time {p['thunk_ms_per_step']} ms/step_", ""]
  lines += [f"Model FLOPs per step (hand count, `model_flops_per_step`): {_f(p['model_flops_per_step'] / 1e9, 1)} G; "
            f"XLA cost analysis of the compiled step: {_f(p['xla_cost_flops'] / 1e9, 1)} GFLOP, "
            f"{_f(p['xla_cost_bytes'] / 2**30, 2)} GiB accessed. Dot FLOPs in the timed GEMM thunks: "
            f"{p['gemm_gflop_per_step']} G/step, run at **{_f(p['gemm_gflops_per_s'], 1)} GFLOP/s** inside the step "
            f"(vs {p['jax_matmul_gflops']} for a large square matmul)."
            + (f" Another {p['async_gemm_gflop_per_step']} G/step ran in {p['async_gemm_thunks']} asynchronous Eigen "
               "`dot` thunks whose trace events cover only their dispatch (their time overlaps the other thunks)."
               if p.get("async_gemm_thunks") else ""), ""]
  lines += _table(["kind", "ms/step"], [[k, v] for k, v in p["by_kind_ms"].items()])
  lines += _table(["model part", "ms/step"], [[k, v] for k, v in p["by_part_ms"].items()])
  if p.get("non_gemm_by_fusion_ms"):
    lines += ["Non-GEMM thunks by fusion family (XLA names a fusion after its ops: `copy_bitcast_fusion` are "
              "transposing copies, `slice_bitcast_fusion` slices, `add_dynamic-update-slice_fusion` in-place "
              "updates):", ""]
    lines += _table(["fusion family", "ms/step"], [[f"`{k}`", v] for k, v in p["non_gemm_by_fusion_ms"].items()])
  bound = p.get("gemm_bound")
  if bound:
    lines += [f"**GEMMs alone** (`profile.gemm_bound`): each of the step's {bound['dots']} dots ({bound['distinct']} "
              f"distinct shapes, {bound['gflop']} GFLOP) timed by itself as a jitted `lax.dot_general` in this "
              f"process: together **{_f(bound['gemm_alone_s'], 3)} s** ({_f(bound['gflops_per_s'], 1)} GFLOP/s), "
              f"against the step's {_f(p['step_wall_s_median'], 3)} s. Even with everything but the GEMMs free, "
              f"MFU could not exceed **{_f(100 * bound['mfu_ceiling'], 1)}%** of the matmul peak measured here "
              "for these shapes. The costliest GEMMs:", ""]
    lines += _table(["lhs", "rhs", "contracting (lhs, rhs)", "count", "ms each", "GFLOP/s alone", "ms total"],
                    [[f"`{r['lhs']}`", f"`{r['rhs']}`", f"`{r['contracting']}`", r["count"], r["ms_each"],
                      r["gflops_per_s"], r["ms_total"]] for r in bound["top"]])
  lines += ["Top thunks:", ""]
  lines += _table(["thunk", "ms/step", "output", "GFLOP/s", "source op"],
                  [[t["thunk"], t["ms_per_step"], f"`{t['shape'].split('{')[0]}`", _f(t["gflops_per_s"], 1),
                    f"`{t['op_name']}`"] for t in p["top_thunks"]])
  return lines


GPU_HOW = ("`python -m benchmarks --only gpu` runs it where JAX sees a GPU (a CUDA build of jaxlib); on a CPU-only "
           "machine the section records why it did not run.")


def gpu_lines(g: dict) -> list[str]:
  if "skipped" in g:
    return [f"Not run: {g['skipped']}.", "", GPU_HOW, ""]
  peak = g.get("datasheet_bf16_tflops")
  host = g.get("host", {})
  lines = [f"Device: {g['device_kind']} ({g['platform']}, {g['device_count']} visible; one used), host CPU "
           f"{host.get('cpu')} ({host.get('cores')} cores), jax {host.get('versions', {}).get('jaxlib')}. Batch "
           f"{g['batch_size']} pairs x {g['length']} tokens, production objective; bf16 = `MoteConfig(dtype="
           f"'bfloat16')` (parameters, optimizer state, logits, softmax and LayerNorm statistics fp32), timed "
           f"round-robin against the same step in fp32 (JAX's default matmul precision).", "",
           f"MFU denominators: the datasheet's dense bf16 peak, **{_f(peak, 1)} TFLOP/s** "
           f"({g['datasheet_source']}{'' if peak else ': device not listed'}), and a {g['matmul_n']} x "
           f"{g['matmul_n']} bf16 matmul measured in the same process, **{_f(g['matmul_bf16_tflops'], 2)} TFLOP/s** "
           f"(best of 5).", ""]
  rows = []
  for shape, by_dtype in g["shapes"].items():
    for dtype, r in by_dtype.items():
      mfu = r.get("mfu_vs_datasheet")
      rows.append([shape, dtype, _f(r["median_s"] * 1e3, 1), _spread(r), _f(r["pairs_per_s"], 1),
                   _f(r["flops_per_step"] / 1e9, 1), _f(r["model_tflops_per_s"], 2),
                   _f(None if mfu is None else 100 * mfu, 1, "%"),
                   _f(100 * r["mfu_vs_measured_matmul"], 1, "%"), _f(r.get("speedup_over_float32"), 2, "x"),
                   _f(r["memory"].get("temp_size_mb"), 0)])
  lines += _table(["shape", "dtype", "median ms/step", "min-max s", "pairs/s", "model GFLOP/step",
                   "model TFLOP/s", "MFU (datasheet bf16)", "MFU (measured bf16 matmul)", "bf16 speed-up",
                   "XLA temp MB"], rows)
  return lines


def input_lines(i: dict) -> list[str]:
  r = i["records"]
  first = i["first_batch_s"]
  pairs = i.get("distinct_pairs_per_s", i.get("span_pairs_per_s"))
  rows = [["masked rows/s (anchor + context, both masked; a pair gives two rows)", _f(i["rows_per_s"], 0)],
          ["distinct span pairs/s (wall)", _f(pairs, 0)]]
  if "distinct_pairs_per_cpu_s" in i:
    rows.append(["distinct span pairs per CPU-second of the pinned process", _f(i["distinct_pairs_per_cpu_s"], 0)])
  rows += [["first batch at start step 0, median s", _f(first["0"]["median"], 3)],
           ["first batch at start step 10^6, median s", _f(first["1000000"]["median"], 3)],
           ["ratio (10^6 / 0)", _f(i["first_batch_ratio"], 2, "x")],
           ["anchor masked share", _f(i["anchor_masked_share"], 3)]]
  return ([f"`mote_jax.data.online` on {i['cores']}; {i['text']}: {r['documents']:,} records of "
           f"{_f(r['mean_ids_per_document'], 0)} ids on average; batches of {i['batch_rows']} rows x {i['max_len']} "
           f"ids (the recipe's 512 span pairs in both directions), {i['timed_batches']} batches timed after "
           f"warm-up. Other jobs shared the machine (see the load).", ""]
          + _table(["measure", "value"], rows))


def finetune_data_lines(f: dict) -> list[str]:
  b, m = f["build"], f["bm25"]
  rows = [["peak RSS of the building process (MB)", _f(b["peak_rss_mb"], 0)],
          ["of which after imports (MB)", _f(b["rss_after_imports_mb"], 0)],
          ["synthetic texts, s", _f(b["seconds"]["texts"], 1)],
          ["groups (beir_groups over the run), s", _f(b["seconds"]["groups"], 1)],
          ["tokenise corpus + queries into the cache, build the stream, s", _f(b["seconds"]["tokenise_and_stream"], 1)],
          [f"draw a batch of {b['batch_groups']} groups, consecutive steps: median / max ms",
           f"{_f(b['draw_consecutive_ms']['median'], 2)} / {_f(b['draw_consecutive_ms']['max'], 2)}"],
          [f"draw a batch of {b['batch_groups']} groups at a random step (resume): median / max ms",
           f"{_f(b['draw_random_steps_ms']['median'], 2)} / {_f(b['draw_random_steps_ms']['max'], 2)}"],
          [f"BM25 index of {m['passages']:,} passages, s", _f(m["index_s"], 1)]]
  rows += [[f"BM25 queries/s, {t} thread{'s' if t != '1' else ''} (top {m['depth']})", _f(q, 0)]
           for t, q in m["queries_per_s"].items()]
  return ([f"`mote_jax.data.finetune` / `mote_jax.data.bm25`, {f['text']}: {b['passages']:,} passages "
           f"({b['corpus_tokens']:,} tokens), {b['queries']:,} queries x {b['negatives_per_query']} negatives "
           f"({b['groups']:,} groups), built in a fresh process; batches of {b['batch_groups']} groups x "
           f"{b['batch_passages']} passages x {b['passage_max_len']} tokens. BM25 over a smaller corpus of the "
           f"same text ({m['passages']:,} passages, {m['queries']:,} queries). Other jobs shared the machine "
           "(see the load).", ""] + _table(["measure", "value"], rows))


def loop_lines(r: dict) -> list[str]:
  rows = [["jitted step alone, one batch in host memory (steps/s, median of rounds)", _f(r["step_steps_per_s"], 3)],
          ["step rounds (steps/s; before and after the loop)", ", ".join(_f(v, 3) for v in r["step_steps_per_s_all"])],
          ["real loop: Trainer.train + records input pipeline (steps/s)", _f(r["loop_steps_per_s"], 3)],
          ["loop windows (steps/s)", ", ".join(_f(v, 3) for v in r["loop_windows_steps_per_s"])],
          ["loop / step", _f(r["loop_vs_step"], 3)]]
  if "input_alone_steps_per_s" in r:
    rows.append(["the records input alone, no model (batches/s)", _f(r["input_alone_steps_per_s"], 1)])
  return ([f"The quickstart's pre-training shape ({r['model']}, {r['rows_per_step']} rows x {r['max_len']} ids a step"
           f" = {r['rows_per_step'] // 2} span pairs in both directions) on records of the first "
           f"{r['documents']} SciFact documents (Beam job, {_f(r['preprocess_s'], 1)} s); {r['timed_steps']} steps "
           f"timed after {r['warmup_steps']} warm-up steps. Other jobs shared the machine (see the load).", ""]
          + _table(["measure", "value"], rows))


SECTIONS = [
    ("gemm", "Measured GEMM peak", gemm_lines),
    ("pretrain", "1. Pre-training step: JAX vs PyTorch (eager, torch.compile)", pretrain_lines),
    ("finetune_step", "1b. Contrastive fine-tuning step: JAX vs PyTorch eager", finetune_lines),
    ("mote", "2. MoTE overhead: mote vs siamese", mote_lines),
    ("encode", "3. Encoding: JAX Embedder vs sentence-transformers", encode_lines),
    ("search", "4. Search: ScaNN vs exact brute force (1M x 384)", search_lines),
    ("scaling", "5. Scaling of the MiniLM step with batch size and sequence length", scaling_lines),
    ("gpu", "6. GPU bf16 pre-training step", gpu_lines),
    ("variants", "7a. Optimisation experiments (in process)", variants_lines),
    ("kernel_ab", "7d. CPU kernel set against plain XLA (fresh A/B)", kernel_ab_lines),
    ("flags", "7b. XLA:CPU flags and JAX settings (one process each)", flags_lines),
    ("profile", "7c. Profile of the JAX MiniLM step", profile_lines),
    ("preprocess", "9. Offline preprocessing (Beam DirectRunner)", _preprocess.lines),
    ("input", "10. Online pre-training input pipeline (records -> masked pairs)", input_lines),
    ("finetune_data", "11. Fine-tuning data at MS MARCO scale", finetune_data_lines),
    ("loop", "12. The quickstart's pre-training loop (input included) vs its step", loop_lines),
]


def targets(results: dict) -> list[list]:
  rows = []
  p = results.get("pretrain", {}).get("shapes", {})
  for shape, s in p.items():
    r = s["ratios"]
    # The reference is the official recipe's objective (full-vocabulary MLM logits); the "masked" torch rows give
    # torch the same masked-position logits as the JAX step: a stricter comparison, shown beside it.
    for name, target, note in (("jax/masked vs torch/eager/full", 2.0, " (the reference)"),
                               ("jax/masked vs torch/compile/full", 1.0, ""),
                               ("jax/masked vs torch/eager/masked", 2.0, " (stricter: torch with masked logits too)"),
                               ("jax/masked vs torch/compile/masked", 1.0, " (stricter)")):
      if name in r:
        rows.append([f"{shape}: {name}{note}", f">= {target}x", _f(r[name], 2, "x"),
                     "yes" if r[name] >= target else "no"])
    if "jax/masked" in s["rows"]:
      mfu = s["rows"]["jax/masked"]["mfu"]
      rows.append([f"{shape}: jax/masked MFU", ">= 70%", _f(100 * mfu, 1, "%"), "yes" if mfu >= 0.7 else "no"])
      if "mfu_vs_peak_in_rounds" in s["rows"]["jax/masked"]:
        mfu = s["rows"]["jax/masked"]["mfu_vs_peak_in_rounds"]
        rows.append([f"{shape}: jax/masked MFU against the peak timed inside the same rounds", ">= 70%",
                     _f(100 * mfu, 1, "%"), "yes" if mfu >= 0.7 else "no"])
    if "jax/masked vs jax-xla/masked" in r:
      rows.append([f"{shape}: jax/masked, this platform's kernel set vs the plain-XLA set (jax-xla/masked)",
                   "measured", _f(r["jax/masked vs jax-xla/masked"], 3, "x"), "-"])
  for shape, s in results.get("finetune_step", {}).get("shapes", {}).items():
    for name in [n for n in s["ratios"] if n.endswith("vs torch/eager")]:
      ratio = s["ratios"][name]
      rows.append([f"fine-tuning {shape}: {name}", ">= 2.0x", _f(ratio, 2, "x"), "yes" if ratio >= 2 else "no"])
    if "jax/default" in s["rows"]:
      mfu = s["rows"]["jax/default"]["mfu"]
      rows.append([f"fine-tuning {shape}: jax/default MFU", "measured", _f(100 * mfu, 1, "%"), "-"])
  for name, v in results.get("kernel_ab", {}).get("verdicts", {}).items():
    if v["consistent"] is not None:
      rows.append([f"CPU kernel set, {name}: {v['rule']}", ">= 1.02x or left out",
                   f"{v['cpu_set']} / {v['alternative']}: {_f(v['cpu_choice_speed_over_alternative'], 3, 'x')}",
                   "yes" if v["consistent"] else "no"])
  m = results.get("mote", {})
  if "mote_over_siamese" in m:
    rows.append(["mote / siamese step time", "<= 1.05x", _f(m["mote_over_siamese"], 3, "x"),
                 "yes" if m["mote_over_siamese"] <= 1.05 else "no"])
  e = results.get("encode", {})
  if "jax_over_st" in e:
    rows.append(["encoding JAX / sentence-transformers", ">= 1.5x", _f(e["jax_over_st"], 2, "x"),
                 "yes" if e["jax_over_st"] >= 1.5 else "no"])
  s = results.get("search", {})
  if "scann_default_speedup_vs_best_exact" in s:
    d = s["methods"]["scann/default"]
    ok = s["scann_default_speedup_vs_best_exact"] >= 20 and d["recall"] >= 0.95
    rows.append(["ScaNN (default) / best exact queries/s, recall@10", ">= 20x at >= 0.95",
                 f"{_f(s['scann_default_speedup_vs_best_exact'], 1)}x at {_f(d['recall'], 3)}", "yes" if ok else "no"])
    if s.get("scann_best_at_095_speedup_vs_best_exact"):
      v = s["scann_best_at_095_speedup_vs_best_exact"]
      rows.append(["ScaNN (fastest swept setting at recall >= 0.95) / best exact", ">= 20x", _f(v, 1, "x"),
                   "yes" if v >= 20 else "no"])
      for name, ratio in s.get("scann_best_at_095_speedup_vs", {}).items():
        rows.append([f"ScaNN (same setting) / {name}", ">= 20x", _f(ratio, 1, "x"), "yes" if ratio >= 20 else "no"])
  if "rows" in results.get("preprocess", {}):
    rows += _preprocess.target_rows(results["preprocess"])
  i = results.get("input", {})
  if "rows_per_s" in i:
    pairs = i.get("distinct_pairs_per_s", i.get("span_pairs_per_s"))
    rows.append([f"online input pipeline, distinct masked span pairs/s on one core ({i['text']})", ">= 10,000",
                 _f(pairs, 0), "yes" if pairs >= 10_000 else "no"])
    if "distinct_pairs_per_cpu_s" in i:
      per_cpu = i["distinct_pairs_per_cpu_s"]
      rows.append(["the same per CPU-second of the pinned process (its rate alone on the core)", ">= 10,000",
                   _f(per_cpu, 0), "yes" if per_cpu >= 10_000 else "no"])
    rows.append(["online input: time to first batch at step 10^6 / at step 0", "<= 2x",
                 _f(i["first_batch_ratio"], 2, "x"), "yes" if i["first_batch_ratio"] <= 2 else "no"])
  f = results.get("finetune_data", {})
  if "build" in f:
    b, m = f["build"], f["bm25"]
    scale = f"{b['passages']:,} passages, {b['queries']:,} queries x {b['negatives_per_query']} negatives"
    rows.append([f"fine-tuning data: peak RSS of building ({scale})", "<= 3 GB",
                 _f(b["peak_rss_mb"] / 1024, 2, " GB"), "yes" if b["peak_rss_mb"] <= 3 * 1024 else "no"])
    draw = b["draw_consecutive_ms"]["median"]
    rows.append([f"fine-tuning data: draw a batch of {b['batch_groups']} groups (median, consecutive steps)",
                 "<= 5 ms", _f(draw, 2, " ms"), "yes" if draw <= 5 else "no"])
    for t, q in m["queries_per_s"].items():
      rows.append([f"BM25 queries/s, {t} thread{'s' if t != '1' else ''} ({m['passages']:,}-passage corpus, "
                   f"top {m['depth']})", "reported", _f(q, 0), "-"])
  lp = results.get("loop", {})
  if "loop_vs_step" in lp:
    rows.append(["quickstart pre-training loop steps/s / its step's steps/s", ">= 0.90",
                 _f(lp["loop_vs_step"], 3), "yes" if lp["loop_vs_step"] >= 0.9 else "no"])
  return rows


def render(results: dict, command: str) -> str:
  machine = results.get("machine", {})
  minutes = sum(results[key].get("seconds", 0.0) for key, _, _ in SECTIONS if key in results) / 60
  times = sorted(results[key]["measured_at"] for key, _, _ in SECTIONS if "measured_at" in results.get(key, {}))
  measured = f"{times[0]} to {times[-1]}" if times else "(no section measured)"
  lines = ["# mote_jax benchmarks", "",
           f"Regenerate with `{command}` from the repository root (the sections below took {minutes:.0f} minutes "
           f"on 2 cores, plus waits for a quiet machine; `--quick` for a small smoke run, `--only NAME[,NAME]` for some sections; the raw figures are in "
           f"`benchmarks/results.json`). Sections measured {measured}.", ""]
  lines += [MACHINE_NOTE, ""]
  if machine:
    v = machine.get("versions", {})
    lines += ["## Machine", "",
              f"- CPU: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('memory_gb')} GB RAM; "
              f"ISA: {', '.join(machine.get('isa', []))}",
              "- sections 0-5 and 7 run on this CPU: fp32 unless stated; every library uses all cores (2 threads); "
              "section 6 names its own device and host",
              "- every section's process (JAX and PyTorch alike) runs with the glibc malloc settings that "
              "`mote_jax.launch` applies (`mote_jax/host_malloc.py`: one arena, no mmap'd chunks, no trimming); "
              "section 7b times the glibc defaults",
              "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
              f"- 1-min load average when the run started: {machine.get('load1')} (other jobs share this machine; "
              f"each section notes the load before/after, and contenders are timed round-robin within a section "
              f"so that a load change affects them alike)",
              ""]
    if machine.get("notes"):
      lines += [f"- {n}" for n in machine["notes"]] + [""]
  rows = targets(results)
  if rows:
    lines += ["## Targets", ""] + _table(["target", "wanted", "measured", "met"], rows)
  for key, title, fn in SECTIONS:
    if key in results:
      section = results[key]
      lines += [f"## {title}", ""]
      # A failed section says why; a measured one starts with its load, duration and time, then its body.
      lines += _error(section) if "error" in section else [_meta(section), ""] + fn(section)
    elif key == "gpu":
      lines += ["## 6. GPU bf16 pre-training step", "", f"Not run in this results file: {GPU_HOW}", ""]
  if "baseline" in results:
    from benchmarks import baseline
    lines += [f"## Same-run comparison with {results['baseline']['rev']}", ""]
    lines += baseline.lines(results["baseline"], _f)
  if ANALYSIS.exists():
    lines += ["## 8. What each optimisation gains", "",
              f"See [{ANALYSIS.name}]({ANALYSIS.name}): a table of each change, its platform, its gain and where it "
              "was measured (written by hand; this file is regenerated).", ""]
  return "\n".join(lines)
