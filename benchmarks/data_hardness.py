"""One-off check: is section 4's synthetic search data as hard to partition as real embeddings?

    python -m benchmarks.data_hardness [--noises 1.0,0.5] [--samples 3] [--json OUT]

Section 4 searches 1M x 384 vectors from `benchmarks.scann_recall.clustered_vectors` (10,000 clusters,
noise 1.0, decay 0.4). No real 1M-row embedding set is available offline, so this compares the two at the size
of the real one: all-MiniLM-L6-v2 embeddings of SciFact (5,183 passages, 256 tokens, its 300 test queries, as
`mote_jax` encodes them) against a random 5,183-row sample of section 4's corpus with 300 of its queries.

For each set it prints, for the queries against the corpus:
- the corpus's participation ratio (effective dimension of its covariance);
- LID@20, the maximum-likelihood local intrinsic dimensionality of each query's 20 nearest neighbours
  (Levina & Bickel 2004; Amsaleg et al. 2015), median over queries: the standard hardness measure of
  ann-benchmarks (Aumueller & Ceccarello 2019);
- the median top-1 / top-10 inner product and the mean inner product;
- partition hardness, the quantity that sets ScaNN's speed: a spherical k-means of the corpus into sqrt(rows)
  leaves (faiss), leaves visited best-centroid first, and the share of the leaves a search must visit for mean
  recall@10 of 0.90 / 0.95 with exact scores inside the visited leaves (no SOAR, no quantisation); and the same
  with query-adaptive leaf selection (`ScannConfig.leaf_score_margin`): each query visits the leaves whose
  centres score within a margin of its best centre's; the smallest margin that reaches the recall, and the mean
  share of leaves it visits. Where that share is below the fixed one, adaptive selection helps on that data.

A random sample of the 1M rows keeps almost no cluster-mates (5,183 draws from 10,000 clusters), so it measures
the mixture's background, not the tight per-cluster neighbourhoods that a 1M-row search sees (about 100 rows per
cluster). A second synthetic set keeps that density: 5,183 rows and the queries drawn from 51 of the mixture's
clusters (5,183 // 100), as many rows per cluster as the 1M corpus has.

Each set is measured `--samples` times: with a different k-means seed, and for the synthetic data a different
random sample of its rows. Not part of `python -m benchmarks`; benchmarks/analysis.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def hardness(queries: np.ndarray, corpus: np.ndarray, *, k_lid: int = 20, seed: int = 0) -> dict:
  """Hardness statistics of top-10 inner-product search of `queries` [Q, D] in `corpus` [N, D] (unit rows)."""
  import faiss
  scores = queries @ corpus.T  # [Q, N]
  order = np.argsort(-scores, axis=1)
  top = np.take_along_axis(scores, order[:, :k_lid], 1)
  dist = np.sqrt(np.maximum(2.0 - 2.0 * top, 1e-12))  # Euclidean distances of unit vectors, ascending
  lid = -1.0 / np.mean(np.log(dist / dist[:, -1:]), axis=1)
  eig = np.linalg.eigvalsh(np.cov(corpus.T.astype(np.float64)))
  leaves = int(round(np.sqrt(len(corpus))))
  kmeans = faiss.Kmeans(corpus.shape[1], leaves, niter=20, spherical=True, seed=seed, verbose=False)
  kmeans.train(corpus)
  _, assignment = kmeans.index.search(corpus, 1)
  centroid_scores = queries @ kmeans.centroids.T  # [Q, leaves]
  centroid_rank = np.argsort(np.argsort(-centroid_scores, axis=1), axis=1)
  neighbour_leaves = assignment[:, 0][order[:, :10]]  # [Q, 10]: the leaf of each true top-10 neighbour
  # The visit rank of each neighbour's leaf: visiting m leaves finds those below m.
  needed = np.take_along_axis(centroid_rank, neighbour_leaves, 1)
  # The same as a score gap: a neighbour is found by visiting the leaves whose centres score within `margin` of
  # the query's best centre (ScannConfig.leaf_score_margin) once margin >= its leaf's gap.
  gaps = centroid_scores.max(axis=1, keepdims=True) - centroid_scores  # [Q, leaves]
  needed_gap = np.take_along_axis(gaps, neighbour_leaves, 1)  # [Q, 10]
  share, adaptive = {}, {}
  for target in (0.90, 0.95):
    visited = next(m for m in range(1, leaves + 1) if (needed < m).mean() >= target)
    share[f"{target:.2f}"] = round(visited / leaves, 3)
    margin = float(np.quantile(needed_gap, target, method="inverted_cdf"))  # smallest margin reaching target
    # Visited as `gaps <= margin`, the rule the margin was read from: the same leaves as ScaNN's (score >= best -
    # margin) but for float rounding at a margin equal to a gap, which would drop a neighbour the quantile counts.
    adaptive[f"{target:.2f}"] = {"margin": round(margin, 4),
                                 "mean_share": round(float((gaps <= margin).sum(axis=1).mean()) / leaves, 3)}
  return {"rows": len(corpus), "queries": len(queries), "participation_ratio": round(float(eig.sum() ** 2
          / (eig ** 2).sum()), 1), f"lid@{k_lid}_median": round(float(np.median(lid)), 1),
          "top1_median": round(float(np.median(top[:, 0])), 3), "top10_median": round(float(np.median(top[:, 9])), 3),
          "mean_score": round(float(scores.mean()), 3), "leaves": leaves, "leaf_share_for_recall": share,
          "adaptive_leaf_share_for_recall": adaptive}


def scifact_embeddings(max_length: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """(test-query embeddings [300, 384], corpus embeddings [5183, 384]) of all-MiniLM-L6-v2 via mote_jax."""
  import jax

  from benchmarks import data
  from benchmarks.common import DATA_DIR
  from mote_jax.hf_interop import from_hf
  from mote_jax.partitioning import MeshConfig, Partitioner
  from mote_jax.retrieval.beir import load_beir
  from mote_jax.retrieval.encode import EncodeOptions, Embedder, encode_texts

  dataset = load_beir(DATA_DIR / "scifact", "test")
  config, params = from_hf(data.minilm_path(), tower_mode="mote")
  embedder = Embedder(config, params, Partitioner.create(MeshConfig(), devices=jax.devices()[:1]))
  options = EncodeOptions(batch_size=64, max_length=max_length, progress=True)
  texts = list(dataset.queries.values())  # the split's judged queries
  queries = encode_texts(embedder, data.tokenizer(), texts, "query", options)
  corpus = encode_texts(embedder, data.tokenizer(), dataset.corpus.passages(), "passage", options)
  return queries, corpus


def main(argv=None) -> None:
  from benchmarks import scann_recall as rb
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--noises", default="1.0", help="comma-separated `noise` values of the synthetic data")
  parser.add_argument("--samples", type=int, default=3, help="k-means seeds (and synthetic row samples) per set")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args(argv)
  results = {}
  start = time.perf_counter()
  queries, corpus = scifact_embeddings()
  print(f"[hardness] encoded SciFact in {time.perf_counter() - start:.0f}s", flush=True)
  for seed in range(args.samples):
    results[f"scifact (MiniLM, test queries), k-means seed {seed}"] = hardness(queries, corpus, seed=seed)
  for noise in (float(x) for x in args.noises.split(",")):
    # Section 4's generator and settings; random samples of the 1M rows at SciFact's size.
    rows, mixture = rb.clustered_vectors(1_000_000, 384, clusters=10_000, noise=noise, seed=0)
    synthetic_queries, _ = rb.clustered_vectors(len(queries), 384, noise=noise, seed=1, mixture=mixture)
    for seed in range(args.samples):
      sample = rows[np.random.default_rng(seed).choice(len(rows), len(corpus), replace=False)]
      name = f"section 4 data, noise {noise} ({len(corpus)} of 1M rows), sample and k-means seed {seed}"
      results[name] = hardness(synthetic_queries, sample, seed=seed)
    del rows
    # The same mixture at the 1M corpus's rows per cluster: a random subset of its clusters, all their rows.
    centres, basis = mixture
    per_cluster = 1_000_000 // len(centres)
    for seed in range(args.samples):
      chosen = np.random.default_rng(seed).choice(len(centres), max(1, len(corpus) // per_cluster), replace=False)
      subset = (centres[chosen], basis)
      dense, _ = rb.clustered_vectors(len(corpus), 384, noise=noise, seed=10 + seed, mixture=subset)
      dense_queries, _ = rb.clustered_vectors(len(queries), 384, noise=noise, seed=20 + seed, mixture=subset)
      name = (f"section 4 mixture, noise {noise}, {len(chosen)} clusters at ~{per_cluster} rows each, "
              f"sample and k-means seed {seed}")
      results[name] = hardness(dense_queries, dense, seed=seed)
  for name, stats in results.items():
    print(f"{name}: {json.dumps(stats)}")
  if args.json:
    from mote_jax.retrieval.files import write_json
    write_json(args.json, results)


if __name__ == "__main__":
  main()
