"""BM25 negatives (bm25s, NumPy backend, never the accelerator): runs as arrays, queries sharded across processes,
cached in a shared directory.

k1 and b, the customary values (`training_groups.bm25_k1` / `bm25_b` in gin):
  bm25s defaults, k1=1.5, b=0.75: reproduce BEIR's published BM25 (Elasticsearch) on SciFact test, nDCG@10 0.686
    (tests/test_finetune_data.py checks it);
  MS MARCO passage, k1=0.82, b=0.68: Anserini / Pyserini's tuned setting for `msmarco-passage` (Pyserini's
    `SimpleSearcher` sets it for that index; Anserini's docs/experiments-msmarco-passage.md), MRR@10 0.187 on dev;
  BEIR with Pyserini's flat indices, k1=0.9, b=0.4: Anserini's defaults, used for the BEIR BM25 baselines.

`sharded_bm25_run`: each of P processes retrieves queries [p*Q/P, (p+1)*Q/P) with `n_threads` threads, writes its
part into the cache entry `<cache_dir>/bm25/<split>-<key>/part-<p>-of-<P>.npz` (key: corpus fingerprint, query
fingerprint, k1, b, depth) and, after a barrier, every process reads all parts. The cache directory must therefore
be shared by the hosts when there are several (a shared file system or gs://); a later run (stage 2, a resumed
run, another process count) with the same key reads the parts instead of retrieving again. The BM25 index itself
is built once (process 0) into `<cache_dir>/bm25/index-<corpus fingerprint>-<k1>-<b>` and memory-mapped by every
process (see `mote_jax.data.flat_tokens.cached_artefact`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from etils import epath

from mote_jax.data import flat_tokens

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RankedRun:
  """A top-k run as arrays: query_ids [Q]; rows int32 [Q, k] (corpus rows, best first, -1 past a query's last
  hit); scores float32 [Q, k]."""

  query_ids: tuple[str, ...]
  rows: np.ndarray
  scores: np.ndarray

  def to_dict(self, corpus_ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """{query id: {doc id: score}} (ir_measures' run form)."""
    return {q: {corpus_ids[r]: float(s) for r, s in zip(rows, scores) if r >= 0}
            for q, rows, scores in zip(self.query_ids, self.rows, self.scores)}


def _stemmer():
  import Stemmer
  return Stemmer.Stemmer("english")


def _tokenize(texts: Sequence[str]):
  import bm25s
  return bm25s.tokenize(list(texts), stopwords="en", stemmer=_stemmer(), show_progress=False)


def build_index(passages: Sequence[str], k1: float = 1.5, b: float = 0.75):
  """bm25s's Lucene BM25 over `passages` (English stemming and stop words), NumPy backend."""
  import bm25s
  retriever = bm25s.BM25(k1=k1, b=b, backend="numpy")
  retriever.index(_tokenize(passages), show_progress=False)
  return retriever


def retrieve(retriever, queries: Sequence[str], k: int, n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(rows int32 [Q, k], scores float32 [Q, k]) of `queries`; top-k selection on NumPy (never JAX), with
  `n_threads` threads (bm25s's thread pool over query chunks; 1: in this thread; -1: one per core)."""
  if not len(queries):
    return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
  rows, scores = retriever.retrieve(_tokenize(queries), k=k, show_progress=False, backend_selection="numpy",
                                    n_threads=0 if n_threads in (0, 1) else n_threads)
  return np.asarray(rows, np.int32), np.asarray(scores, np.float32)


def bm25_run(corpus_ids: Sequence[str], passages: Sequence[str], queries: Mapping[str, str], k: int = 100,
             k1: float = 1.5, b: float = 0.75, n_threads: int = 1) -> RankedRun:
  """BM25 top-k of every query over the whole corpus, in this process (see the module docstring for k1, b)."""
  k = min(k, len(corpus_ids))
  rows, scores = retrieve(build_index(passages, k1, b), [queries[q] for q in queries], k, n_threads)
  return RankedRun(tuple(queries), rows, scores)


def _npz_bytes(**arrays) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def _write_atomic(path: epath.Path, data: bytes) -> None:
  """`data` to `path` through a temporary name and a rename (an object store: one object write)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if flat_tokens.is_uri(path):
    path.write_bytes(data)
    return
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_bytes(data)
  tmp.replace(path)


def _complete_parts(entry: epath.Path) -> list[epath.Path] | None:
  """The parts of one finished sharded run in `entry` (any process count), or None."""
  if not entry.exists():
    return None
  by_count: dict[int, dict[int, epath.Path]] = {}
  for path in entry.iterdir():
    match = re.fullmatch(r"part-(\d+)-of-(\d+)\.npz", path.name)
    if match:
      by_count.setdefault(int(match[2]), {})[int(match[1])] = path
  for count, parts in sorted(by_count.items()):
    if len(parts) == count:
      return [parts[i] for i in range(count)]
  return None


def sharded_bm25_run(corpus_ids: Sequence[str], passages: Sequence[str], queries: Mapping[str, str], *,
                     depth: int = 100, k1: float = 1.5, b: float = 0.75, n_threads: int = 1,
                     cache_dir: str | os.PathLike | None = None, split: str = "train",
                     corpus_fingerprint: str | None = None,
                     local_cache_dir: str | os.PathLike | None = None) -> RankedRun:
  """`bm25_run` with the queries sharded across processes and the run cached (see the module docstring).
  Without `cache_dir` (or with one process and no cache) it runs `bm25_run` here. Every process must call it."""
  import jax
  depth = min(depth, len(corpus_ids))
  query_ids = tuple(queries)
  if cache_dir is None:
    if jax.process_count() > 1:
      raise ValueError("sharded_bm25_run: several processes need a cache_dir they all see (shared or gs://) to "
                       "exchange their parts of the run")
    return bm25_run(corpus_ids, passages, queries, k=depth, k1=k1, b=b, n_threads=n_threads)
  corpus_fingerprint = corpus_fingerprint or flat_tokens.texts_fingerprint(passages, corpus_ids)
  query_fingerprint = flat_tokens.texts_fingerprint([queries[q] for q in query_ids], query_ids)
  key = hashlib.sha256(f"{corpus_fingerprint}|{query_fingerprint}|{k1}|{b}|{depth}".encode()).hexdigest()[:20]
  entry = epath.Path(cache_dir) / "bm25" / f"{split}-{key}"
  parts = _complete_parts(entry)
  count, index = jax.process_count(), jax.process_index()
  # Every process decides alike: all read the entry after the barrier below, so a run found by some only is
  # not possible on a shared directory (on a non-shared one the part exchange fails with a clear error).
  if parts is None:
    lo, hi = index * len(query_ids) // count, (index + 1) * len(query_ids) // count
    index_dir = flat_tokens.cached_artefact(
        epath.Path(cache_dir) / "bm25" / f"index-{corpus_fingerprint}-{k1}-{b}",
        lambda tmp: _save_index(tmp, passages, k1, b), local_cache_dir=local_cache_dir)
    import bm25s
    retriever = bm25s.BM25.load(os.fspath(index_dir), mmap=True, show_progress=False)
    log.info("BM25 (k1=%s, b=%s, depth %d, %d threads): process %d of %d retrieves queries [%d, %d) of %d",
             k1, b, depth, n_threads, index, count, lo, hi, len(query_ids))
    rows, scores = retrieve(retriever, [queries[q] for q in query_ids[lo:hi]], depth, n_threads)
    _write_atomic(entry / f"part-{index:05d}-of-{count:05d}.npz",
                  _npz_bytes(rows=rows, scores=scores, first=np.int64(lo)))
  flat_tokens._barrier(f"bm25 run {entry}")
  parts = _complete_parts(entry)
  if parts is None:
    raise FileNotFoundError(f"{entry}: the BM25 run parts of the other processes are missing; with several "
                            "processes the cache directory must be shared by all hosts (a shared file system or "
                            "gs://)")
  rows, scores = [], []
  for path in parts:
    with path.open("rb") as f:
      part = np.load(io.BytesIO(f.read()))
      rows.append(part["rows"])
      scores.append(part["scores"])
  run = RankedRun(query_ids, np.concatenate(rows), np.concatenate(scores))
  if run.rows.shape != (len(query_ids), depth):
    raise ValueError(f"{entry}: the cached run has shape {run.rows.shape}, expected {(len(query_ids), depth)}")
  return run


def _save_index(directory: Path, passages: Sequence[str], k1: float, b: float) -> dict:
  build_index(passages, k1, b).save(os.fspath(directory), show_progress=False)
  return {"passages": len(passages), "k1": k1, "b": b}
