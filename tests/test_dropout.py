"""`layers.Dropout` (hashed bits per element): the rate, the scaling, the bits against a NumPy reference of the
hash, their independence, determinism and mesh independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mote_jax.kernels.dropout import hashed_bits
from mote_jax.model.layers import Dropout


def _apply(rate, x, seed=0, deterministic=False):
  return Dropout(rate, "hashed").apply({}, x, deterministic, rngs={"dropout": jax.random.PRNGKey(seed)})


@pytest.mark.parametrize("rate", [0.1, 0.45])
def test_drop_rate_and_scaling(rate):
  x = jnp.ones((64, 128, 384), jnp.float32)
  y = np.asarray(_apply(rate, x))
  dropped = np.mean(y == 0)
  # 3.1M Bernoulli draws: the standard error is ~3e-4, so 2e-3 would catch a wrong threshold.
  assert abs(dropped - rate) < 2e-3, dropped
  np.testing.assert_allclose(y[y != 0], 1.0 / (1.0 - rate), rtol=1e-6)
  # Neighbouring positions drop at the same rate and are uncorrelated.
  even, odd = (y[..., 0::2] == 0), (y[..., 1::2] == 0)
  assert abs(even.mean() - odd.mean()) < 3e-3
  assert abs(np.mean(even & odd) - even.mean() * odd.mean()) < 2e-3


def test_odd_last_axis_and_other_dtypes():
  x = jnp.ones((7, 5, 33), jnp.bfloat16)
  y = _apply(0.5, x)
  assert y.shape == x.shape and y.dtype == jnp.bfloat16
  assert set(np.unique(np.asarray(y, np.float32))) <= {0.0, 2.0}


def test_deterministic_and_degenerate_rates():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 8))
  np.testing.assert_array_equal(_apply(0.1, x, deterministic=True), x)
  np.testing.assert_array_equal(_apply(0.0, x), x)
  np.testing.assert_array_equal(_apply(1.0, x), jnp.zeros_like(x))
  np.testing.assert_array_equal(_apply(0.3, x, seed=5), _apply(0.3, x, seed=5))
  assert not np.array_equal(_apply(0.3, x, seed=5), _apply(0.3, x, seed=6))


def test_mask_does_not_depend_on_the_mesh():
  x = jnp.ones((16, 32, 64), jnp.float32)
  reference = np.asarray(jax.jit(lambda v: _apply(0.2, v))(x))
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  sharded = jax.device_put(x, NamedSharding(mesh, P("data", None, "model")))
  out = jax.jit(lambda v: _apply(0.2, v), out_shardings=NamedSharding(mesh, P("data", None, "model")))(sharded)
  np.testing.assert_array_equal(np.asarray(out), reference)


def _mix32_numpy(x):
  # lowbias32 as published (https://nullprogram.com/blog/2018/07/31/), in NumPy uint32 arithmetic.
  with np.errstate(over="ignore"):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def test_hashed_bits_match_a_numpy_reference_of_the_hash():
  seeds = np.array([0xDEADBEEF, 0x01234567], np.uint32)
  shape = (3, 5, 37)
  rows = np.arange(15, dtype=np.uint32).reshape(3, 5, 1)
  with np.errstate(over="ignore"):
    column = np.arange(37, dtype=np.uint32) * np.uint32(0x9E3779B9)
  expected = _mix32_numpy(_mix32_numpy(rows ^ seeds[0]) ^ column ^ seeds[1])
  np.testing.assert_array_equal(np.asarray(jax.jit(hashed_bits, static_argnums=1)(jnp.asarray(seeds), shape)),
                                expected)
  # A 1-D shape is one row.
  np.testing.assert_array_equal(np.asarray(hashed_bits(jnp.asarray(seeds), (37,))), expected[0, 0])


def test_hashed_bits_are_uniform_and_independent():
  seeds = jax.random.bits(jax.random.PRNGKey(3), (2,), jnp.uint32)
  other = jax.random.bits(jax.random.PRNGKey(4), (2,), jnp.uint32)
  bits = np.asarray(hashed_bits(seeds, (2048, 512)))
  # Every one of the 32 bits is set half the time (1M draws each: standard error 5e-4).
  ones = ((bits[..., None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=(0, 1))
  assert np.all(np.abs(ones - 0.5) < 3e-3), ones
  # The top byte is uniform: chi-square with 255 degrees of freedom (mean 255, sd 22.6).
  counts = np.bincount((bits >> 24).ravel(), minlength=256)
  expected = bits.size / 256
  assert ((counts - expected) ** 2 / expected).sum() < 255 + 5 * 22.6
  # Uniform variates from neighbouring columns, neighbouring rows and another seed pair are uncorrelated
  # (standard error of a correlation over ~1M pairs: 1e-3).
  u = bits.astype(np.float64) / 2**32
  v = np.asarray(hashed_bits(other, (2048, 512))).astype(np.float64) / 2**32
  for a, b in [(u[:, :-1], u[:, 1:]), (u[:-1], u[1:]), (u, v), (u[:, :-1], v[:, 1:])]:
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5e-3
  # No row repeats another row's bits in another order (what a shared 32-bit row state would cause).
  assert len({row.tobytes() for row in np.sort(bits, axis=1)}) == bits.shape[0]


def test_hashed_bits_reject_more_than_2_to_the_32_rows():
  seeds = jnp.zeros((2,), jnp.uint32)
  with pytest.raises(ValueError, match="2\\^32 rows"):
    jax.eval_shape(lambda s: hashed_bits(s, (2**16, 2**16, 8)), seeds)
  assert jax.eval_shape(lambda s: hashed_bits(s, (2**16, 2**15, 8)), seeds).shape == (2**16, 2**15, 8)
