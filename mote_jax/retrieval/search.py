"""Top-k maximum inner product search: exact (sharded over devices, chunked over the corpus) and ScaNN.

Both return (scores [Q, k] float32, indices [Q, k] int64) with rows sorted by descending score, ties broken by
the lower corpus index; `indices` are row numbers of the corpus (an array, or an `EmbeddingStore` read shard by
shard). Partial top-k lists of corpus chunks, devices or ScaNN indices are merged with `merge_topk`.

The exact search is the reference: it runs in float32 at HIGHEST matmul precision (TPUs would otherwise use
bfloat16 passes) on the devices of this process only, so in multi-process runs it is a local computation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import tempfile
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mote_jax.retrieval.store import EmbeddingStore

log = logging.getLogger(__name__)


def merge_topk(scores: Sequence[np.ndarray], indices: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
  """Merges partial top-k lists ([Q, k_i] each) into one [Q, min(k, sum k_i)], best first, ties by lower index."""
  scores = np.concatenate(scores, axis=1)
  indices = np.concatenate(indices, axis=1)
  k = min(k, scores.shape[1])
  order = np.lexsort((indices, -scores.astype(np.float64)), axis=-1)[:, :k]  # last key is the primary one
  return np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)


def _corpus_rows(corpus) -> int:
  return len(corpus) if isinstance(corpus, EmbeddingStore) else int(np.shape(corpus)[0])


def _chunks(corpus, rows: int) -> Iterator[tuple[int, np.ndarray]]:
  """(row offset, [<= rows, H] float32) chunks of a corpus array or store, crossing store shards as needed."""
  if not isinstance(corpus, EmbeddingStore):
    corpus = np.asarray(corpus)
    for start in range(0, len(corpus), rows):
      yield start, np.asarray(corpus[start:start + rows], np.float32)
    return
  buffer, buffered, offset = [], 0, 0
  for _, _, shard in corpus.iter_shards():
    position = 0
    while position < len(shard):
      take = min(rows - buffered, len(shard) - position)
      buffer.append(np.asarray(shard[position:position + take], np.float32))
      buffered += take
      position += take
      if buffered == rows:
        yield offset, np.concatenate(buffer)
        offset, buffer, buffered = offset + rows, [], 0
  if buffered:
    yield offset, np.concatenate(buffer)


@functools.lru_cache(maxsize=16)
def _exact_chunk_fn(mesh: Mesh, k: int):
  """(cached per mesh and k: a search of query blocks, or of several query sets, compiles once) jit of (queries [Qb, H], chunk [C, H] sharded on rows, valid rows) -> top-k (scores, chunk indices)."""
  def local(queries, chunk, valid):
    rows = chunk.shape[0]  # this device's rows
    first = jax.lax.axis_index("rows") * rows
    scores = jnp.dot(queries, chunk.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    scores = jnp.where((first + jnp.arange(rows))[None] < valid, scores, -jnp.inf)  # padding rows never win
    top_scores, top_indices = jax.lax.top_k(scores, min(k, rows))
    return top_scores, top_indices + first

  def search(queries, chunk, valid):
    scores, indices = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("rows"), P()),
                                    out_specs=(P(None, "rows"), P(None, "rows")))(queries, chunk, valid)
    top_scores, position = jax.lax.top_k(scores, min(k, scores.shape[1]))  # [Qb, devices * k'] -> [Qb, k]
    return top_scores, jnp.take_along_axis(indices, position, 1)

  return jax.jit(search, out_shardings=NamedSharding(mesh, P()))


def exact_search(queries: np.ndarray, corpus, k: int, *, devices: Sequence[jax.Device] | None = None,
                 chunk_rows: int = 65536, query_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by inner product: queries [Q, H] against corpus [N, H] -> (scores, indices) [Q, min(k, N)].

  The corpus streams through in chunks of `chunk_rows` (padded to one shape, so one compilation), each split
  over `devices` (default: this process's devices); every device keeps its own top-k, the devices' lists are
  merged on device and the chunks' lists on the host.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = Mesh(np.asarray(devices), ("rows",))
  queries = np.asarray(queries, np.float32)
  num_rows = _corpus_rows(corpus)
  if num_rows == 0:
    raise ValueError("exact_search: empty corpus")
  k = min(k, num_rows)
  chunk_rows = math.ceil(min(chunk_rows, num_rows) / len(devices)) * len(devices)
  block = min(query_block, max(8, math.ceil(len(queries) / 8) * 8))
  padded_queries = np.zeros((math.ceil(len(queries) / block) * block, queries.shape[1]), np.float32)
  padded_queries[:len(queries)] = queries
  fn = _exact_chunk_fn(mesh, k)
  chunk_sharding = NamedSharding(mesh, P("rows"))
  best_scores, best_indices = None, None
  for offset, chunk in _chunks(corpus, chunk_rows):
    valid = len(chunk)
    if valid < chunk_rows:
      chunk = np.concatenate([chunk, np.zeros((chunk_rows - valid, chunk.shape[1]), np.float32)])
    chunk = jax.device_put(chunk, chunk_sharding)
    parts = [fn(padded_queries[q:q + block], chunk, np.int32(valid)) for q in range(0, len(padded_queries), block)]
    scores = np.concatenate([np.asarray(s) for s, _ in parts])[:len(queries)]
    indices = np.concatenate([np.asarray(i) for _, i in parts])[:len(queries)].astype(np.int64) + offset
    if best_scores is None:
      best_scores, best_indices = scores, indices
    else:
      best_scores, best_indices = merge_topk([best_scores, scores], [best_indices, indices], k)
  # Within a chunk lax.top_k keeps the lower index first among ties; re-sorting makes that hold across devices.
  return merge_topk([best_scores], [best_indices], k)


_REORDER_DTYPES = ("float32", "bfloat16", "int8")  # ScaNN's ReorderType members, upper-cased


@dataclasses.dataclass(frozen=True)
class ScannConfig:
  """A ScaNN index: k-means tree partitioning (with SOAR spilling), anisotropic (AH) scoring, exact reordering.

  Unset sizes scale with the rows N of an index: num_leaves = round(sqrt(N)) (ScaNN's suggested start) and
  num_leaves_to_search = ceil(search_factor * sqrt(num_leaves)), a fraction that falls as N grows (43 of 72
  leaves for SciFact's 5,183 documents, 159 of 1,000 for 1M rows). Searching is cheap next to building, so
  the defaults lean to recall. SOAR also files every row under a second leaf, chosen so that its residual is
  near-orthogonal to the first: that recovers neighbours on partition boundaries, where query/passage pairs
  from different towers often sit. The defaults reach recall@10 >= 0.95 of exact search on SciFact
  (all-MiniLM-L6-v2) and on 1M x 384 clustered vectors (tests/test_retrieval_scifact.py,
  tests/test_retrieval_scann.py; `python -m benchmarks.scann_recall`). For speed on a large corpus, more
  leaves with their k-means trained on every row search a smaller share of the data at the same recall
  (`ScannConfig(num_leaves=5000, training_sample_size=N, spherical=True, dimensions_per_block=4, reorder=200)`),
  at the cost of a longer build; `leaf_score_margin` lets each query search only the leaves near its best one
  (measured by `python -m benchmarks --only search`).
  """

  num_leaves: int | None = None
  num_leaves_to_search: int | None = None
  search_factor: float = 5.0
  training_sample_size: int = 250_000
  spherical: bool = False  # spherical k-means centres; a good choice for L2-normalised embeddings
  soar_lambda: float | None = 1.0  # None: no spilling (a smaller index, lower recall)
  soar_overretrieve_factor: float | None = 2.0
  dimensions_per_block: int = 2
  anisotropic_quantization_threshold: float = 0.2
  reorder: int = 250
  # The rows' copy that reordering scores: "float32" (exact), "bfloat16" or "int8" (fixed point). A quantised
  # copy is a memory knob, not a speed one (search time is the AH scan's; `--only search`). The
  # returned neighbours are then rescored exactly against the float32 rows, so scores stay true inner products.
  reorder_dtype: str = "float32"
  # Query-adaptive leaf selection: a query searches every leaf whose centroid's inner product with it is within
  # this margin of its best leaf's, at most num_leaves_to_search (ScaNN's ADDITIVE query spilling). A query deep
  # inside one cluster then searches few leaves and one on a boundary many. None: every query searches exactly
  # num_leaves_to_search leaves (`python -m benchmarks --only search` compares both).
  leaf_score_margin: float | None = None
  training_threads: int = 0  # 0: all cores
  search_threads: int = 0
  max_rows_per_index: int | None = None  # split bigger corpora into several indices, merged per query
  brute_force_below: int = 1000  # an index of fewer rows scores them all exactly (too few to train a tree)

  def __post_init__(self):
    if self.reorder_dtype not in _REORDER_DTYPES:
      raise ValueError(f"ScannConfig.reorder_dtype {self.reorder_dtype!r}: expected one of {_REORDER_DTYPES}")
    if self.leaf_score_margin is not None and not self.leaf_score_margin >= 0:
      raise ValueError(f"ScannConfig.leaf_score_margin {self.leaf_score_margin!r}: expected None or a number >= 0")

  def leaves(self, num_rows: int) -> tuple[int, int]:
    """(num_leaves, num_leaves_to_search) for an index of `num_rows`."""
    leaves = min(self.num_leaves or max(1, round(math.sqrt(num_rows))), num_rows)
    search = self.num_leaves_to_search or math.ceil(self.search_factor * math.sqrt(leaves))
    return leaves, min(max(1, search), leaves)


def build_scann(corpus: np.ndarray, k: int, config: ScannConfig = ScannConfig()):
  """A ScaNN searcher (dot product) over corpus [N, H] float32, returning `k` neighbours per query."""
  import scann
  corpus = np.ascontiguousarray(corpus, np.float32)
  builder = scann.scann_ops_pybind.builder(corpus, k, "dot_product")
  if len(corpus) < config.brute_force_below:
    return builder.score_brute_force().build()
  leaves, to_search = config.leaves(len(corpus))
  builder.set_n_training_threads(config.training_threads)
  soar = {} if config.soar_lambda is None else dict(soar_lambda=config.soar_lambda,
                                                      overretrieve_factor=config.soar_overretrieve_factor)
  builder = builder.tree(num_leaves=leaves, num_leaves_to_search=to_search, spherical=config.spherical,
                         training_sample_size=min(config.training_sample_size, len(corpus)), **soar)
  builder = builder.score_ah(config.dimensions_per_block,
                             anisotropic_quantization_threshold=config.anisotropic_quantization_threshold)
  builder = builder.reorder(max(config.reorder, k), quantize=scann_reorder_type(config.reorder_dtype))
  if config.leaf_score_margin is None:
    return builder.build()
  # ScaNN's builder writes a fixed leaf count into the config text; the margin is a field of the same stanza.
  from google.protobuf import text_format
  from scann.proto import scann_pb2
  proto = text_format.Parse(builder.create_config(), scann_pb2.ScannConfig())
  spilling = proto.partitioning.query_spilling
  spilling.spilling_type = spilling.ADDITIVE  # distance (-inner product) <= the best leaf's + margin
  spilling.spilling_threshold = config.leaf_score_margin
  spilling.max_spill_centers = to_search
  return scann.scann_ops_pybind.create_searcher(corpus, text_format.MessageToString(proto),
                                                config.training_threads)


def scann_reorder_type(reorder_dtype: str):
  """ScaNN's `ReorderType` member for a `ScannConfig.reorder_dtype` name ("float32" -> ReorderType.FLOAT32)."""
  from scann.scann_ops.py.scann_builder import ReorderType
  return ReorderType[reorder_dtype.upper()]


def rescore_exactly(queries: np.ndarray, rows: np.ndarray, indices: np.ndarray, block: int = 256
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Exact inner products of queries [Q, H] with their candidates rows[indices] ([Q, k] indices into rows
  [N, H]; a negative index, ScaNN's filler when it found fewer than k, scores -inf), re-sorted best first:
  (scores, indices) [Q, k]. Ties keep the lower index first."""
  scores = np.empty(indices.shape, np.float32)
  for start in range(0, len(queries), block):  # bounded memory: block x k x H gathered floats at a time
    found = indices[start:start + block]
    rows_block = rows[np.maximum(found, 0)]
    block_scores = np.einsum("qh,qkh->qk", queries[start:start + block], rows_block)
    scores[start:start + block] = np.where(found >= 0, block_scores, -np.inf)
  order = np.lexsort((indices, -scores), axis=-1)
  return np.take_along_axis(scores, order, -1), np.take_along_axis(indices, order, -1)


def _index_rows(corpus, start: int, stop: int, staging_dir: str) -> np.ndarray:
  """Rows [start, stop) of a corpus array or store as one C-contiguous [rows, H] float32 array that is not a copy
  in this process's memory: a view when the rows lie in one array or store shard, else a memory-mapped file in
  `staging_dir` filled shard by shard. ScaNN copies the rows into its index: a host then holds the corpus once
  (the mapped pages are reclaimable cache, not resident anonymous memory)."""
  if not isinstance(corpus, EmbeddingStore):
    rows = corpus[start:stop]
    if isinstance(rows, np.ndarray) and rows.dtype == np.float32 and rows.flags.c_contiguous:
      return rows
    return np.ascontiguousarray(rows, np.float32)
  pieces = []
  for offset, _, shard in corpus.iter_shards():
    lo, hi = max(start, offset), min(stop, offset + len(shard))
    if lo < hi:
      pieces.append(shard[lo - offset:hi - offset])
  if len(pieces) == 1 and pieces[0].dtype == np.float32:
    return pieces[0]
  fd, path = tempfile.mkstemp(prefix="mote_index_rows_", suffix=".npy", dir=staging_dir)
  os.close(fd)
  try:
    staged = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(stop - start, corpus.dim))
    position = 0
    for piece in pieces:
      staged[position:position + len(piece)] = piece
      position += len(piece)
    staged.flush()
    return np.load(path, mmap_mode="r")  # the mapping outlives the file's name, removed below
  finally:
    os.unlink(path)


class Index:
  """A corpus [N, H] ready to be searched many times: `search(queries [Q, H], k)` -> (scores, indices) [Q, k'].

  method "exact": the corpus (an array or a store, read chunk by chunk at each search) on this process's devices,
  see `exact_search`. method "scann": one ScaNN index per `config.max_rows_per_index` rows, built once here (the
  rows handed over without an in-memory copy, see `_index_rows`), their lists merged per query. Building an
  index is the costly part: several query sets (or query blocks, or a recall check) reuse one.
  """

  def __init__(self, corpus, k: int, method: str = "exact", *, scann_config: ScannConfig = ScannConfig(),
               devices: Sequence[jax.Device] | None = None, staging_dir: str | None = None):
    if method not in ("exact", "scann"):
      raise ValueError(f"search method {method!r}: expected 'exact' or 'scann'")
    self.corpus, self.method, self.scann_config, self.devices = corpus, method, scann_config, devices
    self.num_rows = _corpus_rows(corpus)
    if self.num_rows == 0:
      raise ValueError(f"{method} search: empty corpus")
    self.k = min(k, self.num_rows)
    self.build_seconds = 0.0
    self._parts: list[tuple[int, np.ndarray, object]] = []  # (row offset, rows, searcher)
    if method == "scann":
      start = time.perf_counter()
      part_rows = scann_config.max_rows_per_index or self.num_rows
      for offset in range(0, self.num_rows, part_rows):
        rows = _index_rows(corpus, offset, min(offset + part_rows, self.num_rows),
                           staging_dir or tempfile.gettempdir())
        searcher = build_scann(rows, min(self.k, len(rows)), scann_config)
        if scann_config.search_threads:
          searcher.set_num_threads(scann_config.search_threads)
        self._parts.append((offset, rows, searcher))
        log.info("scann: %d rows indexed (leaves %s)", len(rows), scann_config.leaves(len(rows)))
      self.build_seconds = time.perf_counter() - start

  def search(self, queries: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, H] -> (scores float32, indices int64) [Q, min(k, N)], best first (k <= the built k)."""
    k = self.k if k is None else min(k, self.k)
    queries = np.ascontiguousarray(queries, np.float32)
    if len(queries) == 0:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    if self.method == "exact":
      return exact_search(queries, self.corpus, k, devices=self.devices)
    all_scores, all_indices = [], []
    for offset, rows, searcher in self._parts:
      part_k = min(k, len(rows))
      start = time.perf_counter()
      indices, scores = searcher.search_batched_parallel(queries, final_num_neighbors=part_k)
      if self.scann_config.reorder_dtype != "float32":  # quantised reordering scores: rescore what it returned
        scores, indices = rescore_exactly(queries, rows, np.asarray(indices, np.int64))
      log.debug("scann: %d queries searched in %.2fs", len(queries), time.perf_counter() - start)
      all_scores.append(np.asarray(scores, np.float32))
      all_indices.append(np.asarray(indices, np.int64) + offset)
    return merge_topk(all_scores, all_indices, k)


def scann_search(queries: np.ndarray, corpus, k: int, config: ScannConfig = ScannConfig()
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Approximate top-k with ScaNN: queries [Q, H] against corpus [N, H] -> (scores, indices) [Q, min(k, N)].

  The corpus gets one index, or one per `config.max_rows_per_index` rows; their lists are merged per query.
  Reordering rescores candidates exactly (or, with a quantised `reorder_dtype`, its result is rescored
  exactly), so scores are true inner products.
  """
  return Index(corpus, k, "scann", scann_config=config).search(queries)


def search(queries: np.ndarray, corpus, k: int, method: str = "exact", *, scann_config: ScannConfig = ScannConfig(),
           devices: Sequence[jax.Device] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`exact_search` or `scann_search` by name."""
  return Index(corpus, k, method, scann_config=scann_config, devices=devices).search(queries)


def recall_at_k(approximate: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
  """Mean fraction of the exact top-k indices found in the approximate top-k ([Q, >= k] index arrays)."""
  hits = [len(set(a[:k]) & set(e[:k])) / min(k, len(e)) for a, e in zip(approximate, exact)]
  return float(np.mean(hits))
