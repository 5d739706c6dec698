"""Job: CoT-MoTE pre-training (CoT-MAE encoder + decoder MLM, optional DupMAE bag of words).

gin binds `pretrain` and the data streams; see t5x_configs/runs/pretrain_cotmote.gin (the paper's recipe) and
t5x_configs/runs/pretrain_scifact_cpu.gin (a CPU-sized continuation of all-MiniLM-L6-v2 on SciFact).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Sequence

import flax.linen as nn
import gin
import jax
from etils import epath

from mote_jax import hf_interop
from mote_jax.data import PairBatches, PairTask
from mote_jax.model import MoteConfig
from mote_jax.objectives import ObjectiveConfig, PretrainModel, Stream
from mote_jax.partitioning import MeshConfig, Partitioner
from mote_jax.training.checkpointing import Checkpointer
from mote_jax.training.builder import build_trainer
from mote_jax.training.optimizer import OptimizerConfig
from mote_jax.training.trainer import TrainerConfig

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PretrainStream:
  """One homogeneous stream of pairs: a registered `PairTask` and its share of every global batch (in pairs)."""

  task: PairTask = gin.REQUIRED
  batch_size: int = gin.REQUIRED
  eval_split: str | None = None  # the task's held-out split (e.g. 'validation'), for periodic evaluation

  @property
  def name(self) -> str:
    return self.task.name

  @property
  def stream(self) -> Stream:
    return Stream(self.name, self.task.anchor_type, self.task.context_type)


@gin.configurable
def checkpoint_path(name: str = gin.REQUIRED) -> str:
  """A local directory for a checkpoint name (see `hf_interop.resolve_checkpoint`); for vocab paths in gin."""
  return str(hf_interop.resolve_checkpoint(name))


def model_flops_per_step(config: MoteConfig, objective: ObjectiveConfig,
                         streams: Sequence[PretrainStream]) -> float:
  """Matmul FLOPs of one training step (forward + backward = 3 x forward), counted by hand.

  Per token of an L-token text: each encoder layer 2(4H^2 + 2HF) + 4LH (attention scores and mix); the MLM head
  2(H^2 + HV) per predicted position (every position unless `*_max_predictions` bounds it).
  """
  h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  total = 0.0
  for spec in streams:
    length = spec.task.max_len
    tokens = spec.batch_size * length
    layer = 2 * (4 * h * h + 2 * h * f) + 4 * length * h
    head = 2 * (h * h + h * v)
    enc_pred = objective.encoder_max_predictions or length
    dec_pred = objective.decoder_max_predictions or length
    if objective.bow_weight > 0:
      enc_pred = length
    total += tokens * layer * config.num_layers + spec.batch_size * enc_pred * head
    if objective.decoder_mlm_weight > 0:
      total += tokens * layer * objective.decoder_layers + spec.batch_size * dec_pred * head
  return 3 * total


def _batch_stream(streams: Sequence[PretrainStream], seed: int, start_step: int, evaluation: bool = False
                  ) -> Iterator[dict]:
  """{stream name: this host's rows of the stream's batch}, step after step, from `start_step` on.

  With `evaluation`, the streams' held-out splits, unshuffled. Closing the generator closes the iterators.
  """
  iterators = {
      spec.name: PairBatches(spec.task, batch_size=spec.batch_size, seed=seed, start_step=start_step,
                             shard_index=jax.process_index(), num_shards=jax.process_count(),
                             split=spec.eval_split if evaluation else "train", shuffle=not evaluation)
      for spec in streams}
  try:
    while True:
      yield {name: next(iterator) for name, iterator in iterators.items()}
  finally:
    for iterator in iterators.values():
      iterator.close()


@gin.configurable
def pretrain(model_dir: str, *, streams: Sequence[PretrainStream] = gin.REQUIRED,
             init_checkpoint: str | None = None, model: MoteConfig | None = None, tower_mode: str = "mote",
             model_overrides: dict | None = None, objective: ObjectiveConfig = ObjectiveConfig(),
             optimizer: OptimizerConfig = OptimizerConfig(), trainer: TrainerConfig = TrainerConfig(),
             mesh: MeshConfig = MeshConfig(), data_seed: int = 0, init_seed: int = 0, eval_batches: int = 4,
             export_hf: bool = True):
  """Pre-trains a MoTE encoder with CoT-MAE; resumes from MODEL_DIR/checkpoints when it holds any.

  Args:
    model_dir: run directory: checkpoints/, metrics.jsonl, tensorboard/, config.gin, hf/ (final towers).
    streams: the pair streams; every global batch holds `batch_size` pairs of each.
    init_checkpoint: an HF BERT checkpoint (directory, bundled name or hub id) to start from, or None to start
      from random weights of `model`.
    model: the MoteConfig when starting from random weights.
    tower_mode, model_overrides: how to build the MoteConfig from `init_checkpoint`.
    objective: the CoT-MAE / DupMAE objective.
    optimizer, trainer, mesh: AdamW, loop and device mesh settings.
    data_seed, init_seed: seeds of the data stream (shuffling, masking) and of fresh parameters.
    eval_batches: held-out batches per evaluation (streams with an `eval_task`).
    export_hf: write MODEL_DIR/hf/{query,passage} HF towers at the end.
  """
  if (init_checkpoint is None) == (model is None):
    raise ValueError("pretrain: set exactly one of init_checkpoint (an HF BERT) and model (a MoteConfig)")
  partitioner = Partitioner.create(mesh)
  checkpoint_dir = hf_interop.resolve_checkpoint(init_checkpoint) if init_checkpoint else None
  if checkpoint_dir is not None:
    config = hf_interop.config_from_hf(checkpoint_dir, tower_mode, **(model_overrides or {}))
  else:
    config = model.replace(**(model_overrides or {}))
  pretrain_model = PretrainModel(config, objective)
  rng = jax.random.PRNGKey(init_seed)
  boxed = jax.eval_shape(pretrain_model.init, rng)
  shardings = partitioner.param_shardings(boxed)
  abstract_params = nn.unbox(boxed)

  def init_params():
    if checkpoint_dir is None:
      return partitioner.init(pretrain_model.init, rng)[0]
    _, encoder = hf_interop.from_hf(checkpoint_dir, tower_mode, seed=init_seed, **(model_overrides or {}))
    if objective.decoder_init == "encoder":
      decoder = pretrain_model.decoder_from_encoder(encoder)
    else:
      decoder = jax.tree.map(jax.numpy.asarray, nn.unbox(jax.jit(pretrain_model.init_decoder)(rng)))
    return partitioner.shard({"encoder": encoder, "decoder": jax.device_get(decoder)}, shardings)

  stream_defs = [spec.stream for spec in streams]

  def loss_fn(params, batch, dropout_rng, deterministic):
    return pretrain_model.multi_stream_loss_fn(params, batch, stream_defs, rng=dropout_rng,
                                               deterministic=deterministic)

  eval_specs = [spec for spec in streams if spec.eval_split is not None]
  eval_defs = [spec.stream for spec in eval_specs]

  def eval_loss_fn(params, batch, dropout_rng, deterministic):
    return pretrain_model.multi_stream_loss_fn(params, batch, eval_defs, rng=dropout_rng,
                                               deterministic=deterministic)

  def held_out():  # the same batches every time: unshuffled, the first `eval_batches` steps
    batches = _batch_stream(eval_specs, data_seed, 0, evaluation=True)
    try:
      return [next(batches) for _ in range(eval_batches)]
    finally:
      batches.close()

  flops = model_flops_per_step(config, objective, streams)
  routes = [config.route(t) for s in stream_defs for t in (s.anchor_type, s.context_type)]
  loop = build_trainer(trainer, optimizer, partitioner, loss_fn, model_dir, boxed, routes=routes,
                       flops_per_step=flops, eval_loss_fn=eval_loss_fn if eval_specs else None)
  run_dir = epath.Path(model_dir)  # local or gs://...; pathlib would collapse the "//"
  checkpointer = Checkpointer(run_dir / "checkpoints", save_every=trainer.checkpoint_every,
                              keep=trainer.keep_checkpoints, async_save=trainer.async_checkpointing)
  state = loop.restore_or_init(checkpointer, init_params, abstract_params)
  log.info("pre-training %s (%s) on mesh %s: %s params, streams %s, %.3g model FLOPs/step", config.tower_mode,
           init_checkpoint or "random init", dict(partitioner.mesh.shape),
           f"{sum(x.size for x in jax.tree.leaves(abstract_params)):,}",
           {s.name: (s.task.anchor_type, s.task.context_type, s.batch_size) for s in streams}, flops)

  try:
    state = loop.train(state, lambda start: _batch_stream(streams, data_seed, start), checkpointer,
                       held_out if eval_specs and trainer.eval_every else None)
  finally:
    checkpointer.close()
  if export_hf and int(jax.device_get(state.step)) >= trainer.num_steps:
    tokenizer = checkpoint_dir
    hf_interop.to_hf_anywhere(config, state.params["encoder"], run_dir / "hf", tokenizer=tokenizer,
                              max_seq_length=max(spec.task.max_len for spec in streams), overwrite=True)
  return state
