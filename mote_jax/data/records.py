"""The pre-tokenised document record: the one format between offline preprocessing and the online pipeline.

Offline preprocessing (a Beam job) writes one record per document into sharded ArrayRecord files; the online
pipeline reads them by global index and samples spans, contexts and masks at training time. A record is a
serialised `tf.train.Example` with these features:

  doc_id            bytes [1]    the document's id in its source (docid, `_id`, `file:line`, ...)
  tokens            bytes [1]    word-piece ids of every sentence, concatenated, without special tokens, as
                                 little-endian int32 (4 T bytes)
  sentence_lengths  int64 [S]    ids per sentence, in order; each > 0 and they sum to T
  query_tokens      bytes [1]    word-piece ids of the document's pseudo-queries, concatenated, little-endian
                                 int32 (may be empty)
  query_lengths     int64 [Q]    ids per query; each > 0 and they sum to Tq (Q = 0 for plain documents)

A `tf.train.Example` because `tf.io.parse_example` decodes a whole batch of records in one C++ op (no Python per
record on the hot path) and ArrayRecord gives O(1) random access by index. The ids are raw int32 bytes rather
than an Int64List: decoding them is a copy (`tf.io.decode_raw`), where varint-decoding an Int64List costs
several times the rest of a record's parse. Shards are written with `WRITER_OPTIONS`: one record per chunk
(random access) compressed with snappy, which decompresses several times faster than ArrayRecord's default zstd
for a small size cost (word-piece ids compress little either way).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

FEATURES = ("doc_id", "tokens", "sentence_lengths", "query_tokens", "query_lengths")
SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1,snappy"  # ArrayRecordWriter options of every record shard
# stats.json's settings.record_format: 2 = ids as raw int32 bytes (1, unmarked: Int64List ids, no longer read)
RECORD_FORMAT = 2
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

  def packed(lists) -> tf.train.Feature:
    ids = np.asarray([t for x in lists for t in x], np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
      raise ValueError(f"record {doc_id!r}: token ids must be in [0, 2^31); got {ids.min()}..{ids.max()}")
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[ids.astype("<i4").tobytes()]))

  feature = {
      "doc_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[doc_id.encode("utf-8")])),
      "tokens": packed(sentences),
      "sentence_lengths": ints([len(s) for s in sentences]),
      "query_tokens": packed(queries),
      "query_lengths": ints([len(q) for q in queries]),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


_PACKED = ("tokens", "query_tokens")
_SPEC = {
    "doc_id": tf.io.FixedLenFeature([], tf.string),
    **{name: tf.io.FixedLenFeature([], tf.string, default_value=b"") if name in _PACKED
       else tf.io.RaggedFeature(tf.int64) for name in FEATURES[1:]},
}


def _unpack(packed: tf.Tensor) -> tf.RaggedTensor:
  """string [N] of little-endian int32 bytes -> int32 ragged [N, None] (one concatenation, one raw decode)."""
  values = tf.io.decode_raw(tf.strings.reduce_join(packed), tf.int32, little_endian=True)
  return tf.RaggedTensor.from_row_lengths(values, tf.cast(tf.strings.length(packed) // 4, tf.int64))


def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """Decodes records: `serialized` string [N] -> doc_id string [N] and int32 ragged [N, None] per other feature."""
  parsed = tf.io.parse_example(serialized, _SPEC)
  return {k: v if k == "doc_id" else _unpack(v) if k in _PACKED else tf.cast(v, tf.int32)
          for k, v in parsed.items()}


def parse_numpy(serialized: bytes) -> Mapping[str, np.ndarray | str]:
  """Decodes one record in Python (inspection and tests): doc_id str, the rest int64 [n] arrays."""
  example = tf.train.Example.FromString(serialized)
  feature = example.features.feature
  out: dict = {"doc_id": feature["doc_id"].bytes_list.value[0].decode("utf-8")}
  for name in FEATURES[1:]:
    if name in _PACKED:
      out[name] = np.frombuffer(feature[name].bytes_list.value[0], "<i4").astype(np.int64)
    else:
      out[name] = np.asarray(feature[name].int64_list.value, np.int64)
  return out
