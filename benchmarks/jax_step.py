"""Model shapes, matching JAX and PyTorch weights, and the real jitted JAX pre-training step (`Trainer`'s).

`build_shape(name)` returns an HF `BertForMaskedLM` (MiniLM-L6: all-MiniLM-L6-v2's weights, MLM head fresh;
bert-base: random init) saved to a temporary directory, so that `from_hf` reads the very same weights into JAX.
`JaxStep` is `Trainer.compile_step`'s function around `PretrainModel.multi_stream_loss_fn`, built by
`training.builder.build_trainer` as `mote_jax.jobs.pretrain.pretrain` builds it (one stream of passage/passage
span pairs, AdamW, static routing, non-finite guard, donated state), on one device. `kernels` selects the
kernel set of the model and the trainer (default: the platform's).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
import types
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from benchmarks.data import minilm_path, pair_batch

from mote_jax.hf_interop import from_hf
from mote_jax.jobs.pretrain import model_flops_per_step
from mote_jax.objectives import ObjectiveConfig, PretrainModel, Stream
from mote_jax.partitioning import MeshConfig, Partitioner
from mote_jax.kernels import KernelConfig, resolve
from mote_jax.training.builder import build_trainer
from mote_jax.training.optimizer import OptimizerConfig
from mote_jax.training.trainer import TrainerConfig

SHAPES = ("tiny", "minilm", "bert-base")
STREAM = Stream("spans", "passage", "passage")


def max_predictions(length: int) -> tuple[int, int]:
  """The production gin's encoder/decoder prediction caps (48 / 72 at length 128), scaled with the length."""
  return max(1, math.ceil(48 * length / 128)), max(1, math.ceil(72 * length / 128))


@dataclasses.dataclass
class Shape:
  name: str
  directory: Path  # an HF BertForMaskedLM directory (config.json + model.safetensors)
  torch_model: object  # the same weights as a torch BertForMaskedLM (train mode)

  @property
  def bert_config(self):
    return self.torch_model.config


def build_shape(name: str, workdir: str | Path | None = None, attn_implementation: str = "sdpa") -> Shape:
  """An HF BertForMaskedLM of shape `name`, saved under `workdir` (a fresh temporary directory by default)."""
  import torch
  from transformers import BertConfig, BertForMaskedLM
  torch.manual_seed(0)
  if name == "minilm":
    model = BertForMaskedLM.from_pretrained(minilm_path(), attn_implementation=attn_implementation)
  elif name == "bert-base":
    model = BertForMaskedLM(BertConfig(attn_implementation=attn_implementation))
  elif name == "tiny":
    model = BertForMaskedLM(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, attn_implementation=attn_implementation))
  else:
    raise ValueError(f"shape {name!r}: expected one of {SHAPES}")
  directory = Path(workdir or tempfile.mkdtemp(prefix=f"bench_{name}_")) / name
  model.save_pretrained(directory)
  return Shape(name, directory, model.train())


def flops_per_step(config, objective: ObjectiveConfig, batch_size: int, length: int) -> float:
  """`mote_jax.jobs.pretrain.model_flops_per_step` for one stream of `batch_size` pairs of `length` tokens."""
  spec = types.SimpleNamespace(task=types.SimpleNamespace(max_len=length), batch_size=batch_size)
  return model_flops_per_step(config, objective, [spec])


def decoder_params(shape: Shape, objective: ObjectiveConfig = ObjectiveConfig(), seed: int = 1):
  """Fresh (unboxed, host) CoT-MAE decoder params for the shape; the same for every tower mode."""
  config, _ = from_hf(shape.directory, tower_mode="siamese")
  model = PretrainModel(config, objective)
  return jax.device_get(nn.unbox(jax.jit(model.init_decoder)(jax.random.PRNGKey(seed))))


class JaxStep:
  """The jitted train step of `Trainer` for a `PretrainModel`; `step(host_batch) -> loss` (blocks: one step's
  time, with no overlap of host and device work; `dispatch` does not wait). `static_routing=False` builds the
  trainer with dynamic routing: a full AdamW pass, then experts with all-zero gradients frozen."""

  def __init__(self, shape: Shape, decoder: dict, *, tower_mode: str = "mote",
               objective: ObjectiveConfig = ObjectiveConfig(), batch_size: int = 8, length: int = 128,
               model_overrides: dict | None = None, trainer_overrides: dict | None = None,
               static_routing: bool = True, kernels: KernelConfig | None = None,
               optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4, warmup_steps=1000,
                                                            total_steps=100_000)):
    self.partitioner = Partitioner.create(MeshConfig(), devices=jax.devices()[:1])
    self.kernels = resolve(kernels)
    config, encoder = from_hf(shape.directory, tower_mode=tower_mode,
                              **{"kernels": self.kernels, **(model_overrides or {})})
    if config.scan_layers:  # the decoder's layers are stacked too
      decoder = {"layers": {"layers": jax.tree.map(lambda *x: np.stack(x), *[
          decoder["layers"][f"layer_{i}"] for i in range(len(decoder["layers"]))])}}
    self.config, self.objective = config, objective
    self.model = PretrainModel(config, objective)
    boxed = jax.eval_shape(self.model.init, jax.random.PRNGKey(0))
    shardings = self.partitioner.param_shardings(boxed)
    params = self.partitioner.shard({"encoder": encoder, "decoder": decoder}, shardings)
    self.flops = flops_per_step(config, objective, batch_size, length)
    streams = [STREAM]

    def loss_fn(p, batch, rng, deterministic):
      return self.model.multi_stream_loss_fn(p, batch, streams, rng=rng, deterministic=deterministic)

    self._workdir = tempfile.mkdtemp(prefix="bench_trainer_")
    routes = [config.route(STREAM.anchor_type), config.route(STREAM.context_type)]
    self.trainer = build_trainer(TrainerConfig(progress_bar=False, **(trainer_overrides or {})), optimizer,
                                 self.partitioner, loss_fn, self._workdir, boxed,
                                 routes=routes if static_routing else None, kernels=self.kernels,
                                 flops_per_step=self.flops)
    self.state = self.trainer.init_state(params)
    self.step_fn = self.trainer.compile_step(self.state)  # the jitted step `Trainer.train` runs
    self.compiled = None  # its ahead-of-time compiled executable, once `compile` ran
    self.compile_s = None

  def global_batch(self, host_batch):
    return self.partitioner.global_batch({STREAM.name: host_batch})

  def compile(self, host_batch):
    """Lowers and compiles the step for this batch shape (timed); calls then run the compiled executable."""
    start = time.perf_counter()
    self.compiled = self.step_fn.lower(self.state, self.global_batch(host_batch)).compile()
    self.compile_s = time.perf_counter() - start
    return self.compiled

  def dispatch(self, host_batch):
    """One step without waiting for it (returns the metrics' device arrays)."""
    if self.compiled is None:
      self.compile(host_batch)
    self.state, metrics = self.compiled(self.state, self.global_batch(host_batch))
    return metrics

  def __call__(self, host_batch) -> float:
    return float(self.dispatch(host_batch)["loss"])

  def eval_loss(self, host_batch) -> float:
    """The deterministic (dropout off) loss of the current params, for parity with the torch reference."""
    fn = jax.jit(lambda p, b: self.model.loss_fn(p, b, anchor_type="passage", context_type="passage")[0])
    return float(fn(self.state.params, host_batch))

  def cost_analysis(self) -> dict:
    """XLA's cost analysis of the compiled step."""
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {k: float(v) for k, v in cost.items() if k in ("flops", "bytes accessed", "transcendentals")}

  def memory_analysis(self) -> dict:
    """XLA's memory analysis of the compiled step (MiB)."""
    memory = self.compiled.memory_analysis()
    out = {}
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes", "alias_size_in_bytes"):
      if hasattr(memory, field):
        out[field.replace("_in_bytes", "_mb")] = round(getattr(memory, field) / 2**20, 1)
    return out


def production_objective(length: int) -> ObjectiveConfig:
  """The production objective with masked-position caps sized for `length` (see `max_predictions`)."""
  p_enc, p_dec = max_predictions(length)
  return ObjectiveConfig(encoder_max_predictions=p_enc, decoder_max_predictions=p_dec)


def production_step(shape_name: str, batch_size: int, length: int, **kwargs) -> tuple[JaxStep, dict]:
  """(the production `JaxStep` of a named shape, a host batch of `batch_size` pairs x `length` tokens)."""
  built = build_shape(shape_name)
  step = JaxStep(built, decoder_params(built), objective=production_objective(length), batch_size=batch_size,
                 length=length, **kwargs)
  return step, pair_batch(batch_size, length)
