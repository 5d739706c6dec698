"""Run-level functions that gin binds. `run.job` names the job; each job is a gin configurable."""

from __future__ import annotations

import logging
from pathlib import Path

import gin

from mote_jax.jobs import import_hf  # noqa: F401  (registers its configurables)
from mote_jax.partitioning import MeshConfig

gin.external_configurable(MeshConfig, module="mote_jax")

log = logging.getLogger(__name__)


@gin.configurable
def run(job=gin.REQUIRED, model_dir: str = gin.REQUIRED):
  """Runs `job(model_dir=...)` and writes the operative gin config to MODEL_DIR/config.gin."""
  import jax
  Path(model_dir).mkdir(parents=True, exist_ok=True)
  result = job(model_dir=model_dir)
  if jax.process_index() == 0:
    (Path(model_dir) / "config.gin").write_text(gin.operative_config_str())
  return result
