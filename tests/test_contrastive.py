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


def _reference_scores(params, batch, temperature):
  """float64 numpy scores [B, B * (1 + N)]: every query against all passages of the batch (1-device embeddings)."""
  encoder = MoteEncoder(CONFIG)
  q = np.asarray(encoder.apply({"params": params}, batch["query_input_ids"], batch["query_attention_mask"],
                               expert="query", method=MoteEncoder.embed), np.float64)
  p = np.asarray(encoder.apply({"params": params}, batch["passage_input_ids"].reshape(B * (1 + N), LP),
                               batch["passage_attention_mask"].reshape(B * (1 + N), LP), expert="passage",
                               method=MoteEncoder.embed), np.float64)
  return q @ p.T / temperature


def _reference_loss(params, batch, temperature):
  """numpy InfoNCE of the batch (1-device embeddings)."""
  scores = _reference_scores(params, batch, temperature)
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


def _judged_batch():
  """_batch() with corpus indices: every passage its own document, except that query 4's positive is the same
  document as query 2's positive (shared judgement); query 0's qrels also judge query 3's positive (column
  3 * (1 + N)) and query 5's second hard negative (column 5 * (1 + N) + 2); query 7's list names a document
  that is not in the batch."""
  batch = _batch(5)
  doc = np.arange(B * (1 + N), dtype=np.int32).reshape(B, 1 + N) + 100
  doc[4, 0] = doc[2, 0]
  batch["passage_input_ids"][4, 0] = batch["passage_input_ids"][2, 0]
  batch["passage_attention_mask"][4, 0] = batch["passage_attention_mask"][2, 0]
  judged = np.full((B, 3), -1, np.int32)
  judged[:, 0] = doc[:, 0]  # every query's own positive
  judged[0, 1:] = doc[3, 0], doc[5, 2]
  judged[7, 1] = 9999
  return dict(batch, passage_doc_index=doc, query_judged_index=judged)


def _masked_reference(params, batch, temperature):
  """float64 numpy InfoNCE where query b's softmax leaves out every column c != b(1+N) whose document is in b's
  judged list (loops, independent of `judged_mask`); returns (loss, the mask)."""
  scores = _reference_scores(params, batch, temperature)
  docs = batch["passage_doc_index"].reshape(-1)
  excluded = np.zeros(scores.shape, bool)
  losses = []
  for b in range(B):
    judged = {int(d) for d in batch["query_judged_index"][b] if d >= 0}
    kept = []
    for c in range(B * (1 + N)):
      if c != b * (1 + N) and int(docs[c]) in judged:
        excluded[b, c] = True
      else:
        kept.append(scores[b, c])
    kept = np.array(kept)
    losses.append(np.log(np.exp(kept - kept.max()).sum()) + kept.max() - scores[b, b * (1 + N)])
  return float(np.mean(losses)), excluded


def test_judged_passages_of_other_rows_leave_the_denominator_on_8_devices(params):
  batch = _judged_batch()
  reference, excluded = _masked_reference(params, batch, 0.5)
  # The cases the batch was built for: query 0 loses query 3's positive and query 5's hard negative, queries 2
  # and 4 lose each other's positive (the same document), nothing else is excluded.
  expected = {(0, 3 * (1 + N)), (0, 5 * (1 + N) + 2), (2, 4 * (1 + N)), (4, 2 * (1 + N))}
  assert set(zip(*np.nonzero(excluded))) == expected
  unmasked_batch = {k: v for k, v in batch.items() if k not in ("passage_doc_index", "query_judged_index")}
  unmasked = _reference_loss(params, unmasked_batch, 0.5)
  assert abs(reference - unmasked) > 1e-3  # the mask changes the loss measurably

  model = ContrastiveModel(CONFIG, ContrastiveConfig(temperature=0.5))
  partitioner = Partitioner.create(MeshConfig(data=8))
  shardings = partitioner.param_shardings(jax.eval_shape(lambda: init_params(CONFIG, jax.random.PRNGKey(0))))
  global_batch = partitioner.global_batch(batch)
  assert global_batch["passage_doc_index"].sharding.spec[0] is not None  # each device holds its rows only
  loss, metrics = partitioner.jit(model.loss_fn)(partitioner.shard(params, shardings), global_batch)
  assert abs(float(loss) - reference) <= 1e-5
  assert abs(float(metrics["masked_per_query"]) - len(expected) / B) <= 1e-6
  # mask_judged=False ignores the index fields: the plain global softmax.
  off = ContrastiveModel(CONFIG, ContrastiveConfig(temperature=0.5, mask_judged=False))
  assert abs(float(jax.jit(off.loss_fn)(params, batch)[0]) - unmasked) <= 1e-5


def test_an_excluded_logit_has_no_gradient():
  batch = _judged_batch()
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((B, 16)), jnp.float32)
  p = jnp.asarray(rng.standard_normal((B * (1 + N), 16)), jnp.float32)
  jacobian = np.asarray(jax.jacrev(lambda p: info_nce_per_query(
      q, p, 1.0, batch["query_judged_index"], batch["passage_doc_index"]))(p))
  norms = np.abs(jacobian).sum(-1)  # [B, B(1+N)]
  assert norms[0, 3 * (1 + N)] == 0 and norms[0, 5 * (1 + N) + 2] == 0 and norms[2, 4 * (1 + N)] == 0
  assert norms[0, 0] > 0 and norms[1, 3 * (1 + N)] > 0  # own positive kept; other queries keep the passage
  assert np.isfinite(jacobian).all()


def test_gradcache_applies_the_same_mask(params):
  batch = _judged_batch()
  plain = ContrastiveModel(CONFIG, ContrastiveConfig(temperature=0.5))
  cached = ContrastiveModel(CONFIG, ContrastiveConfig(temperature=0.5, gradcache_chunks=2))
  loss_a = float(jax.jit(plain.loss_fn)(params, batch)[0])
  (loss_b, _), _ = jax.jit(cached.loss_and_grads)(params, batch)
  assert abs(loss_a - float(loss_b)) <= 1e-5 * abs(loss_a)
