"""Sharding: params born sharded by logical-axis rules, and identical numbers on every mesh layout."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mote_jax.model import MoteConfig, MoteEncoder, init_params
from mote_jax.partitioning import MeshConfig, Partitioner, missing_annotations

CONFIG = MoteConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                    max_position_embeddings=64, tower_mode="mote", pooling="mean", normalize=True)

MESHES = {
    "1 device": (MeshConfig(data=1), 1),
    "8 data": (MeshConfig(data=8), 8),
    "4 data x 2 model": (MeshConfig(data=4, model=2), 8),
    "2 data x 4 model": (MeshConfig(data=2, model=4), 8),
    "2 data x 4 fsdp": (MeshConfig(data=2, fsdp=4), 8),
    "2 data x 2 fsdp x 2 model": (MeshConfig(data=2, fsdp=2, model=2), 8),
}


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, size=(16, 32), dtype=np.int32)
  lengths = rng.integers(4, 33, size=16)
  mask = (np.arange(32)[None] < lengths[:, None]).astype(np.int32)
  labels = np.where((rng.random((16, 32)) < 0.3) & (mask > 0), ids, -100).astype(np.int32)
  return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def _loss(params, batch, config=CONFIG):
  """MLM on passages (passage expert) plus a query-passage similarity term (query expert)."""
  encoder = MoteEncoder(config)
  hidden = encoder.apply({"params": params}, batch["input_ids"], batch["attention_mask"], expert="passage")
  logits = encoder.apply({"params": params}, hidden, expert="passage", method=MoteEncoder.mlm_logits)
  valid = batch["labels"] >= 0
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                            jnp.where(valid, batch["labels"], 0)[..., None], -1)[..., 0]
  mlm = (ce * valid).sum() / valid.sum()
  q = encoder.apply({"params": params}, batch["input_ids"], batch["attention_mask"], expert="query",
                    method=MoteEncoder.embed)
  p = encoder.apply({"params": params}, batch["input_ids"], batch["attention_mask"], expert="passage",
                    method=MoteEncoder.embed)
  return mlm - (q * p).sum(-1).mean(), hidden


def _run(mesh_config, num_devices):
  partitioner = Partitioner.create(mesh_config, devices=jax.devices()[:num_devices])
  params, shardings = partitioner.init(functools.partial(init_params, CONFIG), jax.random.PRNGKey(0))
  batch = partitioner.global_batch(_batch())
  step = partitioner.jit(jax.value_and_grad(_loss, has_aux=True), in_shardings=(shardings, None),
                         out_shardings=((None, partitioner.batch_sharding(3)), shardings))
  (loss, hidden), grads = step(params, batch)
  return partitioner, params, jax.device_get((loss, hidden, grads))


@pytest.fixture(scope="module")
def reference():
  return _run(*MESHES["1 device"])


@pytest.mark.parametrize("name", [name for name in MESHES if name != "1 device"])
def test_outputs_and_gradients_agree_across_meshes(reference, name):
  _, ref_params, (ref_loss, ref_hidden, ref_grads) = reference
  partitioner, params, (loss, hidden, grads) = _run(*MESHES[name])
  # Params were created sharded, from the same key, with the same values as on one device.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(ref_params))
  assert abs(loss - ref_loss) <= 1e-5
  np.testing.assert_allclose(hidden, ref_hidden, atol=1e-5, rtol=0)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=0), grads, ref_grads)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_golden_shardings():
  """Where the rules put the big weights (maxtext-style golden test)."""
  partitioner = Partitioner.create(MeshConfig(data=2, fsdp=2, model=2))
  params, _ = partitioner.init(functools.partial(init_params, CONFIG), jax.random.PRNGKey(0))
  tower = params["tower"]
  specs = {
      "word_embeddings": tower["embeddings"]["word_embeddings"]["embedding"],
      "position_embeddings": tower["embeddings"]["position_embeddings"]["embedding"],
      "query_kernel": tower["encoder"]["layer_0"]["attention"]["query_kernel"],
      "output_kernel": tower["encoder"]["layer_0"]["attention"]["output_kernel"],
      "ffn_in": tower["encoder"]["layer_0"]["ffn"]["intermediate_kernel"],
      "ffn_out": tower["encoder"]["layer_0"]["ffn"]["output_kernel"],
      "ffn_ln": tower["encoder"]["layer_0"]["ffn"]["layer_norm_scale"],
      "mlm_bias": tower["mlm_head"]["bias"],
  }
  assert {k: v.sharding.spec for k, v in specs.items()} == {
      "word_embeddings": P("model", "fsdp"),
      "position_embeddings": P(None, "fsdp"),
      "query_kernel": P("fsdp", "model", None),
      "output_kernel": P("model", None, "fsdp"),
      "ffn_in": P(None, "fsdp", "model"),
      "ffn_out": P(None, "model", "fsdp"),
      "ffn_ln": P(None, "fsdp"),
      "mlm_bias": P("model"),
  }
  # The global batch is split over data and fsdp.
  batch = partitioner.global_batch(_batch())
  assert batch["input_ids"].sharding.spec == P(("data", "fsdp"), None)
  assert batch["input_ids"].shape == (16, 32)


def test_indivisible_dimension_falls_back_to_replication():
  config = CONFIG.replace(intermediate_size=250)  # 250 = 2 x 125: not divisible by 4
  partitioner = Partitioner.create(MeshConfig(data=2, model=4))
  shardings = partitioner.param_shardings(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
  assert shardings["tower"]["encoder"]["layer_0"]["ffn"]["intermediate_kernel"].spec == P(None, None, None)
  assert shardings["tower"]["encoder"]["layer_0"]["attention"]["query_kernel"].spec == P(None, "model", None)


def test_padded_vocabulary_is_split_over_the_model_axis():
  """BERT's 30,522 words (2 x 15,261) are padded to 30,592 (a multiple of 128) inside the model, so a 'model'
  axis of 4 (or 8) splits the word embeddings and the MLM bias instead of replicating them."""
  config = CONFIG.replace(vocab_size=30522)
  assert config.padded_vocab_size == 30592
  boxed = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  assert boxed["tower"]["embeddings"]["word_embeddings"]["embedding"].value.shape == (30592, 64)
  for model in (4, 8):
    partitioner = Partitioner.create(MeshConfig(data=8 // model, model=model))
    shardings = partitioner.param_shardings(boxed)
    assert shardings["tower"]["embeddings"]["word_embeddings"]["embedding"].spec[0] == "model"
    assert shardings["tower"]["mlm_head"]["bias"].spec == P("model")


@pytest.mark.parametrize("tower_mode", ["siamese", "separated", "mote"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_parameter_has_logical_axes(tower_mode, scan_layers):
  config = CONFIG.replace(tower_mode=tower_mode, scan_layers=scan_layers, remat=scan_layers)
  boxed = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  assert missing_annotations(boxed) == []
  assert len(jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))) >= 20
  if scan_layers:
    layer = boxed[config.tower_names[0]]["encoder"]["layers"]["ffn"]["intermediate_kernel"]
    assert layer.names == ("layers", "expert", "embed", "mlp")


def test_unannotated_parameter_is_caught():
  class Leaky(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(x)  # plain Dense: no logical axis names

  boxed = jax.eval_shape(lambda: Leaky().init(jax.random.PRNGKey(0), jnp.ones((1, 4)))["params"])
  assert missing_annotations(boxed) == ["['Dense_0']['bias']", "['Dense_0']['kernel']"]
  with pytest.raises(ValueError, match="without logical-axis names"):
    Partitioner.create(MeshConfig(data=8)).param_shardings(boxed)


def test_mesh_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="needs 6 devices, found 8"):
    MeshConfig(data=3, model=2).axis_sizes(8)
  with pytest.raises(ValueError, match="only one axis may be -1"):
    MeshConfig(data=-1, model=-1).axis_sizes(8)
  assert Partitioner.create(MeshConfig(data=-1, model=2)).mesh.shape == {"data": 4, "model": 2}


@pytest.mark.parametrize("kernel_set", ["xla", "xla+dot_product", "cpu"])
def test_every_kernel_set_agrees_across_meshes_in_training(kernel_set):
  """The training branch (`deterministic=False`, dropout 0) of each kernel set available on CPU: loss, hidden
  states and gradients on a 2 x 2 x 2 (data, fsdp, model) mesh equal one device's to 1e-5."""
  from mote_jax.kernels import KernelConfig
  sets = {"xla": KernelConfig(), "xla+dot_product": KernelConfig(attention="dot_product"),
          "cpu": KernelConfig.for_platform("cpu")}
  config = CONFIG.replace(kernels=sets[kernel_set], hidden_dropout=0.0, attention_dropout=0.0)

  def loss(params, batch):
    encoder = MoteEncoder(config)
    rngs = {"dropout": jax.random.PRNGKey(1)}
    hidden = encoder.apply({"params": params}, batch["input_ids"], batch["attention_mask"], expert="passage",
                           deterministic=False, rngs=rngs)
    logits = encoder.apply({"params": params}, hidden, expert="passage", method=MoteEncoder.mlm_logits)
    valid = batch["labels"] >= 0
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.where(valid, batch["labels"], 0)[..., None], -1)
    return (ce[..., 0] * valid).sum() / valid.sum(), hidden

  results = []
  for mesh_config, devices in (MESHES["1 device"], MESHES["2 data x 2 fsdp x 2 model"]):
    partitioner = Partitioner.create(mesh_config, devices=jax.devices()[:devices])
    params, shardings = partitioner.init(functools.partial(init_params, config), jax.random.PRNGKey(0))
    step = partitioner.jit(jax.value_and_grad(loss, has_aux=True), in_shardings=(shardings, None))
    results.append(jax.device_get(step(params, partitioner.global_batch(_batch()))))
  ((ref_loss, ref_hidden), ref_grads), ((got_loss, hidden), grads) = results
  assert abs(got_loss - ref_loss) <= 1e-5
  np.testing.assert_allclose(hidden, ref_hidden, atol=1e-5, rtol=0)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=0), grads, ref_grads)
