"""BERT building blocks with logical axis names: embeddings, self-attention, textual-expert FFN.

Every parameter is created through `nn.with_logical_partitioning`, so the partitioning module can map it
onto any mesh by rules. Layouts follow HF BERT (post-LayerNorm, exact GELU) so BERT weights load exactly. The
dense products, dropout masks and the attention core go through the kernel set of `MoteConfig.kernels`
(`mote_jax.kernels`), so each platform runs its own implementations of them.

Shape letters: B batch, L sequence length, H hidden size, N heads, D head dim, F FFN size,
E experts in the tower, V vocabulary size.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mote_jax.kernels import resolve
from mote_jax.kernels.attention import attention
from mote_jax.kernels.dense import linear
from mote_jax.kernels.dropout import dropout
from mote_jax.model.config import MoteConfig

# Activation logical axes (parameters use 'vocab', 'embed', 'heads', 'kv', 'mlp', 'expert', 'layers').
BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis, statistics in float32 whatever the compute dtype."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class LayerNorm(nn.Module):
  """BERT LayerNorm with `scale`/`bias` of logical axis 'embed'."""

  config: MoteConfig

  @nn.compact
  def __call__(self, x):  # [..., H] -> [..., H]
    cfg = self.config
    scale = self.param("scale", _partitioned(nn.initializers.ones, ("embed",)), (cfg.hidden_size,),
                       cfg.storage_dtype)
    bias = self.param("bias", _partitioned(nn.initializers.zeros, ("embed",)), (cfg.hidden_size,),
                      cfg.storage_dtype)
    return layer_norm(x, scale, bias, cfg.layer_norm_eps)


class Dropout(nn.Module):
  """Inverted dropout (as `nn.Dropout`) with the keep mask of `kernels.dropout.keep_mask` in implementation
  `impl` (`KernelConfig.dropout`; None: the platform's default set). The rng stream is the layer's 'dropout'
  stream, as with `nn.Dropout`."""

  rate: float
  impl: str | None = None

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    impl = self.impl or resolve(None).dropout
    return dropout(x, self.rate, self.make_rng("dropout"), impl)


class Embeddings(nn.Module):
  """Word + absolute position + token type embeddings, LayerNorm, dropout."""

  config: MoteConfig

  def setup(self):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=cfg.compute_dtype,
                              param_dtype=cfg.storage_dtype)
    # Padded rows (`padded_vocab_size`): no input id reaches them, so they get no gradient.
    self.word_embeddings = embed(cfg.padded_vocab_size, embedding_init=_partitioned(init, ("vocab", "embed")))
    self.position_embeddings = embed(cfg.max_position_embeddings,
                                     embedding_init=_partitioned(init, (None, "embed")))
    self.token_type_embeddings = embed(cfg.type_vocab_size, embedding_init=_partitioned(init, (None, "embed")))
    self.layer_norm = LayerNorm(cfg)
    self.dropout = Dropout(cfg.hidden_dropout, cfg.kernel_set.dropout)

  def __call__(self, input_ids, token_type_ids, deterministic: bool):
    """input_ids, token_type_ids: int [B, L] -> [B, L, H]."""
    length = input_ids.shape[1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings="
                       f"{self.config.max_position_embeddings}")
    # The position rows are a slice (not a lookup) broadcast over the batch: their gradient is then a pad and a
    # sum over the batch, not a scatter-add.
    positions = self.position_embeddings.embedding[:length].astype(self.config.compute_dtype)
    x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + positions
    return self.dropout(self.layer_norm(x), deterministic=deterministic)

  def word_embedding_matrix(self):
    """[V', H] word embeddings (V' = padded_vocab_size), for the tied MLM decoder."""
    return self.word_embeddings.embedding


class SelfAttention(nn.Module):
  """Multi-head self-attention with BERT's output projection, residual and post-LayerNorm."""

  config: MoteConfig

  @nn.compact
  def __call__(self, x, mask_bias, deterministic: bool):
    """x: [B, L, H]; mask_bias: additive float [B, 1, 1, L] (0 keep, large negative drop) -> [B, L, H]."""
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    n, d, dt = cfg.num_heads, cfg.head_dim, cfg.compute_dtype
    param = lambda name, init_fn, names, shape: self.param(  # noqa: E731
        name, _partitioned(init_fn, names), shape, cfg.storage_dtype).astype(dt)

    kernels = cfg.kernel_set

    # Head-major layout ([B, N, L, D]) throughout: both attention products are then plain batched GEMMs (with
    # the sequence-major [B, L, N, D] layout XLA:CPU ran the probabilities @ values product far below its GEMM
    # rate).
    def project(name):  # [B, L, H] -> [B, N, L, D]
      kernel = param(f"{name}_kernel", init, ("embed", "heads", "kv"), (cfg.hidden_size, n, d))
      bias = param(f"{name}_bias", nn.initializers.zeros, ("heads", "kv"), (n, d))
      return (linear(x, kernel, kernels.dense) + bias).transpose(0, 2, 1, 3)

    q, k, v = project("query"), project("key"), project("value")
    probs_dropout = None
    if not deterministic and cfg.attention_dropout > 0:
      drop = Dropout(cfg.attention_dropout, kernels.dropout)
      probs_dropout = lambda probs: drop(probs, deterministic=False)  # noqa: E731
    context = attention(q, k, v, mask_bias, impl=kernels.attention, dtype=dt, probs_dropout=probs_dropout,
                        deterministic=deterministic, dropout_rate=cfg.attention_dropout)  # [B, N, L, D]
    out_kernel = param("output_kernel", init, ("heads", "kv", "embed"), (n, d, cfg.hidden_size))
    out_bias = param("output_bias", nn.initializers.zeros, ("embed",), (cfg.hidden_size,))
    # [B, N, L, D] -> [B, L, N*D] @ [N*D, H]
    b, _, l, _ = context.shape
    out = linear(context.transpose(0, 2, 1, 3).reshape(b, l, n * d), out_kernel.reshape(n * d, -1),
                 kernels.dense) + out_bias
    out = Dropout(cfg.hidden_dropout, kernels.dropout)(out, deterministic=deterministic)
    return LayerNorm(cfg, name="output_layer_norm")(out + x)


class ExpertFFN(nn.Module):
  """Textual experts: BERT's FFN block (dense, GELU, dense, residual, LayerNorm) stacked on an 'expert' axis.

  `expert_index` is a Python int, so slicing the stacked parameters is static and a call computes exactly one
  expert: the cost of a dense BERT FFN, and zero gradient for every other expert.
  """

  config: MoteConfig
  num_experts: int

  @nn.compact
  def __call__(self, x, expert_index: int, deterministic: bool):
    """x: [B, L, H] -> [B, L, H] through expert `expert_index`."""
    cfg = self.config
    if not 0 <= expert_index < self.num_experts:
      raise ValueError(f"expert_index {expert_index} out of range for {self.num_experts} experts")
    init = nn.initializers.normal(cfg.initializer_range)
    e, h, f = self.num_experts, cfg.hidden_size, cfg.intermediate_size
    param = lambda name, init_fn, names, shape: self.param(  # noqa: E731
        name, _partitioned(init_fn, names), shape, cfg.storage_dtype)
    wi = param("intermediate_kernel", init, ("expert", "embed", "mlp"), (e, h, f))
    bi = param("intermediate_bias", nn.initializers.zeros, ("expert", "mlp"), (e, f))
    wo = param("output_kernel", init, ("expert", "mlp", "embed"), (e, f, h))
    bo = param("output_bias", nn.initializers.zeros, ("expert", "embed"), (e, h))
    ln_scale = param("layer_norm_scale", nn.initializers.ones, ("expert", "embed"), (e, h))
    ln_bias = param("layer_norm_bias", nn.initializers.zeros, ("expert", "embed"), (e, h))

    dt, kernels = cfg.compute_dtype, cfg.kernel_set
    hidden = linear(x, wi[expert_index].astype(dt), kernels.dense) + bi[expert_index].astype(dt)  # [B, L, F]
    hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
    hidden = jax.nn.gelu(hidden, approximate=False)
    out = linear(hidden, wo[expert_index].astype(dt), kernels.dense) + bo[expert_index].astype(dt)  # [B, L, H]
    out = Dropout(cfg.hidden_dropout, kernels.dropout)(out, deterministic=deterministic)
    return layer_norm(out + x, ln_scale[expert_index], ln_bias[expert_index], cfg.layer_norm_eps)


class EncoderLayer(nn.Module):
  """One BERT layer: shared self-attention, then the textual expert of the call."""

  config: MoteConfig
  num_experts: int

  @nn.compact
  def __call__(self, x, mask_bias, expert_index: int, deterministic: bool):
    """x: [B, L, H] -> ([B, L, H], None); the (carry, output) pair lets `nn.scan` stack layers."""
    x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
    x = SelfAttention(self.config, name="attention")(x, mask_bias, deterministic)
    x = ExpertFFN(self.config, self.num_experts, name="ffn")(x, expert_index, deterministic)
    return nn.with_logical_constraint(x, BATCH_LENGTH_EMBED), None


class LayerStack(nn.Module):
  """`num_layers` encoder layers as a Python loop (`layer_{i}`) or one `nn.scan` (`layers`, stacked axis 0)."""

  config: MoteConfig
  num_experts: int

  @nn.compact
  def __call__(self, x, mask_bias, expert_index: int, deterministic: bool):
    cfg = self.config
    layer_cls = EncoderLayer
    if cfg.remat:
      # Positions count `self`: (self, x, mask_bias, expert_index, deterministic).
      layer_cls = nn.remat(layer_cls, static_argnums=(3, 4), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, self.num_experts, name="layers")(x, mask_bias, expert_index, deterministic)
      return x
    for i in range(cfg.num_layers):
      x, _ = layer_cls(cfg, self.num_experts, name=f"layer_{i}")(x, mask_bias, expert_index, deterministic)
    return x


class MLMHead(nn.Module):
  """BERT's MLM head: dense + GELU + LayerNorm transform; the decoder is tied to the word embeddings."""

  config: MoteConfig

  @nn.compact
  def __call__(self, hidden, word_embeddings):
    """hidden: [..., H], word_embeddings: [V', H] (the tied decoder, V' = padded_vocab_size) -> logits [..., V']
    (float32; the V' - V padding columns masked to the float32 minimum).

    Logits are accumulated and returned in float32 whatever the compute dtype: the softmax over the
    vocabulary is where bfloat16 rounding would hurt the loss.
    """
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    # The transform is H x H; 'mlp' on the output side lets model parallelism shard it like an FFN.
    x = nn.Dense(cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                 kernel_init=_partitioned(init, ("embed", "mlp")),
                 bias_init=_partitioned(nn.initializers.zeros, ("mlp",)), name="transform")(hidden)
    x = LayerNorm(cfg, name="transform_layer_norm")(jax.nn.gelu(x, approximate=False))
    bias = self.param("bias", _partitioned(nn.initializers.zeros, ("vocab",)), (cfg.padded_vocab_size,),
                      cfg.storage_dtype)
    logits = jnp.dot(x, word_embeddings.astype(cfg.compute_dtype).T, preferred_element_type=jnp.float32)
    logits = logits + bias.astype(jnp.float32)  # [..., padded V]
    if cfg.padded_vocab_size == cfg.vocab_size:
      return logits
    # The padding columns are masked (a finite minimum, so 0 * logit stays 0): no probability, no gradient.
    real = jax.lax.broadcasted_iota(jnp.int32, (cfg.padded_vocab_size,), 0) < cfg.vocab_size
    return jnp.where(real, logits, jnp.finfo(jnp.float32).min)
