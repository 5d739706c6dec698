"""Contextual span pairs (CoT-MAE) on the SciFact corpus: span lengths, same-document neighbours, both directions."""

import collections
import itertools
import json

import numpy as np
import pytest

from mote_jax.data import (IGNORE_LABEL, WordPieceVocabulary, group_spans, register_beir_corpus_task,
                           split_sentences)

MAX_LEN = 64
NUM_PAIRS = 6_000


@pytest.fixture(scope="module")
def vocab(minilm_path):
  return WordPieceVocabulary(minilm_path)


def _originals(example, side):
  """The unmasked ids of one side of a masked pair."""
  labels = example[f"{side}_labels"]
  return np.where(labels != IGNORE_LABEL, labels, example[f"{side}_input_ids"])


def _contains(haystack, needle):
  n = len(needle)
  return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def test_split_sentences():
  text = 'Title line\nFirst one (n = 3). "Quoted!" Next?  Last without end'
  assert split_sentences(text) == ["Title line", "First one (n = 3).", '"Quoted!"', "Next?", "Last without end"]
  assert split_sentences(" \n\n ") == []


def test_group_spans_packs_greedily_and_cuts_long_sentences_at_words(vocab):
  continuation = vocab.info.continuation
  first, second = vocab.encode_batch(["A short sentence.", "Another short one."])
  spans = group_spans([first, second], len(first) + len(second), continuation)
  assert spans == [first + second]
  assert group_spans([first, second], len(first) + len(second) - 1, continuation) == [first, second]

  words = vocab.encode("immunohistochemistry " * 20)  # a word of several pieces, repeated
  word = vocab.encode("immunohistochemistry")
  assert len(word) > 2
  budget = 2 * len(word) + 1  # room for two words and one piece of the third
  spans = group_spans([words], budget, continuation)
  assert sum(spans, []) == words
  assert all(len(s) <= budget for s in spans)
  assert all(s == word * 2 for s in spans)  # cut between words, never inside one


def test_scifact_span_pairs(data_dir, vocab, tokenizer):
  task = register_beir_corpus_task("test_data.scifact_spans", data_dir / "scifact", vocab=vocab, max_len=MAX_LEN)
  assert (task.anchor_type, task.context_type) == ("passage", "passage")
  corpus = {}
  with open(data_dir / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      corpus[doc["_id"]] = doc

  ds = task.get_dataset(task.task_feature_lengths, shuffle=False, seed=0)
  pairs = collections.defaultdict(list)
  for example in itertools.islice(ds.as_numpy_iterator(), NUM_PAIRS):
    anchor, context = _originals(example, "anchor"), _originals(example, "context")
    for ids in (anchor, context):
      assert len(ids) <= MAX_LEN
      assert ids[0] == vocab.info.cls_id and ids[-1] == vocab.info.sep_id
      assert not np.isin(ids[1:-1], [vocab.info.cls_id, vocab.info.sep_id, vocab.info.pad_id]).any()
    pairs[example["doc_id"].decode()].append((tuple(anchor[1:-1]), tuple(context[1:-1])))
  assert len(pairs) > 300

  checked_docs = 0
  for doc_id, doc_pairs in list(pairs.items())[:-1]:  # the last document may be cut off by islice
    doc = corpus[doc_id]
    doc_ids = tokenizer(f"{doc['title']} {doc['text']}", add_special_tokens=False)["input_ids"]
    spans = {s for pair in doc_pairs for s in pair}
    for anchor, context in doc_pairs:
      assert (context, anchor) in doc_pairs  # both directions
      # Neighbours: one directly follows the other in the document's own tokenization.
      assert _contains(doc_ids, list(anchor + context)) or _contains(doc_ids, list(context + anchor))
    # The spans tile the document: together they are exactly its tokens.
    assert sum(len(s) for s in spans) == len(doc_ids)
    assert len(doc_pairs) == 2 * (len(spans) - 1)
    checked_docs += 1
  assert checked_docs > 300
