"""Exact search on the 8 emulated devices equals numpy brute force; top-k merging; ScaNN on small sets."""

import jax
import numpy as np
import pytest

from mote_jax.retrieval import store
from mote_jax.retrieval.search import (ScannConfig, exact_search, merge_topk, recall_at_k, rescore_exactly,
                                       scann_search)
from mote_jax.retrieval.store import EmbeddingStore


def _brute_force(queries, corpus, k):
  scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, 1), order


def _data(rows=1000, queries=37, dim=48, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((queries, dim)).astype(np.float32),
          rng.standard_normal((rows, dim)).astype(np.float32))


@pytest.mark.parametrize("rows,k,chunk_rows", [(1000, 10, 65536), (1000, 100, 96), (13, 20, 65536), (517, 5, 64)])
def test_exact_search_on_8_devices_equals_numpy(rows, k, chunk_rows):
  assert len(jax.local_devices()) == 8
  queries, corpus = _data(rows)
  scores, indices = exact_search(queries, corpus, k, chunk_rows=chunk_rows, query_block=16)
  ref_scores, ref_indices = _brute_force(queries, corpus, min(k, rows))
  assert indices.shape == (len(queries), min(k, rows)) and indices.dtype == np.int64
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=0)


def test_exact_search_over_store_shards(tmp_path):
  """A store's shards (sizes 100, 100, 57) stream through chunks that straddle shard boundaries."""
  queries, corpus = _data(257)
  ids = [f"d{i}" for i in range(len(corpus))]
  manifest = {"format": store.FORMAT_VERSION, "num_texts": len(ids), "dim": corpus.shape[1], "shard_size": 100,
              "ids_sha1": store.ids_digest(ids)}
  store.check_or_write_manifest(tmp_path, manifest, write=True)
  for shard in range(3):
    store.write_shard(tmp_path, shard, ids[shard * 100:(shard + 1) * 100], corpus[shard * 100:(shard + 1) * 100])
  opened = EmbeddingStore.open(tmp_path)
  assert opened.ids == ids and len(opened) == 257
  np.testing.assert_array_equal(opened.load(), corpus)
  scores, indices = exact_search(queries, opened, 25, chunk_rows=72)
  ref_scores, ref_indices = _brute_force(queries, corpus, 25)
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=0)


def test_merge_topk_breaks_ties_by_index():
  scores = [np.array([[3.0, 1.0]]), np.array([[2.0, 1.0]]), np.array([[1.0, 0.5]])]
  indices = [np.array([[7, 9]]), np.array([[4, 2]]), np.array([[5, 1]])]
  merged_scores, merged_indices = merge_topk(scores, indices, 4)
  np.testing.assert_array_equal(merged_scores, [[3.0, 2.0, 1.0, 1.0]])
  np.testing.assert_array_equal(merged_indices, [[7, 4, 2, 5]])


def _clustered(num_queries: int, seed: int, rows: int = 20000, dim: int = 32, clusters: int = 50):
  """(queries [num_queries, dim], corpus [rows, dim]): unit rows around `clusters` centres; each query is a
  corpus row plus small noise."""
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((clusters, dim))
  corpus = centers[rng.integers(clusters, size=rows)] + 0.5 * rng.standard_normal((rows, dim))
  corpus = (corpus / np.linalg.norm(corpus, axis=1, keepdims=True)).astype(np.float32)
  picked = corpus[rng.choice(rows, num_queries, replace=False)]
  return picked + 0.05 * rng.standard_normal((num_queries, dim)).astype(np.float32), corpus


def test_scann_on_small_clustered_set_and_split_indices():
  queries, corpus = _clustered(200, seed=1)
  _, exact = _brute_force(queries, corpus, 10)
  scores, approximate = scann_search(queries, corpus, 10)
  assert recall_at_k(approximate, exact, 10) >= 0.95
  # Reordering rescores exactly: returned scores are true inner products.
  np.testing.assert_allclose(scores, np.einsum("qh,qkh->qk", queries, corpus[approximate]), atol=1e-5)
  # Three indices (8000, 8000, 4000 rows), merged per query.
  _, split = scann_search(queries, corpus, 10, ScannConfig(max_rows_per_index=8000))
  assert recall_at_k(split, exact, 10) >= 0.95
  # Fewer rows than `brute_force_below`: exact scoring.
  _, small = scann_search(queries, corpus[:500], 10)
  np.testing.assert_array_equal(small, _brute_force(queries, corpus[:500], 10)[1])


@pytest.mark.parametrize("reorder_dtype", ["bfloat16", "int8"])
def test_scann_quantised_reordering_returns_exact_scores_best_first(reorder_dtype):
  queries, corpus = _clustered(100, seed=2)
  _, exact = _brute_force(queries, corpus, 10)
  scores, approximate = scann_search(queries, corpus, 10, ScannConfig(reorder_dtype=reorder_dtype))
  assert recall_at_k(approximate, exact, 10) >= 0.9
  # The quantised reordering scores are replaced by exact inner products, sorted best first.
  true = np.einsum("qh,qkh->qk", queries, corpus[approximate])
  np.testing.assert_allclose(scores, true, atol=1e-5)
  assert np.all(np.diff(scores, axis=1) <= 0)


def test_rescore_exactly_sorts_breaks_ties_and_scores_fillers_minus_inf():
  rows = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]], np.float32)
  queries = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
  scores, indices = rescore_exactly(queries, rows, np.array([[3, 2, 0], [0, -1, 1]]))
  np.testing.assert_array_equal(indices, [[0, 2, 3], [1, 0, -1]])
  np.testing.assert_allclose(scores, [[1.0, 1.0, 0.5], [2.0, 0.0, -np.inf]])


def test_scann_config_rejects_an_unknown_reorder_dtype():
  with pytest.raises(ValueError, match="reorder_dtype 'fp16'"):
    ScannConfig(reorder_dtype="fp16")


def test_scann_leaf_score_margin_adapts_the_leaves_searched_per_query():
  """`leaf_score_margin` switches ScaNN to ADDITIVE query spilling: margin 0 searches each query's best leaf
  only, a margin wider than any score gap searches `num_leaves_to_search` leaves, as the fixed count does."""
  from benchmarks.scann_recall import clustered_vectors
  from mote_jax.retrieval.search import build_scann
  corpus, mixture = clustered_vectors(20000, 64, clusters=200, noise=1.0, seed=3)
  queries, _ = clustered_vectors(300, 64, noise=1.0, seed=4, mixture=mixture)
  _, exact = _brute_force(queries, corpus, 10)

  def recall(**fields):
    fields = {"num_leaves": 100, "num_leaves_to_search": 30, "soar_lambda": None, **fields}
    searcher = build_scann(corpus, 10, ScannConfig(**fields))
    found, _ = searcher.search_batched(queries)
    return recall_at_k(np.asarray(found), exact, 10), searcher.config()

  fixed_one, _ = recall(num_leaves_to_search=1)
  fixed, fixed_config = recall()
  margin_zero, config = recall(leaf_score_margin=0.0)
  margin_wide, _ = recall(leaf_score_margin=10.0)
  assert "ADDITIVE" in config and "FIXED_NUMBER_OF_CENTERS" not in config and "ADDITIVE" not in fixed_config
  assert fixed - fixed_one > 0.2, (fixed, fixed_one)  # the data needs more than one leaf
  assert abs(margin_zero - fixed_one) < 0.03, (margin_zero, fixed_one)
  assert abs(margin_wide - fixed) < 0.02, (margin_wide, fixed)


def test_scann_config_rejects_a_negative_leaf_score_margin():
  with pytest.raises(ValueError, match="leaf_score_margin -0.1"):
    ScannConfig(leaf_score_margin=-0.1)
