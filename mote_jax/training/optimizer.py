"""AdamW as BERT pre-training uses it: linear warm-up and decay, no decay on biases and LayerNorm, clipping.

The optimizer is generic: what a step's texts reach (MoTE routing) is `training/routing.py`'s business, which
wraps this optimizer. The gradient clip's implementation is `KernelConfig.grad_clip` (`mote_jax.kernels`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from mote_jax.kernels.clip import clip_by_global_norm


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 1e-4
  warmup_steps: int = 0
  total_steps: int = 1000
  end_learning_rate: float = 0.0
  beta1: float = 0.9
  beta2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.01
  max_grad_norm: float | None = 1.0


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """0 -> lr linearly over `warmup_steps`, then lr -> end_learning_rate linearly until `total_steps`."""
  warmup = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
  decay = optax.linear_schedule(config.learning_rate, config.end_learning_rate,
                                max(config.total_steps - config.warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [config.warmup_steps])


def decay_mask(params) -> Any:
  """True for weights that get weight decay: everything but biases and LayerNorm parameters."""
  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    in_layer_norm = any("layer_norm" in str(getattr(p, "key", p)) for p in path)
    return not (name.endswith("bias") or name == "scale" or name.startswith("layer_norm") or in_layer_norm)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig, params, grad_clip: str = "optax") -> optax.GradientTransformationExtraArgs:
  """clip -> AdamW (masked decay, scheduled learning rate).

  `params` (unboxed, abstract, or any tree with the parameters' paths) fixes the decay mask. `grad_clip` is
  `KernelConfig.grad_clip`: 'optax' (`optax.clip_by_global_norm`) or 'scalar' (PyTorch's form, whose update
  takes the gradient's global norm as `global_norm=` when the caller has it). Gradient accumulation lives in the
  train step (micro-batches inside one jitted step), not here.
  """
  chain = []
  if config.max_grad_norm:
    chain.append(clip_by_global_norm(config.max_grad_norm, grad_clip))
  chain.append(optax.adamw(learning_rate_schedule(config), b1=config.beta1, b2=config.beta2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=decay_mask(params)))
  return optax.with_extra_args_support(optax.chain(*chain))
