"""Contrastive fine-tuning (DPR / Tevatron): InfoNCE over every passage of the global batch.

Batch (int32):
  query_input_ids, query_attention_mask        [B, Lq]
  passage_input_ids, passage_attention_mask    [B, 1 + n, Lp]   (the positive first, then n hard negatives)
  optional, for false-negative masking:
  passage_doc_index                            [B, 1 + n]   each passage's corpus index (-1: unknown)
  query_judged_index                           [B, J]       corpus indices of every passage the qrels judge for
                                                            the query, any grade (-1: padding)

Queries go through the query expert, passages through the passage expert. The loss is written in the global
jit view: scores are [B, B * (1 + n)], so each query's softmax runs over the positives and hard negatives of
every device and every host; under a data-parallel mesh XLA all-gathers the passage embeddings.

False negatives: BEIR qrels often judge several passages for a query, and queries share them, so a passage of
another query's row (or a hard negative) may be judged relevant to this query. With `mask_judged` (the default)
and the two index fields present, every column whose passage is judged for the query, other than the query's own
positive, is dropped from its softmax denominator. The mask is built in the global view from the gathered
[B * (1 + n)] passage indices, so it covers the passages of every device and host.

`gradcache_chunks > 1` (GradCache, Gao et al. 2021) bounds activation memory for large batches: embeddings are
computed chunk by chunk without keeping activations, the loss gradient with respect to the embeddings is taken,
and each chunk is re-encoded under `jax.vjp` to push that gradient into the parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from mote_jax.model.config import MoteConfig
from mote_jax.model.encoder import MoteEncoder

PyTree = Any
Batch = Mapping[str, jax.Array]
FINETUNE_FIELDS = ("query_input_ids", "query_attention_mask", "passage_input_ids", "passage_attention_mask")


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
  """temperature: scores are q.p / temperature (1.0 for Tevatron's unnormalised [CLS] dot product; ~0.05 for
  L2-normalised embeddings). gradcache_chunks: encode in this many chunks with GradCache (1 = plain).
  mask_judged: drop passages judged for a query (other than its own positive) from its denominator, when the
  batch carries `passage_doc_index` and `query_judged_index` (see the module docstring)."""

  temperature: float = 1.0
  gradcache_chunks: int = 1
  mask_judged: bool = True

  def __post_init__(self):
    if self.temperature <= 0:
      raise ValueError(f"ContrastiveConfig.temperature={self.temperature}: expected > 0")
    if self.gradcache_chunks < 1:
      raise ValueError(f"ContrastiveConfig.gradcache_chunks={self.gradcache_chunks}: expected >= 1")


def _scores(q, p, temperature):
  """[B, H] x [B(1+n), H] -> [B, B(1+n)] float32 scores and each query's positive column."""
  b = q.shape[0]
  if p.shape[0] % b:
    raise ValueError(f"{p.shape[0]} passages do not form equal groups for {b} queries")
  scores = jnp.einsum("bh,ph->bp", q.astype(jnp.float32), p.astype(jnp.float32)) / temperature
  return scores, jnp.arange(b) * (p.shape[0] // b)


def judged_mask(query_judged: jax.Array, passage_index: jax.Array, targets: jax.Array) -> jax.Array:
  """[B, J] judged corpus indices per query (-1 padded), [P] corpus index per passage column (-1 unknown), [B]
  positive columns -> [B, P] bool: True where the column's passage is judged for the query and is not the
  query's own positive column (those columns leave the softmax denominator)."""
  hit = (query_judged[:, :, None] == passage_index[None, None, :]).any(1) & (passage_index >= 0)[None, :]
  own = jnp.arange(passage_index.shape[0])[None, :] == targets[:, None]
  return hit & ~own


def _masked_scores(q, p, temperature, query_judged, passage_index):
  scores, targets = _scores(q, p, temperature)
  mask = None
  if query_judged is not None:
    if passage_index is None:
      raise ValueError("query_judged needs passage_index (the corpus index of every passage column)")
    mask = judged_mask(query_judged, passage_index.reshape(-1), targets)
    scores = jnp.where(mask, -jnp.inf, scores)
  return scores, targets, mask


def info_nce_per_query(q: jax.Array, p: jax.Array, temperature: float, query_judged: jax.Array | None = None,
                       passage_index: jax.Array | None = None) -> jax.Array:
  """[B] cross-entropy of each query against all B * (1 + n) passages (see `info_nce`)."""
  scores, targets, _ = _masked_scores(q, p, temperature, query_judged, passage_index)
  return optax.softmax_cross_entropy_with_integer_labels(scores, targets)


def info_nce(q: jax.Array, p: jax.Array, temperature: float, query_judged: jax.Array | None = None,
             passage_index: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """q: [B, H] query embeddings; p: [B * (1 + n), H] passage embeddings, grouped per query, positive first.
  query_judged [B, J] / passage_index [B * (1 + n)] or [B, 1 + n]: optional corpus indices for false-negative
  masking (`judged_mask`).

  Returns the mean cross-entropy of each query against all B * (1 + n) passages (less its masked ones), and
  metrics.
  """
  b = q.shape[0]
  group = p.shape[0] // b
  scores, targets, mask = _masked_scores(q, p, temperature, query_judged, passage_index)  # [B, B(1+n)]
  loss = optax.softmax_cross_entropy_with_integer_labels(scores, targets).mean()
  positive = scores[jnp.arange(b), targets]
  own = scores.reshape(b, b, group)[jnp.arange(b), jnp.arange(b)]  # [B, 1 + n]: each query's own group
  kept = jnp.ones(scores.shape, bool) if mask is None else ~mask
  own_kept = kept.reshape(b, b, group)[jnp.arange(b), jnp.arange(b)][:, 1:]
  finite = jnp.where(kept, scores, 0.0)
  metrics = {
      "accuracy": (scores.argmax(-1) == targets).mean(),
      "positive_score": positive.mean() * temperature,
      "hard_negative_score": ((jnp.where(own_kept, own[:, 1:], 0.0).sum() / jnp.maximum(own_kept.sum(), 1))
                              * temperature if group > 1 else jnp.zeros(())),
      "score_gap": (positive - finite.sum(-1) / kept.sum(-1)).mean() * temperature,
      "masked_per_query": (~kept).sum(-1).mean().astype(jnp.float32),
  }
  return loss, metrics


@dataclasses.dataclass(frozen=True)
class ContrastiveModel:
  """Stateless fine-tuning model over MoteEncoder params."""

  config: MoteConfig
  objective: ContrastiveConfig = ContrastiveConfig()

  @property
  def encoder(self) -> MoteEncoder:
    return MoteEncoder(self.config)

  def _embed(self, params, ids, mask, expert, rng, deterministic):
    rngs = None if deterministic else {"dropout": rng}
    return self.encoder.apply({"params": params}, ids, mask, expert=expert, deterministic=deterministic,
                              rngs=rngs, method=MoteEncoder.embed)

  def _inputs(self, batch: Batch):
    missing = [name for name in FINETUNE_FIELDS if name not in batch]
    if missing:
      raise KeyError(f"fine-tuning batch lacks fields {missing} (has {sorted(batch)})")
    p_ids, p_mask = batch["passage_input_ids"], batch["passage_attention_mask"]
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731  [B, 1+n, Lp] -> [B(1+n), Lp]
    return batch["query_input_ids"], batch["query_attention_mask"], flat(p_ids), flat(p_mask)

  def _judged(self, batch: Batch) -> dict[str, jax.Array | None]:
    """info_nce's masking arguments: the batch's index fields when `mask_judged` and both are present."""
    if not self.objective.mask_judged or "query_judged_index" not in batch:
      return {}
    if "passage_doc_index" not in batch:
      raise KeyError("fine-tuning batch has query_judged_index but lacks passage_doc_index")
    return {"query_judged": batch["query_judged_index"], "passage_index": batch["passage_doc_index"]}

  def loss_fn(self, params: PyTree, batch: Batch, rng: jax.Array | None = None,
              deterministic: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(InfoNCE loss, metrics) of a global batch; see the module docstring for the fields."""
    if not deterministic and rng is None:
      raise ValueError("loss_fn(deterministic=False) needs a dropout `rng`")
    q_ids, q_mask, p_ids, p_mask = self._inputs(batch)
    q_rng, p_rng = (None, None) if rng is None else jax.random.split(rng)
    q = self._embed(params, q_ids, q_mask, "query", q_rng, deterministic)
    p = self._embed(params, p_ids, p_mask, "passage", p_rng, deterministic)
    return info_nce(q, p, self.objective.temperature, **self._judged(batch))

  def loss_and_grads(self, params: PyTree, batch: Batch, rng: jax.Array | None = None,
                     deterministic: bool = True):
    """((loss, metrics), grads); with `gradcache_chunks > 1` through GradCache, else plain autodiff."""
    k = self.objective.gradcache_chunks
    if k == 1:
      return jax.value_and_grad(self.loss_fn, has_aux=True)(params, batch, rng, deterministic)
    q_ids, q_mask, p_ids, p_mask = self._inputs(batch)
    q_rng, p_rng = (jax.random.PRNGKey(0),) * 2 if rng is None else jax.random.split(rng)

    def chunks(x):
      if x.shape[0] % k:
        raise ValueError(f"gradcache_chunks={k} does not divide the batch dimension {x.shape[0]}")
      return x.reshape(k, x.shape[0] // k, *x.shape[1:])

    def embed_all(ids, mask, expert, key):  # [k, b, L] -> [k * b, H], no activations kept
      def one(args):
        i, chunk_ids, chunk_mask = args
        return self._embed(params, chunk_ids, chunk_mask, expert, jax.random.fold_in(key, i), deterministic)
      out = jax.lax.map(one, (jnp.arange(k), chunks(ids), chunks(mask)))
      return jax.lax.stop_gradient(out.reshape(-1, out.shape[-1]))

    q = embed_all(q_ids, q_mask, "query", q_rng)
    p = embed_all(p_ids, p_mask, "passage", p_rng)
    (loss, metrics), (dq, dp) = jax.value_and_grad(
        lambda q, p: info_nce(q, p, self.objective.temperature, **self._judged(batch)), argnums=(0, 1), has_aux=True)(q, p)

    def backprop(ids, mask, expert, key, d_emb):  # sum over chunks of vjp(chunk encoding)(d_emb chunk)
      def body(grads, args):
        i, chunk_ids, chunk_mask, chunk_d = args
        f = lambda prm: self._embed(prm, chunk_ids, chunk_mask, expert, jax.random.fold_in(key, i),  # noqa
                                    deterministic)
        _, vjp = jax.vjp(f, params)
        return jax.tree.map(jnp.add, grads, vjp(chunk_d)[0]), None
      zeros = jax.tree.map(jnp.zeros_like, params)
      grads, _ = jax.lax.scan(body, zeros, (jnp.arange(k), chunks(ids), chunks(mask), chunks(d_emb)))
      return grads

    grads = jax.tree.map(jnp.add, backprop(q_ids, q_mask, "query", q_rng, dq),
                         backprop(p_ids, p_mask, "passage", p_rng, dp))
    return (loss, metrics), grads
