"""A dense layer's product, `x @ kernel` over the last axis of x, in the implementations of `KernelConfig.dense`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _product(x, kernel):
  out = kernel.shape[1:]
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[0], -1))
  return y.reshape(*x.shape[:-1], *out)


@jax.custom_vjp
def linear_cpu_gemm(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., K] @ kernel [K, *O] -> [..., *O], with the values and gradients of `jnp.einsum`.

  The backward pass is written out so that the kernel gradient comes straight out in the kernel's own [K, *O]
  orientation: x^T dy over the flattened leading axes, one GEMM that reads both operands as they are. From
  autodiff XLA:CPU computes dy^T x and a transpose, which its layout assignment turns into transposed copies of the
  cotangent fused with the elementwise backward before it (dropout, GELU), recomputing that work with strided
  writes. Other backends lay the transposed product out themselves: use 'xla' there.
  """
  return _product(x, kernel)


def _fwd(x, kernel):
  return _product(x, kernel), (x, kernel)


def _bwd(residuals, dy):
  x, kernel = residuals
  k = kernel.shape[0]
  x2 = x.reshape(-1, k)
  dy2 = dy.reshape(x2.shape[0], -1)
  dx = jnp.dot(dy2, kernel.reshape(k, -1).T).reshape(x.shape)  # [N, O] x [K, O]^T
  dkernel = jnp.dot(x2.T, dy2).reshape(kernel.shape)  # [N, K]^T x [N, O]: contracts the leading axes
  return dx, dkernel


linear_cpu_gemm.defvjp(_fwd, _bwd)


def linear(x: jax.Array, kernel: jax.Array, impl: str = "xla") -> jax.Array:
  """x [..., K] @ kernel [K, *O] -> [..., *O] (no bias); `impl` is `KernelConfig.dense`."""
  if impl not in ("xla", "cpu_gemm"):
    raise ValueError(f"KernelConfig.dense={impl!r}: expected 'xla' or 'cpu_gemm'")
  with jax.named_scope(f"kernel_dense_{impl}"):  # names the kernel in lowered HLO (tests read it)
    return _product(x, kernel) if impl == "xla" else linear_cpu_gemm(x, kernel)
