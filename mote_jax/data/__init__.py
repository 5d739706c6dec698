"""CoT-MoTE pre-training data: seqio tasks of masked (anchor, context) pairs and resumable per-host batches.

  tasks.register_*      register span-pair / query-pair tasks (explicit, idempotent)
  batches.PairBatches   one host's fixed-shape numpy batches of a task, resumable at any step
  masking.mask_tokens   BERT 80/10/10 (whole-word) masking, stateless
  online.register_records_task, online.RecordBatches   online span sampling from pre-tokenised records, O(1) resume

Names are imported lazily (PEP 562), so that `import mote_jax.data.finetune` does not pull in TensorFlow and
seqio through this package.
"""

import importlib

_EXPORTS = {
    "mote_jax.data.batches": ("PairBatches", "host_seed"),
    "mote_jax.data.feature_converter": ("MODEL_FEATURE_NAMES", "TASK_FEATURE_NAMES", "PairFeatureConverter"),
    "mote_jax.data.masking": ("IGNORE_LABEL", "MaskingConfig", "mask_pairs", "mask_tokens"),
    "mote_jax.data.online": ("RecordBatches", "RecordPairTask", "RecordsSource", "register_records_task"),
    "mote_jax.data.sampling": ("CONTEXT_TYPES", "PairSampler", "SpanSampling"),
    "mote_jax.data.readers": ("BEIR_CORPUS", "DataFormatError", "Document", "JsonlFormat", "ReadStats",
                              "TextFormat"),
    "mote_jax.data.sources": ("DocumentSource", "TfdsDocumentSource"),
    "mote_jax.data.spans": ("document_span_pairs", "group_spans", "split_sentences"),
    "mote_jax.data.tasks": ("TEXT_TYPES", "PairTask", "PairTaskSpec", "register_beir_corpus_task",
                            "register_document_task", "register_jsonl_task", "register_query_pair_tasks",
                            "register_text_file_task", "register_tfds_task"),
    "mote_jax.data.vocabulary": ("VocabInfo", "WordPieceVocabulary"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name not in _MODULE_OF:
    raise AttributeError(f"module 'mote_jax.data' has no attribute {name!r}")
  return getattr(importlib.import_module(_MODULE_OF[name]), name)


def __dir__():
  return sorted(set(globals()) | set(__all__))
