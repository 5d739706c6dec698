"""ScaNN vs exact search on synthetic clustered vectors: recall@k, build time and query throughput.

    python -m benchmarks.scann_recall --rows 1000000 --dim 384 --queries 1000 [--clusters 10000 --noise 1]
    python -m benchmarks.scann_recall --num_leaves_to_search 95 --soar_lambda none   # any ScannConfig field

See `clustered_vectors` for the data: a Gaussian mixture shaped like real passage embeddings (their effective
dimension), not isotropic noise, which no partitioning index handles well and real embeddings do not resemble.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import numpy as np

from mote_jax.retrieval.search import ScannConfig, recall_at_k, scann_search

log = logging.getLogger(__name__)


def _mixture_basis(dim: int, decay: float, rng: np.random.Generator) -> np.ndarray:
  """[dim, dim]: per-direction scales falling as (i + 1) ** -decay, then a random rotation."""
  scales = (1.0 + np.arange(dim)) ** -decay
  scales *= np.sqrt(dim / np.square(scales).sum())  # keep the total variance of an isotropic draw
  rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  return (scales[:, None] * rotation).astype(np.float32)


def clustered_vectors(rows: int, dim: int, *, clusters: int = 1000, noise: float = 1.0, decay: float = 0.4,
                      seed: int = 0, mixture: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
  """(unit vectors [rows, dim] float32, the mixture (centres, basis) they came from), generated in blocks.

  A point is centre + noise (`noise` is the offset's norm relative to the centre's), both drawn with variances
  falling as a power law (`decay`) along randomly rotated directions: decay 0.4 gives an effective dimension
  (participation ratio) of about 64, as all-MiniLM-L6-v2's SciFact embeddings have (65), where isotropic
  vectors (decay 0) have about 370 and are far harder to partition than real embeddings. Pass `mixture` to
  draw more points (e.g. queries) from the same mixture.
  """
  rng = np.random.default_rng(seed)
  if mixture is None:
    basis = _mixture_basis(dim, decay, rng)
    mixture = ((rng.standard_normal((clusters, dim), dtype=np.float32) / np.sqrt(dim)) @ basis, basis)
  centres, basis = mixture
  out = np.empty((rows, dim), np.float32)
  for start in range(0, rows, 65536):
    block = out[start:start + 65536]
    offsets = rng.standard_normal(block.shape, dtype=np.float32) * np.float32(noise / np.sqrt(dim))
    block[:] = centres[rng.integers(len(centres), size=len(block))] + offsets @ basis
    block /= np.linalg.norm(block, axis=1, keepdims=True)
  return out, mixture


def exact_topk(queries: np.ndarray, corpus: np.ndarray, k: int, block: int = 131072) -> np.ndarray:
  """Exact top-k indices [Q, k] by inner product with numpy (the independent reference), corpus in blocks."""
  best_scores = np.full((len(queries), 0), -np.inf, np.float32)
  best = np.zeros((len(queries), 0), np.int64)
  for start in range(0, len(corpus), block):
    scores = queries @ corpus[start:start + block].T
    top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    candidate_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], 1)
    candidates = np.concatenate([best, top + start], 1)
    keep = np.argsort(-candidate_scores, axis=1, kind="stable")[:, :k]
    best_scores, best = np.take_along_axis(candidate_scores, keep, 1), np.take_along_axis(candidates, keep, 1)
  return best


def run(rows: int, dim: int, num_queries: int, *, k: int = 10, clusters: int = 10_000, noise: float = 1.0,
        decay: float = 0.4, config: ScannConfig = ScannConfig(), seed: int = 0) -> dict:
  """Builds data, the exact reference and a ScaNN search; returns recall@k and timings."""
  start = time.perf_counter()
  corpus, mixture = clustered_vectors(rows, dim, clusters=clusters, noise=noise, decay=decay, seed=seed)
  queries, _ = clustered_vectors(num_queries, dim, noise=noise, seed=seed + 1, mixture=mixture)
  generated = time.perf_counter()
  exact = exact_topk(queries, corpus, k)
  exact_done = time.perf_counter()
  _, approximate = scann_search(queries, corpus, k, config)
  done = time.perf_counter()
  leaves, to_search = config.leaves(rows)
  return {
      "rows": rows, "dim": dim, "queries": num_queries, "k": k, "clusters": clusters, "noise": noise, "decay": decay,
      f"recall@{k}": recall_at_k(approximate, exact, k),
      "num_leaves": leaves, "num_leaves_to_search": to_search, "reorder": config.reorder,
      "seconds": {"generate": round(generated - start, 2), "exact_numpy": round(exact_done - generated, 2),
                  "scann_build_and_search": round(done - exact_done, 2)},
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=384)
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--clusters", type=int, default=10_000)
  parser.add_argument("--noise", type=float, default=1.0)
  parser.add_argument("--decay", type=float, default=0.4)
  optional = lambda cast: lambda text: None if text.lower() == "none" else cast(text)  # noqa: E731
  parse = {"int": int, "float": float, "int | None": optional(int), "float | None": optional(float),
           "bool": lambda text: text.lower() in ("1", "true", "yes"), "str": str}
  for field in dataclasses.fields(ScannConfig):
    parser.add_argument(f"--{field.name}", type=parse[field.type], default=field.default)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  config = ScannConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ScannConfig)})
  result = run(args.rows, args.dim, args.queries, k=args.k, clusters=args.clusters, noise=args.noise,
               decay=args.decay, config=config)
  print(json.dumps(result, indent=2))

if __name__ == "__main__":
  main()
