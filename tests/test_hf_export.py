"""to_hf: standard HF BertModel + sentence-transformers towers that reproduce the JAX encoder."""

import json
from pathlib import Path

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


def _longest_scifact_passages(data_dir, n: int) -> list[str]:
  docs = [json.loads(line) for line in (data_dir / "scifact" / "corpus.jsonl").read_text().splitlines()]
  texts = [(d["title"] + " " + d["text"]).strip() for d in docs]
  return sorted(texts, key=len, reverse=True)[:n]


def test_import_export_round_trip_serves_like_the_source(minilm_path, data_dir, tmp_path):
  """from_hf -> to_hf with no setting passed: sentence-transformers embeds the longest SciFact passages (beyond
  256 tokens, where the serving length matters) as the original model does."""
  from sentence_transformers import SentenceTransformer
  config, params = from_hf(minilm_path, tower_mode="mote")
  source = json.loads((Path(minilm_path) / "sentence_bert_config.json").read_text())
  assert (config.query_max_seq_length, config.passage_max_seq_length) == (source["max_seq_length"],) * 2
  out = to_hf(config, params, tmp_path / "export", tokenizer=minilm_path)
  texts = _longest_scifact_passages(data_dir, 64)
  original = SentenceTransformer(str(minilm_path), device="cpu")
  assert max(len(original.tokenizer(t)["input_ids"]) for t in texts) > source["max_seq_length"]
  expected = original.encode(texts, batch_size=16, convert_to_numpy=True)
  for expert in EXPERTS:
    assert json.loads((out / expert / "sentence_bert_config.json").read_text()) == source
    exported = SentenceTransformer(str(out / expert), device="cpu").encode(texts, batch_size=16,
                                                                           convert_to_numpy=True)
    cosine = (exported * expected).sum(-1) / np.linalg.norm(exported, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cosine.min() >= 0.9999, cosine.min()


def test_towers_keep_their_own_lengths_through_export_job(trained_mote, tmp_path):
  """What fine-tuning writes (each tower at its training length) is what `export_job` keeps with no length given;
  an explicit length still overrides."""
  from mote_jax.jobs.finetune import ModelSource, export_job
  config, params = trained_mote
  trained = to_hf(config, params, tmp_path / "run" / "hf", tokenizer=None,
                  max_seq_length={"query": 64, "passage": 256})
  lengths = lambda d: {e: json.loads((d / e / "sentence_bert_config.json").read_text())["max_seq_length"]  # noqa
                       for e in EXPERTS}
  assert lengths(trained) == {"query": 64, "passage": 256}
  exported = Path(export_job(str(tmp_path / "export"), model=ModelSource(towers=str(trained))))
  assert lengths(exported) == {"query": 64, "passage": 256}
  assert load_mote_config(exported).passage_max_seq_length == 256
  again = Path(export_job(str(tmp_path / "export2"), model=ModelSource(towers=str(trained)), max_seq_length=128))
  assert lengths(again) == {"query": 128, "passage": 128}
  with pytest.raises(ValueError, match="keys"):
    to_hf(config, params, tmp_path / "bad", tokenizer=None, max_seq_length={"passages": 128})


def test_serving_lengths_of_older_exports_come_from_the_tower_files(trained_mote, tmp_path):
  """An export whose mote_config.json predates the serving fields reads each tower's sentence_bert_config."""
  config, params = trained_mote
  out = to_hf(config, params, tmp_path / "export", tokenizer=None, max_seq_length={"query": 32, "passage": 200})
  recorded = json.loads((out / "mote_config.json").read_text())
  for key in ("query_max_seq_length", "passage_max_seq_length", "st_do_lower_case"):
    del recorded[key]
  (out / "mote_config.json").write_text(json.dumps(recorded))
  restored, _ = hf_interop.from_hf_towers(out)
  assert (restored.query_max_seq_length, restored.passage_max_seq_length) == (32, 200)
