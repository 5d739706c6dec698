"""Loss primitives of CoT-MAE pre-training: masked-token cross-entropy and the DupMAE bag-of-words loss.

Every loss is returned as sums and counts (not means), so that losses over several streams, micro-batches or
devices combine exactly: the mean is taken once, at the end (`pretrain.finalize`). All arithmetic on logits
is float32 whatever the compute dtype.

Shape letters: B batch, L sequence length, P gathered (masked) positions, H hidden size, V vocabulary size.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100  # label of a position that is not predicted (torch CrossEntropyLoss's default)

# [PAD], [UNK], [CLS], [SEP], [MASK] of the bert-base-uncased vocabulary (also all-MiniLM-L6-v2's).
BERT_UNCASED_SPECIAL_IDS: tuple[int, ...] = (0, 100, 101, 102, 103)

BOW_ACTIVATIONS = ("none", "log1p_relu")


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Cross-entropy of `logits` [..., V] at the positions of `labels` [...] that are not IGNORE_INDEX.

  Returns float32 scalars {"sum": summed CE, "correct": argmax hits, "count": predicted positions}; the mean
  `sum / count` equals torch `CrossEntropyLoss(ignore_index=-100)` (which is NaN for count 0, where
  `finalize` gives 0).

  A hit is `target logit >= max logit` (argmax == label up to exact ties): the max is the one logsumexp needs
  anyway, while a separate argmax is a (value, index) reduction over the vocabulary that XLA:CPU runs slowly
  (the benchmarks' variants section measures it).
  """
  return {name: value.sum() for name, value in token_cross_entropy_terms(logits, labels).items()}


def token_cross_entropy_terms(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Per-position terms of `token_cross_entropy`: float32 [...] {"sum": CE (0 where not predicted), "correct":
  1 for a hit, "count": 1 where predicted}; their sums over any set of positions are that set's sums."""
  logits = logits.astype(jnp.float32)
  valid = labels != IGNORE_INDEX
  safe_labels = jnp.where(valid, labels, 0)  # any in-range id; the position is masked out below
  top = jax.lax.stop_gradient(logits.max(axis=-1))
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, log_z - target, 0.0)
  correct = jnp.where(valid, target >= top, False)
  return {"sum": nll, "correct": correct.astype(jnp.float32), "count": valid.astype(jnp.float32)}


def gather_masked(hidden: jax.Array, labels: jax.Array, max_predictions: int) -> tuple[jax.Array, jax.Array]:
  """The first `max_predictions` predicted positions of each row: ([B, P, H] hidden, [B, P] labels).

  Computing MLM logits only there saves the [B, L, V] logits tensor (P is ~0.15-0.5 L). Rows with fewer
  predicted positions are filled with unpredicted ones, whose label stays IGNORE_INDEX; predicted positions
  beyond `max_predictions` are dropped (count them with `dropped_predictions`), so choose P from the masking
  rate and the maximum length.
  """
  masked = labels != IGNORE_INDEX
  # A stable sort of "not masked" keys puts each row's masked positions first, in sequence order.
  order = jnp.argsort(jnp.logical_not(masked).astype(jnp.int32), axis=-1, stable=True)[:, :max_predictions]
  return (jnp.take_along_axis(hidden, order[..., None], axis=1),
          jnp.take_along_axis(labels, order, axis=1))


def dropped_predictions(labels: jax.Array, max_predictions: int) -> jax.Array:
  """How many predicted positions [B, L] `gather_masked(..., max_predictions)` leaves out (float32 scalar)."""
  per_row = (labels != IGNORE_INDEX).sum(-1)
  return jnp.maximum(per_row - max_predictions, 0).sum().astype(jnp.float32)


def restore_input_ids(input_ids: jax.Array, labels: jax.Array) -> jax.Array:
  """The unmasked text: the label where a position is predicted, the input id elsewhere ([B, L] int)."""
  return jnp.where(labels != IGNORE_INDEX, labels, input_ids)


def ordinary_token_mask(input_ids: jax.Array, attention_mask: jax.Array,
                        special_ids: Sequence[int]) -> jax.Array:
  """bool [B, L]: attended positions whose (unmasked) id is not special ([CLS], [SEP], [PAD], ...)."""
  special = jnp.isin(input_ids, jnp.asarray(tuple(special_ids), dtype=input_ids.dtype))
  return (attention_mask > 0) & jnp.logical_not(special)


def bow_targets(input_ids: jax.Array, token_mask: jax.Array, vocab_size: int) -> jax.Array:
  """Bag-of-words target distribution [B, V] (float32) of the ordinary tokens of unmasked `input_ids` [B, L].

  Each distinct id present at a `token_mask` position gets weight 1 / (number of distinct ids), so a row sums
  to 1 (0 for a row without ordinary tokens). DupMAE's collator gives each distinct id 1 / (number of tokens)
  instead, which scales a row's loss by distinct / total tokens; normalising makes it a proper cross-entropy
  whose size does not depend on how repetitive a text is.
  """
  batch = input_ids.shape[0]
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], input_ids.shape)
  present = jnp.zeros((batch, vocab_size), jnp.float32).at[rows, input_ids].max(token_mask.astype(jnp.float32))
  return present / jnp.maximum(present.sum(-1, keepdims=True), 1.0)


def bow_representation(logits: jax.Array, token_mask: jax.Array, activation: str = "none") -> jax.Array:
  """Max-pool token logits [B, L, V] over the `token_mask` [B, L] positions -> [B, V] (float32).

  activation "none" pools the raw MLM logits, as DupMAE's official pre-training code does
  (`ot_embedding(lm_out.logits[:, 1:], ...)`); "log1p_relu" pools log(1 + relu(logits)), the SPLADE-style
  non-negative term weights of the sparse representation used for retrieval. A row without any ordinary
  position pools to a constant (and its target is empty, so it adds nothing to the loss).
  """
  if activation not in BOW_ACTIVATIONS:
    raise ValueError(f"bow activation {activation!r}: expected one of {BOW_ACTIVATIONS}")
  logits = logits.astype(jnp.float32)
  if activation == "log1p_relu":
    logits = jnp.log1p(jax.nn.relu(logits))
  # A finite floor (not -inf) keeps an empty row finite: log_softmax of a constant row is uniform.
  floor = jnp.finfo(jnp.float32).min
  return jnp.where(token_mask[..., None], logits, floor).max(axis=1)


def bow_loss(representation: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
  """Multi-label softmax cross-entropy -sum_v targets * log_softmax(representation), summed over rows.

  representation, targets: [B, V]. Returns float32 scalars {"sum", "count"}: count is the number of rows with
  a non-empty bag, the rows the loss is averaged over.
  """
  log_probs = jax.nn.log_softmax(representation.astype(jnp.float32), axis=-1)
  has_bag = targets.sum(-1) > 0
  per_row = -(targets * log_probs).sum(-1)
  return {"sum": jnp.where(has_bag, per_row, 0.0).sum(), "count": has_bag.sum().astype(jnp.float32)}
