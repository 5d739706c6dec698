"""Encoding: right expert, input order kept through length sorting, padding masked out, resumable shards."""

import json

import jax
import numpy as np
import pytest

from mote_jax.model import MoteConfig, MoteEncoder, init_params
from mote_jax.partitioning import MeshConfig, Partitioner
from mote_jax.retrieval.encode import EncodeOptions, Embedder, encode_texts, encode_to_store, params_fingerprint
from mote_jax.retrieval.store import EmbeddingStore, StoreMismatchError

TINY = MoteConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                  max_position_embeddings=128, tower_mode="mote", pooling="mean", normalize=True)
OPTIONS = EncodeOptions(batch_size=16, max_length=64, length_step=16, shard_size=10, progress=False)


@pytest.fixture(scope="module")
def tiny_params_unboxed():
  """Random tiny MoTE params whose passage expert is pushed well away from the query expert."""
  import flax.linen as nn
  params = jax.tree.map(np.array, nn.unbox(jax.jit(lambda: init_params(TINY, jax.random.PRNGKey(3)))()))
  rng = np.random.default_rng(0)
  for layer in params["tower"]["encoder"].values():
    for value in layer["ffn"].values():  # [experts, ...]
      value[1] += rng.normal(0, 0.5, value.shape[1:]).astype(value.dtype)
  return params


@pytest.fixture(scope="module")
def embedder(tiny_params_unboxed):
  return Embedder(TINY, tiny_params_unboxed, Partitioner.create(MeshConfig(data=-1)))


@pytest.fixture(scope="module")
def texts(scifact_sentences):
  """45 texts of mixed lengths, some longer than max_length (truncated), in no length order."""
  rng = np.random.default_rng(0)
  picked = [scifact_sentences[i] for i in rng.permutation(len(scifact_sentences))[:40]]
  return picked + ["Short.", "x", " ".join(scifact_sentences[:6]), "Cells.", " ".join(scifact_sentences[6:9])]


def _reference(params, tokenizer, texts, expert, max_length):
  """All texts in one padded batch, in input order, straight through MoteEncoder.embed on the default device."""
  batch = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="np")
  return np.asarray(MoteEncoder(TINY).apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                            expert=expert, method=MoteEncoder.embed))


class CountingTokenizer:
  """Wraps a tokenizer: counts calls (one per encoded shard) and can crash on the n-th call."""

  def __init__(self, tokenizer, crash_on_call=None):
    self.tokenizer, self.crash_on_call, self.calls = tokenizer, crash_on_call, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    if self.calls == self.crash_on_call:
      raise KeyboardInterrupt("simulated crash")
    return self.tokenizer(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.tokenizer, name)


@pytest.mark.parametrize("expert", ["query", "passage"])
def test_encode_texts_keeps_order_and_uses_the_expert(embedder, tiny_params_unboxed, tokenizer, texts, expert):
  assert embedder.partitioner.data_parallel_size == 8
  embeddings = encode_texts(embedder, tokenizer, texts, expert, OPTIONS)
  reference = _reference(tiny_params_unboxed, tokenizer, texts, expert, OPTIONS.max_length)
  assert embeddings.shape == (len(texts), TINY.hidden_size) and embeddings.dtype == np.float32
  np.testing.assert_allclose(embeddings, reference, atol=2e-5, rtol=0)
  other = "passage" if expert == "query" else "query"  # the experts differ, so a mix-up cannot pass
  assert np.abs(embeddings - _reference(tiny_params_unboxed, tokenizer, texts, other, 64)).max() > 0.1


def test_encode_texts_edge_cases(embedder, tokenizer, texts):
  assert encode_texts(embedder, tokenizer, [], "query", OPTIONS).shape == (0, TINY.hidden_size)
  one = encode_texts(embedder, tokenizer, texts[:1], "query", OPTIONS)  # 1 real row, 15 padding rows
  np.testing.assert_allclose(one[0], encode_texts(embedder, tokenizer, texts, "query", OPTIONS)[0], atol=2e-5)
  with pytest.raises(ValueError, match="multiple of the data-parallel size 8"):
    encode_texts(embedder, tokenizer, texts, "query", EncodeOptions(batch_size=12))
  with pytest.raises(ValueError, match="expert='document'"):
    encode_texts(embedder, tokenizer, texts, "document", OPTIONS)


def test_matches_sentence_transformers(minilm_path, tokenizer, scifact_sentences):
  """all-MiniLM-L6-v2 through encode_texts (bucketed, sorted, sharded) equals sentence-transformers."""
  from sentence_transformers import SentenceTransformer
  from mote_jax.hf_interop import from_hf
  texts = scifact_sentences[:20] + [" ".join(scifact_sentences[20:32])]  # the last one exceeds 256 tokens
  config, params = from_hf(minilm_path, tower_mode="siamese")
  ours = encode_texts(Embedder(config, params), tokenizer, texts, "passage",
                      EncodeOptions(batch_size=8, progress=False))
  model = SentenceTransformer(minilm_path, device="cpu")
  assert model.max_seq_length == 256
  reference = model.encode(texts, batch_size=16, convert_to_numpy=True)
  np.testing.assert_allclose(ours, reference, atol=2e-5, rtol=0)


def _ids(texts):
  return [f"t{i}" for i in range(len(texts))]


def test_store_layout_and_contents(embedder, tokenizer, texts, tmp_path):
  stats = encode_to_store(embedder, tokenizer, texts, _ids(texts), "passage", tmp_path, OPTIONS, model="m1")
  assert (stats.num_shards, stats.shards_encoded, stats.shards_skipped, stats.texts_encoded) == (5, 5, 0, 45)
  names = sorted(p.name for p in tmp_path.iterdir())
  assert names == ["emb_00000.npy", "emb_00001.npy", "emb_00002.npy", "emb_00003.npy", "emb_00004.npy",
                   "ids_00000.json", "ids_00001.json", "ids_00002.json", "ids_00003.json", "ids_00004.json",
                   "manifest.json"]
  assert json.loads((tmp_path / "ids_00004.json").read_text()) == ["t40", "t41", "t42", "t43", "t44"]
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert manifest["expert"] == "passage" and manifest["num_texts"] == 45 and manifest["model"] == "m1"
  opened = EmbeddingStore.open(tmp_path)
  assert opened.ids == _ids(texts)
  np.testing.assert_allclose(opened.load(), encode_texts(embedder, tokenizer, texts, "passage", OPTIONS),
                             atol=1e-6)


def test_interrupted_encoding_resumes_without_recomputing(embedder, tokenizer, texts, tmp_path):
  ids = _ids(texts)
  crashing = CountingTokenizer(tokenizer, crash_on_call=4)  # dies while encoding shard 3 of 5
  with pytest.raises(KeyboardInterrupt):
    encode_to_store(embedder, crashing, texts, ids, "passage", tmp_path, OPTIONS, model="m1")
  done = sorted(p.name for p in tmp_path.glob("ids_*.json"))
  assert done == ["ids_00000.json", "ids_00001.json", "ids_00002.json"]
  with pytest.raises(StoreMismatchError, match="ids_00003.json: missing"):
    EmbeddingStore.open(tmp_path)
  (tmp_path / ".emb_00003.npy.abcd.tmp").write_bytes(b"half-written")  # what a crash mid-write leaves
  mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*_0000[012].*")}

  counting = CountingTokenizer(tokenizer)
  stats = encode_to_store(embedder, counting, texts, ids, "passage", tmp_path, OPTIONS, model="m1")
  assert counting.calls == 2 and (stats.shards_encoded, stats.shards_skipped, stats.texts_encoded) == (2, 3, 15)
  assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*_0000[012].*")} == mtimes
  assert not list(tmp_path.glob(".*.tmp"))
  fresh = encode_to_store(embedder, tokenizer, texts, ids, "passage", tmp_path / "fresh", OPTIONS, model="m1")
  assert fresh.shards_encoded == 5
  np.testing.assert_array_equal(EmbeddingStore.open(tmp_path).load(), EmbeddingStore.open(tmp_path / "fresh").load())

  again = CountingTokenizer(tokenizer)
  stats = encode_to_store(embedder, again, texts, ids, "passage", tmp_path, OPTIONS, model="m1")
  assert again.calls == 0 and stats.shards_skipped == 5 and stats.texts_encoded == 0


@pytest.mark.parametrize("change,field", [
    (dict(expert="query"), "expert"),
    (dict(model="m2"), "model"),
    (dict(options=EncodeOptions(batch_size=16, max_length=32, length_step=16, shard_size=10)), "max_length"),
    (dict(ids=[f"other{i}" for i in range(45)]), "ids_sha1"),
])
def test_store_refuses_other_inputs(embedder, tokenizer, texts, tmp_path, change, field):
  encode_to_store(embedder, tokenizer, texts[:12], _ids(texts)[:12], "passage", tmp_path, OPTIONS, model="m1")
  kwargs = dict(expert="passage", model="m1", options=OPTIONS, ids=_ids(texts)[:12]) | change
  kwargs["ids"] = kwargs["ids"][:12]
  with pytest.raises(StoreMismatchError, match=rf"manifest.json: field '{field}'"):
    encode_to_store(embedder, tokenizer, texts[:12], kwargs["ids"], kwargs["expert"], tmp_path,
                    kwargs["options"], model=kwargs["model"])


def test_params_fingerprint(tiny_params_unboxed, embedder):
  first = params_fingerprint(tiny_params_unboxed)
  assert first == params_fingerprint(embedder.params)  # host arrays and their sharded copies agree
  changed = jax.tree.map(np.array, tiny_params_unboxed)
  leaf = jax.tree.leaves(changed)[0]
  leaf.flat[0] = np.nextafter(leaf.flat[0], np.float32(1))  # one ulp of one weight
  assert params_fingerprint(changed) != first


def test_a_new_embedder_of_the_same_model_compiles_nothing_new(tiny_params_unboxed, tokenizer, texts):
  """A fine-tuning run evaluates its dev split with a new Embedder (new params) every N steps: the compiled
  shapes of the first are reused, and the second's embeddings are its own params' (checked against the
  unbatched reference)."""
  partitioner = Partitioner.create(MeshConfig(data=-1))
  first = Embedder(TINY, tiny_params_unboxed, partitioner)
  encode_texts(first, tokenizer, texts, "passage", OPTIONS)
  compiled = first._function("passage")._cache_size()
  assert compiled >= 2  # several length buckets
  moved = jax.tree.map(lambda x: x * 1.5, tiny_params_unboxed)
  second = Embedder(TINY, moved, Partitioner.create(MeshConfig(data=-1)))  # an equal mesh, another object
  assert second._function("passage") is first._function("passage")
  got = encode_texts(second, tokenizer, texts, "passage", OPTIONS)
  assert first._function("passage")._cache_size() == compiled
  np.testing.assert_allclose(got, _reference(moved, tokenizer, texts, "passage", OPTIONS.max_length),
                             rtol=2e-5, atol=2e-5)
