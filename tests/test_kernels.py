"""Kernel sets (`mote_jax.kernels`): the set chosen per platform, the attention implementations against the
einsum reference (values and gradients; the Pallas TPU kernel in Pallas interpret mode), `jax.random` dropout
following `jax_default_prng_impl`, and the jitted train step lowered for TPU and CUDA carrying the fused attention
and none of the CPU kernels."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mote_jax import kernels
from mote_jax.kernels import KernelConfig
from mote_jax.kernels.attention import attention
from mote_jax.kernels.dropout import keep_mask
from mote_jax.model import MoteConfig


def test_kernel_set_per_platform():
  tpu, gpu, cpu = (KernelConfig.for_platform(p) for p in ("tpu", "gpu", "cpu"))
  # Accelerators: plain XLA autodiff, jax.random dropout, optax clipping, the fused attention.
  assert tpu == KernelConfig(dense="xla", dropout="jax_random", attention="pallas_flash", grad_clip="optax")
  assert gpu == KernelConfig(dense="xla", dropout="jax_random", attention="dot_product", grad_clip="optax")
  assert KernelConfig.for_platform("cuda") == KernelConfig.for_platform("rocm") == gpu
  # CPU: the tuned set; the reference set is plain XLA with einsum attention.
  assert cpu == kernels.CPU and cpu.attention == "einsum" and cpu.dense == "xla" and cpu.dropout == "hashed"
  assert kernels.XLA == KernelConfig()
  # None resolves to the set of the backend the model runs on (CPU here), in the model and in the trainer.
  assert jax.default_backend() == "cpu"
  assert kernels.resolve(None) == cpu and MoteConfig().kernel_set == cpu
  assert kernels.resolve(None, "tpu") == tpu and kernels.resolve(gpu, "tpu") == gpu
  with pytest.raises(ValueError, match="unknown platform 'metal'"):
    KernelConfig.for_platform("metal")
  with pytest.raises(ValueError, match="KernelConfig.attention='flash'"):
    KernelConfig(attention="flash")
  # A JSON record (dataclasses.asdict) reads back into a KernelConfig.
  assert MoteConfig(kernels=dataclasses.asdict(tpu)).kernels == tpu


def _qkv(length=40, padded=(0, 13)):
  """q, k, v [2, 3, L, 16] and an additive key mask with `padded[b]` padded keys at the end of row b."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, (2, 3, length, 16)) for key in keys)
  valid = np.arange(length)[None] < (length - np.asarray(padded))[:, None]
  mask_bias = jnp.where(jnp.asarray(valid)[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
  return q, k, v, mask_bias, valid


def _reference(q, k, v, valid):
  """Softmax attention in float64 NumPy, padded keys excluded."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bnqd,bnkd->bnqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(valid[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnqk,bnkd->bnqd", probs / probs.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("impl", ["einsum", "dot_product", "pallas_flash"])
@pytest.mark.parametrize("length", [40, 128])
def test_attention_implementations_match_the_reference(impl, length):
  """Values against a float64 NumPy softmax attention, gradients against the einsum implementation's, with
  padded keys (the Pallas TPU kernel runs in Pallas interpret mode on CPU; 40 tokens exercise its padding up to
  a 128-key block)."""
  from jax.experimental.pallas import tpu as pltpu
  q, k, v, mask_bias, valid = _qkv(length)
  fn = lambda q, k, v: attention(q, k, v, mask_bias, impl=impl, dtype=jnp.float32)  # noqa: E731
  ref = lambda q, k, v: attention(q, k, v, mask_bias, impl="einsum", dtype=jnp.float32)  # noqa: E731
  cotangent = jax.random.normal(jax.random.PRNGKey(1), q.shape)
  with pltpu.force_tpu_interpret_mode() if impl == "pallas_flash" else _nothing():
    out, vjp = jax.vjp(fn, q, k, v)
    grads = vjp(cotangent)
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, valid), atol=1e-5, rtol=0)
  _, ref_vjp = jax.vjp(ref, q, k, v)
  for got, want in zip(grads, ref_vjp(cotangent)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)
  # Padded keys get no gradient.
  assert not np.asarray(grads[1])[1, :, length - 13:].any()


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def test_attention_rejects_an_unknown_implementation():
  q, k, v, mask_bias, _ = _qkv()
  with pytest.raises(ValueError, match="KernelConfig.attention='cudnn'"):
    attention(q, k, v, mask_bias, impl="cudnn", dtype=jnp.float32)


@pytest.mark.parametrize("prng_impl", ["threefry2x32", "rbg"])
def test_jax_random_dropout_follows_the_default_prng_impl(prng_impl):
  """'jax_random' masks are `jax.random.bernoulli` on the layer's key, whatever PRNG implementation
  `jax_default_prng_impl` gives keys (TPU users set 'rbg'); the keep rate is 1 - rate."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", prng_impl)
  try:
    key = jax.random.PRNGKey(3)
    assert key.shape == ((4,) if prng_impl == "rbg" else (2,))
    mask = keep_mask(key, 0.25, (64, 512), "jax_random")
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(jax.random.bernoulli(key, 0.75, (64, 512))))
    assert abs(float(mask.mean()) - 0.75) < 0.01
  finally:
    jax.config.update("jax_default_prng_impl", previous)
  with pytest.raises(ValueError, match="KernelConfig.dropout='philox'"):
    keep_mask(key, 0.25, (4, 4), "philox")


@pytest.fixture(scope="module")
def tiny_step_parts():
  from benchmarks import data, jax_step
  shape = jax_step.build_shape("tiny")
  return shape, jax_step.decoder_params(shape), data.pair_batch(2, 40)


@pytest.mark.slow
@pytest.mark.parametrize("platform, export_platform", [("tpu", "tpu"), ("gpu", "cuda"), ("cpu", "cpu")])
def test_train_step_lowered_per_platform_carries_its_kernel_set(tiny_step_parts, platform, export_platform):
  """The real jitted train step (`build_trainer`'s, dropout on) with `platform`'s kernel set, exported for that
  platform on this CPU machine: TPU carries the Pallas flash-attention custom call, TPU and CUDA the fused
  attention and none of the CPU kernels (custom-VJP products, hashed dropout); the CPU set carries its own (so
  the check can fail). The kernels name themselves in the HLO through `jax.named_scope`."""
  from jax import export

  from benchmarks import jax_step
  shape, decoder, batch = tiny_step_parts
  kernel_set = KernelConfig.for_platform(platform)
  step = jax_step.JaxStep(shape, decoder, objective=jax_step.production_objective(40), batch_size=2, length=40,
                          kernels=kernel_set)
  assert step.config.kernels == kernel_set and step.trainer.kernels == kernel_set
  exported = export.export(step.step_fn, platforms=(export_platform,))(step.state, step.global_batch(batch))
  text = exported.mlir_module()
  cpu_kernels = ("kernel_dense_cpu_gemm", "kernel_dropout_hashed")
  if platform == "cpu":  # the CPU set: hashed dropout; plain XLA products (cpu_gemm only where selected)
    assert "kernel_dropout_hashed" in text and "kernel_dense_xla" in text and "kernel_attention_einsum" in text
    assert "kernel_dense_cpu_gemm" not in text
    return
  assert not any(name in text for name in cpu_kernels)
  assert "kernel_dense_xla" in text and "kernel_dropout_jax_random" in text
  assert f"kernel_attention_{kernel_set.attention}" in text and "kernel_attention_einsum" not in text
  if platform == "tpu":
    assert "tpu_custom_call" in text


def _mote_imports(path):
  import ast
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
    elif isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
  return {n for n in names if n.startswith("mote_jax")}


@pytest.mark.parametrize("package, allowed", [
    ("kernels", ("mote_jax.kernels",)),
    ("model", ("mote_jax.kernels", "mote_jax.model")),
    ("training", ("mote_jax.kernels", "mote_jax.partitioning", "mote_jax.host_malloc", "mote_jax.training")),
])
def test_no_imports_from_a_lower_layer_up(package, allowed):
  """kernels < model; kernels, partitioning < training: none of them imports a layer above it (objectives, data,
  jobs, ...). The optimizer knows nothing of routing, and layers.py stays a file of BERT modules."""
  from pathlib import Path

  import mote_jax
  root = Path(mote_jax.__file__).parent
  for path in sorted((root / package).glob("*.py")):
    wrong = {name for name in _mote_imports(path) if not name.startswith(allowed)}
    assert not wrong, f"{path.relative_to(root)} imports {sorted(wrong)}"
  optimizer = (root / "training" / "optimizer.py").read_text()
  assert not any("routing" in name for name in _mote_imports(root / "training" / "optimizer.py"))
  assert "expert" not in optimizer.lower() and "Routed" not in optimizer
  assert len((root / "model" / "layers.py").read_text().splitlines()) <= 300
