"""Embedding stores on disk: a directory of shards `emb_NNNNN.npy` ([rows, H] float32) + `ids_NNNNN.json`.

    <dir>/manifest.json    what was encoded and how (expert, text count and ids hash, shard size, model, ...)
    <dir>/emb_00000.npy    embeddings of texts [0, shard_size)
    <dir>/ids_00000.json   their ids, in the same order
    ...

Shard k holds the texts [k * shard_size, (k + 1) * shard_size) of the input, in input order. Each file is written
atomically, embeddings first and ids last, so an ids file marks a complete shard: an interrupted encoding resumes
from the shards without one. The manifest makes a resumed (or reused) store refuse inputs it was not built from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np
from etils import epath

from mote_jax.retrieval import files

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class StoreMismatchError(ValueError):
  """An existing store was built from other inputs (or is incomplete); the message names the file and field."""


def ids_digest(ids: Sequence[str]) -> str:
  """Order-sensitive hash of a list of ids (ids may contain any character but NUL)."""
  h = hashlib.sha1()
  for i in ids:
    h.update(i.encode("utf-8"))
    h.update(b"\0")
  return h.hexdigest()


def emb_path(directory: epath.Path, shard: int) -> epath.Path:
  return directory / f"emb_{shard:05d}.npy"


def ids_path(directory: epath.Path, shard: int) -> epath.Path:
  return directory / f"ids_{shard:05d}.json"


def num_shards(num_texts: int, shard_size: int) -> int:
  return max(1, math.ceil(num_texts / shard_size))


def check_or_write_manifest(directory: str | os.PathLike, manifest: dict[str, Any], *, write: bool) -> None:
  """Compares `manifest` with the one in `directory` (if any), field by field; writes it if absent and `write`."""
  directory = epath.Path(directory)
  path = directory / MANIFEST
  if path.exists():
    found = json.loads(path.read_text())
    for key in sorted(set(found) | set(manifest)):
      if found.get(key) != manifest.get(key):
        raise StoreMismatchError(
            f"{path}: field {key!r} is {found.get(key)!r} but this encoding has {manifest.get(key)!r}; the "
            "directory holds embeddings of other inputs (use another output directory, or delete it)")
  elif write:
    files.write_json(path, manifest)


def shard_complete(directory: epath.Path, shard: int, expected_ids: Sequence[str]) -> bool:
  """Whether shard `shard` exists complete for `expected_ids`; a shard for other ids raises StoreMismatchError."""
  ids_file = ids_path(directory, shard)
  if not ids_file.exists():
    return False
  found = json.loads(ids_file.read_text())
  if found != list(expected_ids):
    raise StoreMismatchError(f"{ids_file}: holds {len(found)} ids that differ from the {len(expected_ids)} "
                             "expected for this shard")
  if not emb_path(directory, shard).exists():
    raise StoreMismatchError(f"{emb_path(directory, shard)}: missing although {ids_file} exists")
  return True


def write_shard(directory: epath.Path, shard: int, ids: Sequence[str], embeddings: np.ndarray) -> None:
  """Embeddings first, ids last: the ids file is the shard's completion mark."""
  if len(ids) != len(embeddings):
    raise ValueError(f"shard {shard}: {len(ids)} ids but {len(embeddings)} embeddings")
  files.write_npy(emb_path(directory, shard), embeddings.astype(np.float32, copy=False))
  files.write_json(ids_path(directory, shard), list(ids))


@dataclasses.dataclass(frozen=True)
class EmbeddingStore:
  """A complete store opened for reading: ids of all rows, and the shards as memory-mapped arrays."""

  directory: epath.Path
  manifest: dict[str, Any]
  shard_ids: tuple[tuple[str, ...], ...]

  @classmethod
  def open(cls, directory: str | os.PathLike) -> "EmbeddingStore":
    """Opens a store; raises StoreMismatchError naming the first missing or inconsistent shard."""
    directory = epath.Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
      raise FileNotFoundError(f"{manifest_path}: not found (not an embedding store, or never encoded)")
    manifest = json.loads(manifest_path.read_text())
    count = num_shards(manifest["num_texts"], manifest["shard_size"])
    shard_ids = []
    for shard in range(count):
      path = ids_path(directory, shard)
      if not path.exists():
        raise StoreMismatchError(f"{path}: missing; the encoding of {directory} is incomplete ({count} shards)")
      shard_ids.append(tuple(json.loads(path.read_text())))
      emb = files.load_npy(emb_path(directory, shard))
      if emb.shape != (len(shard_ids[-1]), manifest["dim"]):
        raise StoreMismatchError(f"{emb_path(directory, shard)}: shape {emb.shape}, expected "
                                 f"({len(shard_ids[-1])}, {manifest['dim']})")
    store = cls(directory, manifest, tuple(shard_ids))
    if len(store) != manifest["num_texts"] or ids_digest(store.ids) != manifest["ids_sha1"]:
      raise StoreMismatchError(f"{directory}: the shards' ids do not match {manifest_path}")
    return store

  def __len__(self) -> int:
    return sum(map(len, self.shard_ids))

  @property
  def dim(self) -> int:
    return int(self.manifest["dim"])

  @property
  def ids(self) -> list[str]:
    return [i for shard in self.shard_ids for i in shard]

  def shard(self, index: int) -> np.ndarray:
    """[rows, H] float32, memory-mapped (read whole from an object store, which cannot be mapped)."""
    return files.load_npy(emb_path(self.directory, index))

  def iter_shards(self) -> Iterator[tuple[int, tuple[str, ...], np.ndarray]]:
    """(row offset, ids, [rows, H] memory-mapped embeddings) per shard, in order."""
    offset = 0
    for index, ids in enumerate(self.shard_ids):
      yield offset, ids, self.shard(index)
      offset += len(ids)

  def load(self) -> np.ndarray:
    """All rows as one [N, H] float32 array in memory."""
    return np.concatenate([np.asarray(self.shard(i)) for i in range(len(self.shard_ids))])
