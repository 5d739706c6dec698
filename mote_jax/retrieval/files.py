"""Atomic file writes: every output is written to a temporary file in its directory, then renamed into place.

A crash (or `kill -9`) leaves either the previous file or no file, never a truncated one; readers that see a
file can trust it is complete. Temporary names start with '.' and end with '.tmp', so listings can skip them.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import numpy as np


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
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
  return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  return _atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
  return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
  buffer = io.BytesIO()
  np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
  return write_bytes(path, buffer.getvalue())


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
  """Deletes temporaries a crashed writer left in `directory`; returns how many."""
  removed = 0
  for tmp in Path(directory).glob(".*.tmp"):
    tmp.unlink(missing_ok=True)
    removed += 1
  return removed
