"""Search in query blocks (`retrieval.sharded`), ScaNN's recall on a query sample against NumPy exact search, the
index fed from a multi-shard store without an in-memory copy, and several query sets sharing one corpus encoding."""

import json

import numpy as np
import pytest

from mote_jax.retrieval import sharded, store
from mote_jax.retrieval.search import Index, ScannConfig, _index_rows
from mote_jax.retrieval.store import EmbeddingStore


def _clustered(rows, queries, dim=32, clusters=40, seed=0):
  """Rows and queries near random cluster centres: ScaNN's partitions then miss some neighbours (recall < 1)."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((clusters, dim))
  corpus = centres[rng.integers(clusters, size=rows)] + 0.7 * rng.standard_normal((rows, dim))
  query = centres[rng.integers(clusters, size=queries)] + 0.7 * rng.standard_normal((queries, dim))
  return query.astype(np.float32), corpus.astype(np.float32)


def _numpy_top(queries, corpus, k):
  scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _write_store(directory, corpus, shard_size):
  ids = [f"d{i}" for i in range(len(corpus))]
  manifest = {"format": store.FORMAT_VERSION, "num_texts": len(ids), "dim": corpus.shape[1],
              "shard_size": shard_size, "ids_sha1": store.ids_digest(ids)}
  store.check_or_write_manifest(directory, manifest, write=True)
  for shard in range(store.num_shards(len(ids), shard_size)):
    span = slice(shard * shard_size, (shard + 1) * shard_size)
    store.write_shard(directory, shard, ids[span], corpus[span])
  return EmbeddingStore.open(directory)


def test_sampled_recall_equals_numpy_on_the_same_sample():
  queries, corpus = _clustered(4000, 300)
  # Few leaves searched: recall clearly below 1, so a wrong reference or sample would show.
  index = Index(corpus, 10, "scann", scann_config=ScannConfig(num_leaves=64, num_leaves_to_search=2, reorder=20))
  result = sharded.sampled_recall(index, queries, sample_size=120, seed=7, k=10)
  sample = np.sort(np.random.default_rng(7).choice(len(queries), 120, replace=False))
  _, approximate = index.search(queries[sample], 10)
  exact = _numpy_top(queries[sample], corpus, 10)
  reference = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
  assert result == {"recall": pytest.approx(reference, abs=1e-9), "queries": 120, "seed": 7, "k": 10}
  assert 0.3 < reference < 0.99
  # A sample at least as large as the query set is the whole set.
  everything = sharded.sampled_recall(index, queries, sample_size=10_000, seed=1)
  _, approximate = index.search(queries, 10)
  exact = _numpy_top(queries, corpus, 10)
  assert everything["queries"] == 300
  assert everything["recall"] == pytest.approx(np.mean([len(set(a) & set(e)) / 10
                                                         for a, e in zip(approximate, exact)]), abs=1e-9)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 1000])
def test_blocks_cover_the_queries_in_order_and_equal_one_search(tmp_path, block_rows):
  queries, corpus = _clustered(500, 45, seed=1)
  query_store = _write_store(tmp_path / "queries", queries, shard_size=10)  # blocks straddle store shards
  index = Index(corpus, 20, "exact")
  starts, scores, indices = [], [], []
  for start, block_scores, block_indices in sharded.sharded_search(index, query_store, block_rows=block_rows):
    starts.append(start)
    scores.append(block_scores)
    indices.append(block_indices)
  assert starts == list(range(0, 45, block_rows))
  np.testing.assert_array_equal(np.concatenate(indices), _numpy_top(queries, corpus, 20))
  reference = np.take_along_axis(queries @ corpus.T, _numpy_top(queries, corpus, 20), 1)
  np.testing.assert_allclose(np.concatenate(scores), reference, atol=1e-5, rtol=0)


def test_block_rows_bound_a_round():
  assert sharded.default_block_rows(1000, 8) * 1000 * 8 <= sharded.ROUND_PAIRS
  assert sharded.default_block_rows(10**9, 8) == 1


def test_scann_index_of_a_multi_shard_store_is_fed_memory_mapped_rows(tmp_path):
  _, corpus = _clustered(2600, 5, seed=2)
  corpus_store = _write_store(tmp_path / "corpus", corpus, shard_size=1000)
  rows = _index_rows(corpus_store, 500, 2600, str(tmp_path))
  assert isinstance(rows.base, np.memmap) or isinstance(rows, np.memmap)  # a mapping, not a resident copy
  np.testing.assert_array_equal(rows, corpus[500:2600])
  assert not list(tmp_path.glob("mote_index_rows_*"))  # the staging file's name is gone once mapped
  one_shard = _index_rows(corpus_store, 1000, 1500, str(tmp_path))
  np.testing.assert_array_equal(one_shard, corpus[1000:1500])
  # The index over the store (parts straddling shards) finds what the index over the array finds.
  queries, _ = _clustered(10, 30, seed=3)
  config = ScannConfig(max_rows_per_index=900)
  _, from_store = Index(corpus_store, 10, "scann", scann_config=config, staging_dir=str(tmp_path)).search(queries)
  _, from_array = Index(corpus, 10, "scann", scann_config=config).search(queries)
  np.testing.assert_array_equal(from_store, from_array)


# --- several query sets sharing a corpus ----------------------------------------------------------------------------


def _query_sets(data_dir, out):
  """Three BEIR directories cut from SciFact test: 'dev' and 'dl' share one corpus (their corpus.jsonl files are
  equal), 'other' has another corpus."""
  from mote_jax.retrieval import load_beir
  from mote_jax.retrieval.beir import write_subset
  data = load_beir(data_dir / "scifact", "test")
  queries = list(data.queries)
  corpus = {d for q in queries[:12] for d in data.qrels[q]} | set(data.corpus.ids[:30])
  write_subset(data, out / "dev", {"dev": queries[:6]}, corpus)
  write_subset(data, out / "dl", {"test": queries[6:12]}, corpus)
  write_subset(data, out / "other", {"test": queries[12:16]},
               {d for q in queries[12:16] for d in data.qrels[q]} | set(data.corpus.ids[30:50]))
  return out


def _tiny_model():
  """A tiny random MoTE model (host params), built from a fixed key."""
  import flax.linen as nn
  import jax
  from mote_jax.model import MoteConfig, init_params
  config = MoteConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=128, tower_mode="mote", pooling="mean", normalize=True)
  params = jax.tree.map(np.asarray, nn.unbox(jax.jit(lambda: init_params(config, jax.random.PRNGKey(3)))()))
  return config, params


def test_query_sets_sharing_a_corpus_encode_it_once(tmp_path, data_dir, minilm_path, tokenizer, monkeypatch):
  from mote_jax.jobs.finetune import ModelSource, evaluate_job
  from mote_jax.retrieval import EncodeOptions, encode
  from mote_jax.retrieval.evaluate import evaluate
  config, params = _tiny_model()
  monkeypatch.setattr(ModelSource, "load", lambda self: (config, params, minilm_path))  # no HF import to pay for
  beir_root = _query_sets(data_dir, tmp_path / "beir")
  options = EncodeOptions(batch_size=8, max_length=32, length_step=16, shard_size=16, progress=False)
  encoded = []
  original = encode.encode_texts

  def counting(embedder, tokenizer, texts, expert, *args, **kwargs):
    if expert == "passage" and len(texts):
      encoded.append(len(texts))
    return original(embedder, tokenizer, texts, expert, *args, **kwargs)

  monkeypatch.setattr(encode, "encode_texts", counting)
  reports = evaluate_job(str(tmp_path / "job"), model=ModelSource(checkpoint="tiny"), method="scann",
                         data=[[str(beir_root / "dev"), "dev"], str(beir_root / "dl"), str(beir_root / "other")],
                         encode_options=options, k=20)
  assert list(reports) == ["dev-dev", "dl", "other"]
  dev_docs, other_docs = reports["dev-dev"]["num_documents"], reports["other"]["num_documents"]
  assert sum(encoded) == dev_docs + other_docs  # 'dl' encoded no passage: it reused dev's corpus encoding
  assert reports["dl"]["encoding"]["corpus"]["reused_in_memory"]
  assert not reports["other"]["encoding"]["corpus"]["reused_in_memory"]
  stores = sorted(p.name for p in (tmp_path / "job" / "eval" / "corpora").iterdir())
  assert len(stores) == 2  # one store per corpus
  assert reports["dev-dev"]["files"]["corpus_embeddings"] == reports["dl"]["files"]["corpus_embeddings"]
  for report in reports.values():  # the corpora are small: ScaNN scores them all (brute force)
    assert report["search"]["recall_vs_exact_at_10"] >= 0.9
    assert report["search"]["recall_sample"]["queries"] == report["num_queries"]

  # The set that reused another's encoding scores as an evaluation of it alone (its own corpus encoding).
  encoded.clear()
  alone = evaluate(config, params, tokenizer, beir_root / "dl", "test", out_dir=tmp_path / "alone", method="scann",
                   encode_options=options, k=20)
  assert sum(encoded) == dev_docs
  assert alone["metrics"] == pytest.approx(reports["dl"]["metrics"], abs=1e-6)
  written = json.loads((tmp_path / "job" / "eval" / "dl" / "report-test-scann.json").read_text())
  assert written["metrics"] == reports["dl"]["metrics"]
  assert (tmp_path / "alone" / "run-test-scann.trec").read_text() == \
      (tmp_path / "job" / "eval" / "dl" / "run-test-scann.trec").read_text()


def test_streamed_text_is_renamed_on_success_and_removed_on_error(tmp_path):
  from etils import epath
  from mote_jax.retrieval.evaluate import StreamedText
  with StreamedText(epath.Path(tmp_path / "run.trec"), True) as text:
    text.write("a\n")
    text.write("b\n")
  with pytest.raises(RuntimeError, match="search failed"):
    with StreamedText(epath.Path(tmp_path / "failed.trec"), True) as text:
      text.write("partial\n")
      raise RuntimeError("search failed")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run.trec"]
  assert (tmp_path / "run.trec").read_text() == "a\nb\n"
