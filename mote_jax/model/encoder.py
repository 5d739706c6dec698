"""The MoTE encoder: towers of BERT layers whose FFN blocks are textual experts.

Tower modes (`MoteConfig.tower_mode`):
  siamese    one tower, one expert: queries and passages share every parameter.
  separated  two towers (`query_tower`, `passage_tower`) that share nothing.
  mote       one tower: shared embeddings, attention and MLM head; per-type FFN experts.

The text type of a call (`expert="query" | "passage"`) is static, so every call costs exactly a dense BERT.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mote_jax.model.config import EXPERTS, MoteConfig
from mote_jax.model.layers import Embeddings, LayerStack, MLMHead


def attention_bias(attention_mask: jax.Array, dtype=jnp.float32) -> jax.Array:
  """[B, L] 1/0 mask -> additive [B, 1, 1, L] bias (0 where attended, dtype min where padded)."""
  return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


def pool(hidden: jax.Array, attention_mask: jax.Array, mode: str) -> jax.Array:
  """[B, L, H] hidden states -> [B, H] (float32): the [CLS] state or the mean over non-padding tokens."""
  hidden = hidden.astype(jnp.float32)
  if mode == "cls":
    return hidden[:, 0]
  if mode == "mean":
    mask = attention_mask.astype(jnp.float32)[..., None]
    return (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
  raise ValueError(f"pooling mode {mode!r}: expected 'cls' or 'mean'")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Row-wise L2 normalisation with the same floor as torch.nn.functional.normalize."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Tower(nn.Module):
  """Embeddings + layer stack (+ MLM head) with `num_experts` textual experts in every layer."""

  config: MoteConfig
  num_experts: int

  def setup(self):
    self.embeddings = Embeddings(self.config)
    self.encoder = LayerStack(self.config, self.num_experts)
    self.mlm_head = MLMHead(self.config)

  def __call__(self, input_ids, attention_mask, token_type_ids, expert_index: int, deterministic: bool):
    """int [B, L] inputs -> hidden states [B, L, H] (compute dtype)."""
    x = self.embeddings(input_ids, token_type_ids, deterministic)
    return self.encoder(x, attention_bias(attention_mask), expert_index, deterministic)

  def mlm_logits(self, hidden):
    """[..., H] -> [..., V] float32 logits."""
    return self.mlm_head(hidden, self.embeddings.word_embedding_matrix())

  def embed_tokens(self, input_ids, token_type_ids, deterministic: bool):
    """Token embeddings only (word + position + type, LayerNorm): [B, L] -> [B, L, H]."""
    return self.embeddings(input_ids, token_type_ids, deterministic)


class MoteEncoder(nn.Module):
  """Stateless MoTE encoder; pick the method with `apply(..., method=...)`.

  Methods take `expert` as a static keyword ("query" or "passage") that selects the tower and expert.
  """

  config: MoteConfig

  def setup(self):
    cfg = self.config
    if cfg.tower_mode == "separated":
      self.query_tower = Tower(cfg, 1)
      self.passage_tower = Tower(cfg, 1)
    else:
      self.tower = Tower(cfg, cfg.num_experts)

  def _route(self, expert: str) -> tuple[Tower, int]:
    name, index = self.config.route(expert)
    return getattr(self, name), index

  def __call__(self, input_ids, attention_mask, token_type_ids=None, *, expert: str,
               deterministic: bool = True):
    """Last hidden states [B, L, H] for int [B, L] `input_ids` / `attention_mask` (1 = token, 0 = pad)."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    tower, index = self._route(expert)
    return tower(input_ids, attention_mask, token_type_ids, index, deterministic)

  def embed(self, input_ids, attention_mask, token_type_ids=None, *, expert: str,
            deterministic: bool = True):
    """Pooled text embeddings [B, H] (float32), L2-normalised if `config.normalize`."""
    hidden = self(input_ids, attention_mask, token_type_ids, expert=expert, deterministic=deterministic)
    pooled = pool(hidden, attention_mask, self.config.pooling)
    return l2_normalize(pooled) if self.config.normalize else pooled

  def mlm_logits(self, hidden, *, expert: str):
    """MLM logits [..., V] (float32) from hidden states [..., H] through the head of `expert`'s tower."""
    tower, _ = self._route(expert)
    return tower.mlm_logits(hidden)

  def embed_tokens(self, input_ids, token_type_ids=None, *, expert: str, deterministic: bool = True):
    """Input token embeddings [B, L, H] of `expert`'s tower (the CoT-MAE decoder reads these)."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    tower, _ = self._route(expert)
    return tower.embed_tokens(input_ids, token_type_ids, deterministic)

  def init_all(self, input_ids, attention_mask):
    """Touches every tower, expert and head, so `init(..., method=MoteEncoder.init_all)` creates all params."""
    outputs = []
    for expert in EXPERTS:
      hidden = self(input_ids, attention_mask, expert=expert)
      outputs.append(self.mlm_logits(hidden, expert=expert))
    return outputs


def init_params(config: MoteConfig, rng: jax.Array, batch_shape=(1, 8)):
  """Boxed (logically partitioned) parameters of every tower and expert; call under jit for big models."""
  ids = jnp.zeros(batch_shape, jnp.int32)
  return MoteEncoder(config).init(rng, ids, jnp.ones_like(ids), method=MoteEncoder.init_all)["params"]
