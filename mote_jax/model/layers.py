"""BERT building blocks with logical axis names: embeddings, self-attention, textual-expert FFN.

Every parameter is created through `nn.with_logical_partitioning`, so the partitioning module can map it
onto any mesh by rules. Layouts follow HF BERT (post-LayerNorm, exact GELU) so BERT weights load exactly.

Shape letters: B batch, L sequence length, H hidden size, N heads, D head dim, F FFN size,
E experts in the tower, V vocabulary size.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

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


@jax.custom_vjp
def linear(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., K] @ kernel [K, *O] -> [..., *O] (a dense layer's product, no bias).

  The value and the gradients are those of `jnp.einsum`; the backward pass is written out so that the kernel
  gradient comes straight out in the kernel's own [K, *O] orientation: x^T dy over the flattened leading
  axes, one GEMM that reads both operands as they are. Autodiff of the einsum gave XLA:CPU dy^T x followed by
  a transpose, which layout assignment turned into transposed copies of the cotangent fused with the
  elementwise backward before it (dropout, GELU), recomputing that work with strided writes: in a bert-base
  pre-training step those copies took ~200 ms (benchmarks/analysis.md; RESULTS.md's 7a row
  autodiff-weight-grads undoes this on every run).
  """
  return _linear(x, kernel)


def _linear(x, kernel):
  out = kernel.shape[1:]
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[0], -1))
  return y.reshape(*x.shape[:-1], *out)


def _linear_fwd(x, kernel):
  return _linear(x, kernel), (x, kernel)


def _linear_bwd(residuals, dy):
  x, kernel = residuals
  k = kernel.shape[0]
  x2 = x.reshape(-1, k)
  dy2 = dy.reshape(x2.shape[0], -1)
  dx = jnp.dot(dy2, kernel.reshape(k, -1).T).reshape(x.shape)  # [N, O] x [K, O]^T
  dkernel = jnp.dot(x2.T, dy2).reshape(kernel.shape)  # [N, K]^T x [N, O]: contracts the leading axes
  return dx, dkernel


linear.defvjp(_linear_fwd, _linear_bwd)


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

  seeds: uint32 [2], fresh per call (drawn with threefry from the layer's rng). Element (r, c), r the row-major
  index over the leading axes and c the last axis's, gets mix(mix(r ^ s0) ^ c * 0x9E3779B9 ^ s1), with `mix`
  the lowbias32 bijection. The row word is computed once per row ([*lead, 1]) and the element hash fuses into
  its consumer, so the bits cost a handful of integer ops per element and are never written out, where
  threefry2x32 costs ~20 rounds per 64 bits in a fusion of its own. Within a row the hashed inputs are distinct
  (the column is multiplied by an odd constant), so a row's bits are a keyed bijection of its positions; the
  XOR (not a sum) with the row word keeps two rows from being shifted copies of each other. Rows and columns
  must each number fewer than 2^32.
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


class Dropout(nn.Module):
  """Inverted dropout, as `nn.Dropout`, with `hashed_bits` (a keyed integer hash of each element's position)
  in place of one threefry2x32 evaluation per element.

  Only the two 32-bit seeds come from threefry, so the layer's rng stream (and `fold_in` per step) work as
  with `nn.Dropout`. On CPU, threefry bits (even 16 per element, two elements per word, this layer before)
  cost 4–5% of the MiniLM pre-training step, more than dropout altogether costs with hashed bits:
  benchmarks/analysis.md. The drop probability is `rate` rounded to 1/2^32. The bits depend on the global
  shape only, so the mask does not depend on the mesh.
  """

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    seeds = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
    keep = hashed_bits(seeds, x.shape) >= jnp.uint32(min(round(self.rate * 2**32), 2**32 - 1))
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x)).astype(x.dtype)


class Embeddings(nn.Module):
  """Word + absolute position + token type embeddings, LayerNorm, dropout."""

  config: MoteConfig

  def setup(self):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=cfg.compute_dtype,
                              param_dtype=cfg.storage_dtype)
    self.word_embeddings = embed(cfg.vocab_size, embedding_init=_partitioned(init, ("vocab", "embed")))
    self.position_embeddings = embed(cfg.max_position_embeddings,
                                     embedding_init=_partitioned(init, (None, "embed")))
    self.token_type_embeddings = embed(cfg.type_vocab_size, embedding_init=_partitioned(init, (None, "embed")))
    self.layer_norm = LayerNorm(cfg)
    self.dropout = Dropout(cfg.hidden_dropout)

  def __call__(self, input_ids, token_type_ids, deterministic: bool):
    """input_ids, token_type_ids: int [B, L] -> [B, L, H]."""
    length = input_ids.shape[1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings="
                       f"{self.config.max_position_embeddings}")
    # The position rows are a slice (not a lookup) broadcast over the batch by `add_bias`: their gradient is then
    # a pad and a GEMV, not a scatter-add and a reduction over the batch axis.
    positions = self.position_embeddings.embedding[:length].astype(self.config.compute_dtype)
    x = add_bias(self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids), positions)
    return self.dropout(self.layer_norm(x), deterministic=deterministic)

  def word_embedding_matrix(self):
    """[V, H] word embeddings, for the tied MLM decoder."""
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

    # Head-major layout ([B, N, L, D]) throughout: both attention products are then plain batched GEMMs. With
    # the sequence-major [B, L, N, D] layout XLA:CPU ran the probs @ values product at ~33 GFLOP/s, two thirds
    # of an encoding pass (benchmarks/RESULTS.md, encoding).
    def project(name):  # [B, L, H] -> [B, N, L, D]
      kernel = param(f"{name}_kernel", init, ("embed", "heads", "kv"), (cfg.hidden_size, n, d))
      bias = param(f"{name}_bias", nn.initializers.zeros, ("heads", "kv"), (n, d))
      return add_bias(linear(x, kernel), bias).transpose(0, 2, 1, 3)

    q, k, v = project("query"), project("key"), project("value")
    q = q * jnp.asarray(d ** -0.5, dt)
    logits = jnp.einsum("bnqd,bnkd->bnqk", q, k, preferred_element_type=jnp.float32) + mask_bias
    if deterministic:
      # Inference: normalise the [B, N, L, D] context instead of the [B, N, L, L] probabilities (one pass less
      # over the largest tensor; the same softmax).
      weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
      context = (jnp.einsum("bnqk,bnkd->bnqd", weights.astype(dt), v, preferred_element_type=jnp.float32)
                 / weights.sum(axis=-1, keepdims=True)).astype(dt)
    else:
      probs = jax.nn.softmax(logits, axis=-1).astype(dt)  # [B, N, L, L]
      probs = Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
      context = jnp.einsum("bnqk,bnkd->bnqd", probs, v)
    out_kernel = param("output_kernel", init, ("heads", "kv", "embed"), (n, d, cfg.hidden_size))
    out_bias = param("output_bias", nn.initializers.zeros, ("embed",), (cfg.hidden_size,))
    # [B, N, L, D] -> [B, L, N*D] @ [N*D, H]
    b, _, l, _ = context.shape
    out = add_bias(linear(context.transpose(0, 2, 1, 3).reshape(b, l, n * d), out_kernel.reshape(n * d, -1)),
                   out_bias)
    out = Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
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

    dt = cfg.compute_dtype
    hidden = add_bias(linear(x, wi[expert_index].astype(dt)), bi[expert_index].astype(dt))  # [B, L, F]
    hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
    hidden = jax.nn.gelu(hidden, approximate=False)
    out = add_bias(linear(hidden, wo[expert_index].astype(dt)), bo[expert_index].astype(dt))  # [B, L, H]
    out = Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
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
    """hidden: [..., H], word_embeddings: [V, H] (the tied decoder) -> logits [..., V] (float32).

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
    bias = self.param("bias", _partitioned(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                      cfg.storage_dtype)
    logits = tied_logits(x, word_embeddings.astype(cfg.compute_dtype))
    return add_bias(logits, bias.astype(jnp.float32))


@jax.custom_vjp
def tied_logits(x: jax.Array, word_embeddings: jax.Array) -> jax.Array:
  """x [..., H] @ word_embeddings [V, H]^T -> float32 logits [..., V] (the tied MLM decoder's product).

  Values and gradients are those of `jnp.dot(x, word_embeddings.T)`; the backward pass is written out so that
  the embedding gradient dlogits^T x is one GEMM that reads the [N, V] cotangent as it is (contracting its
  leading axis). From autodiff's transpose, XLA:CPU's layout assignment wrote the cotangent out transposed
  ([V, N], a copy fused into the softmax backward) to feed a YNNPACK GEMM: slower than the plain dot on the
  untransposed cotangent: 14–30 ms of a ~0.5 s MiniLM pre-training step (benchmarks/analysis.md; RESULTS.md's 7a
  row autodiff-vocab-projection undoes this on every run).
  """
  return _tied_logits(x, word_embeddings)


def _tied_logits(x, word_embeddings):
  return jnp.dot(x, word_embeddings.T, preferred_element_type=jnp.float32)


def _tied_logits_fwd(x, word_embeddings):
  return _tied_logits(x, word_embeddings), (x, word_embeddings)


def _tied_logits_bwd(residuals, dlogits):
  x, word_embeddings = residuals
  x2 = x.reshape(-1, x.shape[-1])  # [N, H]
  d2 = dlogits.reshape(x2.shape[0], -1)  # [N, V] float32; the products accumulate in float32, as autodiff's
  dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
  dx = dot(d2, word_embeddings, (((1,), (0,)), ((), ()))).reshape(x.shape)  # [N, V] x [V, H]
  # [N, V]^T x [N, H] as one dot contracting the leading axes: no transposed copy of the cotangent.
  dembed = dot(d2, x2, (((0,), (0,)), ((), ())))
  return dx.astype(x.dtype), dembed.astype(word_embeddings.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


@jax.custom_vjp
def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """x [..., *S] + bias [*S], the bias broadcast over x's leading axes (a dense layer's or the MLM head's output
  bias, the position embeddings over the batch).

  Values and gradients are those of `x + bias`; the bias gradient is written out as a GEMV, ones [R] @ dy
  [R, prod(S)] over the R = prod(leading axes) rows, where autodiff gives XLA a reduction over the leading
  axes. XLA:CPU runs those reductions far below memory speed: with the MLM head's [N, V] column reduction a
  MiniLM pre-training step took 0.657 s against 0.624 s, and the position embeddings' sum over the batch axis of
  [8, 128, 384] takes ~1.3 ms alone against ~0.1 ms as a GEMV (benchmarks/analysis.md; RESULTS.md's 7a row
  bias-grad-by-reduce undoes this on every run).
  """
  return _add_bias(x, bias)


def _add_bias(x, bias):
  if bias.ndim > x.ndim or x.shape[x.ndim - bias.ndim:] != bias.shape:
    raise ValueError(f"add_bias: bias shape {bias.shape} is not the trailing shape of x {x.shape}")
  return x + bias


def _add_bias_fwd(x, bias):
  # Residuals for shapes and dtypes only: the bias (a live parameter, nothing is copied) and a scalar of x's dtype.
  return _add_bias(x, bias), (bias, jnp.zeros((), x.dtype))


def _add_bias_bwd(residuals, g):
  bias, x_scalar = residuals
  rows = g.reshape(-1, bias.size)
  ones = jnp.ones((rows.shape[0],), rows.dtype)
  dbias = jnp.dot(ones, rows, preferred_element_type=jnp.float32).reshape(bias.shape)
  return g.astype(x_scalar.dtype), dbias.astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)
