"""Embedding-space analysis against Wang & Isola's reference formulas written in torch."""

import numpy as np
import torch

from mote_jax.analysis.embedding_space import alignment, analyse, uniformity


def test_alignment_and_uniformity_match_the_reference_code():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((300, 16)).astype(np.float32)
  y = x + 0.3 * rng.standard_normal((300, 16)).astype(np.float32)
  tx = torch.nn.functional.normalize(torch.tensor(x, dtype=torch.float64), dim=1)
  ty = torch.nn.functional.normalize(torch.tensor(y, dtype=torch.float64), dim=1)
  ref_align = (tx - ty).norm(p=2, dim=1).pow(2).mean().item()
  ref_uniform = torch.pdist(tx, p=2).pow(2).mul(-2).exp().mean().log().item()
  assert abs(alignment(x, y) - ref_align) < 1e-6
  assert abs(uniformity(x) - ref_uniform) < 1e-9  # 300 rows: every pair, like pdist


def test_analysis_separates_positives_from_negatives():
  rng = np.random.default_rng(1)
  passages = rng.standard_normal((200, 8)).astype(np.float32)
  queries = passages[:50] + 0.1 * rng.standard_normal((50, 8)).astype(np.float32)  # query i ~ passage i
  qids, pids = [f"q{i}" for i in range(50)], [f"d{i}" for i in range(200)]
  qrels = {f"q{i}": {f"d{i}": 1} for i in range(50)}
  run = {q: {p: float(queries[i] @ passages[j]) for j, p in enumerate(pids)} for i, q in enumerate(qids)}
  report = analyse(queries, qids, passages, pids, qrels, run, num_pairs=5000)
  assert report["num_positive_pairs"] == 50
  assert report["cosine"]["positive_pairs"]["mean"] > 0.9 > report["cosine"]["query_passage"]["mean"]
  assert report["score_gap"]["gap_to_random"] > report["score_gap"]["gap_to_hard"] > 0
  assert report["alignment"] < 0.1
  assert sum(report["cosine"]["query_query"]["histogram"]) == 5000
