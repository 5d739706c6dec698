"""Orbax checkpoints of the train state: async saves, keep-N, interval, restore of the latest.

Orbax writes each step to a temporary directory and renames it when complete, so a crash (even `kill -9`) during
a save leaves the previous checkpoints restorable; leftovers are cleaned up on the next start.

The directory is an `etils.epath.Path`, so object-store URIs (`gs://bucket/run/checkpoints`) reach orbax intact.
Multi-process runs: saves and restores are collectives (every process calls them with the same step); each
process writes and reads its own shards, so a checkpoint restores on any process count and mesh whose shardings
`restore` is given.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


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
