"""Contrastive fine-tuning loss: global in-batch and hard negatives, routing, GradCache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mote_jax.model import MoteConfig, MoteEncoder, init_params
from mote_jax.objectives.contrastive import ContrastiveConfig, ContrastiveModel, info_nce, info_nce_per_query
from mote_jax.partitioning import MeshConfig, Partitioner

CONFIG = MoteConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                    max_position_embeddings=32, tower_mode="mote", pooling="cls")
B, N, LQ, LP = 8, 2, 8, 16  # 8 queries, each with a positive and 2 hard negatives


def _batch(seed=0):
  rng = np.random.default_rng(seed)

  def texts(shape, length):
    ids = rng.integers(5, 512, size=shape + (length,), dtype=np.int32)
    lengths = rng.integers(3, length + 1, size=shape)
    mask = (np.arange(length) < lengths[..., None]).astype(np.int32)
    return ids * mask, mask

  q_ids, q_mask = texts((B,), LQ)
  p_ids, p_mask = texts((B, 1 + N), LP)
  return {"query_input_ids": q_ids, "query_attention_mask": q_mask, "passage_input_ids": p_ids,
          "passage_attention_mask": p_mask}


@pytest.fixture(scope="module")
def params():
  return nn.unbox(init_params(CONFIG, jax.random.PRNGKey(0)))


def _reference_loss(params, batch, temperature):
  """numpy: every query against all B * (1 + N) passages (1-device embeddings)."""
  encoder = MoteEncoder(CONFIG)
  q = np.asarray(encoder.apply({"params": params}, batch["query_input_ids"], batch["query_attention_mask"],
                               expert="query", method=MoteEncoder.embed), np.float64)
  p = np.asarray(encoder.apply({"params": params}, batch["passage_input_ids"].reshape(B * (1 + N), LP),
                               batch["passage_attention_mask"].reshape(B * (1 + N), LP), expert="passage",
                               method=MoteEncoder.embed), np.float64)
  scores = q @ p.T / temperature
  assert scores.shape == (B, B * (1 + N))
  logz = np.log(np.exp(scores - scores.max(1, keepdims=True)).sum(1)) + scores.max(1)
  return float(np.mean(logz - scores[np.arange(B), np.arange(B) * (1 + N)]))


@pytest.mark.parametrize("mesh", [MeshConfig(data=8), MeshConfig(data=4, model=2), MeshConfig(data=2, fsdp=4)])
def test_global_loss_on_8_devices_equals_full_softmax(params, mesh):
  model = ContrastiveModel(CONFIG, ContrastiveConfig(temperature=1.0))
  batch = _batch()
  reference = _reference_loss(params, batch, 1.0)
  assert 1.0 < reference < 10.0  # a loss of order log(B * (1 + N)): 1e-5 is a meaningful tolerance
  one_device = float(jax.jit(model.loss_fn)(params, batch)[0])
  partitioner = Partitioner.create(mesh)
  shardings = partitioner.param_shardings(jax.eval_shape(lambda: init_params(CONFIG, jax.random.PRNGKey(0))))
  sharded = partitioner.shard(params, shardings)
  global_batch = partitioner.global_batch(batch)
  assert global_batch["passage_input_ids"].sharding.spec[0] is not None  # rows really are split
  loss, metrics = partitioner.jit(model.loss_fn)(sharded, global_batch)
  assert abs(float(loss) - one_device) <= 1e-5
  assert abs(float(loss) - reference) <= 1e-5


def test_each_query_softmax_covers_every_passage_of_the_batch():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, 16)), jnp.float32)
  p = jnp.asarray(rng.standard_normal((B * (1 + N), 16)), jnp.float32)
  # d(loss of query i) / d(passage j) for every i, j: non-zero for all B * (1 + N) passages, including the
  # positives and hard negatives of the other queries (which live on other devices when sharded).
  jacobian = jax.jacrev(lambda p: info_nce_per_query(q, p, 1.0))(p)
  assert jacobian.shape == (B, B * (1 + N), 16)
  assert np.all(np.abs(np.asarray(jacobian)).sum(-1) > 0)


def _query_loss(q, p, i):
  scores = q @ p.T
  return jax.nn.logsumexp(scores[i]) - scores[i, i * (1 + N)]


def test_info_nce_matches_per_query_losses():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((B, 16)), jnp.float32)
  p = jnp.asarray(rng.standard_normal((B * (1 + N), 16)), jnp.float32)
  loss, metrics = info_nce(q, p, 1.0)
  expected = np.mean([float(_query_loss(q, p, i)) for i in range(B)])
  assert abs(float(loss) - expected) < 1e-5
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_queries_train_the_query_expert_and_passages_the_passage_expert(params):
  model = ContrastiveModel(CONFIG)
  batch = _batch()
  encoder = MoteEncoder(CONFIG)

  def passage_only(prm):
    p = encoder.apply({"params": prm}, batch["passage_input_ids"].reshape(-1, LP),
                      batch["passage_attention_mask"].reshape(-1, LP), expert="passage", method=MoteEncoder.embed)
    return (p ** 2).sum()

  grads = jax.grad(passage_only)(params)
  ffn = grads["tower"]["encoder"]["layer_0"]["ffn"]["intermediate_kernel"]
  assert np.abs(ffn[0]).max() == 0 and np.abs(ffn[1]).max() > 0
  grads = jax.grad(lambda prm: model.loss_fn(prm, batch)[0])(params)
  ffn = grads["tower"]["encoder"]["layer_0"]["ffn"]["intermediate_kernel"]
  assert np.abs(ffn[0]).max() > 0 and np.abs(ffn[1]).max() > 0


def test_gradcache_matches_plain_gradients(params):
  batch = _batch(3)
  plain = ContrastiveModel(CONFIG, ContrastiveConfig(temperature=0.05))
  cached = ContrastiveModel(CONFIG, ContrastiveConfig(temperature=0.05, gradcache_chunks=4))
  (loss_a, _), grads_a = jax.jit(plain.loss_and_grads)(params, batch)
  (loss_b, _), grads_b = jax.jit(cached.loss_and_grads)(params, batch)
  assert abs(float(loss_a) - float(loss_b)) <= 1e-5 * abs(float(loss_a))
  # Temperature 0.05 scales gradients up to ~1e2: compare each parameter relative to its largest gradient.
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * max(np.abs(np.asarray(a)).max(), 1e-3)
