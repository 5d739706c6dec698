"""Retrieval evaluation: BEIR data, encoding to embedding stores, exact and ScaNN search, IR metrics."""

from mote_jax.retrieval.beir import BeirDataset, BeirFormatError, Corpus, load_beir
from mote_jax.retrieval.encode import (EncodeOptions, EncodeStats, Embedder, encode_texts, encode_to_store,
                                       params_fingerprint)
from mote_jax.retrieval.evaluate import evaluate
from mote_jax.retrieval.metrics import (DEFAULT_MEASURES, compute_metrics, per_query_metrics, ranking_to_run,
                                        read_run, write_report, write_run)
from mote_jax.retrieval.search import ScannConfig, exact_search, merge_topk, recall_at_k, scann_search
from mote_jax.retrieval.store import EmbeddingStore, StoreMismatchError

__all__ = [
    "BeirDataset", "BeirFormatError", "Corpus", "DEFAULT_MEASURES", "EmbeddingStore", "EncodeOptions",
    "EncodeStats", "Embedder", "ScannConfig", "StoreMismatchError", "compute_metrics", "encode_texts",
    "encode_to_store", "evaluate", "exact_search", "load_beir", "merge_topk", "params_fingerprint", "per_query_metrics",
    "ranking_to_run", "read_run", "recall_at_k", "scann_search", "write_report", "write_run",
]
