"""BERT masking: rates over >= 10k real sequences, special tokens and padding, whole words, determinism."""

import numpy as np
import pytest
import tensorflow as tf

from mote_jax.data import IGNORE_LABEL, MaskingConfig, WordPieceVocabulary, mask_tokens

NUM_SEQUENCES = 10_000
LENGTH = 64


@pytest.fixture(scope="module")
def vocab(minilm_path):
  return WordPieceVocabulary(minilm_path)


@pytest.fixture(scope="module")
def sequences(vocab, scifact_sentences):
  """int32 [10000, 64]: [CLS] sentence(s) [SEP] [PAD]..., real SciFact text of varied length."""
  info = vocab.info
  pieces = vocab.encode_batch(scifact_sentences)
  out = np.zeros((NUM_SEQUENCES, LENGTH), np.int32)
  n = len(pieces)
  for i in range(NUM_SEQUENCES):
    # One or two sentences, cut at varied lengths, so that both long and heavily padded rows occur.
    ids = (pieces[i % n] + pieces[(7 * i + 3) % n])[: (i % (LENGTH - 5)) + 3]
    row = [info.cls_id] + ids + [info.sep_id]
    out[i, : len(row)] = row
  return out


def _mask_all(ids, vocab, seed, **kwargs):
  """mask_tokens over every row with seed [seed, row index]; returns (input_ids, labels) as numpy."""
  ds = tf.data.Dataset.from_tensor_slices((ids, np.arange(len(ids), dtype=np.int64)))
  ds = ds.map(lambda x, i: mask_tokens(x, tf.stack([tf.constant(seed, tf.int64), i]), info=vocab.info, **kwargs),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  inputs, labels = zip(*ds.batch(2_000).as_numpy_iterator())
  return np.concatenate(inputs), np.concatenate(labels)


def test_default_ratios_are_cotmae():
  assert (MaskingConfig().encoder_ratio, MaskingConfig().decoder_ratio) == (0.30, 0.45)


@pytest.mark.parametrize("ratio", [0.30, 0.45])
def test_mask_rates_match_config(vocab, sequences, ratio):
  inputs, labels = _mask_all(sequences, vocab, seed=1, ratio=ratio)
  info = vocab.info
  maskable = ~info.never_mask[sequences]
  chosen = labels != IGNORE_LABEL
  assert len(sequences) >= 10_000 and maskable.sum() > 300_000

  # Special tokens ([CLS], [SEP]) and padding are never chosen and never changed.
  assert not chosen[~maskable].any()
  np.testing.assert_array_equal(inputs[~maskable], sequences[~maskable])
  np.testing.assert_array_equal(labels[chosen], sequences[chosen])
  np.testing.assert_array_equal(inputs[~chosen], sequences[~chosen])

  assert abs(chosen.sum() / maskable.sum() - ratio) < 0.01
  as_mask = inputs[chosen] == info.mask_id
  unchanged = inputs[chosen] == sequences[chosen]
  replaced = ~as_mask & ~unchanged
  assert abs(as_mask.mean() - 0.8) < 0.01
  assert abs(replaced.mean() - 0.1) < 0.01
  assert abs(unchanged.mean() - 0.1) < 0.01  # includes the ~1/29k random draws that hit the original id
  # Random replacements are real word pieces, never special or [unusedN] tokens.
  assert np.isin(inputs[chosen][replaced], info.replacement_ids).all()


def test_whole_word_masks_every_piece(vocab, sequences):
  info = vocab.info
  ids = sequences[:3_000]
  inputs, labels = _mask_all(ids, vocab, seed=2, ratio=0.30, whole_word=True)
  chosen = labels != IGNORE_LABEL
  maskable = ~info.never_mask[ids]
  continuation = info.continuation[ids] & np.roll(maskable, 1, axis=1)
  # A continuation piece is chosen exactly when the piece before it (same word) is.
  prev_chosen = np.roll(chosen, 1, axis=1)
  assert continuation.sum() > 5_000
  np.testing.assert_array_equal(chosen[continuation], prev_chosen[continuation])
  multi_piece_words_chosen = (chosen & continuation).sum()
  assert multi_piece_words_chosen > 1_000
  assert not chosen[~maskable].any()
  assert abs(chosen.sum() / maskable.sum() - 0.30) < 0.02


def test_masks_are_a_function_of_seed_and_index(vocab, sequences):
  row = sequences[55]  # a long row
  assert (row != 0).sum() > 40

  def mask(seed, index):
    return [x.numpy() for x in mask_tokens(row, tf.constant([seed, index], tf.int64), ratio=0.45, info=vocab.info)]

  same = mask(3, 17), mask(3, 17)
  np.testing.assert_array_equal(same[0][0], same[1][0])
  np.testing.assert_array_equal(same[0][1], same[1][1])
  assert not np.array_equal(mask(3, 18)[1], same[0][1])
  assert not np.array_equal(mask(4, 17)[1], same[0][1])


def test_masking_config_is_validated():
  with pytest.raises(ValueError, match="MaskingConfig.encoder_ratio=1.5"):
    MaskingConfig(encoder_ratio=1.5)
  with pytest.raises(ValueError, match="mask_token_prob \\+ random_token_prob"):
    MaskingConfig(mask_token_prob=0.8, random_token_prob=0.3)
