"""Per-host batches: fixed shapes, disjoint shards that cover the data, exact resumption mid-stream."""

import collections
import itertools

import numpy as np
import pytest
import seqio

from mote_jax.data import (IGNORE_LABEL, MODEL_FEATURE_NAMES, PairBatches, WordPieceVocabulary, host_seed,
                           register_jsonl_task)

MAX_LEN = 48
NUM_DOCS = 120


@pytest.fixture(scope="module")
def task(data_dir, minilm_path, tmp_path_factory):
  """A span-pair task over the first 120 SciFact documents."""
  path = tmp_path_factory.mktemp("scifact_head") / "corpus.jsonl"
  with open(data_dir / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
    path.write_text("".join(itertools.islice(f, NUM_DOCS)), encoding="utf-8")
  return register_jsonl_task("test_data.scifact_head", str(path), vocab=WordPieceVocabulary(minilm_path),
                             max_len=MAX_LEN, shuffle_buffer_size=256, overwrite=True)


def _pair_key(example):
  """The unmasked (anchor, context) of one example, as a hashable key."""
  out = []
  for side in ("anchor", "context"):
    labels, ids = example[f"{side}_labels"], example[f"{side}_input_ids"]
    out.append(tuple(np.where(labels != IGNORE_LABEL, labels, ids).tolist()))
  return tuple(out)


def test_batches_have_fixed_shapes_and_static_types(task):
  with PairBatches(task.name, batch_size=16, seed=0) as batches:
    assert (batches.anchor_type, batches.context_type) == ("passage", "passage")
    batch = next(batches)
  assert set(batch) == set(MODEL_FEATURE_NAMES)
  for name, array in batch.items():
    assert array.shape == (16, MAX_LEN) and array.dtype == np.int32, name
  info = task.vocabulary.info
  for side in ("anchor", "context"):
    ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
    np.testing.assert_array_equal(mask, (np.arange(MAX_LEN) < mask.sum(1, keepdims=True)).astype(np.int32))
    assert (ids[mask == 0] == 0).all() and (labels[mask == 0] == IGNORE_LABEL).all()
    assert (ids[:, 0] == info.cls_id).all() and (labels[:, 0] == IGNORE_LABEL).all()  # [CLS] never masked
    last = mask.sum(1) - 1
    assert (ids[np.arange(16), last] == info.sep_id).all()
    assert (labels[np.arange(16), last] == IGNORE_LABEL).all()
    # floor(ratio * n + u) pieces are masked: at least one as soon as ratio * n >= 1 (n: pieces between [CLS], [SEP]).
    long_rows = mask.sum(1) - 2 >= 4
    assert long_rows.sum() > 8 and (labels[long_rows] != IGNORE_LABEL).any(1).all()


def test_shards_are_disjoint_and_cover_the_data(task):
  def pairs(shard_info):
    ds = task.get_dataset(task.task_feature_lengths, shuffle=True, seed=7, shard_info=shard_info, num_epochs=1)
    return [(ex["doc_id"], _pair_key(ex)) for ex in ds.as_numpy_iterator()]

  everything = pairs(None)
  assert len(everything) > 500
  shards = [pairs(seqio.ShardInfo(i, 3)) for i in range(3)]
  assert collections.Counter(p for s in shards for p in s) == collections.Counter(everything)
  doc_sets = [{doc for doc, _ in s} for s in shards]
  assert all(doc_sets) and not (doc_sets[0] & doc_sets[1] or doc_sets[0] & doc_sets[2] or doc_sets[1] & doc_sets[2])


@pytest.mark.parametrize("shard_index,num_shards", [(0, 1), (1, 2)])
def test_resume_gives_the_same_batches(task, shard_index, num_shards):
  kwargs = dict(batch_size=32, seed=3, shard_index=shard_index, num_shards=num_shards)
  # 80 steps run past the first epoch (2152 pairs, 1088 in shard 1 of 2), so resuming in a later epoch is covered.
  with PairBatches(task, **kwargs) as batches:
    straight = [next(batches) for _ in range(80)]
    assert batches.step == 80
  with PairBatches(task, start_step=70, **kwargs) as batches:
    assert batches.step == 70
    resumed = [next(batches) for _ in range(10)]
  for a, b in zip(straight[70:], resumed, strict=True):
    for name in MODEL_FEATURE_NAMES:
      np.testing.assert_array_equal(a[name], b[name])


def test_hosts_and_seeds_get_different_streams(task):
  def first(**kwargs):
    with PairBatches(task, batch_size=8, **kwargs) as batches:
      return next(batches)["anchor_input_ids"]

  base = first(seed=0, shard_index=0, num_shards=2)
  assert not np.array_equal(base, first(seed=0, shard_index=1, num_shards=2))
  assert not np.array_equal(base, first(seed=1, shard_index=0, num_shards=2))
  assert host_seed(0, 0, 2) != host_seed(0, 1, 2)


def test_bad_arguments_are_rejected(task):
  with pytest.raises(ValueError, match="batch_size=10 must be a positive multiple of num_shards=4"):
    PairBatches(task, batch_size=10, seed=0, num_shards=4)
  with pytest.raises(ValueError, match="shard_index=2, num_shards=2"):
    PairBatches(task, batch_size=8, seed=0, shard_index=2, num_shards=2)
