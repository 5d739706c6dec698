"""Run-level functions that gin binds. `run.job` names the job; each job is a gin configurable.

This module is the one place that registers library classes and functions with gin, so deeper modules stay
free of gin.
"""

from __future__ import annotations

import logging

import gin
from etils import epath

from mote_jax import data
from mote_jax.data.finetune import SamplingConfig
from mote_jax.jobs import ablation, finetune, generate_queries, import_hf, preprocess, pretrain, quickstart  # noqa: F401,E501  (registers their configurables)
from mote_jax.kernels import KernelConfig
from mote_jax.model import MoteConfig
from mote_jax.objectives import ObjectiveConfig
from mote_jax.objectives.contrastive import ContrastiveConfig
from mote_jax.partitioning import MeshConfig
from mote_jax.retrieval.encode import EncodeOptions
from mote_jax.retrieval.search import ScannConfig
from mote_jax.training.optimizer import OptimizerConfig
from mote_jax.training.trainer import TrainerConfig

for _configurable in (MeshConfig, MoteConfig, ObjectiveConfig, OptimizerConfig, TrainerConfig, data.MaskingConfig,
                      SamplingConfig, ContrastiveConfig, EncodeOptions, ScannConfig,
                      data.register_beir_corpus_task, data.register_jsonl_task, data.register_text_file_task,
                      data.register_tfds_task, data.register_query_pair_tasks, data.register_records_task,
                      data.SpanSampling):
  gin.external_configurable(_configurable, module="mote_jax")

# Kernel sets (`MoteConfig.kernels = @KernelConfig()`, `KernelConfig.attention = 'dot_product'`).
gin.external_configurable(KernelConfig, module="mote_jax")

log = logging.getLogger(__name__)


@gin.configurable
def run(job=gin.REQUIRED, model_dir: str = gin.REQUIRED):
  """Runs `job(model_dir=...)`; MODEL_DIR/config.gin gets the full config first, the operative one at the end.

  `model_dir` may be local or an object store (`gs://bucket/run`); it reaches the job as given (a string). In a
  multi-process run every process calls this and only process 0 writes the gin files.
  """
  import jax
  root = epath.Path(model_dir)  # pathlib would turn gs://bucket into gs:/bucket
  root.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (root / "config.gin").write_text(gin.config_str())
  result = job(model_dir=model_dir)
  if jax.process_index() == 0:
    (root / "operative_config.gin").write_text(gin.operative_config_str())
  return result
