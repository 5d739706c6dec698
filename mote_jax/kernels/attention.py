"""Multi-head attention cores (softmax(q k^T / sqrt(D) + mask) v) in the implementations of
`KernelConfig.attention`.

Shapes: q, k, v [B, N, L, D] (head-major, as the projections produce them); `mask_bias` additive float
[B, 1, 1, L] (0 for a key to attend, a large negative number for padding); the result [B, N, L, D].
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _key_valid(mask_bias: jax.Array) -> jax.Array:
  """bool [B, L]: keys that `mask_bias` lets through (its padding entries are large negative numbers)."""
  return mask_bias[:, 0, 0, :] > jnp.finfo(jnp.float32).min / 2


def einsum_attention(q, k, v, mask_bias, *, dtype, probs_dropout: Callable | None = None, deterministic: bool):
  """The reference: two einsums around a float32 softmax; `probs_dropout` (if given) drops probabilities."""
  d = q.shape[-1]
  q = q * jnp.asarray(d ** -0.5, q.dtype)
  logits = jnp.einsum("bnqd,bnkd->bnqk", q, k, preferred_element_type=jnp.float32) + mask_bias
  if deterministic or probs_dropout is None:
    # Normalise the [B, N, L, D] context rather than the [B, N, L, L] probabilities (one pass less over the
    # largest tensor; the same softmax). Used for inference and whenever no dropout applies.
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    context = jnp.einsum("bnqk,bnkd->bnqd", weights.astype(dtype), v, preferred_element_type=jnp.float32)
    return (context / weights.sum(axis=-1, keepdims=True)).astype(dtype)
  probs = probs_dropout(jax.nn.softmax(logits, axis=-1).astype(dtype))  # [B, N, L, L]
  return jnp.einsum("bnqk,bnkd->bnqd", probs, v)


def dot_product_attention(q, k, v, mask_bias, *, dtype):
  """`jax.nn.dot_product_attention` (its own choice of implementation: cuDNN on GPU where it applies, XLA
  elsewhere), on the [B, L, N, D] layout it takes."""
  t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
  mask = _key_valid(mask_bias)[:, None, None, :]  # [B, 1, 1, L] bool
  out = jax.nn.dot_product_attention(t(q).astype(dtype), t(k).astype(dtype), t(v).astype(dtype), mask=mask)
  return t(out).astype(dtype)


def pallas_flash_attention(q, k, v, mask_bias, *, dtype, block: int = 128):
  """The Pallas TPU flash-attention kernel; padding through segment ids (every query in segment 1, padded keys
  in segment 0). The kernel's segment masks work on whole 128-lane key blocks, so the length is padded up to a
  multiple of `block` (padded keys masked, padded query rows cut off)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, _, length, d = q.shape
  padded = -(-length // block) * block
  valid = _key_valid(mask_bias).astype(jnp.int32)  # [B, L]
  if padded != length:
    widths = ((0, 0), (0, 0), (0, padded - length), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    valid = jnp.pad(valid, ((0, 0), (0, padded - length)))
  sizes = fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                        block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
                        block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
  segments = fa.SegmentIds(q=jnp.ones((b, padded), jnp.int32), kv=valid)
  out = fa.flash_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), segment_ids=segments,
                           sm_scale=d ** -0.5, block_sizes=sizes)
  return out[:, :, :length].astype(dtype)


def attention(q, k, v, mask_bias, *, impl: str, dtype, probs_dropout: Callable | None = None,
              deterministic: bool = True, dropout_rate: float = 0.0):
  """The attention core in implementation `impl` (`KernelConfig.attention`).

  `probs_dropout(probs) -> probs` drops attention probabilities in training (einsum only). The fused kernels
  have no probability dropout: with `dropout_rate > 0` in training they leave it out (a warning, once).
  """
  if impl not in ("einsum", "dot_product", "pallas_flash"):
    raise ValueError(f"KernelConfig.attention={impl!r}: expected 'einsum', 'dot_product' or 'pallas_flash'")
  with jax.named_scope(f"kernel_attention_{impl}"):  # names the kernel in lowered HLO (tests read it)
    if impl == "einsum":
      return einsum_attention(q, k, v, mask_bias, dtype=dtype, probs_dropout=probs_dropout,
                              deterministic=deterministic)
    if not deterministic and dropout_rate > 0 and impl not in _warned:
      _warned.add(impl)
      log.warning("attention %r has no dropout on attention probabilities: attention_dropout=%g is not applied "
                  "(hidden-state dropout is)", impl, dropout_rate)
    fn = dot_product_attention if impl == "dot_product" else pallas_flash_attention
    return fn(q, k, v, mask_bias, dtype=dtype)
