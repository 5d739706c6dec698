"""Orbax checkpoints of the train state: async saves, keep-N, interval, restore of the latest.

Orbax writes each step to a temporary directory and renames it when complete, so a crash (even `kill -9`) during
a save leaves the previous checkpoints restorable; leftovers are cleaned up on the next start.

The directory is an `etils.epath.Path`, so object-store URIs (`gs://bucket/run/checkpoints`) reach orbax intact.
The data state (what defines the input stream: batch size, seed, process count, sampling settings, a
fingerprint of the records; a JSON dict the job builds) is kept beside the steps in `directory/data_state.json`:
recorded when a run starts, compared on every resume (`check_data_state`), so a resume that would silently read
another stream stops with the changed fields instead.

Multi-process runs: saves and restores are collectives (every process calls them with the same step); each
process writes and reads its own shards, so a checkpoint restores on any process count and mesh whose shardings
`restore` is given.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

DATA_STATE_FILE = "data_state.json"


class DataStateMismatch(ValueError):
  """A resume whose data state differs from the checkpoint's; `changes` lists (field, old, new)."""

  def __init__(self, directory, changes: list[tuple[str, Any, Any]]):
    self.changes = changes
    lines = "; ".join(f"{field}: {old!r} -> {new!r}" for field, old, new in changes)
    super().__init__(f"the data state differs from the one recorded in {directory}/{DATA_STATE_FILE} ({lines}): "
                     "resuming would read another stream than the interrupted run. Restore the old settings, or "
                     "set pretrain.allow_data_state_change = True to resume with the new ones.")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
  return {prefix: tree}


def data_state_changes(old: Mapping, new: Mapping) -> list[tuple[str, Any, Any]]:
  """(dotted field, old, new) for every field that differs, is added or is removed (absent = None)."""
  old, new = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
  return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class Checkpointer:
  """Saves and restores one pytree (the train state) under `directory/<step>`."""

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int | None = 3,
               async_save: bool = True):
    self.directory = absolute(directory)
    self.save_every = save_every
    self.async_save = async_save
    # The save decision is ours (every `save_every` steps, or forced); orbax would also save the first step.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def due(self, step: int) -> bool:
    """Whether `maybe_save(step, ...)` saves without `force`."""
    return step % self.save_every == 0

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether a save started."""
    if not (force or self.due(step)):
      return False
    if step in self._manager.all_steps():
      return False
    saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    if saved:
      log.info("checkpoint of step %d %s", step, "started (async)" if self.async_save else "written")
    return saved

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default: latest) into arrays with the shardings of `abstract_state`."""
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), abstract_state)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def stored_data_state(self) -> dict | None:
    """The data state recorded in the directory, or None."""
    path = self.directory / DATA_STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None

  def record_data_state(self, state: Mapping) -> None:
    """Writes `state` (JSON-able) as the run's data state (process 0; a temporary file renamed)."""
    if jax.process_index() != 0:
      return
    self.directory.mkdir(parents=True, exist_ok=True)
    tmp = self.directory / f"{DATA_STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(self.directory / DATA_STATE_FILE)

  def check_data_state(self, state: Mapping, *, allow_change: bool = False) -> list[tuple[str, Any, Any]]:
    """Before training: with no checkpoint, records `state`; on a resume compares it with the recorded one.

    Raises `DataStateMismatch` naming every changed field with its old and new value, unless `allow_change`
    (then logs them and records the new state). A checkpoint without a recorded state gets `state`.
    Returns the changes.
    """
    stored = self.stored_data_state() if self.latest_step is not None else None
    changes = data_state_changes(stored, state) if stored is not None else []
    if changes and not allow_change:
      raise DataStateMismatch(self.directory, changes)
    if changes:
      log.warning("resuming with a changed data state (allowed): %s", changes)
    if stored is None or changes:
      self.record_data_state(state)
    return changes

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def absolute(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: a local path made absolute (orbax wants one), a URI (gs://...) kept as it is."""
  path = epath.Path(path)
  return path if is_uri(path) else epath.Path(os.path.abspath(path))


def is_uri(path: str | os.PathLike) -> bool:
  """Whether `path` names an object store or other non-local file system (`gs://`, `s3://`, ...)."""
  return "://" in os.fspath(path)
