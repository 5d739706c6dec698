"""TFDS text tasks (no TFDS data offline: construction, then the task's own preprocessing on TFDS-like examples),
and the tokenizer wrapper against HF's tokenizer."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from mote_jax.data import IGNORE_LABEL, PairBatches, PairTask, WordPieceVocabulary, register_tfds_task


@pytest.fixture(scope="module")
def vocab(minilm_path):
  return WordPieceVocabulary(minilm_path)


def test_vocabulary_matches_hf_tokenizer(vocab, tokenizer, scifact_sentences):
  expected = tokenizer(scifact_sentences, add_special_tokens=False)["input_ids"]
  assert vocab.encode_batch(scifact_sentences) == expected
  assert [vocab.encode_tf(tf.constant(s)).numpy().tolist() for s in scifact_sentences[:20]] == expected[:20]
  assert vocab.vocab_size == tokenizer.vocab_size and vocab.unk_id == tokenizer.unk_token_id
  assert vocab.decode(expected[0]) == tokenizer.decode(expected[0])
  info = vocab.info
  assert (info.cls_id, info.sep_id, info.pad_id, info.mask_id) == (
      tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id)
  assert info.never_mask.sum() == len(tokenizer.all_special_ids) and info.never_mask[tokenizer.all_special_ids].all()


def test_text_types_are_the_model_experts():
  from mote_jax.data import TEXT_TYPES
  from mote_jax.model import EXPERTS
  assert set(TEXT_TYPES) == set(EXPERTS)


def test_tfds_task_construction_and_preprocessing(vocab, scifact_sentences, monkeypatch):
  task = register_tfds_task("test_data.tfds_wiki", "wikipedia/20230601.en:1.0.0", vocab=vocab, text_key="text",
                            title_key="title", max_len=32, overwrite=True)
  assert isinstance(task, PairTask) and isinstance(task.source, seqio.TfdsDataSource)
  assert task.source.tfds_dataset.name == "wikipedia/20230601.en:1.0.0"
  assert (task.anchor_type, task.context_type) == ("passage", "passage")
  assert register_tfds_task("test_data.tfds_wiki", "wikipedia/20230601.en:1.0.0", vocab=vocab, text_key="text",
                            title_key="title", max_len=32) is task

  # What TFDS would yield for wikipedia: {"title", "text"} strings; one article has no text.
  articles = {"title": ["Article one", "Empty", "Article two"],
              "text": [" ".join(scifact_sentences[:8]), "  ", " ".join(scifact_sentences[8:14])]}
  monkeypatch.setattr(task.source, "get_dataset",
                      lambda split, shuffle, seed, shard_info=None: tf.data.Dataset.from_tensor_slices(articles))
  monkeypatch.setattr(task.source, "num_input_examples", lambda split: None)
  monkeypatch.setattr(task.source, "list_shards", lambda split: ["wikipedia-train.tfrecord-00000-of-00001"])

  examples = list(task.get_dataset(task.task_feature_lengths, shuffle=False, seed=0).as_numpy_iterator())
  doc_ids = [ex["doc_id"] for ex in examples]
  assert len(set(doc_ids)) == 2 and doc_ids == sorted(doc_ids, key=doc_ids.index)  # grouped by article
  first = examples[0]
  anchor = np.where(first["anchor_labels"] != IGNORE_LABEL, first["anchor_labels"], first["anchor_input_ids"])
  title = [vocab.info.cls_id] + vocab.encode("Article one")
  assert anchor.tolist()[:len(title)] == title  # the title opens the article's first span
  assert all(len(ex["anchor_input_ids"]) <= 32 and len(ex["context_input_ids"]) <= 32 for ex in examples)

  with PairBatches(task, batch_size=4, seed=0) as batches:
    assert next(batches)["anchor_input_ids"].shape == (4, 32)
  # Fewer TFDS files than hosts: seqio shards by example; the two hosts split the articles between them.
  host_docs = []
  for index in range(2):
    ds = task.get_dataset(task.task_feature_lengths, shuffle=False, seed=0, shard_info=seqio.ShardInfo(index, 2))
    host_docs.append({ex["doc_id"] for ex in ds.as_numpy_iterator()})
  assert host_docs[0] | host_docs[1] == set(doc_ids) and not host_docs[0] & host_docs[1]
