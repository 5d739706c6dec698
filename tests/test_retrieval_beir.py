"""BEIR loading: the real SciFact files, and every kind of bad input named by file:line, id or count."""

import json
import logging

import pytest

from mote_jax.retrieval.beir import BeirFormatError, load_beir


def _write_dataset(root, corpus=None, queries=None, qrels=None, split="test"):
  """A tiny BEIR directory; each argument overrides one file (a list of lines, written verbatim)."""
  corpus = corpus if corpus is not None else [
      json.dumps({"_id": "d1", "title": "Title one", "text": "first text"}),
      json.dumps({"_id": "d2", "title": "", "text": "second text"}),
      json.dumps({"_id": "d3", "title": "Three", "text": "third"}),
  ]
  queries = queries if queries is not None else [
      json.dumps({"_id": "q1", "text": "query one"}),
      json.dumps({"_id": "q2", "text": "query two"}),
      json.dumps({"_id": "q3", "text": "unjudged query"}),
  ]
  qrels = qrels if qrels is not None else ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td3\t2", "q2\td2\t0"]
  (root / "qrels").mkdir(parents=True, exist_ok=True)
  (root / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
  (root / "queries.jsonl").write_text("\n".join(queries) + "\n")
  (root / "qrels" / f"{split}.tsv").write_bytes(("\r\n".join(qrels) + "\r\n").encode())
  return root


def test_scifact_counts_and_crlf(data_dir):
  data = load_beir(data_dir / "scifact", "test")
  assert len(data.corpus) == 5183 and len(data.queries) == 300
  assert sum(map(len, data.qrels.values())) == 339
  assert all(isinstance(r, int) for judged in data.qrels.values() for r in judged.values())
  assert not any("\r" in d for judged in data.qrels.values() for d in judged)  # CRLF stripped
  passages = data.corpus.passages()
  assert passages[0] == (data.corpus.titles[0] + " " + data.corpus.texts[0]).strip()
  train = load_beir(data_dir / "scifact", "train")
  assert len(train.queries) == 809 and sum(map(len, train.qrels.values())) == 919


def test_msmarco_graded_qrels(data_dir):
  data = load_beir(data_dir / "msmarco-dl19-subset", "test")
  assert len(data.queries) == 43 and len(data.corpus) == 5000
  assert {r for judged in data.qrels.values() for r in judged.values()} == {1, 2, 3}


def test_tiny_dataset_loads(tmp_path):
  data = load_beir(_write_dataset(tmp_path), "test")
  assert data.corpus.ids == ("d1", "d2", "d3")
  assert data.corpus.passages() == ["Title one first text", "second text", "Three third"]
  assert data.queries == {"q1": "query one", "q2": "query two"}  # judged queries only
  assert data.qrels == {"q1": {"d1": 1}, "q2": {"d3": 2, "d2": 0}}


def test_unknown_ids_are_counted_and_raise(tmp_path):
  root = _write_dataset(tmp_path, qrels=["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\tnope\t1",
                                         "q9\td1\t1", "q9\td2\t1", "q2\tgone\t1"])
  with pytest.raises(BeirFormatError) as info:
    load_beir(root)
  message = str(info.value)
  assert "test.tsv" in message and "4 judgements name unknown ids" in message
  assert "1 query ids" in message and "'q9'" in message
  assert "2 document ids" in message and "'nope'" in message and "'gone'" in message


def test_unknown_ids_allowed_warns_and_drops(tmp_path, caplog):
  root = _write_dataset(tmp_path, qrels=["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\tnope\t1",
                                         "q9\td1\t1", "q2\tgone\t1"])
  with caplog.at_level(logging.WARNING):
    data = load_beir(root, allow_unknown_ids=True)
  assert "3 judgements name unknown ids" in caplog.text
  assert data.qrels == {"q1": {"d1": 1}}  # q2 lost its only judgement
  assert data.queries == {"q1": "query one"}


def test_duplicate_document_ids_are_named(tmp_path):
  doc = lambda i: json.dumps({"_id": i, "title": "", "text": "x"})  # noqa: E731
  root = _write_dataset(tmp_path, corpus=[doc("d1"), doc("d2"), doc("d1"), doc("d3"), doc("d3"), doc("d1")])
  with pytest.raises(BeirFormatError, match=r"2 duplicate document ids: 'd1' \(lines 1, 3, 6\), 'd3' \(lines 4, 5\)"):
    load_beir(root)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_query_is_named(tmp_path, text):
  root = _write_dataset(tmp_path, queries=[json.dumps({"_id": "q1", "text": "fine"}),
                                           json.dumps({"_id": "q-empty", "text": text})])
  with pytest.raises(BeirFormatError, match=r"queries.jsonl:2: query 'q-empty' has an empty text"):
    load_beir(root)


def test_malformed_jsonl_names_file_and_line(tmp_path):
  corpus = [json.dumps({"_id": "d1", "title": "", "text": "a"}), '{"_id": "d2", "text": "b"', ""]
  with pytest.raises(BeirFormatError, match=r"corpus.jsonl:2: malformed JSON"):
    load_beir(_write_dataset(tmp_path, corpus=corpus))
  queries = [json.dumps({"_id": "q1", "text": "a"}), json.dumps({"_id": "q2", "text": "b"}), "[1, 2]"]
  with pytest.raises(BeirFormatError, match=r"queries.jsonl:3: expected a JSON object"):
    load_beir(_write_dataset(tmp_path, queries=queries))


def test_missing_or_mistyped_fields(tmp_path):
  corpus = [json.dumps({"_id": "d1", "title": "", "text": "a"}), json.dumps({"title": "no id", "text": "b"})]
  with pytest.raises(BeirFormatError, match=r"corpus.jsonl:2: missing field '_id'"):
    load_beir(_write_dataset(tmp_path, corpus=corpus))
  corpus = [json.dumps({"_id": "d1", "title": "", "text": ["not", "a", "string"]})]
  with pytest.raises(BeirFormatError, match=r"corpus.jsonl:1: field 'text' is list"):
    load_beir(_write_dataset(tmp_path, corpus=corpus))


@pytest.mark.parametrize("row,expected", [
    ("q1\td1", r"test.tsv:3: expected 3 tab-separated columns"),
    ("q1\td1\thigh", r"test.tsv:3: score 'high' is not an integer"),
    ("q1\td1\t2", r"test.tsv:3: \('q1', 'd1'\) judged 2 here and 1 before"),
])
def test_bad_qrels_rows(tmp_path, row, expected):
  root = _write_dataset(tmp_path, qrels=["query-id\tcorpus-id\tscore", "q1\td1\t1", row])
  with pytest.raises(BeirFormatError, match=expected):
    load_beir(root)


def test_missing_split_lists_available(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"dev.tsv: not found \(splits available: \['test'\]\)"):
    load_beir(_write_dataset(tmp_path), "dev")


def test_write_subset_reads_back(data_dir, tmp_path):
  from mote_jax.retrieval.beir import load_beir, write_subset
  train = load_beir(data_dir / "scifact", "train")
  queries = list(train.queries)[:6]
  keep = {d for q in queries for d in train.qrels[q]} | set(train.corpus.ids[:3])
  write_subset(train, tmp_path / "sub", {"train": queries[:4], "dev": queries[4:]}, keep)
  for split, ids in (("train", queries[:4]), ("dev", queries[4:])):
    sub = load_beir(tmp_path / "sub", split)
    assert list(sub.queries) == ids and sub.qrels == {q: train.qrels[q] for q in ids}
    assert sub.corpus.ids == tuple(d for d in train.corpus.ids if d in keep)
    index = {d: i for i, d in enumerate(train.corpus.ids)}
    assert sub.corpus.texts == tuple(train.corpus.texts[index[d]] for d in sub.corpus.ids)
