"""`layers.Dropout` (16 random bits per element): the rate, the scaling, determinism and mesh independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mote_jax.model.layers import Dropout


def _apply(rate, x, seed=0, deterministic=False):
  return Dropout(rate).apply({}, x, deterministic, rngs={"dropout": jax.random.PRNGKey(seed)})


@pytest.mark.parametrize("rate", [0.1, 0.45])
def test_drop_rate_and_scaling(rate):
  x = jnp.ones((64, 128, 384), jnp.float32)
  y = np.asarray(_apply(rate, x))
  dropped = np.mean(y == 0)
  # 3.1M Bernoulli draws: the standard error is ~3e-4, so 2e-3 would catch a wrong threshold or bit split.
  assert abs(dropped - rate) < 2e-3, dropped
  np.testing.assert_allclose(y[y != 0], 1.0 / (1.0 - rate), rtol=1e-6)
  # Both 16-bit halves of a word are used and independent: even and odd positions drop at the same rate and
  # are uncorrelated.
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
