"""The online pre-training input: document records -> masked pairs, per host, with O(1) resume.

Stream of a run (batch size B rows, r rows per example: 2 with `both_directions`, P = B / r examples a step):

  step t -> global example indices i in [t P, (t + 1) P); host h of n takes the contiguous P / n of them
  i -> epoch e = i // N, position p = i % N (N records; with `anchors='all'` N record slots, see `locate`)
    -> record = index_shuffle(p; seed, e)      a stateless permutation of the records per epoch
  records of the host's examples -> one ArrayRecord batch read -> `records.parse` (one TF op)
    -> `sampling.PairSampler` (one numpy call a batch: spans, context, truncation, masks, all keyed by i)
    -> {anchor,context}_{input_ids,attention_mask,labels} int32 [B / n, L]

Nothing depends on earlier steps, so starting at step t builds the same graph as starting at 0 and reads only
step t's records: no skip, no replay. The stream is a function of (records, B, seed, n, sampling settings); the
checkpoint stores them (`data_state`) so a resume can check it continues the same stream.

seqio stays the task interface: `RecordsSource` is a `seqio.DataSource` over the shards and `RecordPairTask` a
`seqio.Task` whose preprocessors are TF ops (`parse_records`) and one batched `tf.numpy_function`
(`sample_pairs`), registered in seqio's TaskRegistry. seqio's `get_dataset` has no start offset (it shuffles
with a buffer and would replay to resume), so the training stream is built by `RecordPairTask.batches`: the
index arithmetic above, then the task's own preprocessors (`Task.preprocess_postcache`). Grain is not used:
tf.data with a stateless index shuffle and ArrayRecord's random access give the same O(1) resume.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Optional

import numpy as np
import seqio
import tensorflow as tf

from mote_jax.data import records
from mote_jax.data.batches import HostBatches
from mote_jax.data.feature_converter import MODEL_FEATURE_NAMES
from mote_jax.data.masking import MaskingConfig
from mote_jax.data.sampling import PairSampler, SpanSampling, full_target_span_counts
from mote_jax.data.vocabulary import WordPieceVocabulary

PAIRINGS = {"span_pairs": ("passage", "passage"), "passage_to_query": ("passage", "query"),
            "query_to_passage": ("query", "passage")}
_SHUFFLE_STREAM = 0x5EED  # the permutation's seed word, apart from the run seed and the epoch


def shard_paths(directory: str) -> list[str]:
  """The record shards `DIR/records-*-of-*.array_record`, sorted; raises if there are none."""
  paths = sorted(tf.io.gfile.glob(os.path.join(os.fspath(directory), f"records-*-of-*{records.SHARD_SUFFIX}")))
  if not paths:
    raise FileNotFoundError(f"no record shards records-*-of-*{records.SHARD_SUFFIX} in {directory}")
  return paths


class RecordsSource(seqio.DataSource):
  """A seqio DataSource over a directory of record shards, with O(1) random access by global record index.

  `get_dataset` yields `{"record": int64 [], "serialized": string []}` in file order (for inspection; seqio
  sharding by index); training reads by index through `read`.
  """

  def __init__(self, directory: str):
    self.directory = os.fspath(directory)
    self.paths = shard_paths(self.directory)
    self._readers, self._starts = None, None
    stats = os.path.join(self.directory, records.STATS_FILE)
    if tf.io.gfile.exists(stats):
      with tf.io.gfile.GFile(stats) as f:
        found = json.load(f).get("settings", {}).get("record_format", 1)
      if found != records.RECORD_FORMAT:
        raise ValueError(f"{stats}: records of format {found}, this version reads format {records.RECORD_FORMAT} "
                         "(token ids as raw int32 bytes); run the preprocessing job again into a new OUTPUT")
    super().__init__(splits=("train",), num_input_examples={"train": len(self)}, caching_permitted=False)

  @property
  def readers(self) -> list:
    """One `ArrayRecordReader` per shard (opened on first use, without read-ahead: reads are random)."""
    if self._readers is None:
      from array_record.python.array_record_module import ArrayRecordReader
      self._readers = [ArrayRecordReader(path, "readahead_buffer_size:0") for path in self.paths]
      self._starts = np.concatenate([[0], np.cumsum([r.num_records() for r in self._readers])]).astype(np.int64)
    return self._readers

  def __len__(self) -> int:
    self.readers  # noqa: B018 - opens them and counts the records
    return int(self._starts[-1])

  def __getstate__(self):  # the readers hold open files: reopened lazily after pickling
    return {**self.__dict__, "_readers": None, "_starts": None}

  def read(self, indices: np.ndarray) -> np.ndarray:
    """Serialised records at global indices `indices` (int [n]) -> object [n] of bytes: one batched read per
    shard (the reader's own parallel read), no thread pool or Python work per record."""
    readers, indices = self.readers, np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self._starts[-1]):
      raise IndexError(f"record indices outside [0, {self._starts[-1]}) of {self.directory}")
    shard = np.searchsorted(self._starts, indices, side="right") - 1
    out = np.empty(len(indices), dtype=object)
    for k in np.unique(shard):
      rows = np.flatnonzero(shard == k)
      out[rows] = readers[k].read((indices[rows] - self._starts[k]).tolist())
    return out

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> list[str]:
    return list(self.paths)

  def get_dataset(self, split: str = "train", shuffle: bool = False, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None, use_cached=False,
                  num_epochs: Optional[int] = 1) -> tf.data.Dataset:
    if split != "train":
      raise ValueError(f"RecordsSource({self.directory}): split {split!r} unknown; it has only 'train'")
    index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    ds = tf.data.Dataset.range(index, len(self), count)
    if shuffle:
      ds = ds.shuffle(10_000, seed=seed)
    read = lambda i: tf.reshape(tf.numpy_function(self.read, [tf.reshape(i, [1])], tf.string, stateful=False), [])
    return ds.map(lambda i: {"record": i, "serialized": read(i)}).repeat(num_epochs)

  def fingerprint(self) -> str:
    """What identifies the records: stats.json's `fingerprint` when the offline job wrote one, else a hash of
    the shards' names, sizes and record counts."""
    stats = os.path.join(self.directory, records.STATS_FILE)
    if tf.io.gfile.exists(stats):
      with tf.io.gfile.GFile(stats) as f:
        value = json.load(f).get("fingerprint")
      if value:
        return str(value)
    digest = hashlib.sha256()
    for path in self.paths:
      digest.update(f"{os.path.basename(path)}:{tf.io.gfile.stat(path).length};".encode())
    digest.update(f"records={len(self)}".encode())
    return digest.hexdigest()[:32]


def parse_records(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """seqio preprocessor: `{"index", "anchor_slot", "anchor_slots" [n], "seed" [], "serialized" [n]}` -> the
  same with the record features as values + row splits instead of `serialized`."""

  def parse(batch):
    parsed = records.parse(batch["serialized"])
    out = {k: batch[k] for k in ("index", "seed", "anchor_slot", "anchor_slots")}
    for name in records.FEATURES[1:]:
      out[name] = parsed[name].values
      out[f"{name}_splits"] = parsed[name].row_splits
    return out

  return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def sample_pairs(dataset: tf.data.Dataset, *, sampler: PairSampler) -> tf.data.Dataset:
  """seqio preprocessor: parsed records of examples `index` [n] of a run seeded `seed` -> masked pairs (one
  numpy call per batch)."""
  keys = [name for base in records.FEATURES[1:] for name in (base, f"{base}_splits")]
  keys += ["anchor_slot", "anchor_slots"]

  def run(index, seed, *arrays):
    parsed = dict(zip(keys, arrays))
    out = sampler(parsed, index, int(seed))
    return tuple(out[name] for name in MODEL_FEATURE_NAMES)

  def sample(batch):
    outputs = tf.numpy_function(run, [batch["index"], batch["seed"]] + [batch[k] for k in keys],
                                [tf.int32] * len(MODEL_FEATURE_NAMES), stateful=False)
    rows = tf.shape(batch["index"])[0] * sampler.rows_per_example
    return {name: tf.ensure_shape(tf.reshape(x, [rows, sampler.max_len]), [None, sampler.max_len])
            for name, x in zip(MODEL_FEATURE_NAMES, outputs)}

  return dataset.map(sample, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclasses.dataclass(frozen=True)
class RecordTaskSpec:
  """Everything that defines a record task's stream except the run's batch size, seed and host count."""

  directory: str
  pairing: str
  max_len: int
  masking: MaskingConfig
  sampling: SpanSampling
  both_directions: bool
  vocabulary: WordPieceVocabulary

  def __post_init__(self):
    if self.pairing not in PAIRINGS:
      raise ValueError(f"pairing={self.pairing!r}: expected one of {sorted(PAIRINGS)}")
    if not 3 <= self.max_len <= 512:
      raise ValueError(f"max_len={self.max_len}: expected 3 <= max_len <= 512 ([CLS] + >= 1 token + [SEP])")


class RecordPairTask(seqio.Task):
  """A seqio Task of masked pairs sampled online from document records (see the module docstring).

  Its stream for training is `batches(...)`: `seqio.get_dataset` (no start offset) is not the way to read it.
  """

  def __init__(self, name: str, *, spec: RecordTaskSpec):
    self._spec = spec
    self._sampler = PairSampler(max_len=spec.max_len, info=spec.vocabulary.info, masking=spec.masking,
                                sampling=spec.sampling, pairing=spec.pairing, both_directions=spec.both_directions)
    output_features = {k: seqio.Feature(spec.vocabulary, add_eos=False, required=True, dtype=tf.int32, rank=2)
                       for k in MODEL_FEATURE_NAMES}
    super().__init__(name, source=RecordsSource(spec.directory), output_features=output_features,
                     preprocessors=[parse_records, functools.partial(sample_pairs, sampler=self._sampler)],
                     shuffle_buffer_size=None)

  spec = property(lambda self: self._spec)
  sampler = property(lambda self: self._sampler)
  anchor_type = property(lambda self: PAIRINGS[self._spec.pairing][0])
  context_type = property(lambda self: PAIRINGS[self._spec.pairing][1])
  max_len = property(lambda self: self._spec.max_len)
  vocabulary = property(lambda self: self._spec.vocabulary)

  @property
  def rows_per_example(self) -> int:
    return self._sampler.rows_per_example

  def data_state(self) -> dict:
    """The task's part of the data state a checkpoint stores (JSON-able)."""
    s = self._spec
    return {"records": s.directory, "fingerprint": self.source.fingerprint(), "num_records": len(self.source),
            "examples_per_epoch": self.examples_per_epoch,
            "pairing": s.pairing, "max_len": s.max_len, "both_directions": s.both_directions,
            "masking": dataclasses.asdict(s.masking),
            "sampling": {**dataclasses.asdict(s.sampling), "context_types": list(s.sampling.context_types)}}

  def example_indices(self, step, *, batch_size: int, shard_index: int = 0, num_shards: int = 1):
    """int64 [B / (n r)]: the global example indices of host `shard_index`'s rows at `step` (TF or numpy)."""
    per_step = batch_size // self.rows_per_example
    local = per_step // num_shards
    start = tf.cast(step, tf.int64) * per_step + shard_index * local
    return tf.range(start, start + local, dtype=tf.int64)

  @functools.cached_property
  def _slot_offsets(self) -> np.ndarray:
    """int64 [N + 1] (`anchors='all'`): first example slot of each record in an epoch; one pass over the records
    when the task is first used, the same at any start step."""
    counts = []
    for start in range(0, len(self.source), 4096):
      serialized = self.source.read(np.arange(start, min(start + 4096, len(self.source))))
      lengths = records.parse(tf.constant(list(serialized)))["sentence_lengths"]
      dense, num = lengths.to_tensor().numpy().astype(np.int64), lengths.row_lengths().numpy()
      counts.append(full_target_span_counts(dense, num, self._spec.max_len))
    return np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)

  @property
  def examples_per_epoch(self) -> int:
    """N records, or with `anchors='all'` the sum of the records' full-target span counts."""
    return int(self._slot_offsets[-1]) if self._all_anchors else len(self.source)

  @property
  def _all_anchors(self) -> bool:
    return self._spec.pairing == "span_pairs" and self._spec.sampling.anchors == "all"

  def locate(self, indices: tf.Tensor, seed: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Global example indices int64 [n] -> (record, anchor slot, anchor slots of the record), int64 [n] each:
    a stateless permutation of the epoch's examples (records, or record slots with `anchors='all'`)."""
    per_epoch = tf.constant(self.examples_per_epoch, tf.int64)
    epoch, position = indices // per_epoch, indices % per_epoch
    seeds = tf.stack([tf.fill(tf.shape(indices), tf.constant(seed, tf.int64)),
                      tf.fill(tf.shape(indices), tf.constant(_SHUFFLE_STREAM, tf.int64)), epoch], axis=1)
    shuffled = tf.raw_ops.RandomIndexShuffle(index=position, seed=seeds,
                                             max_index=tf.fill(tf.shape(indices), per_epoch - 1))
    if not self._all_anchors:
      return shuffled, tf.zeros_like(shuffled), tf.ones_like(shuffled)
    offsets = tf.constant(self._slot_offsets)
    record = tf.searchsorted(offsets, shuffled, side="right", out_type=tf.int64) - 1
    start = tf.gather(offsets, record)
    return record, shuffled - start, tf.gather(offsets, record + 1) - start

  def record_indices(self, indices: tf.Tensor, seed: int) -> tf.Tensor:
    """Global example indices int64 [n] -> record indices int64 [n] (see `locate`)."""
    return self.locate(indices, seed)[0]

  def batches(self, *, batch_size: int, seed: int, start_step: int = 0, shard_index: int = 0,
              num_shards: int = 1) -> tf.data.Dataset:
    """Host `shard_index`'s batches from `start_step` on (infinite): dicts of int32 [B / n, L]."""
    check_layout(batch_size, num_shards, self.rows_per_example)
    read = lambda ids: tf.numpy_function(self.source.read, [ids], tf.string, stateful=False)

    def examples(step):
      index = self.example_indices(step, batch_size=batch_size, shard_index=shard_index, num_shards=num_shards)
      record, slot, slots = self.locate(index, seed)
      serialized = tf.ensure_shape(read(record), [None])
      return {"index": index, "seed": tf.constant(seed, tf.int64), "serialized": serialized,
              "anchor_slot": slot, "anchor_slots": slots}

    ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max).map(examples)
    return self.preprocess_postcache(ds, sequence_length=None, seed=seed).prefetch(2)

  def batch_at(self, step: int, *, batch_size: int, seed: int, shard_index: int = 0, num_shards: int = 1
               ) -> dict[str, np.ndarray]:
    """One host batch computed directly from its indices (no dataset): what `batches` yields at `step`."""
    check_layout(batch_size, num_shards, self.rows_per_example)
    index = self.example_indices(step, batch_size=batch_size, shard_index=shard_index,
                                 num_shards=num_shards).numpy()
    return self.pairs_of(index, seed)

  def pairs_of(self, indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The masked rows of examples `indices` (int64 [n]), in Python (tests, inspection)."""
    record, slot, slots = self.locate(tf.constant(indices, tf.int64), seed)
    serialized = self.source.read(record.numpy())
    parsed = records.parse(tf.constant(list(serialized)))
    flat = {"anchor_slot": slot.numpy(), "anchor_slots": slots.numpy()}
    for name in records.FEATURES[1:]:
      flat[name] = parsed[name].values.numpy()
      flat[f"{name}_splits"] = parsed[name].row_splits.numpy()
    return self._sampler(flat, np.asarray(indices, np.int64), seed)


def check_layout(batch_size: int, num_shards: int, rows_per_example: int) -> None:
  if num_shards < 1 or batch_size < 1 or batch_size % (num_shards * rows_per_example):
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of num_shards={num_shards} x "
                     f"{rows_per_example} rows per example (both_directions gives 2)")


def register_records_task(name: str, directory: str, *, vocab: WordPieceVocabulary | str | os.PathLike,
                          pairing: str = "span_pairs", max_len: int = 128,
                          masking: MaskingConfig = MaskingConfig(), sampling: SpanSampling = SpanSampling(),
                          both_directions: bool = True, overwrite: bool = False) -> RecordPairTask:
  """Registers (idempotently) a task sampling `pairing` pairs from the records in `directory`."""
  vocabulary = vocab if isinstance(vocab, WordPieceVocabulary) else WordPieceVocabulary(vocab)
  spec = RecordTaskSpec(os.fspath(directory), pairing, max_len, masking, sampling,
                        both_directions and pairing == "span_pairs", vocabulary)
  if name in seqio.TaskRegistry.names():
    existing = seqio.TaskRegistry.get(name)
    if isinstance(existing, RecordPairTask) and existing.spec == spec:
      return existing
    if not overwrite:
      raise ValueError(f"seqio task {name!r} is already registered with another definition; pass overwrite=True")
    seqio.TaskRegistry.remove(name)
  task = RecordPairTask(name, spec=spec)
  seqio.TaskRegistry.add_provider(name, task)
  return task


class RecordBatches(HostBatches):
  """One host's batches of a record task from `start_step`, like `batches.PairBatches` (`step` is the next)."""

  def __init__(self, task: RecordPairTask, *, batch_size: int, seed: int, start_step: int = 0,
               shard_index: int = 0, num_shards: int = 1):
    self.task = task
    self.anchor_type, self.context_type = task.anchor_type, task.context_type
    self._start(task.batches(batch_size=batch_size, seed=seed, start_step=start_step, shard_index=shard_index,
                             num_shards=num_shards), start_step)
