"""Fine-tuning data: Tevatron and BEIR(+BM25) groups, deterministic negative rotation, resume, host shards."""

import json

import ir_measures
import numpy as np
import pytest

from mote_jax.data.finetune import (FinetuneBatches, FinetuneStream, Passage, SamplingConfig, TrainGroup,
                                    beir_groups, bm25_run, corpus_rows, read_negatives, tevatron_groups,
                                    write_negatives)
from mote_jax.retrieval.beir import load_beir


@pytest.fixture(scope="module")
def scifact_train(data_dir):
  return load_beir(data_dir / "scifact", "train")


@pytest.fixture(scope="module")
def scifact_bm25(scifact_train):
  return bm25_run(scifact_train.corpus.ids, scifact_train.corpus.passages(), scifact_train.queries, k=100)


def test_bm25_quality_on_scifact_test(data_dir):
  """bm25s with the default k1/b reproduces BEIR's published BM25 (Elasticsearch) on SciFact test: 0.686."""
  test = load_beir(data_dir / "scifact", "test")
  run = bm25_run(test.corpus.ids, test.corpus.passages(), test.queries, k=100).to_dict(test.corpus.ids)
  ndcg = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], test.qrels, run)[ir_measures.nDCG @ 10]
  assert abs(ndcg - 0.686) <= 0.005, ndcg


def test_beir_groups_drop_positives_from_negatives(scifact_train, scifact_bm25):
  ids = scifact_train.corpus.ids
  as_dict = scifact_bm25.to_dict(ids)
  groups = beir_groups(ids, scifact_train.queries, scifact_train.qrels, scifact_bm25, num_negatives=30)
  assert len(groups) == 809
  for i, qid in enumerate(groups.query_ids):
    positives = {ids[r] for r in groups.positives_of(i)}
    assert positives == {d for d, r in scifact_train.qrels[qid].items() if r > 0}
    assert not positives & {ids[r] for r in groups.negatives_of(i)}
    assert len(groups.negatives_of(i)) == 30
  # Negatives are BM25's ranking minus the positives, in order.
  qid = groups.query_ids[0]
  ranked = [d for d, _ in sorted(as_dict[qid].items(), key=lambda x: -x[1])
            if d not in {ids[r] for r in groups.positives_of(0)}]
  assert [ids[r] for r in groups.negatives_of(0)] == ranked[:30]
  # The same run as {query id: {doc id: score}} (a mined TREC run's form) gives the same groups.
  assert beir_groups(ids, scifact_train.queries, scifact_train.qrels, as_dict, num_negatives=30) == groups


def _write_tevatron(path, groups):
  """Tevatron jsonl with text, written independently of the module."""
  passages = lambda ps: [{"docid": p.docid, "title": "", "text": p.text} for p in ps]  # noqa: E731
  path.write_text("".join(json.dumps({"query_id": g.query_id, "query": g.query,
                                      "positive_passages": passages(g.positives),
                                      "negative_passages": passages(g.negatives),
                                      "judged_docids": list(g.judged)}) + "\n" for g in groups))
  return path


def test_negatives_files_hold_ids_and_round_trip(tmp_path, scifact_train, scifact_bm25):
  ids = scifact_train.corpus.ids
  groups = beir_groups(ids, scifact_train.queries, scifact_train.qrels, scifact_bm25, num_negatives=5)
  path = write_negatives(tmp_path / "train.jsonl", groups, ids)
  assert read_negatives(path, corpus_rows(ids)) == groups
  record = json.loads(path.read_text().splitlines()[0])
  assert set(record) == {"query_id", "positive_document_ids", "negative_document_ids", "judged_document_ids"}
  assert record["negative_document_ids"] == [ids[r] for r in groups.negatives_of(0)]
  assert not any(word in path.read_text() for word in scifact_train.corpus.texts[0].split()[:5] if len(word) > 6)
  # Doc ids outside the corpus: an error with the count and the first ids.
  lines = path.read_text().splitlines()
  record["negative_document_ids"][1:3] = ["nope-1", "nope-2"]
  (tmp_path / "stale.jsonl").write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
  with pytest.raises(ValueError, match=r"stale\.jsonl: 2 positive or negative doc ids are not in the corpus "
                                       r"\(first: \['nope-1', 'nope-2'\]\)"):
    read_negatives(tmp_path / "stale.jsonl", corpus_rows(ids))


def test_tevatron_text_files_and_errors(tmp_path, scifact_train, scifact_bm25):
  ids, text = scifact_train.corpus.ids, dict(zip(scifact_train.corpus.ids, scifact_train.corpus.passages()))
  table = beir_groups(ids, scifact_train.queries, scifact_train.qrels, scifact_bm25, num_negatives=5)
  passages = lambda rows: tuple(Passage(ids[r], text[ids[r]]) for r in rows)  # noqa: E731
  groups = [TrainGroup(q, scifact_train.queries[q], passages(table.positives_of(i)), passages(table.negatives_of(i)),
                       judged=tuple(ids[r] for r in table.judged_of(i)))
            for i, q in enumerate(table.query_ids[:20])]
  path = _write_tevatron(tmp_path / "train.jsonl", groups)
  assert tevatron_groups(path) == groups
  # With the corpus known, a text file maps to the same rows as the ids file.
  assert read_negatives(path, corpus_rows(ids)) == read_negatives(
      write_negatives(tmp_path / "ids.jsonl", table, ids), corpus_rows(ids), queries=table.query_ids[:20])
  bad = tmp_path / "bad.jsonl"
  lines = path.read_text().splitlines()
  bad.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl:4: malformed JSON"):
    tevatron_groups(bad)
  record = json.loads(lines[0])
  record["query"] = "  "
  bad.write_text(json.dumps(record) + "\n")
  with pytest.raises(ValueError, match=rf"bad\.jsonl:1: query '{record['query_id']}' is empty"):
    tevatron_groups(bad)


def _toy_groups(num=10, negatives=10):
  return [TrainGroup(f"q{i}", f"query number {i}", (Passage(f"p{i}", f"positive passage {i}"),),
                     tuple(Passage(f"n{i}_{j}", f"negative {j} of query {i}") for j in range(negatives)))
          for i in range(num)]


def test_negatives_rotate_through_the_whole_list(tokenizer):
  stream = FinetuneStream.from_train_groups(_toy_groups(), tokenizer,
                                            SamplingConfig(negatives=3, passage_max_len=16), seed=0)
  seen = {}
  for k in range(4 * len(stream)):  # four epochs: 12 draws of 10 negatives per query
    query, passages = stream.example(k)
    text = tokenizer.decode(query[1:-1])
    seen.setdefault(text, []).extend(tokenizer.decode(p[1:-1]) for p in passages[1:])
    assert tokenizer.decode(passages[0][1:-1]).startswith("positive passage")
  for text, negatives in seen.items():
    assert len(set(negatives[:9])) == 9  # no repeat before the list is used up
    assert len(set(negatives)) == 10


def test_resume_and_host_shards_are_exact(tokenizer):
  stream = FinetuneStream.from_train_groups(_toy_groups(13), tokenizer,
                                            SamplingConfig(negatives=2, passage_max_len=16), seed=3)
  full = FinetuneBatches(stream, batch_size=8)
  batches = [next(full) for _ in range(6)]
  resumed = next(FinetuneBatches(stream, batch_size=8, start_step=5))
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], batches[5][key])
  shards = [next(FinetuneBatches(stream, batch_size=8, start_step=5, shard_index=h, num_shards=4))
            for h in range(4)]
  for key in resumed:
    np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), resumed[key])
  assert batches[0]["passage_input_ids"].shape == (8, 3, 16)
  assert batches[0]["query_attention_mask"].sum(1).min() >= 3  # [CLS] query words [SEP]


def test_seqio_task_yields_the_stream(tokenizer):
  from mote_jax.data.finetune import register_finetune_task
  stream = FinetuneStream.from_train_groups(_toy_groups(5), tokenizer,
                                            SamplingConfig(negatives=2, passage_max_len=16), seed=1)
  task = register_finetune_task("finetune_toy_test", stream)
  examples = list(task.get_dataset(sequence_length=None, split="train", shuffle=False).take(7).as_numpy_iterator())
  expected = stream.batch(range(7))
  for key, value in expected.items():
    np.testing.assert_array_equal(np.stack([e[key] for e in examples]), value)


def test_graded_positives_and_negatives_free_of_judged_passages():
  ids = [f"d{i}" for i in range(8)]
  qrels = {"q": {"d1": 1, "d2": 2, "d3": 0, "d4": -1}}
  run = {"q": {d: 10.0 - i for i, d in enumerate(["d3", "d1", "d5", "d2", "d4", "d6", "d7", "d0"])}}
  group = beir_groups(ids, {"q": "query"}, qrels, run, num_negatives=3)
  assert len(group) == 1
  assert [ids[r] for r in group.positives_of(0)] == ["d2", "d1"]  # highest grade first
  assert [ids[r] for r in group.negatives_of(0)] == ["d5", "d6", "d7"]  # run order, no judged passage of any grade
  assert {ids[r] for r in group.judged_of(0)} == {"d1", "d2", "d3", "d4"}
  group = beir_groups(ids, {"q": "query"}, qrels, run, num_negatives=3, min_positive_grade=2)
  assert [ids[r] for r in group.positives_of(0)] == ["d2"]
  assert [ids[r] for r in group.negatives_of(0)] == ["d5", "d6", "d7"]  # d1 (grade 1) is judged: never a negative
  assert "d1" in {ids[r] for r in group.judged_of(0)}
  with pytest.raises(ValueError, match="min_positive_grade=0"):
    beir_groups(ids, {"q": "query"}, qrels, run, min_positive_grade=0)


def test_batches_carry_the_corpus_indices_the_loss_masks_with(tokenizer):
  groups = _toy_groups(6, negatives=4)
  # q0's qrels also judge q1's positive, one of q2's negatives and a document no group holds.
  groups[0] = TrainGroup(groups[0].query_id, groups[0].query, groups[0].positives, groups[0].negatives,
                         judged=("p1", "n2_3", "unseen"))
  stream = FinetuneStream.from_train_groups(groups, tokenizer, SamplingConfig(negatives=2, passage_max_len=16), seed=0)
  by_text = {p.text: p.docid for g in groups for p in g.positives + g.negatives}
  docids = sorted(by_text.values())
  batch = next(FinetuneBatches(stream, batch_size=6))
  assert batch["query_judged_index"].shape == (6, 3)  # the widest judged list: q0's p1, n2_3 and p0
  for r in range(6):
    texts = [tokenizer.decode(ids[ids != tokenizer.pad_token_id][1:-1]) for ids in batch["passage_input_ids"][r]]
    assert [docids[i] for i in batch["passage_doc_index"][r]] == [by_text[t] for t in texts]
    query = tokenizer.decode(batch["query_input_ids"][r][batch["query_attention_mask"][r] == 1][1:-1])
    number = int(query.rsplit(" ", 1)[1])
    judged = {docids[i] for i in batch["query_judged_index"][r] if i >= 0}
    assert judged == ({"p0", "p1", "n2_3"} if number == 0 else {f"p{number}"})


def test_dev_split_is_reproducible_and_disjoint(data_dir):
  from mote_jax.data.finetune import split_dev
  ids = list(load_beir(data_dir / "scifact", "train").queries)
  train, dev = split_dev(ids, 0.1, seed=0)
  assert sorted(train + dev) == sorted(ids) and not set(train) & set(dev)
  assert 0.06 * len(ids) <= len(dev) <= 0.14 * len(ids)
  assert split_dev(ids[::-1], 0.1, seed=0)[1] == dev[::-1]  # by id alone, not by position
  assert split_dev(ids[:100], 0.1, seed=0)[1] == [q for q in dev if q in set(ids[:100])]
  assert split_dev(ids, 0.1, seed=1)[1] != dev
  with pytest.raises(ValueError, match="dev fraction 1.0"):
    split_dev(ids, 1.0)


def test_training_groups_drop_judged_passages_from_a_mined_file(tmp_path):
  from mote_jax.jobs.finetune import training_groups
  from mote_jax.retrieval.beir import BeirDataset, Corpus
  corpus = Corpus(tuple(f"d{i}" for i in range(6)), ("",) * 6, tuple(f"document {i}" for i in range(6)))
  data = BeirDataset("toy", "train", corpus, {"q": "a query", "other": "not in the file"},
                     {"q": {"d0": 1, "d1": 0}, "other": {"d2": 1}})
  mined = tmp_path / "mined.jsonl"
  mined.write_text(json.dumps({"query_id": "q", "query": "a query",
                               "positive_passages": [{"docid": "d0", "text": "document 0"}],
                               "negative_passages": [{"docid": d, "text": f"document {d[1]}"}
                                                     for d in ("d1", "d3", "d4")]}) + "\n"
                   + json.dumps({"query_id": "gone", "query": "a dev query",
                                 "positive_passages": [{"docid": "d5", "text": "document 5"}]}) + "\n")
  training = training_groups(str(tmp_path), "train", negatives=[str(mined)], data=data)
  ids, group = corpus.ids, training.groups
  assert group.query_ids == ("q",)  # queries outside the split (e.g. carved out as dev) are left out
  assert training.query_texts == ("a query",)
  assert [ids[r] for r in group.negatives_of(0)] == ["d3", "d4"]
  assert {ids[r] for r in group.judged_of(0)} == {"d0", "d1"}


def test_stream_of_cached_token_arrays_matches_the_tokenizer(tmp_path, tokenizer, scifact_train, scifact_bm25,
                                                              monkeypatch):
  """FinetuneStream.build tokenises the corpus and queries once into the cache (memory-mapped), and its batches
  hold exactly what the tokenizer gives for each drawn passage; a second build reads the cache."""
  from mote_jax.data import flat_tokens
  from mote_jax.data.finetune import TrainingData
  ids, passages = scifact_train.corpus.ids, scifact_train.corpus.passages()
  table = beir_groups(ids, scifact_train.queries, scifact_train.qrels, scifact_bm25, num_negatives=5)
  data = TrainingData(table, ids, passages, tuple(scifact_train.queries[q] for q in table.query_ids),
                      flat_tokens.texts_fingerprint(passages, ids))
  sampling = SamplingConfig(negatives=3, query_max_len=16, passage_max_len=24)
  stream = FinetuneStream.build(data, tokenizer, sampling, seed=5, cache_dir=tmp_path / "cache")
  assert isinstance(stream.passages.ids, np.memmap) and len(stream.passages) == len(ids)
  entries = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
  assert [e.split("-")[0] for e in entries] == ["corpus", "queries"]
  batch = next(FinetuneBatches(stream, batch_size=16, start_step=7))

  def padded(text, length):
    row = tokenizer(text, truncation=True, max_length=length)["input_ids"]
    return row + [tokenizer.pad_token_id] * (length - len(row))

  by_query = {}
  for i, q in enumerate(table.query_ids):
    by_query.setdefault(tuple(padded(scifact_train.queries[q], 16)), i)
  for r in range(16):
    rows = batch["passage_doc_index"][r]
    assert [list(x) for x in batch["passage_input_ids"][r]] == [padded(passages[i], 24) for i in rows]
    group = by_query[tuple(batch["query_input_ids"][r])]
    assert rows[0] in set(table.positives_of(group))
    assert set(rows[1:]) <= set(table.negatives_of(group))
    assert set(batch["query_judged_index"][r][batch["query_judged_index"][r] >= 0]) == set(table.judged_of(group))

  def no_rebuild(*args, **kwargs):
    raise AssertionError("the token cache was rebuilt")

  monkeypatch.setattr(flat_tokens, "write_tokens", no_rebuild)
  again = FinetuneStream.build(data, tokenizer, sampling, seed=5, cache_dir=tmp_path / "cache")
  resumed = next(FinetuneBatches(again, batch_size=16, start_step=7))
  for key in batch:
    np.testing.assert_array_equal(resumed[key], batch[key])
  # Another length is another cache entry (the fingerprint holds the length).
  monkeypatch.undo()
  FinetuneStream.build(data, tokenizer, SamplingConfig(negatives=3, query_max_len=16, passage_max_len=32),
                       cache_dir=tmp_path / "cache")
  assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 3


def test_sharded_bm25_run_is_cached_and_threads_agree(tmp_path, scifact_train, scifact_bm25, monkeypatch):
  """The cached, multi-threaded run equals the in-process single-threaded one; a second call (stage 2) reads the
  cache; other k1/b are another entry."""
  from mote_jax.data import bm25
  ids, passages, queries = scifact_train.corpus.ids, scifact_train.corpus.passages(), scifact_train.queries
  run = bm25.sharded_bm25_run(ids, passages, queries, depth=100, n_threads=2, cache_dir=tmp_path, split="train")
  assert run.query_ids == scifact_bm25.query_ids
  np.testing.assert_array_equal(run.rows, scifact_bm25.rows)
  np.testing.assert_allclose(run.scores, scifact_bm25.scores, rtol=1e-6)
  parts = list((tmp_path / "bm25").glob("train-*/part-00000-of-00001.npz"))
  assert len(parts) == 1

  def no_retrieval(*args, **kwargs):
    raise AssertionError("retrieved again")

  monkeypatch.setattr(bm25, "retrieve", no_retrieval)
  again = bm25.sharded_bm25_run(ids, passages, queries, depth=100, cache_dir=tmp_path, split="train")
  np.testing.assert_array_equal(again.rows, run.rows)
  monkeypatch.undo()
  other = bm25.sharded_bm25_run(ids, passages, queries, depth=100, k1=0.82, b=0.68, cache_dir=tmp_path,
                                split="train")
  assert len(list((tmp_path / "bm25").glob("train-*"))) == 2
  assert (other.rows != run.rows).any()
