"""MoTE routing in the optimizer: what a step's texts reach, and what happens to the experts they do not reach.

An expert that no text of a step was routed to gets an all-zero gradient. PyTorch's AdamW skips such a parameter
entirely (its .grad is None): no weight decay, no moment decay. Two ways give the same semantics for the expert
slices of stacked parameters (logical axis 'expert'), so a pre-training run without query texts leaves the query
expert exactly where it started instead of shrinking it by weight decay:

  static   (`Routing.static`) the routing is known when the step is traced (the jobs' streams fix which text
           types a step has): the optimizer runs on the routed slices only (`skip_unrouted`), the trainer norms
           and writes only those slices, and an unrouted expert (or a whole unused tower in `separated` mode)
           gets no optimizer work at all.
  dynamic  (`Routing.dynamic`) the routing is discovered from the gradients (all-zero expert slices are frozen,
           `freeze_unrouted_experts`), at the cost of a full optimizer pass plus a reduction over every expert
           gradient.

`Routing()` (no routing) treats every parameter as reached. The optimizer itself (`training/optimizer.py`) knows
nothing of this: `Routing.wrap` wraps it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

EXPERT_AXIS = "expert"


def _is_boxed(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def expert_axes(boxed_params) -> Any:
  """Per parameter, the index of its 'expert' axis (None when it has none), from the logical names."""
  return jax.tree.map(lambda box: box.names.index(EXPERT_AXIS) if EXPERT_AXIS in box.names else None,
                      boxed_params, is_leaf=_is_boxed)


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


def _is_routed(x) -> bool:
  return isinstance(x, Routed)


def routed_slices(boxed_params, routes: Iterable[tuple[str, int]]) -> Any:
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

  return jax.tree_util.tree_map_with_path(one, boxed_params, is_leaf=_is_boxed)


def take_routed(slices, tree) -> Any:
  """The routed part of every leaf of `tree` (a tree shaped like the parameters)."""
  return jax.tree.map(lambda sl, x: sl.take(x), slices, tree, is_leaf=_is_routed)


def pad_routed(slices, parts, like) -> Any:
  """Inverse of `take_routed`: each routed part back in zeros of its leaf's shape in `like` (arrays or shapes)."""
  return jax.tree.map(lambda sl, x, ref: sl.pad(x, tuple(getattr(ref, "shape", ref))), slices, parts, like,
                      is_leaf=_is_routed)


def apply_routed_updates(params, updates, slices) -> Any:
  """`optax.apply_updates(params, updates)` for updates that are zero outside the routed parts (`skip_unrouted`'s):
  only the routed parts are read and written, not whole expert stacks."""
  return jax.tree.map(lambda sl, p, u: sl.apply(p, u), slices, params, updates, is_leaf=_is_routed)


def skip_unrouted(inner: optax.GradientTransformation, slices) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that it sees only the routed part of each parameter (`slices` from `routed_slices`).

  The rest keeps its value and optimizer moments and gets no optimizer work: its update is zero (padded back to
  the parameter's shape; `apply_routed_updates` adds only the routed part, where `optax.apply_updates` would make
  one pass over the whole parameter). The state keeps the full parameter shapes, so checkpoints do not depend
  on the routing.
  """

  def update(grads, state, params=None, **extra_args):
    # A `Routed` per state leaf: the parameter's for Adam's moments, whole (Routed()) for counts and the like.
    state_slices = optax.tree_utils.tree_map_params(inner, lambda _, sl: sl, state, slices,
                                                    transform_non_params=lambda _: Routed(), is_leaf=_is_routed)
    sub_state = take_routed(state_slices, state)
    sub_updates, sub_new = optax.with_extra_args_support(inner).update(
        take_routed(slices, grads), sub_state, None if params is None else take_routed(slices, params),
        **extra_args)
    updates = pad_routed(slices, sub_updates, grads)
    new_state = jax.tree.map(lambda sl, old, new: sl.put(old, new), state_slices, state, sub_new,
                             is_leaf=_is_routed)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def freeze_unrouted_experts(inner: optax.GradientTransformation, axes) -> optax.GradientTransformationExtraArgs:
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


class Routing:
  """The routing the trainer applies around its optimizer and its gradient (see the module docstring).

  Build it with `Routing.static(boxed_params, routes)`, `Routing.dynamic(boxed_params)` or `Routing()` (none).
  """

  def __init__(self, slices: Any = None, axes: Any = None):
    if slices is not None and axes is not None:
      raise ValueError("Routing: give static slices or dynamic expert axes, not both")
    self.slices = slices
    self.axes = axes

  @classmethod
  def static(cls, boxed_params, routes: Iterable[tuple[str, int]]) -> "Routing":
    """Routing known when tracing: `routes` are the (tower, expert index) pairs the step's texts go to."""
    return cls(slices=routed_slices(boxed_params, routes))

  @classmethod
  def dynamic(cls, boxed_params) -> "Routing":
    """Experts whose gradient comes out all zero are frozen (a full optimizer pass, then masked back)."""
    return cls(axes=expert_axes(boxed_params))

  def wrap(self, tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`tx` restricted to what the step reaches."""
    if self.slices is not None:
      return skip_unrouted(tx, self.slices)
    if self.axes is not None:
      return freeze_unrouted_experts(tx, self.axes)
    return optax.with_extra_args_support(tx)

  def _slices_like(self, tree):
    return self.slices if self.slices is not None else jax.tree.map(lambda _: Routed(), tree)

  def take(self, grads) -> Any:
    """The routed parts of a parameter-shaped tree (the whole tree without static routing)."""
    return take_routed(self._slices_like(grads), grads)

  def pad(self, parts, like) -> Any:
    """Inverse of `take`: parts back in zeros of `like`'s shapes (arrays or shape tuples)."""
    return pad_routed(self._slices_like(parts), parts, like)

  def apply_updates(self, params, updates) -> Any:
    """`optax.apply_updates` that reads and writes the routed parts only."""
    return apply_routed_updates(params, updates, self._slices_like(params))
