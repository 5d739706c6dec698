"""Training metrics to TensorBoard, to MODEL_DIR/metrics.jsonl (one JSON object per logged step), and to a bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import jax


class MetricsWriter:
  """Writes on process 0 only; other processes get a no-op writer."""

  def __init__(self, model_dir: str | Path, total_steps: int, initial_step: int = 0, progress: bool = True):
    self.enabled = jax.process_index() == 0
    self._bar = None
    if not self.enabled:
      return
    from clu import metric_writers
    from tqdm.auto import tqdm
    self._tb = metric_writers.SummaryWriter(str(Path(model_dir) / "tensorboard"))
    self._jsonl = open(Path(model_dir) / "metrics.jsonl", "a", encoding="utf-8")
    if progress:
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                       desc="train", mininterval=1.0)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._tb.write_scalars(step, clean)
    record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
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
