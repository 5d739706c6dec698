"""The pre-tokenised document record: the one format between offline preprocessing and the online pipeline.

Offline preprocessing (a Beam job) writes one record per document into sharded ArrayRecord files; the online
pipeline reads them by global index and samples spans, contexts and masks at training time. A record is a
serialised `tf.train.Example` with these features:

  doc_id            bytes [1]    the document's id in its source (docid, `_id`, `file:line`, ...)
  tokens            int64 [T]    word-piece ids of every sentence, concatenated, without special tokens
  sentence_lengths  int64 [S]    ids per sentence, in order; each > 0 and they sum to T
  query_tokens      int64 [Tq]   word-piece ids of the document's pseudo-queries, concatenated (may be empty)
  query_lengths     int64 [Q]    ids per query; each > 0 and they sum to Tq (Q = 0 for plain documents)

A `tf.train.Example` because `tf.io.parse_example` decodes a whole batch of records in one C++ op (no Python per
record on the hot path) and ArrayRecord gives O(1) random access by index. Ids are stored as int64 (the Example
proto's integer type; varint-encoded on disk, so a 30k-entry vocabulary costs 2-3 bytes an id).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

FEATURES = ("doc_id", "tokens", "sentence_lengths", "query_tokens", "query_lengths")
SHARD_SUFFIX = ".array_record"
STATS_FILE = "stats.json"


def serialize(doc_id: str, sentences: Sequence[Sequence[int]], queries: Sequence[Sequence[int]] = ()) -> bytes:
  """One record: `sentences` and `queries` are token-id lists (empty ones are dropped).

  Serialised deterministically (features in key order), so the same document gives the same bytes in every
  process: a protobuf map is otherwise written in hash order, which PYTHONHASHSEED changes.
  """
  sentences = [list(s) for s in sentences if len(s)]
  queries = [list(q) for q in queries if len(q)]

  def ints(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

  feature = {
      "doc_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[doc_id.encode("utf-8")])),
      "tokens": ints([t for s in sentences for t in s]),
      "sentence_lengths": ints([len(s) for s in sentences]),
      "query_tokens": ints([t for q in queries for t in q]),
      "query_lengths": ints([len(q) for q in queries]),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


_SPEC = {
    "doc_id": tf.io.FixedLenFeature([], tf.string),
    **{name: tf.io.RaggedFeature(tf.int64) for name in FEATURES[1:]},
}


def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """Decodes records: `serialized` string [N] -> doc_id string [N] and int32 ragged [N, None] per other feature."""
  parsed = tf.io.parse_example(serialized, _SPEC)
  return {k: v if k == "doc_id" else tf.cast(v, tf.int32) for k, v in parsed.items()}


def parse_numpy(serialized: bytes) -> Mapping[str, np.ndarray | str]:
  """Decodes one record in Python (inspection and tests): doc_id str, the rest int64 [n] arrays."""
  example = tf.train.Example.FromString(serialized)
  feature = example.features.feature
  out: dict = {"doc_id": feature["doc_id"].bytes_list.value[0].decode("utf-8")}
  for name in FEATURES[1:]:
    out[name] = np.asarray(feature[name].int64_list.value, np.int64)
  return out
