"""File sources and task registration: malformed lines, empty documents, text formats, query pairs, idempotency."""

import json
import logging

import numpy as np
import pytest
import seqio
import tensorflow as tf

from mote_jax.data import (IGNORE_LABEL, DataFormatError, DocumentSource, JsonlFormat, MaskingConfig, ReadStats,
                           TextFormat, WordPieceVocabulary, register_jsonl_task, register_query_pair_tasks,
                           register_text_file_task)


@pytest.fixture(scope="module")
def vocab(minilm_path):
  return WordPieceVocabulary(minilm_path)


def _write_lines(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def _originals(example, side):
  labels = example[f"{side}_labels"]
  return np.where(labels != IGNORE_LABEL, labels, example[f"{side}_input_ids"]).tolist()


@pytest.fixture
def messy_jsonl(tmp_path, scifact_sentences):
  text = " ".join(scifact_sentences[:6])
  return _write_lines(tmp_path / "messy.jsonl", [
      json.dumps({"_id": "a", "title": "T", "text": text}),
      json.dumps({"_id": "empty", "title": "A title alone", "text": "   "}),
      '{"_id": "broken", "text": ',  # line 3: invalid JSON
      "",  # a blank line is no record
      json.dumps({"_id": "b", "text": 7}),  # line 5: text is not a string
      json.dumps({"_id": "c", "text": text}),
  ])


def test_malformed_jsonl_line_is_named(messy_jsonl):
  with pytest.raises(DataFormatError, match=f"^{messy_jsonl}:3: invalid JSON"):
    list(JsonlFormat().read(str(messy_jsonl)))


def test_malformed_jsonl_line_is_named_through_the_task(messy_jsonl, vocab):
  task = register_jsonl_task("test_data.messy_strict", str(messy_jsonl), vocab=vocab, overwrite=True)
  with pytest.raises(tf.errors.InvalidArgumentError, match=f"{messy_jsonl}:3: invalid JSON"):
    list(task.get_dataset(task.task_feature_lengths, shuffle=False, seed=0).as_numpy_iterator())


def test_skip_malformed_counts_and_logs(messy_jsonl, caplog):
  stats = ReadStats()
  with caplog.at_level(logging.WARNING, logger="mote_jax.data.readers"):
    docs = list(JsonlFormat(skip_malformed=True).read(str(messy_jsonl), stats))
  assert [d.doc_id for d in docs] == ["a", "c"]
  assert docs[0].text.startswith("T\n")
  assert stats == ReadStats(documents=2, empty=1, malformed=2)
  assert f"{messy_jsonl}:5: skipping malformed line: field 'text' is a int" in caplog.text
  assert "2 documents read, 1 empty skipped, 2 malformed lines skipped" in caplog.text


def test_skip_malformed_task_yields_the_good_documents(messy_jsonl, vocab):
  task = register_jsonl_task("test_data.messy_lenient", str(messy_jsonl), vocab=vocab, skip_malformed=True,
                             max_len=32, overwrite=True)
  doc_ids = {ex["doc_id"].decode() for ex in
             task.get_dataset(task.task_feature_lengths, shuffle=False, seed=0).as_numpy_iterator()}
  assert doc_ids == {"a", "c"}


def test_text_formats_and_empty_documents(tmp_path, caplog):
  path = _write_lines(tmp_path / "docs.txt", ["First doc, line one.", "Line two.", "", "", "Second doc.", "",
                                              "Third doc."])
  stats = ReadStats()
  docs = list(TextFormat("blocks").read(str(path), stats))
  assert [(d.doc_id, d.text) for d in docs] == [
      (f"{path}:1", "First doc, line one.\nLine two."), (f"{path}:5", "Second doc."), (f"{path}:7", "Third doc.")]
  assert stats == ReadStats(documents=3)

  stats = ReadStats()
  with caplog.at_level(logging.WARNING, logger="mote_jax.data.readers"):
    docs = list(TextFormat("lines").read(str(path), stats))
  assert [d.text for d in docs] == ["First doc, line one.", "Line two.", "Second doc.", "Third doc."]
  assert stats == ReadStats(documents=4, empty=3)
  assert "4 documents read, 3 empty skipped" in caplog.text
  with pytest.raises(ValueError, match="TextFormat.mode='pages'"):
    TextFormat("pages")


def test_document_source_shards_round_robin(tmp_path):
  paths = [_write_lines(tmp_path / f"part{i}.txt", [f"doc {i}.{j}" for j in range(5)]) for i in range(2)]
  source = DocumentSource({"train": [str(tmp_path / "part*.txt")]}, TextFormat("lines"))
  assert list(source.list_shards("train")) == [str(p) for p in paths]
  everything = [d.text for d in source.documents("train")]
  assert everything == [f"doc {i}.{j}" for i in range(2) for j in range(5)]
  import seqio
  shards = [[d.text for d in source.documents("train", seqio.ShardInfo(k, 3))] for k in range(3)]
  assert sorted(sum(shards, [])) == sorted(everything) and shards[0] == everything[0::3]
  with pytest.raises(FileNotFoundError, match="no file matches"):
    DocumentSource({"train": [str(tmp_path / "missing*.jsonl")]}, JsonlFormat()).get_dataset("train")


def test_query_pairs(tmp_path, vocab, caplog):
  records = [
      {"_id": "p1", "title": "Vitamin D", "text": "Vitamin D deficiency is common in winter.",
       "queries": ["what causes vitamin d deficiency", "is vitamin d low in winter"]},
      {"_id": "p2", "text": "Aspirin reduces the risk of heart attack.", "queries": ["does aspirin help the heart"]},
      {"_id": "p3", "text": "A passage without queries.", "queries": ["  "]},
  ]
  path = _write_lines(tmp_path / "queries.jsonl", [json.dumps(r) for r in records])
  tasks = register_query_pair_tasks("test_data.pseudo_queries", str(path), vocab=vocab, max_len=24,
                                    masking=MaskingConfig(whole_word=True), overwrite=True)
  assert set(tasks) == {("passage", "query"), ("query", "passage")}
  info = vocab.info

  def wrap(text):
    return [info.cls_id] + vocab.encode(text)[:22] + [info.sep_id]

  passages = {"p1": wrap("Vitamin D\nVitamin D deficiency is common in winter."),
              "p2": wrap("Aspirin reduces the risk of heart attack.")}
  expected = [("p1", passages["p1"], wrap(records[0]["queries"][0])),
              ("p1", passages["p1"], wrap(records[0]["queries"][1])),
              ("p2", passages["p2"], wrap(records[1]["queries"][0]))]
  for (anchor_type, context_type), task in tasks.items():
    assert (task.anchor_type, task.context_type) == (anchor_type, context_type)
    with caplog.at_level(logging.WARNING, logger="mote_jax.data.readers"):
      examples = list(task.get_dataset(task.task_feature_lengths, shuffle=False, seed=0).as_numpy_iterator())
    got = [(ex["doc_id"].decode(), _originals(ex, "anchor"), _originals(ex, "context")) for ex in examples]
    if anchor_type == "passage":
      assert got == expected
    else:
      assert got == [(d, q, p) for d, p, q in expected]
    assert "2 documents read, 1 empty skipped" in caplog.text


def test_registration_is_idempotent(tmp_path, vocab):
  path = _write_lines(tmp_path / "docs.txt", ["One. Two."])
  task = register_text_file_task("test_data.idempotent", str(path), vocab=vocab, max_len=32, overwrite=True)
  assert register_text_file_task("test_data.idempotent", str(path), vocab=vocab, max_len=32) is task
  with pytest.raises(ValueError, match=r"already registered with a different spec \(differs in \['max_len'\]\)"):
    register_text_file_task("test_data.idempotent", str(path), vocab=vocab, max_len=64)
  replaced = register_text_file_task("test_data.idempotent", str(path), vocab=vocab, max_len=64, overwrite=True)
  assert replaced is not task and replaced.max_len == 64
  with pytest.raises(ValueError, match="max_len=2"):
    register_text_file_task("test_data.tiny", str(path), vocab=vocab, max_len=2)


def test_held_out_split_is_disjoint_stable_and_sized(data_dir):
  from mote_jax.data.readers import BEIR_CORPUS
  from mote_jax.data.sources import HeldOut
  corpus = str(data_dir / "scifact" / "corpus.jsonl")
  source = DocumentSource({"train": [corpus]}, BEIR_CORPUS, HeldOut(0.1))
  train = [d.doc_id for d in source.documents("train")]
  held = [d.doc_id for d in source.documents("validation")]
  assert not set(train) & set(held)
  assert len(train) + len(held) == 5183
  assert abs(len(held) / 5183 - 0.1) < 0.02
  again = DocumentSource({"train": [corpus]}, BEIR_CORPUS, HeldOut(0.1))
  assert [d.doc_id for d in again.documents("validation")] == held
  shards = [[d.doc_id for d in source.documents("validation", seqio.ShardInfo(i, 3))] for i in range(3)]
  assert sorted(sum(shards, [])) == sorted(held)
