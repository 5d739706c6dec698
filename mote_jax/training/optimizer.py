"""AdamW as BERT pre-training uses it: linear warm-up and decay, no decay on biases and LayerNorm, clipping.

MoTE detail: an expert that no text of a step was routed to gets an all-zero gradient. PyTorch's AdamW skips
such a parameter entirely (its .grad is None): no weight decay, no moment decay. Two transformations give the same
semantics for the expert slices of stacked parameters, so a pre-training run without query texts leaves the query
expert exactly where it started instead of shrinking it by weight decay:
  `skip_unrouted`            the routing is known when the step is traced (the jobs' streams fix which text types
                             a step has): AdamW runs on the routed slices only, and an unrouted expert (or a whole
                             unused tower in `separated` mode) gets no AdamW work, only a zero update.
  `freeze_unrouted_experts`  the routing is discovered from the gradients (all-zero slices), at the cost of a full
                             AdamW pass plus a reduction over every expert gradient.
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

  def update(grads, state, params=None, **extra_args):
    masks = jax.tree.map(routed, grads, axes, is_leaf=is_axis)
    updates, new_state = optax.with_extra_args_support(inner).update(grads, state, params, **extra_args)
    updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, masks)
    # The state holds param-shaped trees (Adam's moments) and other fields (counts): a state-shaped tree of
    # masks (True for the other fields) lets one tree_map keep the old moments of unrouted experts.
    state_masks = optax.tree_utils.tree_map_params(inner, lambda _, m: m, new_state, masks,
                                                   transform_non_params=lambda _: True)
    new_state = jax.tree.map(lambda new, old, m: jnp.where(m, new, old), new_state, state, state_masks)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update)


@dataclasses.dataclass(frozen=True)
class Routed:
  """Which part of one parameter a step's texts reach: indices [start, stop) of axis `axis`, or all of it
  (`axis` None). A leaf of the trees `routed_slices` builds (deliberately not a pytree node)."""
  axis: int | None = None
  start: int = 0
  stop: int = 0

  def take(self, x: jax.Array) -> jax.Array:
    return x if self.axis is None else jax.lax.slice_in_dim(x, self.start, self.stop, axis=self.axis)

  def pad(self, part: jax.Array, full_shape: tuple[int, ...]) -> jax.Array:
    """`part` back in a zero array of `full_shape` (an update of zero for what the step did not reach)."""
    if self.axis is None:
      return part
    widths = [(0, 0, 0)] * len(full_shape)
    widths[self.axis] = (self.start, full_shape[self.axis] - self.stop, 0)
    return jax.lax.pad(part, jnp.zeros((), part.dtype), widths)

  def put(self, full: jax.Array, part: jax.Array) -> jax.Array:
    """`full` with `part` written over the routed indices (old values elsewhere)."""
    if self.axis is None:
      return part
    if self.start == self.stop:
      return full
    return jax.lax.dynamic_update_slice_in_dim(full, part, self.start, axis=self.axis)

  def apply(self, param: jax.Array, update: jax.Array) -> jax.Array:
    """`param + update` on the routed part only (`optax.apply_updates` for one leaf): the rest is not read or
    written, and with the state donated the routed part is updated in place."""
    if self.axis is None:
      return (param + update).astype(param.dtype)
    if self.start == self.stop:
      return param
    return self.put(param, (self.take(param) + self.take(update)).astype(param.dtype))


def routed_slices(boxed_params, routes) -> Any:
  """Per parameter, the `Routed` part that a step whose texts go to `routes` reaches.

  `routes`: the (tower name, expert index) pairs of the step's text types (`MoteConfig.route`). A parameter under
  a tower no route names is unrouted entirely; an expert-stacked one (logical axis 'expert') keeps the routed
  experts' contiguous range; everything else (shared layers, the decoder) is routed whole.
  """
  experts: dict[str, set[int]] = {}
  for tower, index in routes:
    experts.setdefault(tower, set()).add(index)

  def one(path, box):
    keys = [str(getattr(k, "key", k)) for k in path]
    towers = [k for k in keys if k == "tower" or k.endswith("_tower")]
    if not towers:
      return Routed()
    used = experts.get(towers[0])
    if not used:
      return Routed(axis=0, start=0, stop=0)
    if EXPERT_AXIS not in box.names:
      return Routed()
    axis = box.names.index(EXPERT_AXIS)
    start, stop = min(used), max(used) + 1
    if stop - start != len(used):
      raise ValueError(f"routed experts {sorted(used)} of {towers[0]} are not contiguous")
    if (start, stop) == (0, box.value.shape[axis]):
      return Routed()
    return Routed(axis=axis, start=start, stop=stop)

  return jax.tree_util.tree_map_with_path(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def take_routed(slices, tree) -> Any:
  """The routed part of every leaf of `tree` (a tree shaped like the parameters)."""
  return jax.tree.map(lambda sl, x: sl.take(x), slices, tree, is_leaf=lambda x: isinstance(x, Routed))


def pad_routed(slices, parts, like) -> Any:
  """Inverse of `take_routed`: each routed part back in zeros of its leaf's shape in `like` (arrays or shapes)."""
  return jax.tree.map(lambda sl, x, ref: sl.pad(x, tuple(getattr(ref, "shape", ref))), slices, parts, like,
                      is_leaf=lambda x: isinstance(x, Routed))


def apply_routed_updates(params, updates, slices) -> Any:
  """`optax.apply_updates(params, updates)` for updates that are zero outside the routed parts (`skip_unrouted`'s):
  only the routed parts are read and written, not whole expert stacks."""
  return jax.tree.map(lambda sl, p, u: sl.apply(p, u), slices, params, updates,
                      is_leaf=lambda x: isinstance(x, Routed))


def skip_unrouted(inner: optax.GradientTransformation, slices) -> optax.GradientTransformation:
  """Wraps `inner` so that it sees only the routed part of each parameter (`slices` from `routed_slices`).

  The rest keeps its value and optimizer moments and gets no AdamW work: its update is zero (padded back to the
  parameter's shape; `apply_routed_updates` adds only the routed part, where `optax.apply_updates` would make
  one pass over the whole parameter). The state keeps the full parameter shapes, so checkpoints do not depend
  on the routing.
  """
  is_routed = lambda x: isinstance(x, Routed)  # noqa: E731

  def update(grads, state, params=None, **extra_args):
    # A `Routed` per state leaf: the parameter's for Adam's moments, whole (Routed()) for counts and the like.
    state_slices = optax.tree_utils.tree_map_params(inner, lambda _, sl: sl, state, slices,
                                                    transform_non_params=lambda _: Routed(), is_leaf=is_routed)
    sub_state = take_routed(state_slices, state)
    sub_updates, sub_new = optax.with_extra_args_support(inner).update(
        take_routed(slices, grads), sub_state, None if params is None else take_routed(slices, params),
        **extra_args)
    updates = pad_routed(slices, sub_updates, grads)
    new_state = jax.tree.map(lambda sl, old, new: sl.put(old, new), state_slices, state, sub_new, is_leaf=is_routed)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def clip_by_global_norm(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformationExtraArgs:
  """`torch.nn.utils.clip_grad_norm_` as a transformation: every gradient times min(1, max_norm / (norm + eps)).

  PyTorch's (and so the reference recipes') form. One scalar multiplies every gradient, which XLA fuses into
  AdamW's moment updates; `optax.clip_by_global_norm` selects between the gradient and its clipped copy, so the
  copy is written out and both are read again by each moment update (14 passes over the word-embedding-sized
  arrays per step instead of 10, counted in the compiled MiniLM step; 1.7–1.8% of that step: benchmarks/analysis.md). The update accepts `global_norm=` (extra argument) when the caller has the norm
  already, as the train step does for its finiteness check; otherwise the norm is computed here.
  """

  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    norm = optax.global_norm(updates) if global_norm is None else global_norm
    coefficient = jnp.minimum(1.0, max_norm / (norm + eps))
    return jax.tree.map(lambda g: g * coefficient.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(config: OptimizerConfig, params, axes=None, slices=None) -> optax.GradientTransformationExtraArgs:
  """clip -> AdamW (masked decay, scheduled learning rate); unrouted experts frozen.

  The update takes `global_norm=`, the gradient's global norm if the caller has it (see `clip_by_global_norm`).

  Gradient accumulation lives in the train step (micro-batches inside one jitted step), not here.

  `params` (unboxed or abstract) fixes the decay mask. `slices` (from `routed_slices`) skips what a step's
  texts do not reach; else `axes` (from `expert_axes`) freezes experts whose gradient is all zero.
  """
  chain = []
  if config.max_grad_norm:
    chain.append(clip_by_global_norm(config.max_grad_norm))
  chain.append(optax.adamw(learning_rate_schedule(config), b1=config.beta1, b2=config.beta2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=decay_mask(params)))
  tx = optax.chain(*chain)
  if slices is not None:
    return skip_unrouted(tx, slices)
  if axes is not None:
    tx = freeze_unrouted_experts(tx, axes)
  return tx
