"""Gradient clipping in PyTorch's form, as one scalar coefficient that fuses into the optimizer's update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def scalar_clip_by_global_norm(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformationExtraArgs:
  """`torch.nn.utils.clip_grad_norm_` as a transformation: every gradient times min(1, max_norm / (norm + eps)).

  The form the reference (PyTorch) recipes use. One scalar multiplies every gradient, which XLA fuses into
  AdamW's moment updates, where `optax.clip_by_global_norm` selects between the gradient and a clipped copy (so
  the copy may be written out and both read again). The update accepts `global_norm=` (an extra argument) when
  the caller has the norm already, as the train step does for its finiteness check; otherwise it is computed.
  """

  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    norm = optax.global_norm(updates) if global_norm is None else global_norm
    coefficient = jnp.minimum(1.0, max_norm / (norm + eps))
    return jax.tree.map(lambda g: g * coefficient.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def clip_by_global_norm(max_norm: float, kind: str) -> optax.GradientTransformation:
  """The gradient clip of `KernelConfig.grad_clip`: 'optax' (`optax.clip_by_global_norm`) or 'scalar'."""
  if kind == "optax":
    return optax.clip_by_global_norm(max_norm)
  if kind == "scalar":
    return scalar_clip_by_global_norm(max_norm)
  raise ValueError(f"KernelConfig.grad_clip={kind!r}: expected 'optax' or 'scalar'")
