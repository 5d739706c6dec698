"""Metrics against hand computation and pytrec_eval used directly; TREC run files and reports."""

import json
import math

import numpy as np
import pytest

from mote_jax.retrieval.metrics import (RunFormatError, compute_metrics, per_query_metrics, ranking_to_run,
                                        read_run, write_report, write_run)

QRELS = {"q1": {"d1": 1, "d3": 1}, "q2": {"d2": 2, "d4": 1, "d5": 0}, "q3": {"d1": 1}}
RUN = {"q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7}, "q2": {"d3": 0.9, "d4": 0.8, "d2": 0.1}}  # q3: no results


def test_hand_computed_example():
  per_query = per_query_metrics(QRELS, RUN, ("nDCG@10", "RR@10", "R@1", "R@10", "AP"))
  log2 = math.log2
  # trec_eval's nDCG gains are the relevance grades themselves.
  assert per_query["q1"]["nDCG@10"] == pytest.approx((1 + 1 / log2(4)) / (1 + 1 / log2(3)))
  assert per_query["q2"]["nDCG@10"] == pytest.approx((1 / log2(3) + 2 / log2(4)) / (2 + 1 / log2(3)))
  assert per_query["q1"]["RR@10"] == 1.0 and per_query["q2"]["RR@10"] == 0.5
  assert per_query["q1"]["R@1"] == 0.5 and per_query["q2"]["R@1"] == 0.0
  assert per_query["q1"]["R@10"] == 1.0 and per_query["q2"]["R@10"] == 1.0
  assert per_query["q1"]["AP"] == pytest.approx((1 + 2 / 3) / 2)
  assert per_query["q2"]["AP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert per_query["q3"] == {"nDCG@10": 0.0, "RR@10": 0.0, "R@1": 0.0, "R@10": 0.0, "AP": 0.0}
  means = compute_metrics(QRELS, RUN, ("nDCG@10", "AP"))
  assert means["AP"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 3)  # q3 counts as 0


def _random_run(seed=0, queries=40, docs=300, depth=150):
  rng = np.random.default_rng(seed)
  doc_ids = [f"doc{i}" for i in range(docs)]
  qrels, run = {}, {}
  for q in range(queries):
    judged = rng.choice(docs, size=rng.integers(1, 12), replace=False)
    qrels[f"q{q}"] = {doc_ids[d]: int(rng.integers(0, 4)) for d in judged}
    if not any(qrels[f"q{q}"].values()):
      qrels[f"q{q}"][doc_ids[judged[0]]] = 1
    retrieved = rng.choice(docs, size=depth, replace=False)
    run[f"q{q}"] = {doc_ids[d]: float(s) for d, s in zip(retrieved, rng.standard_normal(depth))}
  return qrels, run


def test_agrees_with_pytrec_eval_directly():
  import pytrec_eval
  qrels, run = _random_run()
  ours = compute_metrics(qrels, run, ("nDCG@10", "RR@10", "R@10", "R@100", "AP"))
  evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_10", "recall_100", "map"})
  reference = evaluator.evaluate(run)
  mean = lambda key: np.mean([reference[q][key] for q in qrels])  # noqa: E731
  assert ours["nDCG@10"] == pytest.approx(mean("ndcg_cut_10"), abs=1e-9)
  assert ours["R@10"] == pytest.approx(mean("recall_10"), abs=1e-9)
  assert ours["R@100"] == pytest.approx(mean("recall_100"), abs=1e-9)
  assert ours["AP"] == pytest.approx(mean("map"), abs=1e-9)
  # MRR@10 by hand: reciprocal rank of the first relevant document within the top 10, else 0.
  rr = []
  for q, docs in run.items():
    ranked = [d for d, _ in sorted(docs.items(), key=lambda item: -item[1])][:10]
    first = next((i for i, d in enumerate(ranked, 1) if qrels[q].get(d, 0) > 0), None)
    rr.append(1 / first if first else 0.0)
  assert ours["RR@10"] == pytest.approx(np.mean(rr), abs=1e-9)


def test_ranking_to_run_and_trec_round_trip(tmp_path):
  scores = np.array([[0.9, 0.5, 0.25], [np.float32(1 / 3), 0.2, 0.1]], np.float32)
  indices = np.array([[2, 0, 1], [1, 2, 0]])
  run = ranking_to_run(["qa", "qb"], ["x", "y", "z"], scores, indices)
  assert list(run["qa"]) == ["z", "x", "y"] and run["qb"]["y"] == float(np.float32(1 / 3))
  path = write_run(tmp_path / "run.trec", run, tag="test")
  lines = path.read_text().splitlines()
  assert lines[0] == "qa Q0 z 1 0.8999999761581421 test" and lines[3].startswith("qb Q0 y 1 ")
  assert read_run(path) == run  # scores round-trip exactly
  assert not list(tmp_path.glob(".*.tmp"))


def test_run_errors(tmp_path):
  with pytest.raises(ValueError, match="'bad id'"):
    write_run(tmp_path / "r.trec", {"q1": {"bad id": 1.0}})
  with pytest.raises(ValueError, match="not finite"):
    write_run(tmp_path / "r.trec", {"q1": {"d1": float("nan")}})
  (tmp_path / "bad.trec").write_text("q1 Q0 d1 1 0.5 t\nq1 Q0 d2 2 0.4\n")
  with pytest.raises(RunFormatError, match=r"bad.trec:2: expected 6 columns"):
    read_run(tmp_path / "bad.trec")
  (tmp_path / "bad.trec").write_text("q1 Q0 d1 1 0.5 t\nq1 Q0 d1 2 0.4 t\n")
  with pytest.raises(RunFormatError, match=r"bad.trec:2: document 'd1' listed twice"):
    read_run(tmp_path / "bad.trec")
  (tmp_path / "bad.trec").write_text("q1 Q0 d1 one 0.5 t\n")
  with pytest.raises(RunFormatError, match=r"bad.trec:1: rank 'one'"):
    read_run(tmp_path / "bad.trec")


def test_report_is_written_atomically(tmp_path):
  path = write_report(tmp_path / "out" / "report.json", {"metrics": {"nDCG@10": 0.5}, "name": "é"})
  assert json.loads(path.read_text(encoding="utf-8")) == {"metrics": {"nDCG@10": 0.5}, "name": "é"}
  assert [p.name for p in path.parent.iterdir()] == ["report.json"]
