"""Encoding texts with a MoTE expert: tokenised, length-bucketed fixed-shape global batches, sharded on the mesh.

`Embedder` places the encoder on a `Partitioner`'s mesh and runs one jitted call per global batch. `encode_texts`
encodes this process's texts in memory; `encode_to_store` writes an embedding store (see `store.py`) shard by
shard, resumably, with the shards split round-robin over processes.

Multi-process runs: each jitted call is a collective over the global mesh, so every process must make the same
calls with the same shapes. Texts are sorted by length and batched per length bucket; before running, the
processes agree (an all-gather of per-bucket batch counts, the max wins) on how many batches of each shape to
run, and a process with fewer texts fills its rows with padding. Padded rows are masked out of the result.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from mote_jax.model import EXPERTS, MoteConfig, MoteEncoder, init_params
from mote_jax.partitioning import MeshConfig, Partitioner
from mote_jax.retrieval import files, store

log = logging.getLogger(__name__)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
  """How texts are batched and stored.

  batch_size: global rows per jitted call, a multiple of the data-parallel size and of the process count.
  max_length: tokens per text after truncation ([CLS] and [SEP] included); 256 is all-MiniLM-L6-v2's
    sentence-transformers `max_seq_length`.
  length_step: padded lengths are multiples of this (capped at max_length): at most max_length / length_step
    compiled shapes, and at most length_step - 1 padding tokens per text.
  shard_size: texts per stored shard, the unit of resumption.
  progress: show a tqdm progress bar.
  """

  batch_size: int = 64
  max_length: int = 256
  length_step: int = 32
  shard_size: int = 8192
  progress: bool = True

  def __post_init__(self):
    for name in ("batch_size", "max_length", "length_step", "shard_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"EncodeOptions.{name}={getattr(self, name)}: expected a positive integer")

  def buckets(self) -> np.ndarray:
    """Padded lengths, ascending: multiples of length_step below max_length, then max_length."""
    steps = np.arange(self.length_step, self.max_length, self.length_step)
    return np.append(steps, self.max_length)


def _local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global order (replicas deduplicated)."""
  pieces = {}
  for shard in array.addressable_shards:
    pieces.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(pieces[start]) for start in sorted(pieces)])


def _max_over_processes(counts: np.ndarray) -> np.ndarray:
  """Elementwise max of an int vector over processes (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(counts)).max(axis=0)


def params_fingerprint(params: PyTree) -> str:
  """A hash of every parameter's path, dtype, shape and bytes: it tells apart any two different models.

  Arrays not fully addressable by this process are all-gathered first (a collective in multi-process runs).
  """
  h = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      from jax.experimental import multihost_utils
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    value = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
    h.update(value.tobytes())
  return h.hexdigest()[:20]


@functools.lru_cache(maxsize=8)
def _embed_function(partitioner: Partitioner, config: MoteConfig, expert: str) -> Callable:
  """The jitted `(params, batch) -> [B, H] embeddings` of one expert, shared by every `Embedder` of the same
  mesh and model config: a run that evaluates a dev split every N steps (a new Embedder each time, new params)
  compiles each (expert, length) shape once, not once per evaluation. A few recent ones are kept."""

  def embed(params, batch):
    return MoteEncoder(config).apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                     expert=expert, method=MoteEncoder.embed)

  return partitioner.jit(embed, out_shardings=partitioner.batch_sharding(2))


class Embedder:
  """A MoTE encoder on a mesh: int [rows, L] local batches -> float32 [rows, H] pooled embeddings.

  `params` may be host (numpy) arrays, identical on every process, or jax.Arrays; either way they end up with
  the partitioner's parameter shardings. Each (expert, L) pair compiles once per mesh and config, whatever the
  params (see `_embed_function`).
  """

  def __init__(self, config: MoteConfig, params: PyTree, partitioner: Partitioner | None = None):
    self.config = config
    self.partitioner = partitioner or Partitioner.create(MeshConfig())
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    shardings = self.partitioner.param_shardings(abstract)
    if all(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
      self.params = jax.device_put(params, shardings)  # a no-op for params already placed this way
    else:
      self.params = self.partitioner.shard(params, shardings)
    self._uncached: dict[str, Callable] = {}

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  def _function(self, expert: str) -> Callable:
    if expert not in EXPERTS:
      raise ValueError(f"expert={expert!r}: expected one of {EXPERTS}")
    try:
      return _embed_function(self.partitioner, self.config, expert)
    except TypeError:  # a config with an unhashable field: compiled for this Embedder only
      if expert not in self._uncached:
        self._uncached[expert] = _embed_function.__wrapped__(self.partitioner, self.config, expert)
      return self._uncached[expert]

  def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, expert: str) -> np.ndarray:
    """This process's rows (the same count on every process) -> their embeddings [rows, H] float32."""
    batch = self.partitioner.global_batch({"input_ids": input_ids, "attention_mask": attention_mask})
    return _local_rows(self._function(expert)(self.params, batch))


def _local_batch_rows(embedder: Embedder, options: EncodeOptions) -> int:
  processes, data_parallel = jax.process_count(), embedder.partitioner.data_parallel_size
  if options.batch_size % data_parallel or options.batch_size % processes:
    raise ValueError(f"EncodeOptions.batch_size={options.batch_size} must be a multiple of the data-parallel "
                     f"size {data_parallel} and of the process count {processes}")
  return options.batch_size // processes


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
  """Token ids per text ([CLS] ... [SEP], truncated to max_length), unpadded."""
  if not getattr(tokenizer, "is_fast", False):
    log.warning("tokenizer %s is not a fast (Rust) tokenizer: tokenisation will be slow",
                type(tokenizer).__name__)
  return tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                   return_attention_mask=False, return_token_type_ids=False)["input_ids"]


def encode_texts(embedder: Embedder, tokenizer, texts: Sequence[str], expert: str,
                 options: EncodeOptions = EncodeOptions(),
                 on_batch: Callable[[int], None] | None = None) -> np.ndarray:
  """This process's `texts` -> embeddings [len(texts), H] float32, in input order.

  Texts run longest first in consecutive batches of `batch_size`, each padded to the bucket (a multiple of
  `length_step`) of its longest text: only the very last batch has empty rows, and there are at most
  max_length / length_step compiled shapes. A collective in multi-process runs: every process calls it (with its
  own texts, possibly none) and the processes agree on each call's padded length. `on_batch(n)` is told the
  number of real texts of each batch (for progress bars).
  """
  rows = _local_batch_rows(embedder, options)
  buckets = options.buckets()
  tokens = tokenize(tokenizer, texts, options.max_length) if len(texts) else []
  lengths = np.array([len(t) for t in tokens], dtype=np.int64)
  if len(lengths) and lengths.max() > options.max_length:
    raise ValueError(f"tokenizer returned {lengths.max()} tokens with max_length={options.max_length}")
  order = np.argsort(-lengths, kind="stable")  # longest first: memory trouble shows up in the first batch
  chunks = [order[start:start + rows] for start in range(0, len(order), rows)]
  num_batches = int(_max_over_processes(np.array([len(chunks)], dtype=np.int64))[0])
  padded = np.zeros(num_batches, np.int64)  # 0: this process has no batch there
  for j, chunk in enumerate(chunks):
    padded[j] = buckets[np.searchsorted(buckets, lengths[chunk[0]])]
  padded = _max_over_processes(padded)

  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else embedder.config.pad_token_id
  out = np.zeros((len(texts), embedder.dim), np.float32)
  for j in range(num_batches):
    length = int(padded[j])
    chunk = chunks[j] if j < len(chunks) else order[:0]  # empty when other processes have more batches
    input_ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    mask[:, 0] = 1  # padding rows attend to one token, so no row is fully masked
    for r, i in enumerate(chunk):
      input_ids[r, :lengths[i]] = tokens[i]
      mask[r, :lengths[i]] = 1
    embeddings = embedder(input_ids, mask, expert)
    out[chunk] = embeddings[:len(chunk)]
    if on_batch is not None and len(chunk):
      on_batch(len(chunk))
  return out


@dataclasses.dataclass(frozen=True)
class EncodeStats:
  """What `encode_to_store` did on this process (seconds and rates exclude skipped shards)."""

  directory: epath.Path
  num_texts: int
  num_shards: int
  shards_encoded: int
  shards_skipped: int
  texts_encoded: int
  seconds: float

  @property
  def texts_per_second(self) -> float:
    return self.texts_encoded / self.seconds if self.seconds > 0 else float("nan")


def encode_to_store(embedder: Embedder, tokenizer, texts: Sequence[str], ids: Sequence[str], expert: str,
                    directory: str | os.PathLike, options: EncodeOptions = EncodeOptions(), *,
                    model: str | None = None) -> EncodeStats:
  """Encodes `texts` (the same full list on every process) into an embedding store under `directory`.

  Shard k (texts [k * shard_size, (k + 1) * shard_size)) is encoded by process k % process_count, and written
  atomically; shards already complete are skipped, so an interrupted encoding resumes where it stopped. `model`
  (e.g. `params_fingerprint(params)`) is recorded in the manifest: a store of another model, expert, text list
  or max_length raises StoreMismatchError instead of being reused. In multi-process runs `directory` must be
  on a file system every process sees; the call ends with a barrier, after which the store is complete.
  """
  if len(texts) != len(ids):
    raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
  if len(set(ids)) != len(ids):
    raise ValueError(f"{len(ids) - len(set(ids))} duplicate ids among the texts to encode")
  directory = epath.Path(directory)  # local or gs://...
  directory.mkdir(parents=True, exist_ok=True)
  process, processes = jax.process_index(), jax.process_count()
  if processes == 1:
    files.remove_stale_temporaries(directory)  # with several writers, another's temporary may be in flight
  config = embedder.config
  manifest = {
      "format": store.FORMAT_VERSION, "expert": expert, "num_texts": len(texts), "dim": embedder.dim,
      "ids_sha1": store.ids_digest(ids), "shard_size": options.shard_size, "max_length": options.max_length,
      "model": model, "tower_mode": config.tower_mode, "pooling": config.pooling,
      "normalize": config.normalize, "dtype": config.dtype,
  }
  store.check_or_write_manifest(directory, manifest, write=process == 0)

  total_shards = store.num_shards(len(texts), options.shard_size)
  mine = list(range(process, total_shards, processes))
  todo = [s for s in mine if not store.shard_complete(directory, s, ids[_span(s, options, len(texts))])]
  skipped = len(mine) - len(todo)
  if skipped:
    log.info("%s: %d of %d shards of this process already complete, skipping them", directory, skipped, len(mine))

  todo_texts = sum(_span(s, options, len(texts)).stop - s * options.shard_size for s in todo)
  bar = tqdm(total=todo_texts, unit="text", desc=f"encode {expert} {directory.name}", mininterval=2.0,
             disable=not options.progress)
  start, encoded = time.perf_counter(), 0
  try:
    for round_start in range(0, total_shards, processes):
      shard = round_start + process
      work = shard < total_shards and shard in todo
      span = _span(shard, options, len(texts)) if work else slice(0, 0)
      shard_start = time.perf_counter()
      embeddings = encode_texts(embedder, tokenizer, texts[span], expert, options, on_batch=bar.update)
      if work:
        store.write_shard(directory, shard, ids[span], embeddings)
        encoded += len(embeddings)
        seconds = time.perf_counter() - shard_start
        log.info("%s: shard %d/%d, %d texts in %.1fs (%.1f texts/s)", directory, shard + 1, total_shards,
                 len(embeddings), seconds, len(embeddings) / max(seconds, 1e-9))
  finally:
    bar.close()
  seconds = time.perf_counter() - start
  if processes > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"encode_to_store {directory}")
  stats = EncodeStats(directory, len(texts), total_shards, len(todo), skipped, encoded, seconds)
  if encoded:
    log.info("%s: encoded %d texts with the %s expert in %.1fs (%.1f texts/s)", directory, encoded, expert,
             seconds, stats.texts_per_second)
  return stats


def _span(shard: int, options: EncodeOptions, num_texts: int) -> slice:
  return slice(shard * options.shard_size, min((shard + 1) * options.shard_size, num_texts))
