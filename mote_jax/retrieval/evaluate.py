"""End-to-end evaluation of a MoTE retriever on one split of a BEIR dataset.

    out_dir/corpus/                     passage embeddings (an embedding store; reused across splits and methods)
    out_dir/queries-<split>/            query embeddings of the judged queries
    out_dir/run-<split>-<method>.trec   the top-k run
    out_dir/report-<split>-<method>.json  metrics, counts, settings and timings

Every process encodes its share; process 0 searches, scores and writes the run and the report, which every
process returns. Encodings are resumable and checked against the model (see `encode.encode_to_store`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Sequence

import jax
from etils import epath

from mote_jax.model import MoteConfig
from mote_jax.partitioning import Partitioner
from mote_jax.retrieval import beir, encode, metrics, search
from mote_jax.retrieval.store import EmbeddingStore

log = logging.getLogger(__name__)

PyTree = Any


def evaluate(config: MoteConfig, params: PyTree, tokenizer, beir_dir: str | os.PathLike, split: str = "test", *,
             out_dir: str | os.PathLike, method: str = "exact", k: int = 1000,
             encode_options: encode.EncodeOptions = encode.EncodeOptions(),
             scann_config: search.ScannConfig = search.ScannConfig(), partitioner: Partitioner | None = None,
             measures: Sequence[str] = metrics.DEFAULT_MEASURES, allow_unknown_ids: bool = False,
             corpus_dir: str | os.PathLike | None = None, recall_check_max_docs: int = 2_000_000
             ) -> dict[str, Any]:
  """Encodes the corpus (passage expert) and the judged queries (query expert) of `split`, retrieves the top
  `k` per query by `method` ("exact" or "scann"), and scores the run with `measures`.

  Returns the report (also written to out_dir/report-<split>-<method>.json): {"metrics": {name: value}, ...}.
  `corpus_dir` (default out_dir/corpus) lets evaluations of several splits share one corpus encoding.
  With method "scann" and at most `recall_check_max_docs` documents, the report also holds ScaNN's recall@10
  against exact search of the same embeddings (report["search"]["recall_vs_exact_at_10"]).
  """
  data = beir.load_beir(beir_dir, split, allow_unknown_ids=allow_unknown_ids)
  return evaluate_dataset(config, params, tokenizer, data, out_dir=out_dir, method=method, k=k,
                          encode_options=encode_options, scann_config=scann_config, partitioner=partitioner,
                          measures=measures, corpus_dir=corpus_dir, recall_check_max_docs=recall_check_max_docs,
                          beir_dir=beir_dir)


def evaluate_dataset(config: MoteConfig, params: PyTree, tokenizer, data: beir.BeirDataset, *,
                     out_dir: str | os.PathLike, method: str = "exact", k: int = 1000,
                     encode_options: encode.EncodeOptions = encode.EncodeOptions(),
                     scann_config: search.ScannConfig = search.ScannConfig(),
                     partitioner: Partitioner | None = None, measures: Sequence[str] = metrics.DEFAULT_MEASURES,
                     corpus_dir: str | os.PathLike | None = None, recall_check_max_docs: int = 2_000_000,
                     beir_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """`evaluate` of a loaded (possibly subset, e.g. a dev split carved from train) BEIR split `data`."""
  start = time.perf_counter()
  out_dir = epath.Path(out_dir)  # local or gs://...
  split = data.split
  embedder = encode.Embedder(config, params, partitioner)
  fingerprint = encode.params_fingerprint(params)

  corpus_dir = epath.Path(corpus_dir) if corpus_dir is not None else out_dir / "corpus"
  queries_dir = out_dir / f"queries-{split}"
  corpus_stats = encode.encode_to_store(embedder, tokenizer, data.corpus.passages(), data.corpus.ids, "passage",
                                        corpus_dir, encode_options, model=fingerprint)
  query_ids = list(data.queries)
  query_stats = encode.encode_to_store(embedder, tokenizer, [data.queries[q] for q in query_ids], query_ids,
                                       "query", queries_dir, encode_options, model=fingerprint)

  run_path = out_dir / f"run-{split}-{method}.trec"
  report_path = out_dir / f"report-{split}-{method}.json"
  if jax.process_index() == 0:
    corpus_store, query_store = EmbeddingStore.open(corpus_dir), EmbeddingStore.open(queries_dir)
    query_embeddings = query_store.load()
    search_start = time.perf_counter()
    scores, indices = search.search(query_embeddings, corpus_store, k, method, scann_config=scann_config)
    search_seconds = time.perf_counter() - search_start
    run = metrics.ranking_to_run(query_store.ids, corpus_store.ids, scores, indices)
    metrics.write_run(run_path, run, tag=f"mote_jax-{config.tower_mode}-{method}")
    values = metrics.compute_metrics(data.qrels, run, measures)
    search_report = {"method": method, "k": int(scores.shape[1]), "seconds": round(search_seconds, 3)}
    if method == "scann":
      leaves, to_search = scann_config.leaves(scann_config.max_rows_per_index or len(corpus_store))
      search_report.update(scann=dataclasses.asdict(scann_config), num_leaves=leaves,
                           num_leaves_to_search=to_search)
      if len(corpus_store) <= recall_check_max_docs:
        _, exact_indices = search.search(query_embeddings, corpus_store, 10, "exact")
        search_report["recall_vs_exact_at_10"] = round(search.recall_at_k(indices, exact_indices, 10), 4)
        log.info("ScaNN recall@10 against exact search: %.4f", search_report["recall_vs_exact_at_10"])
    report = {
        "dataset": data.name, "beir_dir": None if beir_dir is None else str(beir_dir), "split": split,
        "num_queries": len(data.queries), "num_documents": len(data.corpus),
        "num_judgements": sum(map(len, data.qrels.values())),
        "metrics": values,
        "search": search_report,
        "encoding": {
            "options": {key: value for key, value in dataclasses.asdict(encode_options).items() if key != "progress"},
            "corpus": _stats_report(corpus_stats), "queries": _stats_report(query_stats),
        },
        "model": {"fingerprint": fingerprint, **{key: getattr(config, key) for key in (
            "tower_mode", "pooling", "normalize", "dtype", "hidden_size", "num_layers")}},
        "devices": {"platform": jax.devices()[0].platform, "count": jax.device_count(),
                    "processes": jax.process_count(), "mesh": dict(embedder.partitioner.mesh.shape)},
        "files": {"run": str(run_path), "corpus_embeddings": str(corpus_dir), "query_embeddings": str(queries_dir)},
        "seconds": round(time.perf_counter() - start, 3),
    }
    metrics.write_report(report_path, report)
    log.info("%s/%s (%s): %s", data.name, split, method,
             ", ".join(f"{name} {value:.4f}" for name, value in values.items()))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"evaluate {report_path}")
    if jax.process_index() != 0:
      report = json.loads(report_path.read_text())
  return report


def _stats_report(stats: encode.EncodeStats) -> dict[str, Any]:
  return {"num_texts": stats.num_texts, "shards": stats.num_shards, "shards_encoded": stats.shards_encoded,
          "shards_skipped": stats.shards_skipped, "texts_encoded": stats.texts_encoded,
          "seconds": round(stats.seconds, 3), "texts_per_second": round(stats.texts_per_second, 2)
          if stats.texts_encoded else None}
