"""Paired significance tests of retrieval runs, per query, with a correction for several comparisons.

Inputs are per-query scores of one measure ({query id: value}, e.g. from `retrieval.metrics.per_query_metrics`,
which wraps `ir_measures.iter_calc`). Two systems are compared on the queries both were scored on (they must be
the same set: a query missing from one side is an error, not silently dropped).

  paired t-test        `scipy.stats.ttest_rel` (two-sided) on the per-query pairs;
  randomisation test   `scipy.stats.permutation_test` with permutation_type='samples' (each query's two scores
                       are swapped or not; the statistic is the mean difference; two-sided; `n_resamples` random
                       swaps with a fixed seed, or every one of the 2^n when that is fewer);
  Holm-Bonferroni      step-down adjustment of a family of p-values (`holm`), controlling the family-wise error.

When every per-query difference is zero the two runs are indistinguishable and both p-values are 1.0 (scipy's
t statistic is undefined there).

Seeds: a system trained with several seeds is compared through each query's score averaged over its seeds
(`average_over_seeds`), so the test asks whether the modes differ on these queries, with seed noise averaged
out; the spread over seeds is reported separately (`mean_std`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import stats

PerQuery = Mapping[str, float]


def aligned(baseline: PerQuery, other: PerQuery, *, names: tuple[str, str] = ("baseline", "other")
            ) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(query ids sorted, baseline scores [n], other scores [n]); a ValueError names queries only one side has."""
  only_a, only_b = set(baseline) - set(other), set(other) - set(baseline)
  if only_a or only_b:
    raise ValueError(f"paired test: {names[0]} and {names[1]} were scored on different queries "
                     f"({len(only_a)} only in {names[0]}, e.g. {sorted(only_a)[:3]}; {len(only_b)} only in "
                     f"{names[1]}, e.g. {sorted(only_b)[:3]})")
  ids = sorted(baseline)
  if not ids:
    raise ValueError(f"paired test: {names[0]} and {names[1]} have no queries")
  return ids, np.array([baseline[q] for q in ids], np.float64), np.array([other[q] for q in ids], np.float64)


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
  return np.mean(x - y, axis=axis)


def paired_tests(baseline: PerQuery, other: PerQuery, *, n_resamples: int = 10_000, seed: int = 0,
                 names: tuple[str, str] = ("baseline", "other")) -> dict:
  """Paired t-test and randomisation test of `other` against `baseline` on their per-query scores.

  Returns {"num_queries", "mean_baseline", "mean_other", "mean_difference" (other - baseline), "t_statistic",
  "p_ttest", "p_permutation"}.
  """
  _, a, b = aligned(baseline, other, names=names)
  diff = b - a
  result = {"num_queries": int(len(a)), "mean_baseline": float(a.mean()), "mean_other": float(b.mean()),
            "mean_difference": float(diff.mean())}
  if not np.any(diff):
    return {**result, "t_statistic": 0.0, "p_ttest": 1.0, "p_permutation": 1.0}
  t = stats.ttest_rel(b, a)
  perm = stats.permutation_test((b, a), _mean_difference, permutation_type="samples", vectorized=True,
                                n_resamples=n_resamples, alternative="two-sided", rng=np.random.default_rng(seed))
  return {**result, "t_statistic": float(t.statistic), "p_ttest": float(t.pvalue),
          "p_permutation": float(perm.pvalue)}


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values, in the input order.

  Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). Rejecting
  where the adjusted value is below alpha controls the family-wise error rate at alpha.
  """
  p = np.asarray(pvalues, np.float64)
  m = len(p)
  if m == 0:
    return []
  order = np.argsort(p, kind="stable")
  scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
  adjusted = np.empty(m)
  adjusted[order] = np.maximum.accumulate(scaled)
  return adjusted.tolist()


def average_over_seeds(per_seed: Mapping[int, PerQuery], *, name: str = "system") -> dict[str, float]:
  """{query id: mean score over seeds}; every seed must have scored the same queries."""
  seeds = sorted(per_seed)
  if not seeds:
    raise ValueError(f"{name}: no seeds")
  first = per_seed[seeds[0]]
  for s in seeds[1:]:
    aligned(first, per_seed[s], names=(f"{name} seed {seeds[0]}", f"{name} seed {s}"))
  return {q: float(np.mean([per_seed[s][q] for s in seeds])) for q in first}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample standard deviation with ddof=1; 0.0 for a single value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def compare_to_baseline(per_query: Mapping[str, Mapping[int, PerQuery]], baseline: str = "siamese", *,
                        n_resamples: int = 10_000, seed: int = 0, alpha: float = 0.05) -> dict[str, dict]:
  """Tests every system of `per_query` ({system: {seed: {query: score}}}) against `baseline`.

  Each system's per-query scores are first averaged over its seeds. Returns {system: paired_tests(...) plus
  "p_ttest_holm", "p_permutation_holm", "significant_ttest", "significant_permutation"}, where the Holm
  adjustment runs over the comparisons of this call, separately for each test.
  """
  if baseline not in per_query:
    raise ValueError(f"baseline {baseline!r} is not among the systems {sorted(per_query)}")
  base = average_over_seeds(per_query[baseline], name=baseline)
  results = {}
  for system, seeds in per_query.items():
    if system == baseline:
      continue
    results[system] = paired_tests(base, average_over_seeds(seeds, name=system), n_resamples=n_resamples,
                                   seed=seed, names=(baseline, system))
  return apply_holm(results, alpha=alpha)


def apply_holm(results: Mapping[str, dict], alpha: float = 0.05) -> dict[str, dict]:
  """Adds Holm-adjusted p-values and significance flags over the family `results` ({name: paired_tests()})."""
  names = list(results)
  out = {name: dict(results[name]) for name in names}
  for test in ("ttest", "permutation"):
    adjusted = holm([results[n][f"p_{test}"] for n in names])
    for name, p in zip(names, adjusted):
      out[name][f"p_{test}_holm"] = p
      out[name][f"significant_{test}"] = bool(p < alpha)
  return out
