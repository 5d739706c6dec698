"""Training metrics to TensorBoard, to MODEL_DIR/metrics.jsonl (one JSON object per logged step), and to a bar.

MODEL_DIR may be local or an object store (`gs://bucket/run`): TensorBoard's writer takes either, and
metrics.jsonl is appended to locally (flushed at every record, so a crash loses nothing) but rewritten whole on
object stores, which cannot append: there, the records are kept in memory (after those of earlier launches, read
at the start) and the file is rewritten at most every `remote_flush_secs` and at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import jax
from etils import epath

from mote_jax.training.checkpointing import is_uri


class JsonlLog:
  """Appends JSON lines to a local file, or to an object-store file by rewriting it (see the module docstring)."""

  def __init__(self, path: str | os.PathLike, remote_flush_secs: float = 30.0):
    self.path = epath.Path(path)
    self.remote = is_uri(path)
    self.remote_flush_secs = remote_flush_secs
    if self.remote:
      self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
      self._dirty = False
      self._last_flush = time.monotonic()
    else:
      self._file = open(self.path, "a", encoding="utf-8")

  def append(self, record: Mapping) -> None:
    line = json.dumps(record) + "\n"
    if not self.remote:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line)
    self._dirty = True
    if time.monotonic() - self._last_flush >= self.remote_flush_secs:
      self.flush()

  def flush(self) -> None:
    if not self.remote:
      self._file.flush()
      return
    if self._dirty:
      self.path.write_text("".join(self._lines))  # one object write: readers see the old or the new file
      self._dirty = False
    self._last_flush = time.monotonic()

  def close(self) -> None:
    if self.remote:
      self.flush()
    else:
      self._file.close()


class MetricsWriter:
  """Writes on process 0 only; other processes get a no-op writer."""

  def __init__(self, model_dir: str | os.PathLike, total_steps: int, initial_step: int = 0, progress: bool = True):
    self.enabled = jax.process_index() == 0
    self._bar = None
    if not self.enabled:
      return
    from clu import metric_writers
    from tqdm.auto import tqdm
    model_dir = epath.Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    # os.fspath keeps a URI whole ("gs://bucket/run/tensorboard"); tf.summary writes to object stores itself.
    self._tb = metric_writers.SummaryWriter(os.fspath(model_dir / "tensorboard"))
    self._jsonl = JsonlLog(model_dir / "metrics.jsonl")
    if progress:
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                       desc="train", mininterval=1.0)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._tb.write_scalars(step, clean)
    self._jsonl.append({"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}})
    if self._bar is not None:
      shown = {k: clean[k] for k in ("loss", "eval/loss", "learning_rate", "steps_per_sec") if k in clean}
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

  def advance(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if not self.enabled:
      return
    self._tb.flush()
    self._tb.close()
    self._jsonl.close()
    if self._bar is not None:
      self._bar.close()
