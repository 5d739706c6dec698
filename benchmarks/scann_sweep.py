"""One-off ScaNN index exploration on section 4's data (1M x 384 clustered unit vectors, 1000 queries).

    python -m benchmarks.scann_sweep '[["spherical", {"leaves": 2000, "spherical": true}],
                                       ["pca128", {"leaves": 2000, "pca": 128, "reorders": [400, 1000]}]]'

Each named config builds one index (k-means tree with `leaves` leaves, SOAR `soar` (null: none), AH with `dpb`
dimensions per block and threshold `ast`, optional PCA to `pca` dimensions, `spherical` k-means, `iters`
k-means iterations, `avq`: anisotropic VQ of the partitioner with that eta, `reorder_dtype`: "float32",
"bfloat16" or "int8" for the reordering copy of the rows) and prints
(leaves searched, reorder, queries/s, recall@10 against exact search) for each fraction of leaves in `fracs`
and each reorder size in `reorders` (median of 3 searches of all queries after one warm-up). Not part of
`python -m benchmarks`; benchmarks/analysis.md quotes its output for the index settings it rejected.
"""

from __future__ import annotations

import gc
import json
import sys
import time

import numpy as np


def build(corpus, k, *, leaves, dpb=4, soar=1.0, spherical=False, pca=None, ast=0.2, reorder=400,
          sample=250_000, iters=12, avq=None, reorder_dtype="float32"):
  import scann

  from mote_jax.retrieval.search import scann_reorder_type
  builder = scann.scann_ops_pybind.builder(corpus, k, "dot_product")
  builder.set_n_training_threads(0)
  spill = {} if soar is None else dict(soar_lambda=soar, overretrieve_factor=2.0)
  builder = builder.tree(num_leaves=leaves, num_leaves_to_search=max(1, leaves // 10), spherical=spherical,
                         training_sample_size=sample, training_iterations=iters, avq=avq, **spill)
  if pca:
    builder = builder.pca(reduction_dim=pca, pca_significance_threshold=None)
  return builder.score_ah(dpb, anisotropic_quantization_threshold=ast).reorder(
      reorder, quantize=scann_reorder_type(reorder_dtype)).build()


def main(argv=None) -> None:
  from benchmarks import scann_recall as rb
  from mote_jax.retrieval.search import recall_at_k

  configs = json.loads((argv or sys.argv[1:])[0])
  k, num_queries = 10, 1000
  corpus, mixture = rb.clustered_vectors(1_000_000, 384, clusters=10_000, noise=1.0, seed=0)
  queries, _ = rb.clustered_vectors(num_queries, 384, noise=1.0, seed=1, mixture=mixture)
  exact = rb.exact_topk(queries, corpus, k)
  for name, config in configs:
    fracs = config.pop("fracs", [0.06, 0.08, 0.1, 0.12])
    reorders = config.pop("reorders", [config.get("reorder", 400)])
    start = time.perf_counter()
    searcher = build(corpus, k, **config)
    print(f"{name} {config} build {time.perf_counter() - start:.1f}s", flush=True)
    for reorder in reorders:
      for fraction in fracs:
        leaves = max(1, round(fraction * config["leaves"]))
        search = lambda: searcher.search_batched_parallel(  # noqa: E731
            queries, final_num_neighbors=k, leaves_to_search=leaves, pre_reorder_num_neighbors=reorder)
        search()
        times = []
        for _ in range(3):
          t = time.perf_counter()
          found, _ = search()
          times.append(time.perf_counter() - t)
        print(f"    leaves_to_search={leaves} reorder={reorder}: {num_queries / np.median(times):,.0f} queries/s, "
              f"recall@10 {recall_at_k(np.asarray(found), exact, k):.4f}", flush=True)
    del searcher
    gc.collect()


if __name__ == "__main__":
  main()
