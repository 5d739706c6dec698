"""Atomic file writes: every output is written to a temporary file in its directory, then renamed into place.

A crash (or `kill -9`) leaves either the previous file or no file, never a truncated one; readers that see a
file can trust it is complete. Temporary names start with '.' and end with '.tmp', so listings can skip them.
Object stores (`gs://...`, through `etils.epath` / `tf.io.gfile`) have no rename, but an object appears only when
its upload completes: there an output is written as one object write, with the same guarantee.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import numpy as np
from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
  """Whether `path` names an object store or other non-local file system (`gs://`, `s3://`, ...)."""
  return "://" in os.fspath(path)


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> epath.Path:
  if is_uri(path):
    path = epath.Path(path)
    buffer = io.BytesIO()
    write(buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())  # one object write: the object exists complete or not at all
    return path
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())  # the rename must not become visible before the bytes are on disk
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return epath.Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> epath.Path:
  return _atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> epath.Path:
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> epath.Path:
  return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> epath.Path:
  buffer = io.BytesIO()
  np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
  return write_bytes(path, buffer.getvalue())


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
  """Deletes temporaries a crashed writer left in `directory`; returns how many (none on object stores, which
  are written without temporaries)."""
  if is_uri(directory):
    return 0
  removed = 0
  for tmp in Path(directory).glob(".*.tmp"):
    tmp.unlink(missing_ok=True)
    removed += 1
  return removed


def load_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
  """A .npy array: memory-mapped when local and `mmap`, else read whole (object stores cannot be mapped)."""
  if not is_uri(path):
    return np.load(os.fspath(path), mmap_mode="r" if mmap else None, allow_pickle=False)
  return np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False)
