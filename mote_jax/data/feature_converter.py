"""seqio feature converter of masked pairs to fixed-shape model features.

Task features (per example, variable length <= L):
  anchor_input_ids, anchor_labels, context_input_ids, context_labels: int32 [n]
Model features (per example, fixed length, L per side from `task_feature_lengths`):
  {anchor,context}_input_ids      int32 [L]  masked ids, padded with [PAD] = 0
  {anchor,context}_attention_mask int32 [L]  1 on the sequence, 0 on padding
  {anchor,context}_labels         int32 [L]  original id at masked positions, -100 elsewhere (padding included)
No packing: each row is one sequence, as the encoder's [CLS] pooling expects.
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from mote_jax.data.masking import IGNORE_LABEL

SIDES = ("anchor", "context")
TASK_FEATURE_NAMES = tuple(f"{side}_{name}" for side in SIDES for name in ("input_ids", "labels"))
MODEL_FEATURE_NAMES = tuple(f"{side}_{name}" for side in SIDES
                            for name in ("input_ids", "attention_mask", "labels"))
PAD_ID = 0  # BERT's [PAD]; seqio's PAD_ID too


class PairFeatureConverter(seqio.FeatureConverter):
  """Pads masked (anchor, context) pairs to fixed lengths and adds attention masks (see the module docstring)."""

  TASK_FEATURES = {k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for k in TASK_FEATURE_NAMES}
  MODEL_FEATURES = {k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for k in MODEL_FEATURE_NAMES}
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, apply_length_check: bool = True):
    super().__init__(pack=False, apply_length_check=apply_length_check)

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    for side in SIDES:
      if task_feature_lengths[f"{side}_input_ids"] != task_feature_lengths[f"{side}_labels"]:
        raise ValueError(f"task_feature_lengths: {side}_input_ids and {side}_labels must have the same length, "
                         f"got {dict(task_feature_lengths)}")

    def pad(example):
      out = {}
      for side in SIDES:
        length = task_feature_lengths[f"{side}_input_ids"]
        ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
        padding = [[0, length - tf.shape(ids)[0]]]
        out[f"{side}_input_ids"] = tf.ensure_shape(tf.pad(ids, padding, constant_values=PAD_ID), [length])
        out[f"{side}_attention_mask"] = tf.ensure_shape(tf.pad(tf.ones_like(ids), padding), [length])
        out[f"{side}_labels"] = tf.ensure_shape(
            tf.pad(labels, padding, constant_values=IGNORE_LABEL), [length])
      return out

    return ds.map(pad, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    return {f"{side}_{name}": task_feature_lengths[f"{side}_input_ids"]
            for side in SIDES for name in ("input_ids", "attention_mask", "labels")}
