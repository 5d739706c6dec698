"""End-to-end evaluation of a MoTE retriever on BEIR splits, and the search behind hard-negative mining.

    out_dir/corpus/                     passage embeddings (an embedding store; or a shared one, see below)
    out_dir/queries-<split>/            query embeddings of the judged queries
    out_dir/run-<split>-<method>.trec   the top-k run
    out_dir/report-<split>-<method>.json  metrics, counts, settings and timings

Every process encodes its share of the corpus and query shards, builds the same index over the whole corpus and
searches its share of the queries (`sharded.py` says why queries and not the corpus); the top-k lists of every
block of queries are all-gathered, so every process scores the run, and process 0 streams the run file to disk
one block at a time. Every process returns the same report. Encodings are resumable and checked against the
model (see `encode.encode_to_store`); embedding stores must be on a file system every process reads (each
process reads the shards the others wrote); the run, the metrics and the report need none.

An `Evaluator` keeps the last corpus it encoded and indexed: query sets sharing a corpus (MS MARCO dev, TREC DL
2019 and 2020) encode it once and search one index. With `corpus_root`, the corpus store lives in
`corpus_root/<key>`, the key a hash of the corpus's ids and texts, the model's parameters and the encoding's
max_length and shard size, so separate runs (or jobs) with the same model and corpus share it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from etils import epath

from mote_jax.model import MoteConfig
from mote_jax.partitioning import Partitioner
from mote_jax.retrieval import beir, encode, metrics, search, sharded
from mote_jax.retrieval.store import EmbeddingStore

log = logging.getLogger(__name__)

PyTree = Any


def corpus_fingerprint(corpus: beir.Corpus) -> str:
  """A hash of a corpus's ids and passage texts, in order (two BEIR directories with one corpus.jsonl agree)."""
  h = hashlib.sha1()
  for doc_id, passage in zip(corpus.ids, corpus.passages()):
    h.update(doc_id.encode("utf-8"))
    h.update(b"\0")
    h.update(passage.encode("utf-8"))
    h.update(b"\0")
  return h.hexdigest()[:20]


class StreamedText:
  """A text file written piece by piece to a temporary name beside `path` and renamed into place on `close`
  (process 0 only; elsewhere a no-op). Local or gs:// through epath. As a context manager: closed when the block
  ends normally, aborted (temporary removed) when it raises."""

  def __init__(self, path: epath.Path, write: bool):
    self.path, self._file = path, None
    if write:
      path.parent.mkdir(parents=True, exist_ok=True)
      self._tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
      # A local path's open() is a file; a gs:// one's is a context manager around a GFile: enter either.
      self._handle = contextlib.ExitStack()
      self._file = self._handle.enter_context(self._tmp.open("w"))

  def write(self, text: str) -> None:
    if self._file is not None:
      self._file.write(text)

  def close(self) -> None:
    if self._file is not None:
      self._handle.close()
      self._tmp.replace(self.path)

  def abort(self) -> None:
    if self._file is not None:
      self._handle.close()
      self._tmp.unlink(missing_ok=True)

  def __enter__(self) -> "StreamedText":
    return self

  def __exit__(self, exc_type, *exc) -> None:
    """Renames the file into place when the block ends normally; removes the temporary when it raises."""
    if exc_type is None:
      self.close()
    else:
      self.abort()


def _write_json(path: epath.Path, value) -> None:
  text = StreamedText(path, jax.process_index() == 0)
  text.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
  text.close()


@dataclasses.dataclass
class _Corpus:
  """The corpus an `Evaluator` encoded and indexed last."""

  key: tuple[str, str]  # (store directory, corpus fingerprint)
  store: EmbeddingStore
  stats: encode.EncodeStats
  index: search.Index
  uses: int = 0


class Evaluator:
  """Encodes, indexes and searches with one model; reuses the last corpus's encoding and index across calls.

  `evaluate(data, out_dir)` scores a BEIR split; `search(data, out_dir, k, consume)` is the search alone (mining
  uses it). Collectives in multi-process runs: every process makes the same calls.
  """

  def __init__(self, config: MoteConfig, params: PyTree, tokenizer, *, method: str = "exact", k: int = 1000,
               encode_options: encode.EncodeOptions = encode.EncodeOptions(),
               scann_config: search.ScannConfig = search.ScannConfig(), partitioner: Partitioner | None = None,
               measures: Sequence[str] = metrics.DEFAULT_MEASURES, corpus_root: str | os.PathLike | None = None,
               recall_sample: int = 1000, recall_seed: int = 0, block_rows: int | None = None):
    if method not in ("exact", "scann"):
      raise ValueError(f"search method {method!r}: expected 'exact' or 'scann'")
    self.config, self.tokenizer, self.method, self.k = config, tokenizer, method, k
    self.encode_options, self.scann_config, self.measures = encode_options, scann_config, tuple(measures)
    self.corpus_root = None if corpus_root is None else epath.Path(corpus_root)
    self.recall_sample, self.recall_seed, self.block_rows = recall_sample, recall_seed, block_rows
    self.embedder = encode.Embedder(config, params, partitioner)
    self.fingerprint = encode.params_fingerprint(params)
    self.corpus_encodings = 0  # how many times a corpus went through encode_to_store
    self._corpus: _Corpus | None = None

  def corpus_dir(self, corpus_hash: str, out_dir: epath.Path) -> epath.Path:
    """Where a corpus (`corpus_fingerprint`) is stored: corpus_root/<key> with a `corpus_root`, else out_dir/corpus."""
    if self.corpus_root is None:
      return out_dir / "corpus"
    key = "|".join([corpus_hash, self.fingerprint, str(self.encode_options.max_length),
                    str(self.encode_options.shard_size)])
    return self.corpus_root / f"corpus-{hashlib.sha1(key.encode()).hexdigest()[:16]}"

  def _indexed_corpus(self, data: beir.BeirDataset, corpus_hash: str, corpus_dir: epath.Path) -> _Corpus:
    key = (os.fspath(corpus_dir), corpus_hash)
    if self._corpus is not None and self._corpus.key == key:
      self._corpus.uses += 1
      log.info("%s: corpus encoding and %s index reused", corpus_dir, self.method)
      return self._corpus
    self._corpus = None  # one index held at a time
    stats = encode.encode_to_store(self.embedder, self.tokenizer, data.corpus.passages(), data.corpus.ids,
                                   "passage", corpus_dir, self.encode_options, model=self.fingerprint)
    self.corpus_encodings += 1
    store = EmbeddingStore.open(corpus_dir)
    index = search.Index(store, self.k, self.method, scann_config=self.scann_config)
    self._corpus = _Corpus(key, store, stats, index)
    return self._corpus

  def search(self, data: beir.BeirDataset, out_dir: str | os.PathLike, consume: Callable, *,
             corpus_dir: str | os.PathLike | None = None, k: int | None = None) -> dict[str, Any]:
    """Encodes `data`'s corpus (unless the last call's is the same) and queries, and searches the queries' top `k`
    (default: the Evaluator's k) sharded over processes; `consume(query ids, doc ids, scores, indices)` gets every
    block of queries ([b] ids, [b, k'] arrays; rows of the corpus) in query order, on every process.

    Returns {"corpus": its _Corpus, "queries": query EncodeStats, "queries_dir", "search": the search report}.
    """
    out_dir = epath.Path(out_dir)
    corpus_hash = corpus_fingerprint(data.corpus)
    corpus_dir = epath.Path(corpus_dir) if corpus_dir is not None else self.corpus_dir(corpus_hash, out_dir)
    corpus = self._indexed_corpus(data, corpus_hash, corpus_dir)
    queries_dir = out_dir / f"queries-{data.split}"
    query_ids = list(data.queries)
    query_stats = encode.encode_to_store(self.embedder, self.tokenizer, [data.queries[q] for q in query_ids],
                                         query_ids, "query", queries_dir, self.encode_options,
                                         model=self.fingerprint)
    query_store = EmbeddingStore.open(queries_dir)
    doc_ids = corpus.store.ids
    start = time.perf_counter()
    k = self.k if k is None else k
    for first, scores, indices in sharded.sharded_search(corpus.index, query_store, k, block_rows=self.block_rows):
      consume(query_ids[first:first + len(scores)], doc_ids, scores, indices)
    report = {"method": self.method, "k": min(k, len(doc_ids)), "seconds": round(time.perf_counter() - start, 3),
              "index_seconds": round(corpus.index.build_seconds, 3), "processes": jax.process_count(),
              "block_rows": self.block_rows or sharded.default_block_rows(min(k, len(doc_ids)))}
    if self.method == "scann":
      leaves, to_search = self.scann_config.leaves(self.scann_config.max_rows_per_index or len(doc_ids))
      report.update(scann=dataclasses.asdict(self.scann_config), num_leaves=leaves, num_leaves_to_search=to_search)
      if self.recall_sample:
        recall = sharded.sampled_recall(corpus.index, query_store, self.recall_sample, self.recall_seed, 10)
        report["recall_vs_exact_at_10"] = round(recall["recall"], 4)
        report["recall_sample"] = {"queries": recall["queries"], "seed": recall["seed"]}
        log.info("ScaNN recall@10 against exact search on %d sampled queries: %.4f", recall["queries"],
                 recall["recall"])
    return {"corpus": corpus, "queries": query_stats, "queries_dir": queries_dir, "corpus_dir": corpus_dir,
            "search": report}

  def evaluate(self, data: beir.BeirDataset, out_dir: str | os.PathLike, *,
               corpus_dir: str | os.PathLike | None = None, beir_dir: str | os.PathLike | None = None
               ) -> dict[str, Any]:
    """Retrieves the top k of `data`'s judged queries and scores the run with the measures; the report (also in
    out_dir/report-<split>-<method>.json): {"metrics": {name: value}, "search": {...}, ...}."""
    start = time.perf_counter()
    out_dir = epath.Path(out_dir)
    split = data.split
    run_path = out_dir / f"run-{split}-{self.method}.trec"
    report_path = out_dir / f"report-{split}-{self.method}.json"
    tag = f"mote_jax-{self.config.tower_mode}-{self.method}"
    run_file = StreamedText(run_path, jax.process_index() == 0)
    per_query: dict[str, dict[str, float]] = {}

    def consume(query_ids, doc_ids, scores, indices):
      run = metrics.ranking_to_run(query_ids, doc_ids, scores, indices)
      run_file.write(metrics.format_run(run, tag))
      judged = {q: data.qrels[q] for q in query_ids if data.qrels.get(q)}
      if judged:
        per_query.update(metrics.per_query_metrics(judged, run, self.measures))

    with run_file:
      found = self.search(data, out_dir, consume, corpus_dir=corpus_dir)
    judged = [q for q, docs in data.qrels.items() if docs]
    missing = [q for q in judged if q not in per_query]
    if missing:
      log.warning("%d judged queries have no results in the run (they score 0): %s", len(missing), missing[:5])
    values = {name: float(np.mean([per_query.get(q, {}).get(name, 0.0) for q in judged])) for name in self.measures}
    corpus = found["corpus"]
    report = {
        "dataset": data.name, "beir_dir": None if beir_dir is None else os.fspath(beir_dir), "split": split,
        "num_queries": len(data.queries), "num_documents": len(data.corpus),
        "num_judgements": sum(map(len, data.qrels.values())),
        "metrics": values,
        "search": found["search"],
        "encoding": {
            "options": {key: value for key, value in dataclasses.asdict(self.encode_options).items()
                        if key != "progress"},
            "corpus": {**_stats_report(corpus.stats), "reused_in_memory": corpus.uses > 0},
            "queries": _stats_report(found["queries"]),
        },
        "model": {"fingerprint": self.fingerprint, **{key: getattr(self.config, key) for key in (
            "tower_mode", "pooling", "normalize", "dtype", "hidden_size", "num_layers")}},
        "devices": {"platform": jax.devices()[0].platform, "count": jax.device_count(),
                    "processes": jax.process_count(), "mesh": dict(self.embedder.partitioner.mesh.shape)},
        "files": {"run": os.fspath(run_path), "corpus_embeddings": os.fspath(found["corpus_dir"]),
                  "query_embeddings": os.fspath(found["queries_dir"])},
        "seconds": round(time.perf_counter() - start, 3),
    }
    _write_json(report_path, report)
    log.info("%s/%s (%s): %s", data.name, split, self.method,
             ", ".join(f"{name} {value:.4f}" for name, value in values.items()))
    if jax.process_count() > 1:  # the files are complete when any process returns
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"evaluate {report_path}")
    return report


def evaluate(config: MoteConfig, params: PyTree, tokenizer, beir_dir: str | os.PathLike, split: str = "test", *,
             out_dir: str | os.PathLike, method: str = "exact", k: int = 1000,
             encode_options: encode.EncodeOptions = encode.EncodeOptions(),
             scann_config: search.ScannConfig = search.ScannConfig(), partitioner: Partitioner | None = None,
             measures: Sequence[str] = metrics.DEFAULT_MEASURES, allow_unknown_ids: bool = False,
             corpus_dir: str | os.PathLike | None = None, recall_sample: int = 1000, recall_seed: int = 0
             ) -> dict[str, Any]:
  """Encodes the corpus (passage expert) and the judged queries (query expert) of `split`, retrieves the top
  `k` per query by `method` ("exact" or "scann"), and scores the run with `measures`.

  Returns the report (also written to out_dir/report-<split>-<method>.json): {"metrics": {name: value}, ...}.
  `corpus_dir` (default out_dir/corpus) lets evaluations of several splits share one corpus encoding.
  With method "scann", the report also holds ScaNN's recall@10 against exact search of the same embeddings on
  `recall_sample` queries drawn with `recall_seed` (report["search"]["recall_vs_exact_at_10"]; 0: no check).
  """
  data = beir.load_beir(beir_dir, split, allow_unknown_ids=allow_unknown_ids)
  return evaluate_dataset(config, params, tokenizer, data, out_dir=out_dir, method=method, k=k,
                          encode_options=encode_options, scann_config=scann_config, partitioner=partitioner,
                          measures=measures, corpus_dir=corpus_dir, recall_sample=recall_sample,
                          recall_seed=recall_seed, beir_dir=beir_dir)


def evaluate_dataset(config: MoteConfig, params: PyTree, tokenizer, data: beir.BeirDataset, *,
                     out_dir: str | os.PathLike, method: str = "exact", k: int = 1000,
                     encode_options: encode.EncodeOptions = encode.EncodeOptions(),
                     scann_config: search.ScannConfig = search.ScannConfig(),
                     partitioner: Partitioner | None = None, measures: Sequence[str] = metrics.DEFAULT_MEASURES,
                     corpus_dir: str | os.PathLike | None = None, recall_sample: int = 1000, recall_seed: int = 0,
                     beir_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """`evaluate` of a loaded (possibly subset, e.g. a dev split carved from train) BEIR split `data`."""
  evaluator = Evaluator(config, params, tokenizer, method=method, k=k, encode_options=encode_options,
                        scann_config=scann_config, partitioner=partitioner, measures=measures,
                        recall_sample=recall_sample, recall_seed=recall_seed)
  return evaluator.evaluate(data, out_dir, corpus_dir=corpus_dir, beir_dir=beir_dir)


def evaluate_datasets(evaluator: Evaluator, datasets: Iterable[tuple[beir.BeirDataset, str | os.PathLike]]
                      ) -> list[dict[str, Any]]:
  """Reports of several (dataset, out_dir) pairs, in order, with one evaluator: consecutive datasets sharing a
  corpus encode it once and search one index. `datasets` may be a generator (one corpus in memory at a time)."""
  return [evaluator.evaluate(data, out_dir) for data, out_dir in datasets]


def _stats_report(stats: encode.EncodeStats) -> dict[str, Any]:
  return {"num_texts": stats.num_texts, "shards": stats.num_shards, "shards_encoded": stats.shards_encoded,
          "shards_skipped": stats.shards_skipped, "texts_encoded": stats.texts_encoded,
          "seconds": round(stats.seconds, 3), "texts_per_second": round(stats.texts_per_second, 2)
          if stats.texts_encoded else None}
