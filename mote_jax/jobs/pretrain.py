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
from mote_jax.data.online import RecordBatches, RecordPairTask
from mote_jax.model import MoteConfig
from mote_jax.objectives import ObjectiveConfig, PretrainModel, Stream
from mote_jax.partitioning import MeshConfig, Partitioner
from mote_jax.training import flops as peak_flops
from mote_jax.training.checkpointing import Checkpointer
from mote_jax.training.builder import build_trainer
from mote_jax.training.optimizer import OptimizerConfig
from mote_jax.training.trainer import TrainerConfig

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PretrainStream:
  """One homogeneous stream of pairs: a registered task and its share of every global batch (in rows).

  `task`: a `PairTask` (documents tokenised in the pipeline) or a `RecordPairTask` (pre-tokenised records with
  online span sampling and O(1) resume; with `both_directions` each example gives two rows, so `batch_size`
  rows hold `batch_size / 2` span pairs in both directions).
  """

  task: PairTask | RecordPairTask = gin.REQUIRED
  batch_size: int = gin.REQUIRED
  eval_split: str | None = None  # the task's held-out split (e.g. 'validation'), for periodic evaluation

  @property
  def name(self) -> str:
    return self.task.name

  @property
  def stream(self) -> Stream:
    return Stream(self.name, self.task.anchor_type, self.task.context_type)


@gin.configurable
def mixed_streams(span_task: PairTask = gin.REQUIRED, query_tasks: Sequence[PairTask] = (),
                  texts_per_step: int = gin.REQUIRED, query_pair_share: float = 0.5,
                  eval_split: str | None = None) -> list[PretrainStream]:
  """Splits each global batch of `texts_per_step` encoded texts (one anchor per row) between the span stream and
  the query streams: round(query_pair_share * texts_per_step) rows for the query streams, in equal parts (the
  first ones take a remainder), the rest for the span stream.

  A span-stream row is one direction of a span pair, so both directions of a pair count as two texts.
  """
  if not 0.0 <= query_pair_share <= 1.0:
    raise ValueError(f"mixed_streams.query_pair_share={query_pair_share}: must be in [0, 1]")
  query_rows = round(query_pair_share * texts_per_step) if query_tasks else 0
  if query_pair_share > 0 and not query_tasks:
    raise ValueError(f"mixed_streams.query_pair_share={query_pair_share} but no query_tasks are bound")
  per_task, extra = divmod(query_rows, max(len(query_tasks), 1))
  sizes = [per_task + (k < extra) for k in range(len(query_tasks))]
  span_rows = texts_per_step - query_rows
  if any(size == 0 for size in sizes) or (span_rows == 0 and query_pair_share < 1.0):
    raise ValueError(f"mixed_streams: texts_per_step={texts_per_step} with query_pair_share={query_pair_share} "
                     f"leaves a stream without rows (spans {span_rows}, query streams {sizes}); raise "
                     "texts_per_step or change the share")
  streams = [PretrainStream(span_task, span_rows, eval_split)] if span_rows else []
  return streams + [PretrainStream(task, size, eval_split) for task, size in zip(query_tasks, sizes)]


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


def trained_lengths(streams: Sequence[PretrainStream]) -> dict[str, int]:
  """{text type: the longest sequence it was trained at}: each exported tower serves at its training length
  (a type no stream trains keeps the source's length)."""
  lengths: dict[str, int] = {}
  for spec in streams:
    for text_type in (spec.task.anchor_type, spec.task.context_type):
      lengths[text_type] = max(lengths.get(text_type, 0), spec.task.max_len)
  return lengths


def data_state(streams: Sequence[PretrainStream], seed: int, process_count: int) -> dict:
  """What defines the run's input stream (JSON-able), stored beside the checkpoints and checked on resume."""
  state = {"data_seed": seed, "process_count": process_count, "streams": {}}
  for spec in streams:
    task = spec.task
    if isinstance(task, RecordPairTask):
      task_state = task.data_state()
    else:
      s = task.spec
      task_state = {"source": repr(s.source), "pairing": s.pairing, "max_len": s.max_len,
                    "masking": dataclasses.asdict(s.masking), "shuffle_buffer_size": s.shuffle_buffer_size}
    state["streams"][spec.name] = {"batch_size": spec.batch_size, **task_state}
  return state


def _host_batches(spec: PretrainStream, seed: int, start_step: int, evaluation: bool) -> Iterator[dict]:
  if isinstance(spec.task, RecordPairTask):
    if evaluation:
      raise ValueError(f"stream {spec.name!r}: record tasks have no held-out split; set its eval_split to None")
    return RecordBatches(spec.task, batch_size=spec.batch_size, seed=seed, start_step=start_step,
                         shard_index=jax.process_index(), num_shards=jax.process_count())
  return PairBatches(spec.task, batch_size=spec.batch_size, seed=seed, start_step=start_step,
                     shard_index=jax.process_index(), num_shards=jax.process_count(),
                     split=spec.eval_split if evaluation else "train", shuffle=not evaluation)


def _batch_stream(streams: Sequence[PretrainStream], seed: int, start_step: int, evaluation: bool = False
                  ) -> Iterator[dict]:
  """{stream name: this host's rows of the stream's batch}, step after step, from `start_step` on.

  With `evaluation`, the streams' held-out splits, unshuffled. Closing the generator closes the iterators.
  """
  iterators = {spec.name: _host_batches(spec, seed, start_step, evaluation) for spec in streams}
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
             export_hf: bool = True, allow_data_state_change: bool = False):
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
    allow_data_state_change: resume even when the data state (batch sizes, seed, process count, sampling
      settings, records) differs from the checkpoint's (by default that stops with the changed fields). A run
      whose checkpoint is already at `num_steps` reads no data and is not checked.
  """
  if (init_checkpoint is None) == (model is None):
    raise ValueError("pretrain: set exactly one of init_checkpoint (an HF BERT) and model (a MoteConfig)")
  partitioner = Partitioner.create(mesh)
  checkpoint_dir = hf_interop.resolve_checkpoint(init_checkpoint) if init_checkpoint else None
  if checkpoint_dir is not None:
    config = hf_interop.config_from_hf(checkpoint_dir, tower_mode, **(model_overrides or {}))
  else:
    config = model.replace(**(model_overrides or {}))
  # dtype "auto": bf16 activations on TPU/GPU, fp32 on CPU. The export keeps "auto", so that whoever loads the
  # towers gets their own platform's choice.
  export_config, config = config, config.for_platform(partitioner.mesh.devices.flat[0].platform)
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
  trainer = dataclasses.replace(trainer, peak_flops_per_device=peak_flops.resolve_peak_flops(
      trainer.peak_flops_per_device, partitioner.mesh.devices.flat[0].device_kind, config.dtype))
  routes = [config.route(t) for s in stream_defs for t in (s.anchor_type, s.context_type)]
  loop = build_trainer(trainer, optimizer, partitioner, loss_fn, model_dir, boxed, routes=routes,
                       flops_per_step=flops, eval_loss_fn=eval_loss_fn if eval_specs else None)
  run_dir = epath.Path(model_dir)  # local or gs://...; pathlib would collapse the "//"
  checkpointer = Checkpointer(run_dir / "checkpoints", save_every=trainer.checkpoint_every,
                              keep=trainer.keep_checkpoints, async_save=trainer.async_checkpointing)
  if (checkpointer.latest_step or 0) < trainer.num_steps:  # a restore-only run reads no batch: nothing to check
    checkpointer.check_data_state(data_state(streams, data_seed, jax.process_count()),
                                  allow_change=allow_data_state_change)
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
    hf_interop.to_hf_anywhere(export_config, state.params["encoder"], run_dir / "hf", tokenizer=tokenizer,
                              max_seq_length=trained_lengths(streams), overwrite=True)
  return state
