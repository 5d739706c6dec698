"""AdamW as BERT pre-training uses it: linear warm-up and decay, no decay on biases and LayerNorm, clipping.

MoTE detail: an expert that no text of a step was routed to gets an all-zero gradient. PyTorch's AdamW skips
such a parameter entirely (its .grad is None): no weight decay, no moment decay. `freeze_unrouted_experts` gives
the same semantics for the expert slices of stacked parameters, so a pre-training run without query texts leaves
the query expert exactly where it started instead of shrinking it by weight decay.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

EXPERT_AXIS = "expert"


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


def expert_axes(boxed_params) -> Any:
  """Per parameter, the index of its 'expert' axis (None when it has none), from the logical names."""
  return jax.tree.map(
      lambda box: box.names.index(EXPERT_AXIS) if EXPERT_AXIS in box.names else None,
      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def freeze_unrouted_experts(inner: optax.GradientTransformation, axes) -> optax.GradientTransformation:
  """Wraps `inner` so that expert slices with an all-zero gradient keep their value and optimizer moments.

  `axes` is `expert_axes(boxed_params)`: a tree (like params) of the expert axis index or None.
  """
  is_axis = lambda x: x is None or isinstance(x, int)  # noqa: E731

  def routed(grad, axis):
    """bool array broadcastable to `grad`: True where the slice's expert received gradient."""
    if axis is None:
      return jnp.ones((1,) * grad.ndim, bool)
    other = tuple(i for i in range(grad.ndim) if i != axis)
    return jnp.any(grad != 0, axis=other, keepdims=True)

  def update(grads, state, params=None):
    masks = jax.tree.map(routed, grads, axes, is_leaf=is_axis)
    updates, new_state = inner.update(grads, state, params)
    updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, masks)
    # The state holds param-shaped trees (Adam's moments) and other fields (counts): a state-shaped tree of
    # masks (True for the other fields) lets one tree_map keep the old moments of unrouted experts.
    state_masks = optax.tree_utils.tree_map_params(inner, lambda _, m: m, new_state, masks,
                                                   transform_non_params=lambda _: True)
    new_state = jax.tree.map(lambda new, old, m: jnp.where(m, new, old), new_state, state, state_masks)
    return updates, new_state

  return optax.GradientTransformation(inner.init, update)


def make_optimizer(config: OptimizerConfig, params, axes=None) -> optax.GradientTransformation:
  """clip -> AdamW (masked decay, scheduled learning rate); unrouted experts frozen.

  Gradient accumulation lives in the train step (micro-batches inside one jitted step), not here.

  `params` (unboxed or abstract) fixes the decay mask; `axes` (from `expert_axes`) enables expert freezing.
  """
  chain = []
  if config.max_grad_norm:
    chain.append(optax.clip_by_global_norm(config.max_grad_norm))
  chain.append(optax.adamw(learning_rate_schedule(config), b1=config.beta1, b2=config.beta2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=decay_mask(params)))
  tx = optax.chain(*chain)
  if axes is not None:
    tx = freeze_unrouted_experts(tx, axes)
  return tx
