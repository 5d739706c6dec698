"""The paper's embedding-space analysis of a retriever, per tower mode.

For query embeddings Q [Nq, H], passage embeddings P [Np, H] and the positive (query, passage) pairs of qrels:
  similarity distributions  cosine of query-query, passage-passage and query-passage pairs drawn at random
                            (histogram, mean, std), and of the positive pairs;
  alignment                 E ||q - p+||^2 over positive pairs of L2-normalised embeddings (Wang & Isola 2020,
                            alpha = 2): lower = positives closer;
  uniformity                log E exp(-2 ||x - y||^2) over random pairs of normalised queries, of passages, and of
                            both pooled: lower = more uniform on the sphere;
  score gap                 mean score (the model's own: dot product) of positives minus that of the hardest
                            non-positive passages (the top-k retrieved) and of random passages.

A MoTE model is expected to separate the query and passage distributions less than `separated` towers and more
than a `siamese` one; these numbers make that visible.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _random_pairs(n: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """`count` pairs (i, j) with i != j, uniform over ordered pairs of range(n)."""
  i = rng.integers(n, size=count)
  j = (i + rng.integers(1, n, size=count)) % n
  return i, j


def _distribution(values: np.ndarray, bins: np.ndarray) -> dict:
  hist, _ = np.histogram(values, bins=bins)
  return {"mean": float(values.mean()), "std": float(values.std()), "histogram": hist.tolist()}


def alignment(q: np.ndarray, p: np.ndarray) -> float:
  """E ||q_i - p_i||^2 over rows of normalised [N, H] arrays (positive pairs)."""
  return float(np.mean(np.sum((_normalise(q) - _normalise(p)) ** 2, axis=-1)))


def uniformity(x: np.ndarray, num_pairs: int = 200_000, seed: int = 0, t: float = 2.0) -> float:
  """log E exp(-t ||x_i - x_j||^2) over random pairs i != j of normalised rows (all pairs when few rows)."""
  x = _normalise(np.asarray(x, np.float64))
  n = len(x)
  if n * (n - 1) // 2 <= num_pairs:
    i, j = np.triu_indices(n, k=1)
  else:
    i, j = _random_pairs(n, num_pairs, np.random.default_rng(seed))
  sq = np.sum((x[i] - x[j]) ** 2, axis=-1)
  return float(np.log(np.mean(np.exp(-t * sq))))


def analyse(queries: np.ndarray, query_ids: Sequence[str], passages: np.ndarray, passage_ids: Sequence[str],
            qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]] | None = None, *,
            num_pairs: int = 100_000, bins: int = 40, hard_negatives: int = 10, seed: int = 0) -> dict:
  """The analysis as a JSON-able dict; `run` (query id -> {doc id: score}) supplies the hard negatives."""
  rng = np.random.default_rng(seed)
  queries, passages = np.asarray(queries, np.float32), np.asarray(passages, np.float32)
  qn, pn = _normalise(queries), _normalise(passages)
  edges = np.linspace(-1.0, 1.0, bins + 1)
  q_row = {q: i for i, q in enumerate(query_ids)}
  p_row = {p: i for i, p in enumerate(passage_ids)}
  pos_q, pos_p = [], []
  for q, judged in qrels.items():
    for p, rel in judged.items():
      if rel > 0 and q in q_row and p in p_row:
        pos_q.append(q_row[q])
        pos_p.append(p_row[p])
  pos_q, pos_p = np.asarray(pos_q), np.asarray(pos_p)

  qq = _random_pairs(len(qn), num_pairs, rng)
  pp = _random_pairs(len(pn), num_pairs, rng)
  qp = rng.integers(len(qn), size=num_pairs), rng.integers(len(pn), size=num_pairs)
  cos = lambda a, b, i, j: np.sum(a[i] * b[j], axis=-1)  # noqa: E731
  report = {
      "num_queries": len(qn), "num_passages": len(pn), "num_positive_pairs": len(pos_q),
      "cosine": {
          "bins": edges.tolist(),
          "query_query": _distribution(cos(qn, qn, *qq), edges),
          "passage_passage": _distribution(cos(pn, pn, *pp), edges),
          "query_passage": _distribution(cos(qn, pn, *qp), edges),
          "positive_pairs": _distribution(cos(qn, pn, pos_q, pos_p), edges),
      },
      "alignment": alignment(queries[pos_q], passages[pos_p]),
      "uniformity": {"queries": uniformity(queries, num_pairs, seed), "passages": uniformity(passages, num_pairs,
                                                                                           seed),
                     "pooled": uniformity(np.concatenate([queries, passages]), num_pairs, seed)},
  }
  scores = np.sum(queries[pos_q] * passages[pos_p], axis=-1)
  random_neg = np.sum(queries[pos_q] * passages[rng.integers(len(passages), size=len(pos_q))], axis=-1)
  gap = {"positive_score": float(scores.mean()), "random_negative_score": float(random_neg.mean()),
         "gap_to_random": float(scores.mean() - random_neg.mean())}
  if run is not None:
    hard = []
    for q, ranked in run.items():
      if q not in q_row:
        continue
      positives = {p for p, rel in qrels.get(q, {}).items() if rel > 0}
      top = [p for p, _ in sorted(ranked.items(), key=lambda x: -x[1]) if p not in positives][:hard_negatives]
      hard += [float(queries[q_row[q]] @ passages[p_row[p]]) for p in top if p in p_row]
    gap["hard_negative_score"] = float(np.mean(hard))
    gap["gap_to_hard"] = float(scores.mean() - np.mean(hard))
  report["score_gap"] = gap
  return report
