"""to_hf: standard HF BertModel + sentence-transformers towers that reproduce the JAX encoder."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import BertModel

from mote_jax import hf_interop
from mote_jax.hf_interop import from_hf, load_mote_config, to_hf
from mote_jax.model import EXPERTS, MoteEncoder


@pytest.fixture(scope="module")
def trained_mote(minilm_path):
  """all-MiniLM-L6-v2 in `mote` mode with the experts pulled apart (as training would)."""
  config, params = from_hf(minilm_path, tower_mode="mote")
  rng = np.random.default_rng(0)
  for layer in params["tower"]["encoder"].values():
    for name, value in layer["ffn"].items():
      value[1] += 0.02 * rng.standard_normal(value[1].shape).astype(value.dtype)  # passage expert only
  return config, params


def test_round_trip_through_transformers_and_sentence_transformers(trained_mote, minilm_path, tokenizer,
                                                                    scifact_sentences, tmp_path):
  from sentence_transformers import SentenceTransformer
  config, params = trained_mote
  out = to_hf(config, params, tmp_path / "export", tokenizer=minilm_path, max_seq_length=256)
  assert sorted(p.name for p in out.iterdir()) == ["mote_config.json", "passage", "query"]
  assert load_mote_config(out) == config
  texts = scifact_sentences[:33]
  batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="np"))
  encoder = MoteEncoder(config)
  embeddings = {}
  for expert in EXPERTS:
    tower = out / expert
    assert json.loads((tower / "config.json").read_text())["architectures"] == ["BertModel"]
    assert json.loads((tower / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    ours = np.asarray(encoder.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                    batch["token_type_ids"], expert=expert))
    model = BertModel.from_pretrained(tower, attn_implementation="eager").eval()
    with torch.no_grad():
      theirs = model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    # Real tokens within 1e-5. Padded query positions carry no information and are more sensitive to the
    # order of float32 operations (HF eager vs float64 differs there by ~1e-4 too): 1e-4 (+1e-4 relative) there.
    tokens = batch["attention_mask"][..., None] > 0
    assert np.abs(np.where(tokens, theirs - ours, 0)).max() <= 1e-5
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)

    embeddings[expert] = np.asarray(encoder.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                                  expert=expert, method=MoteEncoder.embed))
    st = SentenceTransformer(str(tower), device="cpu").encode(texts, batch_size=16, convert_to_numpy=True)
    cosine = (st * embeddings[expert]).sum(-1) / np.linalg.norm(st, axis=-1)
    assert cosine.min() >= 0.9999, cosine.min()
    np.testing.assert_allclose(st, embeddings[expert], atol=1e-5)
  # The towers really differ: the export did not write one expert twice.
  assert np.abs(embeddings["query"] - embeddings["passage"]).max() > 1e-3


def test_reimport_of_exported_tower(trained_mote, tmp_path):
  config, params = trained_mote
  out = to_hf(config, params, tmp_path / "export", tokenizer=None)
  _, passage = from_hf(out / "passage", tower_mode="siamese")
  for i in range(config.num_layers):
    for name, value in params["tower"]["encoder"][f"layer_{i}"]["ffn"].items():
      np.testing.assert_array_equal(passage["tower"]["encoder"][f"layer_{i}"]["ffn"][name][0], value[1])


def test_failed_export_leaves_nothing(trained_mote, tmp_path, monkeypatch):
  config, params = trained_mote
  calls = []

  def failing_save(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:  # the query tower is complete, the passage tower fails mid-way
      open(path, "wb").write(b"partial")
      raise OSError("disk full")
    from safetensors.numpy import save_file as real
    real(tensors, path, metadata=metadata)

  monkeypatch.setattr("safetensors.numpy.save_file", failing_save)
  with pytest.raises(OSError, match="disk full"):
    to_hf(config, params, tmp_path / "export", tokenizer=None)
  assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(trained_mote, tmp_path):
  config, params = trained_mote
  to_hf(config, params, tmp_path / "export", tokenizer=None)
  with pytest.raises(FileExistsError, match="exists"):
    to_hf(config, params, tmp_path / "export", tokenizer=None)
  to_hf(config, params, tmp_path / "export", tokenizer=None, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_from_sharded_params(trained_mote, tmp_path):
  """Params living on a mesh (what training holds) export like host arrays."""
  from mote_jax.partitioning import MeshConfig, Partitioner
  config, params = trained_mote
  partitioner = Partitioner.create(MeshConfig(data=4, model=2))
  shardings = partitioner.param_shardings(jax.eval_shape(
      lambda: hf_interop.init_params(config, jax.random.PRNGKey(0))))
  sharded = partitioner.shard(params, shardings)
  out = to_hf(config, sharded, tmp_path / "export", tokenizer=None)
  host = hf_interop.export_tower(config, params, "query")
  from safetensors.numpy import load_file
  written = load_file(str(out / "query" / "model.safetensors"))
  assert written.keys() == host.keys()
  for name in host:
    np.testing.assert_array_equal(written[name], host[name])


@pytest.mark.parametrize("tower_mode", ["mote", "separated"])
def test_from_hf_towers_reads_an_export_back(minilm_path, tmp_path, tower_mode):
  config, params = from_hf(minilm_path, tower_mode=tower_mode, scan_layers=True)
  last = config.tower_names[-1]
  params[last]["encoder"]["layers"]["ffn"]["output_bias"][:, -1] += 0.5  # the passage side differs
  to_hf(config, params, tmp_path / "export", tokenizer=None)
  restored_config, restored = hf_interop.from_hf_towers(tmp_path / "export")
  assert restored_config == config
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    if "mlm_head" in jax.tree_util.keystr(path):
      continue  # not exported
    other = restored
    for key in path:
      other = other[key.key]
    np.testing.assert_array_equal(other, value)


def test_from_hf_towers_rejects_towers_that_do_not_share(trained_mote, tmp_path):
  config, params = trained_mote
  out = to_hf(config, params, tmp_path / "export", tokenizer=None)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(out / "query" / "model.safetensors"))
  tensors["encoder.layer.0.attention.self.query.bias"] += 1.0
  save_file(tensors, str(out / "query" / "model.safetensors"))
  with pytest.raises(hf_interop.CheckpointError, match="shared parameter .*query_bias differs"):
    hf_interop.from_hf_towers(out)
