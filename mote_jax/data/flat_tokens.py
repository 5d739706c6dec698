"""Texts tokenised once into flat arrays, cached on disk and memory-mapped by every host.

Layout of one cached entry, `<cache_dir>/tokens/<name>-<fingerprint>/`:
  ids.npy      int32 [T]      the token ids of every text, concatenated (each truncated to `max_length`, with the
                              tokenizer's special tokens)
  offsets.npy  int64 [N + 1]  text i is ids[offsets[i]:offsets[i + 1]]
  meta.json    what was tokenised (name, count, tokenizer, max_length); written last: the entry's completion mark
The fingerprint hashes the texts (ids and bodies, in order), the tokenizer (class, name, vocabulary and, for a fast
tokenizer, its whole serialised pipeline) and `max_length`, so a changed corpus, tokenizer or length never reads a
stale entry.

`cached_artefact` is how every cache entry of the fine-tuning data is built once and shared (token arrays here,
BM25 runs and indices in `mote_jax.data.bm25`): process 0 builds it into a temporary directory and renames it into
place (a local or shared directory), or uploads it file by file with the completion mark last (gs://); the other
processes wait at a barrier and read it. On gs://, every host first copies the entry into a local directory
(`local_cache_dir`, default `$TMPDIR/mote_jax_cache`) and memory-maps the copy: NumPy cannot memory-map an object.
A local cache directory that is not shared between hosts still works: a host that does not see process 0's entry
after the barrier builds its own (the same arrays; the work is repeated).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from etils import epath

log = logging.getLogger(__name__)

DONE = "meta.json"


def is_uri(path) -> bool:
  return "://" in os.fspath(path)


def default_local_cache_dir() -> Path:
  return Path(os.environ.get("MOTE_JAX_LOCAL_CACHE", Path(tempfile.gettempdir()) / "mote_jax_cache"))


def _barrier(name: str) -> None:
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _build_into(directory: Path, build: Callable[[Path], dict]) -> None:
  """`build(tmp)` fills a temporary sibling of `directory` and returns the meta; written last, then renamed."""
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  try:
    meta = build(tmp)
    (tmp / DONE).write_text(json.dumps(meta, indent=1) + "\n")
    try:
      os.replace(tmp, directory)
    except OSError:  # another process (non-shared ranks on one machine) finished first: theirs is the same
      if not (directory / DONE).exists():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def cached_artefact(entry: epath.Path | str, build: Callable[[Path], dict], *,
                    local_cache_dir: str | os.PathLike | None = None) -> Path:
  """The local directory holding cache entry `entry`, built once by `build(tmp_dir) -> meta` (see the module
  docstring). Every process must call it (a barrier when there are several)."""
  import jax
  entry = epath.Path(entry)
  remote = is_uri(entry)
  local = (Path(local_cache_dir or default_local_cache_dir()) / hashlib.sha256(os.fspath(entry).encode())
           .hexdigest()[:16] / entry.name) if remote else Path(os.fspath(entry))
  present = (local / DONE).exists() or (remote and (entry / DONE).exists())
  if not present and jax.process_index() == 0:
    log.info("building cache entry %s", entry)
    _build_into(local, build)
    if remote:
      _upload(local, entry)
  _barrier(f"cache entry {entry}")
  if (local / DONE).exists():
    return local
  if remote and (entry / DONE).exists():
    _download(entry, local)
    return local
  log.info("cache entry %s is not visible to process %d (a cache directory not shared by the hosts): building "
           "it here", entry, jax.process_index())
  _build_into(local, build)
  return local


def _upload(local: Path, entry: epath.Path) -> None:
  """Copies a finished entry to an object store, its completion mark last."""
  entry.mkdir(parents=True, exist_ok=True)
  for file in sorted(local.iterdir(), key=lambda f: f.name == DONE):
    with open(file, "rb") as src, (entry / file.name).open("wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)


def _download(entry: epath.Path, local: Path) -> None:
  def build(tmp: Path) -> dict:
    for file in entry.iterdir():
      if file.name != DONE:
        with file.open("rb") as src, open(tmp / file.name, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 24)
    return json.loads((entry / DONE).read_text())
  _build_into(local, build)


@dataclasses.dataclass(frozen=True)
class FlatTokens:
  """N token sequences in two arrays (memory-mapped when read from the cache): ids int32 [T], offsets int64
  [N + 1]."""

  ids: np.ndarray
  offsets: np.ndarray

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    return self.ids[self.offsets[i]:self.offsets[i + 1]]

  def padded(self, rows: np.ndarray, length: int, pad_id: int) -> np.ndarray:
    """int32 [*rows.shape, length]: the sequences of `rows`, cut at `length`, right-padded with `pad_id`."""
    flat = np.asarray(rows, np.int64).reshape(-1)
    starts = self.offsets[flat]
    lengths = np.minimum(self.offsets[flat + 1] - starts, length)
    positions = np.arange(length)
    inside = positions[None, :] < lengths[:, None]
    gather = np.where(inside, starts[:, None] + positions[None, :], 0)
    out = np.where(inside, self.ids[gather] if len(self.ids) else 0, pad_id).astype(np.int32)
    return out.reshape(*np.shape(rows), length)

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "FlatTokens":
    directory = Path(directory)
    return cls(np.load(directory / "ids.npy", mmap_mode="r"), np.load(directory / "offsets.npy", mmap_mode="r"))


def texts_fingerprint(texts: Iterable[str], ids: Iterable[str] | None = None) -> str:
  """sha256 (hex, 24 digits) of the texts and their ids, in order."""
  digest = hashlib.sha256()
  for i, text in zip(itertools.count() if ids is None else ids, texts):
    digest.update(f"{i}\x00{text}\x01".encode())
  return digest.hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
  digest = hashlib.sha256(f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|"
                          f"{len(tokenizer)}|{tokenizer.pad_token_id}".encode())
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:  # the pipeline, without the call-time truncation / padding state a call leaves there
    pipeline = json.loads(backend.to_str())
    pipeline.pop("truncation", None)
    pipeline.pop("padding", None)
    digest.update(json.dumps(pipeline, sort_keys=True).encode())
  else:
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  return digest.hexdigest()[:16]


def write_tokens(directory: Path, texts: Sequence[str], tokenizer, max_length: int, chunk: int = 8192) -> int:
  """Tokenises `texts` chunk by chunk into directory/{ids,offsets}.npy (the ids body streamed to disk, so memory
  holds one chunk); returns the token count."""
  offsets = np.zeros(len(texts) + 1, np.int64)
  body = directory / "ids.body"
  total = 0
  with open(body, "wb") as f:
    for start in range(0, len(texts), chunk):
      batch = tokenizer(list(texts[start:start + chunk]), truncation=True, max_length=max_length)["input_ids"]
      lengths = np.fromiter(map(len, batch), np.int64, count=len(batch))
      offsets[start + 1:start + 1 + len(batch)] = total + np.cumsum(lengths)
      total += int(lengths.sum())
      f.write(np.fromiter(itertools.chain.from_iterable(batch), np.int32, count=int(lengths.sum())).tobytes())
  with open(directory / "ids.npy", "wb") as out, open(body, "rb") as src:
    np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(np.int32).str, "fortran_order": False,
                                               "shape": (total,)})
    shutil.copyfileobj(src, out, 1 << 24)
  body.unlink()
  np.save(directory / "offsets.npy", offsets)
  return total


def cached_tokens(name: str, texts: Sequence[str], tokenizer, max_length: int, cache_dir: str | os.PathLike | None,
                  *, fingerprint: str | None = None, local_cache_dir: str | os.PathLike | None = None) -> FlatTokens:
  """`texts` tokenised (truncated at `max_length`) as memory-mapped `FlatTokens`, from the cache entry
  `<cache_dir>/tokens/<name>-<key>` (built once: see the module docstring). `fingerprint`: of the texts, when the
  caller has it (e.g. the corpus's, shared with the BM25 cache); else computed here. Without a `cache_dir` the
  arrays are built in memory."""
  if cache_dir is None:
    with tempfile.TemporaryDirectory() as tmp:
      write_tokens(Path(tmp), texts, tokenizer, max_length)
      loaded = FlatTokens.load(tmp)
      return FlatTokens(np.array(loaded.ids), np.array(loaded.offsets))
  fingerprint = fingerprint or texts_fingerprint(texts)
  key = hashlib.sha256(f"{fingerprint}|{tokenizer_fingerprint(tokenizer)}|{max_length}".encode()).hexdigest()[:20]
  entry = epath.Path(cache_dir) / "tokens" / f"{name}-{key}"

  def build(tmp: Path) -> dict:
    total = write_tokens(tmp, texts, tokenizer, max_length)
    return {"name": name, "texts": len(texts), "tokens": total, "max_length": max_length,
            "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__), "texts_fingerprint": fingerprint}

  tokens = FlatTokens.load(cached_artefact(entry, build, local_cache_dir=local_cache_dir))
  if len(tokens) != len(texts):
    raise ValueError(f"token cache {entry} holds {len(tokens)} texts, expected {len(texts)}: remove it")
  return tokens
