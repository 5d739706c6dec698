"""Registration of the CoT-MoTE pre-training tasks in seqio's TaskRegistry: the one place tasks are defined.

Every task is a `PairTask`: a homogeneous stream of masked (anchor, context) pairs whose text types (which pick
the MoTE expert) are fixed per task, never per example:

  span-pair tasks   (passage, passage)  contextual span pairs of documents (CoT-MAE), both directions
  query-pair tasks  (passage, query) and (query, passage)  from passages with pseudo-queries, one task each

A task's pipeline: source documents -> pair preprocessor (`pairs.py`) -> `masking.mask_pairs` ->
`PairFeatureConverter` (applied by `seqio.get_dataset`, see `batches.py`).

Registration is explicit and idempotent: nothing is registered at import time; registering a name again with an
equal spec returns the registered task, with a different spec raises (or replaces it with `overwrite=True`).
The only state is seqio's own TaskRegistry.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from mote_jax.data.feature_converter import TASK_FEATURE_NAMES
from mote_jax.data.masking import MaskingConfig, mask_pairs
from mote_jax.data.pairs import QueryDirection, query_pairs, span_pairs, tfds_documents
from mote_jax.data.readers import BEIR_CORPUS, JsonlFormat, TextFormat
from mote_jax.data.sources import DocumentSource, HeldOut, TfdsDocumentSource
from mote_jax.data.vocabulary import WordPieceVocabulary

# The text types of the encoder's experts (mote_jax.model.config.EXPERTS; not imported, so that the data
# pipeline does not import JAX).
TEXT_TYPES = ("query", "passage")
DEFAULT_SHUFFLE_BUFFER = 10_000
Paths = Sequence[str] | str | Mapping[str, Sequence[str] | str]


@dataclasses.dataclass(frozen=True)
class PairTaskSpec:
  """Everything that defines a pair task's stream; two registrations are the same task iff their specs are equal."""

  source: tuple  # what identifies the source's content, e.g. (class name, split -> paths, file format)
  pairing: str  # "span_pairs", "query_pairs:passage_to_query", ...
  anchor_type: str
  context_type: str
  max_len: int
  masking: MaskingConfig
  vocabulary: WordPieceVocabulary
  shuffle_buffer_size: int
  extra: tuple = ()  # further source-specific preprocessing arguments, as (name, value) pairs

  def __post_init__(self):
    for name in ("anchor_type", "context_type"):
      if getattr(self, name) not in TEXT_TYPES:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {TEXT_TYPES}")
    if not 3 <= self.max_len <= 512:
      raise ValueError(f"max_len={self.max_len}: expected 3 <= max_len <= 512 ([CLS] + >= 1 token + [SEP])")
    if self.shuffle_buffer_size < 1:
      raise ValueError(f"shuffle_buffer_size={self.shuffle_buffer_size}: expected >= 1")


class PairTask(seqio.Task):
  """A seqio Task of masked pairs with static text types; see the module docstring."""

  def __init__(self, name: str, *, spec: PairTaskSpec, source: seqio.DataSource,
               document_preprocessors: Sequence[Callable] = ()):
    if spec.pairing == "span_pairs":
      pairing = functools.partial(span_pairs, max_len=spec.max_len)
    elif spec.pairing.startswith("query_pairs:"):
      pairing = functools.partial(query_pairs, max_len=spec.max_len, direction=spec.pairing.split(":", 1)[1])
    else:
      raise ValueError(f"PairTaskSpec.pairing={spec.pairing!r}: expected 'span_pairs' or 'query_pairs:<direction>'")
    output_features = {k: seqio.Feature(spec.vocabulary, add_eos=False, required=True, dtype=tf.int32, rank=1)
                       for k in TASK_FEATURE_NAMES}
    super().__init__(
        name, source=source, output_features=output_features,
        preprocessors=[*document_preprocessors, pairing, functools.partial(mask_pairs, masking=spec.masking)],
        shuffle_buffer_size=spec.shuffle_buffer_size)
    self._spec = spec

  @property
  def spec(self) -> PairTaskSpec:
    return self._spec

  @property
  def anchor_type(self) -> str:
    return self._spec.anchor_type

  @property
  def context_type(self) -> str:
    return self._spec.context_type

  @property
  def max_len(self) -> int:
    return self._spec.max_len

  @property
  def vocabulary(self) -> WordPieceVocabulary:
    return self._spec.vocabulary

  @property
  def task_feature_lengths(self) -> dict[str, int]:
    """seqio `sequence_length` / `task_feature_lengths`: `max_len` for every task feature."""
    return {k: self._spec.max_len for k in TASK_FEATURE_NAMES}


def _register(name: str, spec: PairTaskSpec, source: seqio.DataSource, document_preprocessors: Sequence[Callable],
              overwrite: bool) -> PairTask:
  if name in seqio.TaskRegistry.names():
    existing = seqio.TaskRegistry.get(name)
    if isinstance(existing, PairTask) and existing.spec == spec:
      return existing
    if not overwrite:
      if isinstance(existing, PairTask):
        differ = [f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(existing.spec, f.name)]
        reason = f"with a different spec (differs in {differ})"
      else:
        reason = f"as a {type(existing).__name__}"
      raise ValueError(f"seqio task {name!r} is already registered {reason}; pass overwrite=True to replace it")
    seqio.TaskRegistry.remove(name)
  task = PairTask(name, spec=spec, source=source, document_preprocessors=document_preprocessors)
  seqio.TaskRegistry.add_provider(name, task)
  return task


def _vocabulary(vocab: WordPieceVocabulary | str | os.PathLike) -> WordPieceVocabulary:
  return vocab if isinstance(vocab, WordPieceVocabulary) else WordPieceVocabulary(vocab)


def _split_to_paths(paths: Paths) -> dict:
  if isinstance(paths, Mapping):
    return dict(paths)
  return {"train": paths}


def register_document_task(name: str, source: DocumentSource, *, vocab: WordPieceVocabulary | str | os.PathLike,
                           max_len: int = 128, masking: MaskingConfig = MaskingConfig(),
                           shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER, overwrite: bool = False) -> PairTask:
  """(passage, passage) span-pair task over any `DocumentSource`."""
  if source.with_queries:
    raise ValueError(f"task {name!r}: the source has queries; use register_query_pair_tasks")
  spec = PairTaskSpec(source.key, "span_pairs", "passage", "passage", max_len, masking, _vocabulary(vocab),
                      shuffle_buffer_size)
  return _register(name, spec, source, (), overwrite)


def register_text_file_task(name: str, paths: Paths, *, mode: str = "blocks", **kwargs) -> PairTask:
  """Span pairs of plain-text files: `mode='blocks'` (blank-line-separated documents) or `'lines'`.

  `paths`: a glob, a list of globs (split 'train'), or {split: globs}. `kwargs`: see `register_document_task`.
  """
  return register_document_task(name, DocumentSource(_split_to_paths(paths), TextFormat(mode)), **kwargs)


def register_jsonl_task(name: str, paths: Paths, *, text_key: str = "text", title_key: Optional[str] = "title",
                        id_key: Optional[str] = "_id", skip_malformed: bool = False, **kwargs) -> PairTask:
  """Span pairs of jsonl files (title, if present, then text); see `readers.JsonlFormat`."""
  file_format = JsonlFormat(text_key=text_key, title_key=title_key, id_key=id_key, skip_malformed=skip_malformed)
  return register_document_task(name, DocumentSource(_split_to_paths(paths), file_format), **kwargs)


def register_beir_corpus_task(name: str, corpus: str | os.PathLike, *, skip_malformed: bool = False,
                              held_out_fraction: float = 0.0, **kwargs) -> PairTask:
  """Span pairs of a BEIR corpus: `corpus` is `corpus.jsonl` or its dataset directory (title + text).

  `held_out_fraction > 0` moves that fraction of the documents (by a hash of their ids) from split 'train' to
  split 'validation', for held-out losses.
  """
  corpus = os.fspath(corpus)
  if os.path.isdir(corpus):
    corpus = os.path.join(corpus, "corpus.jsonl")
  file_format = dataclasses.replace(BEIR_CORPUS, skip_malformed=skip_malformed)
  held_out = HeldOut(held_out_fraction) if held_out_fraction else None
  return register_document_task(name, DocumentSource({"train": [corpus]}, file_format, held_out), **kwargs)


def register_tfds_task(name: str, tfds_name: str, *, vocab: WordPieceVocabulary | str | os.PathLike,
                       text_key: str = "text", title_key: Optional[str] = None, tfds_data_dir: Optional[str] = None,
                       splits: Optional[Sequence[str] | Mapping[str, str]] = ("train",), max_len: int = 128,
                       masking: MaskingConfig = MaskingConfig(), shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
                       overwrite: bool = False) -> PairTask:
  """Span pairs of a TFDS text dataset by versioned name (seqio requires the version).

  E.g. `register_tfds_task("cotmae.wiki", "wikipedia/20230601.en:1.0.0", vocab=..., title_key="title")`.

  Sharding across hosts is seqio's: by TFDS file when the split has at least `num_shards` files, else by example.
  Files are read in a fixed order (`sources.TfdsDocumentSource`); the task's buffer shuffles.
  """
  source = TfdsDocumentSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=splits)
  split_key = tuple(sorted(splits.items())) if isinstance(splits, Mapping) else tuple(splits or ())
  spec = PairTaskSpec(("TfdsDocumentSource", tfds_name, tfds_data_dir, split_key), "span_pairs", "passage",
                      "passage", max_len, masking, _vocabulary(vocab), shuffle_buffer_size,
                      extra=(("text_key", text_key), ("title_key", title_key)))
  documents = functools.partial(tfds_documents, text_key=text_key, title_key=title_key)
  return _register(name, spec, source, (documents,), overwrite)


QUERY_DIRECTIONS: dict[QueryDirection, tuple[str, str]] = {
    "passage_to_query": ("passage", "query"),
    "query_to_passage": ("query", "passage"),
}


def register_query_pair_tasks(name: str, paths: Paths, *, vocab: WordPieceVocabulary | str | os.PathLike,
                              text_key: str = "text", title_key: Optional[str] = "title",
                              id_key: Optional[str] = "_id", queries_key: str = "queries",
                              skip_malformed: bool = False, max_len: int = 128,
                              masking: MaskingConfig = MaskingConfig(),
                              shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
                              overwrite: bool = False) -> dict[tuple[str, str], PairTask]:
  """Query-as-context tasks from jsonl passages with pseudo-queries, one task per direction.

  Records: `{"_id": ..., "title": ..., "text": passage, "queries": [query, ...]}` (title and id optional).
  Registers `{name}.passage_to_query` (anchor passage, context query) and `{name}.query_to_passage` (anchor
  query, so the query expert is trained as an encoder too) and returns them keyed by (anchor_type, context_type).
  """
  vocabulary = _vocabulary(vocab)
  file_format = JsonlFormat(text_key=text_key, title_key=title_key, id_key=id_key, queries_key=queries_key,
                            skip_malformed=skip_malformed)
  source = DocumentSource(_split_to_paths(paths), file_format)
  tasks = {}
  for direction, types in QUERY_DIRECTIONS.items():
    spec = PairTaskSpec(source.key, f"query_pairs:{direction}", *types, max_len, masking, vocabulary,
                        shuffle_buffer_size)
    tasks[types] = _register(f"{name}.{direction}", spec, source, (), overwrite)
  return tasks
