"""Section "finetune_step": the contrastive fine-tuning step, JAX (the real `Trainer` step) vs independent PyTorch.

Shapes (all-MiniLM-L6-v2 as a MoTE model, fp32, dropout on as in training; real SciFact train batches with BM25
negatives, built by the fine-tuning job's own data path):
  quickstart   16 queries x 64 tokens, 1 + 1 passages x 128 tokens each  (`runs/quickstart_scifact.gin`)
  scifact      16 queries x 64 tokens, 1 + 1 passages x 256 tokens each  (`runs/finetune_scifact_cpu.gin`)
Contenders:
  jax/<kernels>  `Trainer.compile_step` around `ContrastiveModel.loss_fn` built by `training.builder.build_trainer`
                 exactly as `mote_jax.jobs.finetune.finetune` builds it (static routing over both experts,
                 `loss_and_grads_fn`, AdamW with the gin's learning rate, warm-up and decay), with this platform's
                 kernel set (`jax/default`) and the plain-XLA set (`jax/xla`)
  torch/eager    written here, independently: two HF `BertModel`s sharing their embeddings and attention modules,
                 each with its own FFN (the MoTE query and passage experts), the model's pooling (mean / [CLS]) and
                 L2 normalisation, InfoNCE of every query against all B (1 + n) passages of the batch with the
                 judged passages other than its positive masked out, clipping at 1.0, AdamW (no decay on biases
                 and LayerNorm), the same schedule
All start from the same weights (checked first: their deterministic losses agree) and are timed round-robin in one
process. MFU = model FLOPs (`model_flops_per_step`, counted as `mote_jax.jobs.pretrain.model_flops_per_step`
counts) per second over the fp32 GEMM peak measured at the start of the section.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DATA_DIR, load1, ratio_of_medians, section_main, time_interleaved

SHAPES = {"quickstart": dict(batch_size=16, negatives=1, query_len=64, passage_len=128),
          "scifact": dict(batch_size=16, negatives=1, query_len=64, passage_len=256),
          "tiny": dict(batch_size=4, negatives=1, query_len=16, passage_len=32)}
MAX_GROUPS = {"tiny": 32}  # the stream over the first this many groups only (tokenising every group costs time)
TEMPERATURE = 0.05  # both gins: all-MiniLM-L6-v2's normalised embeddings


def temperature_for(config) -> float:
  """The gins' 0.05 for L2-normalised embeddings; Tevatron's 1.0 for raw dot products (the tiny random model)."""
  return TEMPERATURE if config.normalize else 1.0
OPTIMIZER = dict(learning_rate=2e-5, warmup_steps=10, total_steps=100, weight_decay=0.01)  # finetune_scifact_cpu


def model_flops_per_step(config, batch_size: int, negatives: int, query_len: int, passage_len: int) -> float:
  """Matmul FLOPs of one fine-tuning step (forward + backward = 3 x forward), counted by hand as the pre-training
  count is: per token of an L-token text, each encoder layer 2(4H^2 + 2HF) + 4LH; plus the [B, B(1+n)] scores."""
  h, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
  passages = batch_size * (1 + negatives)

  def encoder(texts, length):
    return texts * length * layers * (2 * (4 * h * h + 2 * h * f) + 4 * length * h)

  return 3 * (encoder(batch_size, query_len) + encoder(passages, passage_len) + 2 * batch_size * passages * h)


@functools.lru_cache(maxsize=1)
def _groups(split: str = "train"):
  """SciFact train groups with BM25 negatives, as the fine-tuning gins configure them (depth 100, 30 kept)."""
  from mote_jax.jobs.finetune import training_groups
  scifact = DATA_DIR / "scifact"
  if not (scifact / "corpus.jsonl").exists():
    raise FileNotFoundError(f"{scifact}/corpus.jsonl not found (set MOTE_DATA_DIR)")
  return training_groups(str(scifact), split, negatives=["bm25"], bm25_depth=100, num_negatives=30)


def finetune_batch(batch_size: int, negatives: int, query_len: int, passage_len: int, step: int = 0,
                   max_groups: int | None = None) -> dict:
  """Global batch `step` of the fine-tuning job's stream over SciFact train (`FinetuneStream`, seed 0), over the
  first `max_groups` groups when given."""
  from benchmarks.data import tokenizer
  from mote_jax.data.finetune import FinetuneBatches, FinetuneStream, GroupTable, SamplingConfig
  sampling = SamplingConfig(negatives=negatives, query_max_len=query_len, passage_max_len=passage_len)
  data = _groups()
  if max_groups is not None and max_groups < len(data):  # the first groups, as the job would hold them
    g, keep = data.groups, range(max_groups)
    data = dataclasses.replace(data, query_texts=data.query_texts[:max_groups], groups=GroupTable.from_lists(
        g.query_ids[:max_groups], [g.positives_of(i) for i in keep], [g.negatives_of(i) for i in keep],
        [g.judged_of(i) for i in keep]))
  stream = FinetuneStream.build(data, tokenizer(), sampling, seed=0)
  return next(FinetuneBatches(stream, batch_size=batch_size, start_step=step))


def checkpoint_dir(shape_name: str) -> Path:
  """An HF BERT directory: all-MiniLM-L6-v2 (with its sentence-transformers pooling files) or a tiny random one."""
  if shape_name == "tiny":
    from benchmarks import jax_step
    return jax_step.build_shape("tiny").directory
  from benchmarks.data import minilm_path
  return Path(minilm_path())


# --- JAX -----------------------------------------------------------------------------------------------------


class JaxFinetuneStep:
  """`Trainer`'s jitted fine-tuning step, assembled as `mote_jax.jobs.finetune.finetune` assembles it, on one
  device; `step(host_batch) -> loss` blocks until the step is done."""

  def __init__(self, directory, dims: dict, *, tower_mode: str = "mote", kernels=None):
    import jax

    from mote_jax.hf_interop import from_hf
    from mote_jax.kernels import resolve
    from mote_jax.model import EXPERTS, init_params
    from mote_jax.objectives.contrastive import ContrastiveConfig, ContrastiveModel
    from mote_jax.partitioning import MeshConfig, Partitioner
    from mote_jax.training.builder import build_trainer
    from mote_jax.training.optimizer import OptimizerConfig
    from mote_jax.training.trainer import TrainerConfig

    self.partitioner = Partitioner.create(MeshConfig(), devices=jax.devices()[:1])
    self.kernels = resolve(kernels)
    config, host_params = from_hf(directory, tower_mode=tower_mode, kernels=self.kernels)
    self.config = config
    self.flops = model_flops_per_step(config, **dims)
    self.model = ContrastiveModel(config, ContrastiveConfig(temperature=temperature_for(config)))
    boxed = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    params = self.partitioner.shard(host_params, self.partitioner.param_shardings(boxed))

    def loss_fn(p, batch, rng, deterministic):
      return self.model.loss_fn(p, batch, rng, deterministic)

    self._workdir = tempfile.mkdtemp(prefix="bench_finetune_")
    self.trainer = build_trainer(TrainerConfig(progress_bar=False), OptimizerConfig(**OPTIMIZER), self.partitioner,
                                 loss_fn, self._workdir, boxed, routes=[config.route(t) for t in EXPERTS],
                                 loss_and_grads_fn=self.model.loss_and_grads, kernels=self.kernels,
                                 flops_per_step=self.flops)
    self.state = self.trainer.init_state(params)
    self.step_fn = self.trainer.compile_step(self.state)
    self.compiled = None

  def eval_loss(self, host_batch) -> float:
    """The deterministic (dropout off) loss of the current params."""
    import jax
    fn = jax.jit(lambda p, b: self.model.loss_fn(p, b, deterministic=True)[0])
    return float(fn(self.state.params, host_batch))

  def __call__(self, host_batch) -> float:
    batch = self.partitioner.global_batch(host_batch)
    if self.compiled is None:
      self.compiled = self.step_fn.lower(self.state, batch).compile()
    self.state, metrics = self.compiled(self.state, batch)
    return float(metrics["loss"])


# --- PyTorch (independent) -----------------------------------------------------------------------------------


class TorchMote:
  """Query and passage `BertModel`s sharing embeddings and every layer's attention (MoTE: one FFN expert per text
  type); `tower_mode='siamese'` uses one model for both. `forward(**batch) -> InfoNCE loss`."""

  def __init__(self, directory, *, tower_mode: str, pooling: str, normalize: bool, temperature: float,
               attn_implementation: str = "sdpa"):
    import torch
    from transformers import BertModel

    class Module(torch.nn.Module):
      pass

    self.module = Module()
    passage = BertModel.from_pretrained(str(directory), add_pooling_layer=False,
                                        attn_implementation=attn_implementation)
    if tower_mode == "mote":
      query = copy.deepcopy(passage)
      query.embeddings = passage.embeddings
      for q_layer, p_layer in zip(query.encoder.layer, passage.encoder.layer):
        q_layer.attention = p_layer.attention  # shared; intermediate + output (the FFN expert) stay separate
    elif tower_mode == "siamese":
      query = passage
    else:
      raise ValueError(f"tower_mode={tower_mode!r}: the torch reference has 'mote' and 'siamese'")
    self.module.query, self.module.passage = query, passage
    self.pooling, self.normalize, self.temperature = pooling, normalize, temperature

  def _embed(self, model, ids, mask):
    import torch
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    if self.pooling == "cls":
      pooled = hidden[:, 0]
    else:
      m = mask[..., None].to(hidden.dtype)
      pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

  def loss(self, query_input_ids, query_attention_mask, passage_input_ids, passage_attention_mask,
           passage_doc_index=None, query_judged_index=None):
    import torch
    b, group = passage_input_ids.shape[:2]
    q = self._embed(self.module.query, query_input_ids, query_attention_mask)
    p = self._embed(self.module.passage, passage_input_ids.flatten(0, 1), passage_attention_mask.flatten(0, 1))
    scores = q @ p.T / self.temperature  # [B, B * group]
    targets = torch.arange(b) * group
    if query_judged_index is not None:
      index = passage_doc_index.flatten()
      judged = (query_judged_index[:, :, None] == index[None, None, :]).any(1) & (index >= 0)[None, :]
      own = torch.arange(index.shape[0])[None, :] == targets[:, None]
      scores = scores.masked_fill(judged & ~own, float("-inf"))
    return torch.nn.functional.cross_entropy(scores, targets)


class TorchFinetuneStep:
  """Forward, backward, clip at 1.0, AdamW, schedule, zero_grad: one eager PyTorch training step."""

  def __init__(self, model: TorchMote, max_grad_norm: float = 1.0):
    from benchmarks.torch_cotmae import make_optimizer
    self.model = model
    model.module.train()
    self.optimizer, self.scheduler = make_optimizer(
        model.module, lr=OPTIMIZER["learning_rate"], weight_decay=OPTIMIZER["weight_decay"],
        warmup=OPTIMIZER["warmup_steps"], total=OPTIMIZER["total_steps"])
    self.params = [p for p in model.module.parameters() if p.requires_grad]  # shared modules counted once
    self.max_grad_norm = max_grad_norm

  def __call__(self, batch) -> float:
    from benchmarks.torch_cotmae import optimizer_step
    return optimizer_step(self.model.loss(**_tensors(batch)), self)


def _tensors(batch):
  import torch
  return {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items()}


def torch_eval_loss(model: TorchMote, batch) -> float:
  import torch
  model.module.eval()
  with torch.no_grad():
    loss = float(model.loss(**_tensors(batch)))
  model.module.train()
  return loss


# --- the section ---------------------------------------------------------------------------------------------


def bench_shape(shape_name: str, *, warmup: int, repeats: int, peak_gflops: float, tower_mode: str = "mote",
                kernel_sets=("default", "xla"), log=print) -> dict:
  from mote_jax import kernels as kernel_lib
  dims = SHAPES[shape_name]
  directory = checkpoint_dir(shape_name)
  batch = finetune_batch(**dims, max_groups=MAX_GROUPS.get(shape_name))
  sets = {"default": None, "xla": kernel_lib.XLA, "cpu": kernel_lib.CPU}
  fns, info, losses, steps = {}, {}, {}, {}
  for name in kernel_sets:
    step = steps[name] = JaxFinetuneStep(directory, dims, tower_mode=tower_mode, kernels=sets[name])
    flops = step.flops
    losses[f"jax/{name}"] = step.eval_loss(batch)
    info[f"jax/{name}"] = {"kernels": vars(step.kernels)}
    fns[f"jax/{name}"] = (lambda s: lambda: s(batch))(step)
  config = step.config
  reference = TorchMote(directory, tower_mode=tower_mode, pooling=config.pooling, normalize=config.normalize,
                        temperature=temperature_for(config))
  losses["torch/eager"] = torch_eval_loss(reference, batch)
  info["torch/eager"] = {}
  fns["torch/eager"] = (lambda s: lambda: s(batch))(TorchFinetuneStep(reference))
  for name, fn in fns.items():
    start = time.perf_counter()
    fn()  # first call: compile (jax) + one step
    info[name]["first_step_s"] = round(time.perf_counter() - start, 2)
    log(f"[bench] finetune {shape_name} {name}: first step {info[name]['first_step_s']}s")
  for name in kernel_sets:  # the compiled step's own buffers (XLA's buffer assignment), what a host or HBM must hold
    memory = steps[name].compiled.memory_analysis()
    if memory is not None:
      info[f"jax/{name}"]["step_temp_gb"] = memory.temp_size_in_bytes / 1e9
  timings = time_interleaved(fns, warmup=warmup, repeats=repeats, log=log)
  rows = {}
  for name, t in timings.items():
    rows[name] = dict(t, **info[name], flops_per_step=flops, queries_per_s=dims["batch_size"] / t["median_s"],
                      model_gflops_per_s=flops / t["median_s"] / 1e9,
                      mfu=flops / t["median_s"] / 1e9 / peak_gflops)
  ratios = {f"{name} vs torch/eager": ratio_of_medians(rows[name], rows["torch/eager"]) for name in rows
            if name.startswith("jax/")}
  if "jax/default" in rows and "jax/xla" in rows:
    ratios["jax/default vs jax/xla"] = ratio_of_medians(rows["jax/default"], rows["jax/xla"])
  del fns, steps
  gc.collect()
  return {**dims, "tower_mode": tower_mode, "pooling": config.pooling, "normalize": config.normalize,
          "temperature": temperature_for(config), "rows": rows, "ratios": ratios, "eval_losses": losses,
          "loss_abs_diff_vs_torch": {k: abs(v - losses["torch/eager"]) for k, v in losses.items()
                                     if k != "torch/eager"},
          "masked_judged": "query_judged_index" in batch, "warmup": warmup, "repeats": repeats}


def run(quick: bool = False, shapes=None, tower_mode: str = "mote", kernel_sets=("default", "xla")) -> dict:
  import torch

  from benchmarks import gemm
  torch.manual_seed(0)
  peak = gemm.measure(sizes=(512,) if quick else (2048,), repeats=2 if quick else 5)
  result = {"gemm": peak, "load1_before": load1(), "shapes": {}}
  shapes = shapes or (["tiny"] if quick else ["quickstart", "scifact"])
  settings = dict(warmup=1, repeats=2) if quick else dict(warmup=1, repeats=5)
  for name in shapes:
    result["shapes"][name] = bench_shape(name, peak_gflops=peak["peak_fp32_gflops"], tower_mode=tower_mode,
                                         kernel_sets=tuple(kernel_sets), **settings)
    gc.collect()
  result["load1_after"] = load1()
  return result


if __name__ == "__main__":
  section_main("finetune_step", run)
