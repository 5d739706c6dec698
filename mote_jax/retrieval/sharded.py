"""Search sharded over processes: each process searches its share of the queries against the full index.

Why queries and not the corpus: a process needs the whole corpus in its index either way it is split, unless
each builds a corpus shard; but a corpus shard per process changes ScaNN's partitioning with the process count
(the results of a 2-host and an 8-host run would differ, and neither would equal one host's), and merging needs
every process's top-k of every query (Q x k x processes scores and ids over the network). With the queries
split, every process builds the same index (the same result as one process, whatever the process count), the
builds run in parallel (the wall time of one build), and only each query's final top-k travels. The cost is RAM:
each host holds the corpus once, in the index (MS MARCO's 8.8M x 768 float32 rows are 27 GB, bf16 reordering
halves the index's copy: `ScannConfig.reorder_dtype`; a pod host has several hundred GB), fed to ScaNN from the
memory-mapped store (`search.Index`), never as a second in-memory copy. A corpus too large for one host's RAM can
be split into several indices with `ScannConfig.max_rows_per_index` (searched one after another, still per host).

Schedule: the queries are cut into blocks of `block_rows`; block j belongs to process j % P. In round r every
process searches its block (r * P + its index; possibly none), then the blocks' top-k lists are all-gathered
(`multihost_utils.process_allgather`, padded to one shape), so every process sees blocks r * P ... r * P + P - 1
in query order, and `on_block` consumes them: writing a run file (process 0, streamed, one block at a time),
computing metrics, mining negatives. Results travel through JAX's collectives, not files: the search needs no
shared file system. (The embedding stores it reads do: every process reads every corpus shard, which other
processes wrote; gs:// counts as shared.) A round's all-gather holds P x block_rows x k (score, id) pairs.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import jax
import numpy as np

from mote_jax.retrieval.search import Index
from mote_jax.retrieval.store import EmbeddingStore

log = logging.getLogger(__name__)

# A round's all-gathered (score, id) pairs at most, over all processes: 2^24 pairs are 128 MB.
ROUND_PAIRS = 1 << 24


def default_block_rows(k: int, processes: int | None = None) -> int:
  """Queries per block so that a round (one block per process) gathers at most ROUND_PAIRS pairs."""
  processes = processes or jax.process_count()
  return max(1, min(8192, ROUND_PAIRS // max(1, k * processes)))


def _allgather(array: np.ndarray) -> np.ndarray:
  """[P, *array.shape]: every process's `array` (same shape everywhere), by process index; a collective."""
  if jax.process_count() == 1:
    return array[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(array))


def _rows(queries, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of a query array or store, as float32."""
  if not isinstance(queries, EmbeddingStore):
    return np.asarray(queries[start:stop], np.float32)
  pieces = []
  for offset, _, shard in queries.iter_shards():
    lo, hi = max(start, offset), min(stop, offset + len(shard))
    if lo < hi:
      pieces.append(np.asarray(shard[lo - offset:hi - offset], np.float32))
  return np.concatenate(pieces) if pieces else np.zeros((0, queries.dim), np.float32)


def _take(queries, rows: np.ndarray) -> np.ndarray:
  """Rows `rows` (ascending) of a query array or store, as float32 [len(rows), H]."""
  if not isinstance(queries, EmbeddingStore):
    return np.asarray(np.asarray(queries)[rows], np.float32)
  pieces = []
  for offset, _, shard in queries.iter_shards():
    inside = rows[(rows >= offset) & (rows < offset + len(shard))]
    if len(inside):
      pieces.append(np.asarray(shard[inside - offset], np.float32))
  return np.concatenate(pieces) if pieces else np.zeros((0, queries.dim), np.float32)


def _num_rows(queries) -> int:
  return len(queries) if isinstance(queries, EmbeddingStore) else int(np.shape(queries)[0])


def sharded_search(index: Index, queries, k: int | None = None, *, block_rows: int | None = None
                   ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """Yields (first query row, scores [b, k'] float32, indices [b, k'] int64) for consecutive blocks covering all
  queries ([Q, H], an array or a store, the same on every process), in query order, on every process.

  Each process searches only its blocks (see the module docstring); a collective in multi-process runs: every
  process must iterate to the end. k' = min(k, N).
  """
  k = index.k if k is None else min(k, index.k)
  num_queries, processes, me = _num_rows(queries), jax.process_count(), jax.process_index()
  block_rows = block_rows or default_block_rows(k, processes)
  num_blocks = math.ceil(num_queries / block_rows)
  for round_start in range(0, num_blocks, processes):
    block = round_start + me
    start, stop = block * block_rows, min((block + 1) * block_rows, num_queries)
    scores = np.full((block_rows, k), -np.inf, np.float32)
    indices = np.full((block_rows, k), -1, np.int64)
    if start < stop:
      found_scores, found_indices = index.search(_rows(queries, start, stop), k)
      scores[:stop - start], indices[:stop - start] = found_scores, found_indices
    # int32 on the wire (JAX without x64 would narrow int64 anyway); row numbers stay below 2^31.
    all_scores, all_indices = _allgather(scores), _allgather(indices.astype(np.int32)).astype(np.int64)
    for process in range(processes):
      block = round_start + process
      start, stop = block * block_rows, min((block + 1) * block_rows, num_queries)
      if start < stop:
        yield start, all_scores[process, :stop - start], all_indices[process, :stop - start]


def sampled_recall(index: Index, queries, sample_size: int = 1000, seed: int = 0, k: int = 10
                   ) -> dict[str, float | int]:
  """Recall@k of `index` (e.g. ScaNN) against exact search of the same corpus, on `sample_size` queries drawn
  without replacement by a numpy Generator seeded with `seed` (all of them when there are fewer).

  The exact search costs sample x N inner products, on this process's devices in corpus chunks, whatever N: the
  check runs at any corpus size. The sample is split over processes and the hit counts summed (a collective).
  Returns {"recall": mean recall@k over the sample, "queries": sample size, "seed": seed, "k": k}.
  """
  num_queries = _num_rows(queries)
  size = min(sample_size, num_queries)
  sample = np.sort(np.random.default_rng(seed).choice(num_queries, size, replace=False))
  mine = sample[jax.process_index()::jax.process_count()]
  if len(mine):
    rows = _take(queries, mine)
    _, approximate = index.search(rows, k)
    _, reference = Index(index.corpus, k, "exact", devices=index.devices).search(rows, k)
    hits = sum(len(set(a[:k]) & set(e[:k])) for a, e in zip(approximate, reference))
    wanted = sum(min(k, len(e)) for e in reference)  # recall_at_k's denominators
  else:
    hits = wanted = 0
  hits, wanted = _allgather(np.array([hits, wanted], np.int32)).sum(axis=0)  # integers: exact on any process count
  return {"recall": float(hits / max(wanted, 1)), "queries": int(size), "seed": seed, "k": k}
