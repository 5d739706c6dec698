"""Smoke test of the `benchmarks` package at tiny sizes: every code path that produces a figure, not the figures.

The full benchmarks are `python -m benchmarks` (see benchmarks/RESULTS.md); these checks keep them runnable: the
PyTorch reference computes the same loss as the JAX objective, the JAX step is `Trainer`'s, the encoders agree,
the search contenders return the exact neighbours, the profile parser finds the dots, and the report renders.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import gemm, gpu, pretrain, profile, report
from benchmarks.common import REPO, clean_env


@pytest.mark.slow  # builds and runs both MiniLM steps: ~50 s on 2 cores
def test_pretrain_step_jax_and_torch_agree_on_the_loss(data_dir):
  contenders = ["jax/masked", "torch/eager/full", "torch/eager/masked"]
  result = pretrain.bench_shape("tiny", batch_size=2, length=32, warmup=0, repeats=1, peak_gflops=100.0,
                                contenders=contenders, peak_n=256)
  assert set(result["rows"]) == set(contenders)
  # The matmul timed inside the rounds is not a contender; MFU against it is the model rate over its rate.
  peak = result["peak_in_rounds"]
  assert peak["n"] == 256 and peak["runs"] == 1 and peak["gflops"] > 0
  for row in result["rows"].values():
    assert row["mfu_vs_peak_in_rounds"] == pytest.approx(row["model_gflops_per_s"] / peak["gflops"], rel=1e-9)
  # Same weights, same batch, dropout off: the independent PyTorch CoT-MAE gives the JAX objective's loss.
  for name, diff in result["loss_abs_diff_vs_torch_full"].items():
    assert diff <= 1e-4, (name, diff)
  assert result["rows"]["jax/masked"]["flops_per_step"] < result["rows"]["torch/eager/full"]["flops_per_step"]
  for row in result["rows"].values():
    assert row["median_s"] > 0 and 0 < row["mfu"] < 10
  assert "jax/masked vs torch/eager/full" in result["ratios"]


@pytest.mark.slow  # builds and runs both fine-tuning steps: ~40 s on 2 cores
def test_finetune_step_jax_and_torch_agree_on_the_loss(data_dir):
  """The fine-tuning section's contenders on a tiny model and a real SciFact batch (BM25 negatives, judged
  passages masked): the independent PyTorch MoTE InfoNCE (two BertModels sharing embeddings and attention) gives
  the loss of the JAX step's objective at step 0, and the hand FLOP count agrees with XLA's count."""
  from benchmarks import finetune_step
  dims = finetune_step.SHAPES["tiny"]
  directory = finetune_step.checkpoint_dir("tiny")
  batch = finetune_step.finetune_batch(**dims, max_groups=finetune_step.MAX_GROUPS["tiny"])
  assert (batch["query_judged_index"] >= 0).any()
  step = finetune_step.JaxFinetuneStep(directory, dims)  # the trainer `jobs.finetune` builds, not yet stepped
  config = step.config
  for tower_mode in ("mote", "siamese"):
    jax_loss = finetune_step.JaxFinetuneStep(directory, dims, tower_mode=tower_mode).eval_loss(batch) \
        if tower_mode == "siamese" else step.eval_loss(batch)
    torch_loss = finetune_step.torch_eval_loss(finetune_step.TorchMote(
        directory, tower_mode=tower_mode, pooling=config.pooling, normalize=config.normalize,
        temperature=finetune_step.temperature_for(config)), batch)
    assert abs(jax_loss - torch_loss) <= 1e-4, (tower_mode, jax_loss, torch_loss)
  # The hand count (3 x the forward's matmuls) against XLA's cost analysis of the deterministic forward loss.
  forward = jax.jit(lambda p, b: step.model.loss_fn(p, b)[0]).lower(step.state.params, batch).compile()
  cost = forward.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert step.flops / 3 == pytest.approx(cost["flops"], rel=0.15), (step.flops / 3, cost["flops"])


@pytest.mark.slow
def test_finetune_section_times_jax_and_torch_steps(data_dir):
  from benchmarks import finetune_step
  result = finetune_step.bench_shape("tiny", warmup=0, repeats=1, peak_gflops=100.0)
  assert set(result["rows"]) == {"jax/default", "jax/xla", "torch/eager"}
  for name, diff in result["loss_abs_diff_vs_torch"].items():
    assert diff <= 1e-4, (name, diff, result["eval_losses"])
  for row in result["rows"].values():
    assert row["median_s"] > 0 and 0 < row["mfu"] < 10
  assert {"jax/default vs torch/eager", "jax/xla vs torch/eager", "jax/default vs jax/xla"} <= set(result["ratios"])


@pytest.mark.slow  # encodes with both stacks: ~35 s on 2 cores
def test_encode_section_matches_sentence_transformers(data_dir):
  from benchmarks import encode
  result = encode.run(quick=True, num_passages=2)
  assert result["rows"]["jax/fp32"]["min_cosine_vs_st"] >= 0.9999
  assert result["jax_over_st"] > 0


def test_search_section_small():
  from benchmarks import search
  result = search.run(quick=True, rows=3000, num_queries=20)
  assert result["methods"]["exact/faiss-flat"]["recall"] == 1.0
  assert result["methods"]["exact/mote_jax"]["recall"] == 1.0
  assert 0.0 < result["methods"]["scann/default"]["recall"] <= 1.0
  # The tuned index's k-means is trained on every row, not on ScannConfig's default sample.
  assert result["tuned_config"]["training_sample_size"] == 3000
  assert result["tuned_config"]["spherical"] and result["tuned_config"]["dimensions_per_block"] == 4
  # The tuned index is searched with bfloat16 and float32 reordering at the same settings.
  tuned = [name for name in result["scann_sweep"] if name.startswith("tuned") and "adaptive" not in name]
  assert {name.split(" reordering")[0].split(", ")[-1] for name in tuned} == {"bfloat16", "float32"}
  # Query-adaptive leaf selection on the same index: a query searches at least its best leaf and at most the cap,
  # and the margin lets queries search fewer leaves than the cap on average.
  assert result["tuned_adaptive_config"]["leaf_score_margin"] == 0.19
  adaptive = {name: row for name, row in result["scann_sweep"].items() if "adaptive" in name}
  assert len(adaptive) == 1
  for name, row in adaptive.items():
    cap = int(name.split("leaves_to_search<=")[1].split(",")[0])
    p10, p50, p90 = row["leaves_searched_p10_p50_p90"]
    assert 1 <= p10 <= p50 <= p90 <= cap and 1 <= row["leaves_searched_mean"] < cap, row
    assert row["recall"] > 0.5
  # A bfloat16 reordering copy makes a smaller index than a float32 one.
  index_mb = {name.split(" reordering")[0].split(", ")[-1]: result["scann_sweep"][name]["index_mb"] for name in tuned}
  assert 0 < index_mb["bfloat16"] < index_mb["float32"]


def test_search_section_counts_the_leaves_scann_searches_under_a_score_margin(tmp_path):
  """Section 4's leaves-searched count for `leaf_score_margin` is what ScaNN does: on the same partition, a
  fixed-count search of each query's counted leaves finds the same rows as the margin search."""
  import dataclasses

  from benchmarks.search import _leaf_centres, leaves_within_margin
  from benchmarks.scann_recall import clustered_vectors
  from mote_jax.retrieval.search import ScannConfig, build_scann
  corpus, mixture = clustered_vectors(20000, 64, clusters=200, noise=1.0, seed=3)
  queries, _ = clustered_vectors(100, 64, noise=1.0, seed=4, mixture=mixture)
  config = ScannConfig(num_leaves=100, num_leaves_to_search=30, soar_lambda=None, leaf_score_margin=0.1)

  def build(config, name):
    searcher = build_scann(corpus, 10, config)
    (tmp_path / name).mkdir()
    searcher.serialize(str(tmp_path / name))
    return searcher, _leaf_centres(tmp_path / name)

  # ScaNN's k-means is not always reproducible between builds (and numbers the leaves differently): build both
  # kinds until a margin index and a fixed-count index share their leaf centres.
  adaptive_builds, fixed_builds = [], []
  for attempt in range(6):
    adaptive_builds.append(build(config, f"adaptive{attempt}"))
    fixed_builds.append(build(dataclasses.replace(config, leaf_score_margin=None), f"fixed{attempt}"))
    pair = next(((a, f) for a in adaptive_builds for f in fixed_builds
                 if np.array_equal(np.unique(a[1], axis=0), np.unique(f[1], axis=0))), None)
    if pair:
      break
  else:
    pytest.fail("six margin and six fixed-count builds share no partition")
  (adaptive, centres), (fixed, _) = pair
  assert centres.shape == (100, 64)
  counts = leaves_within_margin(queries, centres, 0.1, 30)
  assert counts.min() == 1 and 1 < np.median(counts) < counts.max() <= 30, counts  # it does adapt
  found, _ = adaptive.search_batched(queries)
  for query, count, row in zip(queries, counts, np.asarray(found)):
    expected, _ = fixed.search(query, leaves_to_search=int(count))
    assert set(expected) == set(row), count


def test_data_hardness_measures_known_dimension_and_separable_clusters():
  from benchmarks.data_hardness import hardness
  rng = np.random.default_rng(0)
  # Gaussian on a 6-dimensional subspace of 384, normalised: a 5-sphere, local dimension 5.
  sphere = rng.standard_normal((4000, 6)) @ np.linalg.qr(rng.standard_normal((384, 384)))[0][:6]
  sphere = (sphere / np.linalg.norm(sphere, axis=1, keepdims=True)).astype(np.float32)
  stats = hardness(sphere[:200], sphere[200:])
  assert 4.0 < stats["lid@20_median"] < 6.5, stats
  assert 5.0 < stats["participation_ratio"] < 6.5, stats
  # 16 tight, well-separated clusters: every true neighbour is in the query's own (best-scoring) leaf region.
  centres = np.linalg.qr(rng.standard_normal((384, 16)))[0].T
  labels = rng.integers(16, size=4100)
  points = centres[labels] + 0.01 * rng.standard_normal((4100, 384))
  points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
  stats = hardness(points[:100], points[100:])
  assert stats["leaves"] == 63 and stats["leaf_share_for_recall"]["0.95"] <= 8 / 63, stats
  # Adaptive leaf selection: the smallest margin reaching recall 0.95 visits no more leaves on average than the
  # fixed count does, and the margin itself is a score gap between leaf centres (0 <= gap <= 2 for unit vectors).
  adaptive = stats["adaptive_leaf_share_for_recall"]["0.95"]
  assert adaptive["mean_share"] <= stats["leaf_share_for_recall"]["0.95"] and 0 <= adaptive["margin"] <= 2, stats
  # Isotropic unit vectors: no structure to partition, most leaves must be visited.
  iso = rng.standard_normal((4100, 384)).astype(np.float32)
  iso /= np.linalg.norm(iso, axis=1, keepdims=True)
  stats = hardness(iso[:100], iso[100:])
  assert stats["leaf_share_for_recall"]["0.95"] > 0.5 and stats["adaptive_leaf_share_for_recall"]["0.95"][
      "mean_share"] > 0.3, stats


def test_profile_parser_counts_dot_flops():
  f = jax.jit(lambda a, b: jax.nn.gelu(a @ b).sum())
  a = jnp.ones((64, 32))
  b = jnp.ones((32, 16))
  hlo = profile.parse_hlo(f.lower(a, b).compile().as_text())
  assert max(i["dot_flops"] for i in hlo.values()) == 2 * 64 * 32 * 16


def test_gemm_bound_times_every_dot_of_the_module():
  f = jax.jit(lambda a, b, c: (jnp.einsum("bqd,bkd->bqk", a, b) @ c).sum() + (a[0] @ b[0].T).sum())
  a, b, c = jnp.ones((2, 64, 32)), jnp.ones((2, 48, 32)), jnp.ones((48, 16))
  signatures = profile.dot_signatures(f.lower(a, b, c).compile().as_text())
  flops = {sig: 2 * np.prod(sig[1]) * np.prod(sig[2]) / np.prod([sig[2][i] for i in sig[3][1] + sig[4][1]])
           for sig in signatures}
  # The batched [2: 64 x 32 x 48] score product, [2 x 64, 48] x [48, 16], and the unbatched [64 x 32 x 48] one.
  assert sum(flops[sig] * n for sig, n in signatures.items()) == 2 * 64 * 48 * (2 * 32 + 2 * 16 + 32)
  bound = profile.gemm_bound(f.lower(a, b, c).compile().as_text(), repeats=1)
  assert bound["dots"] == sum(signatures.values()) and bound["gemm_alone_s"] > 0
  assert bound["gflop"] == round(sum(flops[sig] * n for sig, n in signatures.items()) / 1e9, 2)


def test_gemm_and_report_render(tmp_path):
  peak = gemm.measure(sizes=(128,), repeats=1, libraries=("jax", "numpy"))
  assert peak["peak_fp32_gflops"] > 0
  text = report.render({"machine": {"cpu": "x", "cores": 2, "versions": {}}, "gemm": peak}, "python -m benchmarks")
  assert "## Measured GEMM peak" in text and peak["peak_fp32_source"] in text
  # A section that failed says why instead of rendering its body (which would need the missing figures).
  failed = report.render({"encode": {"error": "RuntimeError: out of memory", "seconds": 3.0}}, "python -m benchmarks")
  assert "## 3. Encoding" in failed and "**Not measured: RuntimeError: out of memory**" in failed


@pytest.mark.slow  # compiles the bf16 step on CPU: ~45 s on 2 cores
def test_gpu_section_skips_without_a_gpu_and_runs_its_step_on_cpu(data_dir):
  skipped = gpu.run()  # the project's jaxlib is CPU-only: no "gpu" backend
  assert skipped["skipped"].startswith("no gpu device visible to JAX"), skipped
  assert "Not run: no gpu device visible to JAX" in report.render({"gpu": skipped}, "python -m benchmarks")
  # The same code on the CPU at the tiny shape, with a given datasheet peak.
  result = gpu.run(quick=True, platform="cpu", peak_tflops=0.5)
  assert result["datasheet_bf16_tflops"] == 0.5 and result["datasheet_source"] == "--options peak_tflops"
  assert result["matmul_bf16_tflops"] > 0
  rows = result["shapes"]["tiny"]
  assert set(rows) == {"bfloat16", "float32"}
  for row in rows.values():
    tflops = row["flops_per_step"] / row["median_s"] / 1e12
    assert row["model_tflops_per_s"] == pytest.approx(tflops, rel=1e-9)
    assert row["mfu_vs_datasheet"] == pytest.approx(tflops / 0.5, rel=1e-9)
    assert row["mfu_vs_measured_matmul"] == pytest.approx(tflops / result["matmul_bf16_tflops"], rel=1e-9)
  # Both dtypes are credited the same model FLOPs, so their MFU figures compare.
  assert rows["bfloat16"]["flops_per_step"] == rows["float32"]["flops_per_step"]
  # bf16 compute over fp32 parameters: the same first loss to bf16 precision (same weights, batch and dropout).
  assert rows["bfloat16"]["first_loss"] == pytest.approx(rows["float32"]["first_loss"], rel=1e-2)
  text = report.render({"gpu": dict(result, seconds=1.0)}, "python -m benchmarks")
  assert "## 6. GPU bf16 pre-training step" in text and "| tiny | bfloat16 |" in text


def test_gpu_datasheet_peaks_match_the_most_specific_device_name():
  assert gpu.datasheet_peak_tflops("NVIDIA H200") == 989.4
  assert gpu.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert gpu.datasheet_peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert gpu.datasheet_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert gpu.datasheet_peak_tflops("NVIDIA L40S") == 362.0
  assert gpu.datasheet_peak_tflops("NVIDIA L40") == 181.0
  assert gpu.datasheet_peak_tflops("NVIDIA L4") == 121.0
  assert gpu.datasheet_peak_tflops("Tesla V100-SXM2-16GB") is None  # no bf16 tensor cores


def test_cli_runs_a_section(tmp_path):
  out = tmp_path / "RESULTS.md"
  proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "gemm", "--out", str(out)],
                        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["gemm"]["peak_fp32_gflops"] > 0
  assert "fp32 peak" in out.read_text()


def test_input_section_rows_render():
  section = {"cores": "1", "text": "synthetic ids", "records": {"documents": 10, "mean_ids_per_document": 1500.0},
             "batch_rows": 1024, "max_len": 128, "timed_batches": 3, "rows_per_s": 12_000.0,
             "distinct_pairs_per_s": 6_000.0, "distinct_pairs_per_cpu_s": 11_000.0, "first_batch_ratio": 2.5,
             "anchor_masked_share": 0.3, "first_batch_s": {"0": {"median": 0.2}, "1000000": {"median": 0.5}}}
  text = report.render({"input": section}, "python -m benchmarks")
  # The target counts distinct span pairs: 12,000 rows/s in both directions are 6,000 pairs/s.
  assert ("| online input pipeline, distinct masked span pairs/s on one core (synthetic ids) | >= 10,000 | 6,000 "
          "| no |") in text
  assert "| the same per CPU-second of the pinned process (its rate alone on the core) | >= 10,000 | 11,000 | yes |" \
      in text
  assert "| online input: time to first batch at step 10^6 / at step 0 | <= 2x | 2.50x | no |" in text


def test_loop_section_rows_render():
  section = {"model": "m", "rows_per_step": 8, "max_len": 128, "documents": 600, "preprocess_s": 5.0,
             "timed_steps": 30, "warmup_steps": 10, "step_steps_per_s": 4.0, "step_steps_per_s_all": [4.0, 3.9],
             "loop_steps_per_s": 3.8, "loop_windows_steps_per_s": [3.8], "loop_vs_step": 0.95,
             "input_alone_steps_per_s": 400.0}
  text = report.render({"loop": section}, "python -m benchmarks")
  assert "| quickstart pre-training loop steps/s / its step's steps/s | >= 0.90 | 0.950 | yes |" in text
  assert "| the records input alone, no model (batches/s) | 400.0 |" in text
def _paired_row(speedup):
  """A variant row whose paired speed over the baseline is `speedup` in every round."""
  return {"paired_speedup_vs_baseline": {"median": speedup, "rounds": 5}}


def test_kernel_ab_verdicts_follow_the_two_percent_rule_on_the_steps_geometric_mean():
  """The CPU set's dropout choice differs from plain XLA and must be >= 2% faster than it (geometric mean over the
  pre-training and fine-tuning steps); its dense products and clip are XLA's, so the alternatives must not be >= 2%
  faster. paired_speedup_vs_baseline is the alternative's speed over the CPU set's."""
  from benchmarks import kernel_ab
  from mote_jax import kernels
  assert kernels.CPU.dropout != kernels.XLA.dropout
  assert kernels.CPU.dense == kernels.XLA.dense and kernels.CPU.grad_clip == kernels.XLA.grad_clip

  def result(dense, dropout, clip, whole=0.8):
    return {"rows": {"kernels-xla": _paired_row(whole), "dense-cpu_gemm": _paired_row(dense),
                     "dropout-jax_random": _paired_row(dropout), "clip-scalar": _paired_row(clip)}}
  v = kernel_ab.verdicts({"pretrain": result(dense=1.01, dropout=0.78, clip=1.03)})
  assert v["dropout"]["consistent"] and v["dropout"]["cpu_choice_speed_over_alternative"] == pytest.approx(1 / 0.78)
  assert v["dense"]["consistent"] and v["dense"]["alternative"] == "cpu_gemm"  # 1% faster: not worth adding
  assert not v["clip"]["consistent"]  # scalar 3% faster than optax: would belong in the CPU set
  assert v["whole set"]["cpu_choice_speed_over_alternative"] == pytest.approx(1.25)
  assert v["whole set"]["consistent"] is None
  assert not kernel_ab.verdicts({"pretrain": result(dense=1.0, dropout=0.99, clip=1.0)})["dropout"]["consistent"]
  # Two steps: hashed 1% faster on one and 5% on the other is kept (geometric mean 1.030); 1% slower on one and 4%
  # faster on the other is not (1.015).
  v = kernel_ab.verdicts({"pretrain": result(dense=1.0, dropout=1 / 1.01, clip=1.0),
                          "finetune": result(dense=1.0, dropout=1 / 1.05, clip=1.0)})
  assert v["dropout"]["consistent"] and v["dropout"]["cpu_choice_speed_over_alternative"] == pytest.approx(
      (1.01 * 1.05) ** 0.5)
  assert set(v["dropout"]["per_step"]) == {"pretrain", "finetune"}
  v = kernel_ab.verdicts({"pretrain": result(dense=1.0, dropout=1.01, clip=1.0),
                          "finetune": result(dense=1.0, dropout=1 / 1.04, clip=1.0)})
  assert not v["dropout"]["consistent"]
  # cpu_gemm 3% faster on both steps would belong in the CPU set.
  assert not kernel_ab.verdicts({"pretrain": result(dense=1.03, dropout=0.9, clip=1.0),
                                 "finetune": result(dense=1.03, dropout=0.9, clip=1.0)})["dense"]["consistent"]


def test_paired_speedup_is_the_median_per_round_ratio_with_a_bootstrap_interval():
  """The median of the per-round ratios (other / base), and scipy's percentile bootstrap of it."""
  import numpy as np
  from scipy import stats

  from benchmarks.common import paired_speedup, summary
  # A load spike in rounds 3-4 slows both runs of those rounds; the base run of round 5 alone is slow.
  base = summary([1.0, 1.0, 2.0, 2.0, 3.0])
  other = summary([1.1, 1.1, 2.2, 2.2, 1.1])
  p = paired_speedup(base, other)
  assert p["median"] == pytest.approx(1.1) and p["rounds"] == 5 and "ci95" in p
  rng = np.random.default_rng(3)
  base = summary(list(rng.uniform(1.0, 2.0, 9)))
  other = summary([t * r for t, r in zip(base["times_s"], rng.uniform(1.0, 1.2, 9))])
  p = paired_speedup(base, other)
  ratios = np.asarray(other["times_s"]) / np.asarray(base["times_s"])
  assert p["median"] == pytest.approx(float(np.median(ratios)))
  ci = stats.bootstrap((ratios,), np.median, n_resamples=5000, method="percentile",
                       rng=np.random.default_rng(0)).confidence_interval
  assert p["ci95"] == pytest.approx([ci.low, ci.high]) and ci.low <= p["median"] <= ci.high


def test_baseline_comparison_flags_a_figure_that_falls_by_more_than_five_percent():
  from benchmarks import baseline

  def pretrain(ratio, mfu, seconds):
    return {"shapes": {"minilm": {"ratios": {"jax/masked vs torch/eager/full": ratio},
                                  "rows": {"jax/masked": {"mfu": mfu, "median_s": seconds},
                                           "torch/eager/full": {"mfu": 0.5, "median_s": 1.0}}}}}
  ours = [pretrain(2.0, 0.70, 0.50), pretrain(2.2, 0.72, 0.48)]
  base = [pretrain(2.0, 0.80, 0.50), pretrain(2.0, 0.80, 0.50)]
  c = baseline.compare(ours, base, "pretrain")["figures"]
  assert set(c) == {"minilm: jax/masked vs torch/eager/full", "minilm: jax/masked MFU", "minilm: jax/masked s/step"}
  assert c["minilm: jax/masked vs torch/eager/full"]["change"] == pytest.approx(2.1 / 2.0)
  assert not c["minilm: jax/masked MFU"]["within_5pct"]  # 0.71 / 0.80
  assert c["minilm: jax/masked s/step"]["change"] == pytest.approx(0.5 / 0.49) and c["minilm: jax/masked s/step"][
      "within_5pct"]
  mote = baseline.compare([{"mote_over_siamese": 1.10}], [{"mote_over_siamese": 1.0}], "mote")["figures"]
  assert mote["mote / siamese step time"]["change"] == pytest.approx(1 / 1.1)
  text = "\n".join(baseline.lines({"rev": "abc", "sha": "abcdef0123456789", "sections": {
      "pretrain": baseline.compare(ours, base, "pretrain")}}, report._f))
  assert "| minilm: jax/masked MFU |" in text and "**no**" in text


def test_baseline_run_passes_options_to_both_trees_and_keeps_other_sections(tmp_path, monkeypatch):
  """`--options` reaches both trees' sections; a later `--only` run against the same revision adds its section to
  the stored comparison instead of replacing it; a bad `--options` is refused with the flag named."""
  import contextlib

  from benchmarks import __main__ as bench_main
  from benchmarks import baseline as baseline_lib
  tree = tmp_path / "tree"
  (tree / "benchmarks").mkdir(parents=True)
  for name in ("pretrain", "mote"):
    (tree / "benchmarks" / f"{name}.py").write_text("")
  calls = []

  def fake_run_module(module, out_json, *, quick, options=None, timeout=None, repo=None, env=None, **_):
    calls.append((module, repo, options))
    if module == "benchmarks.mote":
      return {"mote_over_siamese": 1.0 if repo == tree else 0.98}
    return {"shapes": {"minilm": {"ratios": {"jax/masked vs torch/eager/full": 2.0},
                                  "rows": {"jax/masked": {"mfu": 0.6, "median_s": 1.0}}}}}

  monkeypatch.setattr(bench_main, "run_module", fake_run_module)
  monkeypatch.setattr(bench_main, "wait_for_quiet", lambda *a, **k: {"quiet": True, "load1": 0.1, "waited_s": 0})
  monkeypatch.setattr(baseline_lib, "checkout", lambda rev: contextlib.nullcontext((tree, "f" * 40)))
  # Only the comparison is rendered: the fake section results lack what their own tables need.
  monkeypatch.setattr(bench_main.report, "render",
                      lambda results, command: "\n".join(baseline_lib.lines(results["baseline"], report._f)))
  out = tmp_path / "RESULTS.md"
  assert bench_main.main(["--only", "pretrain", "--baseline_rev", "abc", "--baseline_rounds", "2", "--out", str(out),
                          "--options", '{"pretrain": {"shapes": ["minilm"]}}']) == 0
  assert [(c[1] == tree, c[2]) for c in calls] == [(False, {"shapes": ["minilm"]}), (True, {"shapes": ["minilm"]})] * 2
  assert bench_main.main(["--only", "mote", "--baseline_rev", "abc", "--baseline_rounds", "1", "--out", str(out)]) == 0
  assert bench_main.main(["--only", "pretrain", "--baseline_rev", "abc", "--baseline_rounds", "1", "--out", str(out),
                          "--options", '{"pretrain": {"shapes": ["bert-base"]}}']) == 0
  stored = json.loads(out.with_name("results.json").read_text())["baseline"]
  minilm, bert = 'pretrain {"shapes": ["minilm"]}', 'pretrain {"shapes": ["bert-base"]}'
  assert list(stored["sections"]) == [minilm, "mote", bert]
  assert [stored["sections"][k]["rounds"] for k in (minilm, "mote", bert)] == [2, 1, 1]
  assert stored["sections"][bert]["section"] == "pretrain"
  text = out.read_text()
  assert '2 rounds of each tree, `--options` `{"pretrain": {"shapes": ["minilm"]}}`' in text
  assert "1 rounds of each tree" in text
  with pytest.raises(SystemExit):
    bench_main.main(["--only", "mote", "--options", '{"motte": {}}', "--out", str(out)])


def test_finetune_and_kernel_ab_sections_render_with_target_rows():
  from benchmarks import kernel_ab
  timing = {"median_s": 0.5, "min_s": 0.4, "max_s": 0.6, "runs": 3}
  row = dict(timing, flops_per_step=1e9, queries_per_s=32.0, model_gflops_per_s=2.0, mfu=0.01, first_step_s=3.0)
  finetune = {"gemm": {"gflops": {"jax/float32/512": 100.0}, "peak_fp32_gflops": 100.0,
                       "peak_fp32_source": "jax/float32/512"},
              "shapes": {"scifact": {"batch_size": 16, "negatives": 1, "query_len": 64, "passage_len": 256,
                                     "tower_mode": "mote", "pooling": "mean", "normalize": True, "temperature": 0.05,
                                     "masked_judged": True, "warmup": 1, "repeats": 3,
                                     "rows": {"jax/default": row, "torch/eager": dict(row, median_s=1.5)},
                                     "ratios": {"jax/default vs torch/eager": 3.0},
                                     "eval_losses": {"jax/default": 1.0, "torch/eager": 1.0},
                                     "loss_abs_diff_vs_torch": {"jax/default": 1e-6}}}}
  variants = {"shape": "minilm", "batch_size": 8, "length": 128, "baseline_kernels": {"dense": "xla"},
              "rows": {name: dict(timing, compile_s=1.0, first_loss=2.0, speedup_vs_baseline=s,
                                  **(_paired_row(s) if name != "baseline" else {}))
                       for name, s in (("baseline", 1.0), ("kernels-xla", 0.75), ("dense-cpu_gemm", 0.99),
                                       ("dropout-jax_random", 0.8), ("clip-scalar", 1.0))}}
  variants["finetune"] = {"batch_size": 16, "query_len": 64, "negatives": 1, "passage_len": 256, "repeats": 3,
                          "rows": {"dropout-jax_random": dict(timing, baseline=timing, first_loss=2.0, speedup_vs_baseline=0.9,
                                                     paired_speedup_vs_baseline={"median": 0.9, "rounds": 3,
                                                                                 "ci95": [0.85, 0.95]})}}
  variants["verdicts"] = kernel_ab.verdicts({"pretrain": variants, "finetune": variants["finetune"]})
  text = report.render({"finetune_step": finetune, "kernel_ab": variants}, "python -m benchmarks")
  assert "## 1b. Contrastive fine-tuning step" in text and "## 7d. CPU kernel set against plain XLA" in text
  assert "| fine-tuning scifact: jax/default vs torch/eager | >= 2.0x | 3.00x | yes |" in text
  assert "CPU kernel set, dropout: hashed kept only if >= 1.02x faster than jax_random" in text
  assert "CPU kernel set, dense: cpu_gemm would be added only if >= 1.02x faster than xla" in text
  assert "| dropout-jax_random | 0.500 | 0.500 | 0.400-0.600 | 0.900x [0.850, 0.950] |" in text  # fine-tuning pair
  assert "pretrain 1.250x; finetune 1.111x [1.053, 1.176] | 1.179x |" in text  # per step, then geometric mean
  assert "depend on the machine" in text.split("## ")[0]  # the header says the PyTorch ratio is machine-bound
