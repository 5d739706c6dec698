"""seqio data sources of documents: files sharded per host by document, and TFDS datasets in a fixed order.

Output examples: `{"doc_id": tf.string [], "text": tf.string []}`, plus `"queries": tf.string [Q]` when the
format has a `queries_key`. Files are read in the sorted order of `expand_paths`, whatever the shuffle seed:
the k-th kept document (over all files of a split) goes to shard `k % num_shards`, so every host must see the same
order for the shards to be disjoint and to cover the split. Shuffling is left to the seqio Task's buffer.
Each host parses every line (not only its own documents), so all hosts raise the same `DataFormatError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Iterator, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from mote_jax.data.readers import Document, FileFormat, ReadStats, expand_paths

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """A held-out split carved from another by document: a document is held out when the hash of its id (or of
  its position, for documents without an id) falls below `fraction`. Stable across runs, hosts and file order."""

  fraction: float
  split: str = "validation"
  source_split: str = "train"

  def __post_init__(self):
    if not 0.0 < self.fraction < 1.0:
      raise ValueError(f"HeldOut.fraction={self.fraction}: expected a value in (0, 1)")

  def holds(self, doc: Document, position: int) -> bool:
    key = (doc.doc_id or f"#{position}").encode("utf-8")
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "big") < self.fraction * 2.0**64


class DocumentSource(seqio.DataSource):
  """Documents of text/jsonl files, one split per entry of `split_to_paths` (globs allowed), plus an optional
  held-out split carved from one of them (`held_out`), which that split then no longer contains."""

  def __init__(self, split_to_paths: Mapping[str, Sequence[str] | str], file_format: FileFormat,
               held_out: Optional[HeldOut] = None):
    self._split_to_patterns = {
        split: (patterns,) if isinstance(patterns, str) else tuple(str(p) for p in patterns)
        for split, patterns in split_to_paths.items()}
    self._format = file_format
    self._held_out = held_out
    splits = tuple(self._split_to_patterns)
    if held_out is not None:
      if held_out.source_split not in self._split_to_patterns or held_out.split in self._split_to_patterns:
        raise ValueError(f"{held_out}: needs an existing source split and a new split name (splits: {splits})")
      splits += (held_out.split,)
    super().__init__(splits=splits, caching_permitted=True)

  @property
  def file_format(self) -> FileFormat:
    return self._format

  @property
  def with_queries(self) -> bool:
    return bool(getattr(self._format, "queries_key", None))

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True  # round-robin over documents, any number of shards

  @property
  def key(self) -> tuple:
    """What identifies the source's content, for comparing task registrations."""
    return (type(self).__name__, tuple(sorted(self._split_to_patterns.items())), self._format, self._held_out)

  def list_shards(self, split: str) -> Sequence[str]:
    return expand_paths(self._patterns(split))

  def _patterns(self, split: str) -> tuple[str, ...]:
    if self._held_out is not None and split == self._held_out.split:
      split = self._held_out.source_split
    if split not in self._split_to_patterns:
      raise ValueError(f"split {split!r} not in this source's splits {self.splits}")
    return self._split_to_patterns[split]

  def _keeps(self, split: str, doc: Document, position: int) -> bool:
    held = self._held_out
    if held is None or split not in (held.split, held.source_split):
      return True
    return held.holds(doc, position) == (split == held.split)

  def documents(self, split: str = "train", shard_info: Optional[seqio.ShardInfo] = None,
                stats: Optional[ReadStats] = None) -> Iterator[Document]:
    """The split's documents of one shard, in file order, as Python objects; counts go to `stats`."""
    index, num_shards = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    if not 0 <= index < num_shards:
      raise ValueError(f"ShardInfo(index={index}, num_shards={num_shards}): index out of range")
    ordinal = position = 0
    for path in expand_paths(self._patterns(split)):
      for doc in self._format.read(path, stats):
        position += 1
        if not self._keeps(split, doc, position):
          continue
        if ordinal % num_shards == index:
          yield doc
        ordinal += 1

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None, use_cached=False,
                  num_epochs=1) -> tf.data.Dataset:
    del shuffle, seed, sequence_length, use_cached, num_epochs  # order is fixed, see the module docstring
    expand_paths(self._patterns(split))  # fail now, not at the first iteration, on a pattern without files
    with_queries = self.with_queries

    def generate():
      for doc in self.documents(split, shard_info):
        example = {"doc_id": doc.doc_id, "text": doc.text}
        if with_queries:
          example["queries"] = list(doc.queries)
        yield example

    signature = {"doc_id": tf.TensorSpec([], tf.string), "text": tf.TensorSpec([], tf.string)}
    if with_queries:
      signature["queries"] = tf.TensorSpec([None], tf.string)
    return tf.data.Dataset.from_generator(generate, output_signature=signature)

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self._split_to_patterns}, {self._format})"


class TfdsDocumentSource(seqio.TfdsDataSource):
  """A `seqio.TfdsDataSource` that reads its files in a fixed order, whatever the shuffle seed.

  Hosts get different seeds (`batches.host_seed`). When a split has fewer files than hosts, seqio reads the whole
  split on every host and keeps every n-th example; with seed-dependent file order the hosts' streams would overlap.
  A fixed order keeps them disjoint; shuffling is left to the Task's buffer (TFDS shuffles examples when it
  generates a dataset, so file order carries no topic order).
  """

  def get_dataset(self, split: Optional[str] = None, shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None, use_cached=False,
                  num_epochs=1) -> tf.data.Dataset:
    del shuffle, seed  # see the class docstring
    return super().get_dataset(split, shuffle=False, seed=None, shard_info=shard_info,
                               sequence_length=sequence_length, use_cached=use_cached, num_epochs=num_epochs)
