"""Inverted-dropout keep masks in the implementations of `KernelConfig.dropout`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mix32(x: jax.Array) -> jax.Array:
  """lowbias32 (C. Wellons' integer-hash search): a bijection of uint32 with near-ideal avalanche (every input bit
  flips every output bit with probability ~1/2)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major position of each element of `shape`, built from iotas (so SPMD partitions it: each shard
  gets its own global positions)."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return index


def hashed_bits(seeds: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 [*shape] pseudo-random bits: a keyed hash of each element's (row, column) position.

  seeds: uint32 [2], fresh per call. Element (r, c), r the row-major index over the leading axes and c the last
  axis's, gets mix(mix(r ^ s0) ^ c * 0x9E3779B9 ^ s1), with `mix` the lowbias32 bijection. The row word is
  computed once per row ([*lead, 1]) and the element hash fuses into its consumer, so the bits cost a handful of
  integer ops per element and are never written out (threefry2x32 costs ~20 rounds per 64 bits in a fusion of its
  own). Within a row the hashed inputs are distinct (the column is multiplied by an odd constant), so a row's bits
  are a keyed bijection of its positions; the XOR with the row word keeps two rows from being shifted copies of
  each other. Rows and columns must each number fewer than 2^32.
  """
  *lead, n = shape
  rows = 1
  for d in lead:
    rows *= d
  if rows >= 2**32 or n >= 2**32:
    raise ValueError(f"hashed_bits: shape {shape} has 2^32 rows or columns or more (row-major rows over the "
                     f"leading axes, columns along the last)")
  row_word = _mix32(_flat_index((*lead, 1)) ^ seeds[0])
  column = jax.lax.broadcasted_iota(jnp.uint32, (*(1,) * len(lead), n), len(lead)) * jnp.uint32(0x9E3779B9)
  return _mix32(row_word ^ column ^ seeds[1])


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...], impl: str = "jax_random") -> jax.Array:
  """bool [*shape]: True where an element is kept, with probability 1 - rate; `impl` is `KernelConfig.dropout`.

  'jax_random': `jax.random.bernoulli` on `rng` (whatever PRNG implementation the key has, so it follows
  `jax_default_prng_impl`). 'hashed': `hashed_bits` keyed by two 32-bit seeds drawn from `rng`; the probability
  is `rate` rounded to 2^-32 and the mask depends on the global shape only, so not on the mesh.
  """
  if impl not in ("jax_random", "hashed"):
    raise ValueError(f"KernelConfig.dropout={impl!r}: expected 'jax_random' or 'hashed'")
  with jax.named_scope(f"kernel_dropout_{impl}"):  # names the kernel in lowered HLO (tests read it)
    if impl == "jax_random":
      return jax.random.bernoulli(rng, 1.0 - rate, shape)
    seeds = jax.random.bits(rng, (2,), jnp.uint32)
    return hashed_bits(seeds, shape) >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


def dropout(x: jax.Array, rate: float, rng: jax.Array, impl: str = "jax_random") -> jax.Array:
  """Inverted dropout of `x` (kept elements scaled by 1 / (1 - rate))."""
  if rate == 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = keep_mask(rng, rate, x.shape, impl)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)
