"""Tevatron's two-stage MS MARCO recipe through the launcher on the TREC DL 2019 subset (small model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _launch(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "mote_jax.launch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.mark.slow  # both Tevatron stages end to end: ~90 s on 2 cores
def test_two_stage_recipe_end_to_end(tmp_path, data_dir, random_bert_dir):
  subset = data_dir / "msmarco-dl19-subset"
  common = [f"--gin.MSMARCO={subset}", f"--gin.ModelSource.checkpoint={random_bert_dir}",
            "--gin.EncodeOptions.max_length=64", "--gin.SamplingConfig.passage_max_len=64"]
  stage1 = tmp_path / "s1"
  _launch("--gin_file=runs/msmarco_dl19_smoke.gin", f"--gin.MODEL_DIR={stage1}", *common)
  report = json.loads((stage1 / "eval" / "report-test-exact.json").read_text())
  assert set(report["metrics"]) == {"RR@10", "R@50", "R@1000", "nDCG@10"}
  # Mining searched the evaluation's corpus encoding instead of encoding the corpus again.
  assert not (stage1 / "mining" / "corpus").exists() and (stage1 / "mining" / "queries-test").exists()
  # The mined file holds ids only, never passage text.
  mined = [json.loads(line) for line in (stage1 / "mined_negatives.jsonl").read_text().splitlines()]
  assert len(mined) == 43 and all(len(m["negative_document_ids"]) == 30 for m in mined)
  # Doc ids only, never passage text.
  assert all(set(m) == {"query_id", "positive_document_ids", "negative_document_ids", "judged_document_ids"}
             for m in mined)
  from mote_jax.retrieval.beir import load_corpus
  corpus_ids = set(load_corpus(subset / "corpus.jsonl").ids)
  assert all(set(m["negative_document_ids"]) <= corpus_ids for m in mined)
  qrels = {}
  for line in (subset / "qrels" / "test.tsv").read_text().splitlines()[1:]:
    q, d, rel = line.split("\t")
    qrels.setdefault(q, {})[d] = int(rel)
  for m in mined:  # judged positives never come back as negatives
    assert not set(m["negative_document_ids"]) & set(qrels[m["query_id"]])
  assert (stage1 / "hf" / "query" / "model.safetensors").exists()

  stage2 = tmp_path / "s2"
  result = _launch("--gin_file=runs/msmarco_dl19_smoke.gin", "--gin_file=runs/msmarco_dl19_smoke_stage2.gin",
                   f"--gin.MODEL_DIR={stage2}", f"--gin.STAGE1_NEGATIVES={stage1 / 'mined_negatives.jsonl'}",
                   *common)
  assert "negatives from ['bm25', " in result.stderr
  report = json.loads((stage2 / "eval" / "report-test-exact.json").read_text())
  assert set(report["metrics"]) == {"RR@10", "R@50", "R@1000", "nDCG@10"}
  assert report["num_queries"] == 43 and report["num_documents"] == 5000
  assert not (stage2 / "mined_negatives.jsonl").exists()
