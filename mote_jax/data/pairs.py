"""seqio preprocessors that turn documents into (anchor, context) token pairs.

Input examples are documents `{"doc_id": string [], "text": string []}` (plus `"queries": string [Q]` for query
pairs); output examples are pairs
  `{"doc_id": string [], "anchor_tokens": int32 [La], "context_tokens": int32 [Lc]}`,
each sequence `[CLS] ... [SEP]` of at most `max_len` ids, in document order. The vocabulary is the
`WordPieceVocabulary` of the task's `anchor_input_ids` feature. Tokenization and span grouping run in Python
(`tf.numpy_function`), one call per document, parallelised by tf.data with the order kept.
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

from mote_jax.data.spans import document_span_pairs, truncate
from mote_jax.data.vocabulary import WordPieceVocabulary, as_str

QueryDirection = Literal["passage_to_query", "query_to_passage"]


def task_vocabulary(output_features: Mapping[str, seqio.Feature]) -> WordPieceVocabulary:
  """The task's WordPiece vocabulary (that of its `anchor_input_ids` feature)."""
  vocab = output_features["anchor_input_ids"].vocabulary
  if not isinstance(vocab, WordPieceVocabulary):
    raise TypeError(f"output feature 'anchor_input_ids' needs a WordPieceVocabulary, got {type(vocab).__name__}")
  return vocab


def _flatten(pairs: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, ...]:
  """(anchor ids [sum La], anchor lengths [P], context ids [sum Lc], context lengths [P]), int32."""
  out = []
  for side in (0, 1):
    seqs = [p[side] for p in pairs]
    out.append(np.fromiter((t for s in seqs for t in s), np.int32, sum(len(s) for s in seqs)))
    out.append(np.fromiter((len(s) for s in seqs), np.int32, len(seqs)))
  return tuple(out)


def _unbatch_pairs(dataset: tf.data.Dataset, build: Callable[..., list], input_keys: tuple[str, ...]
                   ) -> tf.data.Dataset:
  """Maps each document to its pairs with `build(*numpy inputs)` and flattens them into the stream."""

  def numpy_build(*inputs):
    return _flatten(build(*inputs))

  def to_pairs(example):
    a_ids, a_len, c_ids, c_len = tf.numpy_function(
        numpy_build, [example[k] for k in input_keys], [tf.int32] * 4, stateful=False)
    a_ids, a_len, c_ids, c_len = (tf.ensure_shape(x, [None]) for x in (a_ids, a_len, c_ids, c_len))
    return {
        "doc_id": tf.fill(tf.shape(a_len), example["doc_id"]),
        "anchor_tokens": tf.RaggedTensor.from_row_lengths(a_ids, a_len),
        "context_tokens": tf.RaggedTensor.from_row_lengths(c_ids, c_len),
    }

  # Order is kept (deterministic map), so the stream is a function of the input order alone.
  return dataset.map(to_pairs, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def span_pairs(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature], *, max_len: int
               ) -> tf.data.Dataset:
  """Documents -> contextual span pairs (both directions of every adjacent pair), see `spans.py`."""
  vocab = task_vocabulary(output_features)
  info = vocab.info

  def build(text):
    return document_span_pairs(as_str(text), vocab.encode_batch, max_len, info.cls_id, info.sep_id,
                               info.continuation)

  return _unbatch_pairs(dataset, build, ("text",))


def query_pairs(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature], *, max_len: int,
                direction: QueryDirection) -> tf.data.Dataset:
  """Passages with pseudo-queries -> one pair per query: (passage, query) or (query, passage).

  Passage and queries are truncated to `max_len` at word boundaries ([CLS] and [SEP] included).
  """
  if direction not in ("passage_to_query", "query_to_passage"):
    raise ValueError(f"direction={direction!r}: expected 'passage_to_query' or 'query_to_passage'")
  vocab = task_vocabulary(output_features)
  info = vocab.info

  def wrap(ids):
    return [info.cls_id] + truncate(ids, max_len - 2, info.continuation) + [info.sep_id]

  def build(text, queries: np.ndarray):
    encoded = vocab.encode_batch([as_str(text)] + [as_str(q) for q in queries])
    passage, queries = wrap(encoded[0]), [wrap(q) for q in encoded[1:]]
    if direction == "passage_to_query":
      return [(passage, q) for q in queries]
    return [(q, passage) for q in queries]

  return _unbatch_pairs(dataset, build, ("text", "queries"))


def tfds_documents(dataset: tf.data.Dataset, *, text_key: str = "text", title_key: Optional[str] = None
                   ) -> tf.data.Dataset:
  """TFDS examples -> documents `{"doc_id", "text"}`, dropping blank ones.

  `doc_id` is a fingerprint of the text: TFDS examples carry no common id. Blank documents are dropped without a
  count (a count would need state in the graph); the file sources count theirs.
  """

  def check_keys(example):
    for key in (text_key, title_key):
      if key is not None and key not in example:
        raise KeyError(f"TFDS feature {key!r} not in the dataset's features {sorted(example)}")

  def not_blank(example):  # on the body alone: a title without text is no document
    check_keys(example)
    return tf.strings.length(tf.strings.strip(example[text_key])) > 0

  def select(example):
    text = example[text_key]
    if title_key is not None:
      title = tf.strings.strip(example[title_key])
      text = tf.where(tf.strings.length(title) > 0, tf.strings.join([title, text], "\n"), text)
    doc_id = tf.strings.as_string(tf.bitcast(tf.fingerprint([text])[0], tf.int64))
    return {"doc_id": doc_id, "text": text}

  return dataset.filter(not_blank).map(select, num_parallel_calls=tf.data.AUTOTUNE)
