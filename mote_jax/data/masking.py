"""BERT masking of token sequences for CoT-MAE: a stateless `mask_tokens` and the seqio preprocessor `mask_pairs`.

Selection. Among the maskable positions (everything but the tokenizer's special tokens [PAD], [UNK], [CLS],
[SEP], [MASK]), exactly `floor(ratio * n + u)` units are chosen uniformly, u ~ U[0, 1): the count is the ratio
with stochastic rounding, so the expected masked fraction is exactly `ratio` even for short sequences. A unit is
a word piece, or with `whole_word=True` a whole word (a piece and its following '##' pieces); every piece of a
chosen word is masked.

Replacement (BERT's 80/10/10): each chosen piece independently becomes [MASK] with `mask_token_prob`, a random
real word piece (never a bracketed token) with `random_token_prob`, and stays unchanged otherwise. Labels hold the
original id at chosen positions and -100 elsewhere.

Determinism. `mask_tokens` is a pure function of the ids and a stateless seed [2]. In a task, `mask_pairs` gets
the seed of the k-th example of the stream from seqio (`seqio.map_over_dataset(num_seeds=1)`: the k-th element of
a random stream seeded by the `seed` passed to `Task.get_dataset`), so masks depend only on (seed, k): replaying
the stream reproduces them, and a repeated epoch (a larger k) is masked afresh.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import seqio
import tensorflow as tf

from mote_jax.data.vocabulary import VocabInfo

IGNORE_LABEL = -100  # label of unmasked positions (PyTorch/HF convention; the loss skips it)


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """Masking of a pair: the anchor (encoder input) at `encoder_ratio`, the context (decoder input) at
  `decoder_ratio`, CoT-MAE's 0.30 / 0.45 and whole words by default."""

  encoder_ratio: float = 0.30
  decoder_ratio: float = 0.45
  whole_word: bool = True  # as the reference (HF DataCollatorForWholeWordMask)
  mask_token_prob: float = 0.8
  random_token_prob: float = 0.1

  def __post_init__(self):
    for name in ("encoder_ratio", "decoder_ratio", "mask_token_prob", "random_token_prob"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"MaskingConfig.{name}={value}: expected a value in [0, 1]")
    if self.mask_token_prob + self.random_token_prob > 1.0:
      raise ValueError(f"MaskingConfig.mask_token_prob + random_token_prob = "
                       f"{self.mask_token_prob + self.random_token_prob} > 1")


def mask_tokens(token_ids: tf.Tensor, seed: tf.Tensor, *, ratio: float, info: VocabInfo, whole_word: bool = False,
                mask_token_prob: float = 0.8, random_token_prob: float = 0.1) -> tuple[tf.Tensor, tf.Tensor]:
  """Masks one sequence.

  Args:
    token_ids: int32 [L], ids of one sequence (special tokens and padding included or not).
    seed: int [2], stateless seed.
    ratio: fraction of maskable units (pieces, or words with `whole_word`) to choose.
    info: the vocabulary's tables.
    whole_word: choose whole words instead of pieces.
    mask_token_prob, random_token_prob: the 80/10/10 rule's probabilities.

  Returns:
    input_ids int32 [L] (masked sequence) and labels int32 [L] (original id where chosen, -100 elsewhere).
  """
  ids = tf.convert_to_tensor(token_ids, tf.int32)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
  shape = tf.shape(ids)
  maskable = ~tf.gather(tf.constant(info.never_mask), ids)
  if whole_word:
    continuation = tf.gather(tf.constant(info.continuation), ids)
    # A '##' piece right after an unmaskable token (e.g. a span cut inside a word) starts a word of its own.
    after_maskable = tf.concat([[False], maskable[:-1]], 0)
    starts = maskable & ~(continuation & after_maskable)
  else:
    starts = maskable

  num_units = tf.reduce_sum(tf.cast(starts, tf.float32))
  count = tf.floor(ratio * num_units + tf.random.stateless_uniform([], seeds[0]))
  # A uniformly random subset of `count` units: the units with the `count` smallest scores.
  scores = tf.where(starts, tf.random.stateless_uniform(shape, seeds[1]), 2.0)
  rank = tf.argsort(tf.argsort(scores, stable=True), stable=True)
  chosen_start = starts & (tf.cast(rank, tf.float32) < count)
  # Spread each word's choice over its pieces: unit index of every position, then look the choice up.
  unit = tf.maximum(tf.cumsum(tf.cast(starts, tf.int32)) - 1, 0)
  unit_chosen = tf.concat([tf.boolean_mask(chosen_start, starts), [False]], 0)  # [num_units + 1], never empty
  chosen = maskable & tf.gather(unit_chosen, unit)

  action = tf.random.stateless_uniform(shape, seeds[2])
  replacement_ids = tf.constant(info.replacement_ids)
  random_ids = tf.gather(replacement_ids, tf.random.stateless_uniform(
      shape, seeds[3], minval=0, maxval=replacement_ids.shape[0], dtype=tf.int32))
  replaced = tf.where(action < mask_token_prob, info.mask_id,
                      tf.where(action < mask_token_prob + random_token_prob, random_ids, ids))
  input_ids = tf.where(chosen, replaced, ids)
  labels = tf.where(chosen, ids, IGNORE_LABEL)
  return input_ids, labels


@seqio.map_over_dataset(num_seeds=1)
def mask_pairs(example: Mapping[str, tf.Tensor], seed, output_features: Mapping[str, seqio.Feature], *,
               masking: MaskingConfig) -> dict[str, tf.Tensor]:
  """Pairs `{"anchor_tokens", "context_tokens", ...}` -> `{anchor,context}_{input_ids,labels}` int32 [L].

  The anchor is masked at `masking.encoder_ratio`, the context at `masking.decoder_ratio`, with independent seeds
  split from the example's seed. Other features (e.g. `doc_id`) pass through.
  """
  info = output_features["anchor_input_ids"].vocabulary.info
  anchor_seed, context_seed = tf.unstack(tf.random.experimental.stateless_split(tf.stack(seed), 2))
  out = {k: v for k, v in example.items() if k not in ("anchor_tokens", "context_tokens")}
  for side, ratio, side_seed in (("anchor", masking.encoder_ratio, anchor_seed),
                                 ("context", masking.decoder_ratio, context_seed)):
    out[f"{side}_input_ids"], out[f"{side}_labels"] = mask_tokens(
        example[f"{side}_tokens"], side_seed, ratio=ratio, info=info, whole_word=masking.whole_word,
        mask_token_prob=masking.mask_token_prob, random_token_prob=masking.random_token_prob)
  return out
