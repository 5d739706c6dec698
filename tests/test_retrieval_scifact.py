"""SciFact end to end with all-MiniLM-L6-v2 (zero-shot): evaluate() against published and independent numbers.

Fast tier: documents truncated to 32 tokens (about 1/8 of the compute), checked against sentence-transformers
(on a sample) and numpy + pytrec_eval. Slow tier: the full 256-token setting against the published nDCG@10.
"""

import json
import logging
import time

import numpy as np
import pytest

from mote_jax.hf_interop import from_hf
from mote_jax.retrieval import EmbeddingStore, EncodeOptions, ScannConfig, evaluate, load_beir, recall_at_k
from mote_jax.retrieval.metrics import read_run
from mote_jax.retrieval.search import exact_search, scann_search

log = logging.getLogger(__name__)

SHORT = EncodeOptions(max_length=32, progress=False)


@pytest.fixture(scope="module")
def minilm(minilm_path):
  return from_hf(minilm_path, tower_mode="siamese")  # pooling=mean, normalize=True from its ST files


def _evaluate(tmp_path_factory, minilm, tokenizer, data_dir, name, options, method="exact", out_dir=None):
  config, params = minilm
  out_dir = out_dir or tmp_path_factory.mktemp(name)
  start = time.perf_counter()
  report = evaluate(config, params, tokenizer, data_dir / "scifact", "test", out_dir=out_dir, method=method,
                    encode_options=options)
  seconds = time.perf_counter() - start
  log.warning("SciFact %s (%s): %.1fs, %s, corpus %s texts/s", name, method, seconds, report["metrics"],
              report["encoding"]["corpus"]["texts_per_second"])
  return out_dir, report


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, minilm, tokenizer, data_dir):
  return _evaluate(tmp_path_factory, minilm, tokenizer, data_dir, "scifact32", SHORT)


def test_short_pipeline_matches_independent_stack(short_run, minilm_path, data_dir):
  """Same truncation, independent stack: sentence-transformers embeddings (on a sample: torch is slow on these
  CPUs), then the stored embeddings through numpy brute force and pytrec_eval."""
  import pytrec_eval
  from sentence_transformers import SentenceTransformer
  out_dir, report = short_run
  data = load_beir(data_dir / "scifact", "test")
  corpus, queries = EmbeddingStore.open(out_dir / "corpus"), EmbeddingStore.open(out_dir / "queries-test")
  assert corpus.manifest["expert"] == "passage" and queries.manifest["expert"] == "query"
  assert corpus.ids == list(data.corpus.ids) and queries.ids == list(data.queries)
  corpus_emb, query_emb = corpus.load(), queries.load()

  model = SentenceTransformer(minilm_path, device="cpu")
  model.max_seq_length = SHORT.max_length
  rng = np.random.default_rng(0)
  docs, qs = rng.choice(len(corpus_emb), 200, replace=False), rng.choice(len(query_emb), 100, replace=False)
  passages, query_texts = data.corpus.passages(), list(data.queries.values())
  np.testing.assert_allclose(corpus_emb[docs], model.encode([passages[i] for i in docs], batch_size=100),
                             atol=5e-5, rtol=0)
  np.testing.assert_allclose(query_emb[qs], model.encode([query_texts[i] for i in qs], batch_size=100),
                             atol=5e-5, rtol=0)

  scores = query_emb @ corpus_emb.T
  top = np.argsort(-scores, axis=1)[:, :1000]
  run = {q: {data.corpus.ids[d]: float(scores[i, d]) for d in top[i]} for i, q in enumerate(data.queries)}
  reference = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut_10", "recall_100"}).evaluate(run)
  assert report["metrics"]["nDCG@10"] == pytest.approx(np.mean([r["ndcg_cut_10"] for r in reference.values()]),
                                                       abs=1e-4)
  assert report["metrics"]["R@100"] == pytest.approx(np.mean([r["recall_100"] for r in reference.values()]),
                                                     abs=1e-4)
  # The run file on disk is the run the metrics were computed from.
  run_file = (out_dir / "run-test-exact.trec").read_text().splitlines()
  assert len(run_file) == 300 * 1000 and run_file[0].split()[3] == "1"
  assert json.loads((out_dir / "report-test-exact.json").read_text()) == report


def _check_scann(out_dir, report, tmp_path_factory, minilm, tokenizer, data_dir, name, options):
  corpus = EmbeddingStore.open(out_dir / "corpus").load()
  queries = EmbeddingStore.open(out_dir / "queries-test").load()
  _, exact = exact_search(queries, corpus, 10)
  _, approximate = scann_search(queries, corpus, 10, ScannConfig())
  recall = recall_at_k(approximate, exact, 10)
  log.warning("SciFact %s: ScaNN recall@10 vs exact %.4f (leaves %s)", name, recall, ScannConfig().leaves(len(corpus)))
  assert recall >= 0.95
  # evaluate() with ScaNN reuses the stored embeddings (every shard is complete) and loses little nDCG.
  _, scann_report = _evaluate(tmp_path_factory, minilm, tokenizer, data_dir, name, options, "scann", out_dir)
  assert scann_report["encoding"]["corpus"]["shards_skipped"] == scann_report["encoding"]["corpus"]["shards"]
  assert scann_report["encoding"]["queries"]["texts_encoded"] == 0
  assert abs(scann_report["metrics"]["nDCG@10"] - report["metrics"]["nDCG@10"]) <= 0.01
  # The report's recall is that of the run evaluate() wrote (ScaNN builds differ slightly from build to build).
  corpus_ids = EmbeddingStore.open(out_dir / "corpus").ids
  query_ids = EmbeddingStore.open(out_dir / "queries-test").ids
  run = read_run(out_dir / "run-test-scann.trec")
  exact_sets = {q: {corpus_ids[i] for i in row} for q, row in zip(query_ids, exact)}
  top10 = {q: sorted(docs, key=docs.get, reverse=True)[:10] for q, docs in run.items()}
  run_recall = np.mean([len(exact_sets[q] & set(top10[q])) / 10 for q in query_ids])
  assert scann_report["search"]["recall_vs_exact_at_10"] == pytest.approx(run_recall, abs=1e-4)
  assert (out_dir / "run-test-scann.trec").exists() and (out_dir / "report-test-scann.json").exists()


def test_scann_recall_on_scifact_embeddings(short_run, tmp_path_factory, minilm, tokenizer, data_dir):
  _check_scann(*short_run, tmp_path_factory, minilm, tokenizer, data_dir, "scifact32", SHORT)


@pytest.mark.slow
def test_zero_shot_minilm_ndcg_at_10(tmp_path_factory, minilm, tokenizer, data_dir):
  """Published anchor: all-MiniLM-L6-v2 on SciFact test, nDCG@10 = 0.645 (max_seq_length 256)."""
  out_dir, report = _evaluate(tmp_path_factory, minilm, tokenizer, data_dir, "scifact256",
                              EncodeOptions(max_length=256, progress=False))
  assert report["metrics"]["nDCG@10"] == pytest.approx(0.645, abs=0.005)
  assert report["num_queries"] == 300 and report["num_documents"] == 5183
  _check_scann(out_dir, report, tmp_path_factory, minilm, tokenizer, data_dir, "scifact256",
               EncodeOptions(max_length=256, progress=False))
