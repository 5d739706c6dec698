"""Parity of the JAX encoder with HF PyTorch BERT and sentence-transformers (independent references)."""

import jax
import numpy as np
import pytest
import torch
from transformers import BertForMaskedLM, BertModel

from mote_jax.hf_interop import from_hf
from mote_jax.model import EXPERTS, MoteEncoder


def _batch(tokenizer, texts, max_length=128):
  return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np"))


def _torch_hidden(path, batch, attn_implementation):
  model = BertModel.from_pretrained(path, attn_implementation=attn_implementation).eval()
  with torch.no_grad():
    out = model(**{k: torch.tensor(v) for k, v in batch.items()})
  return out.last_hidden_state.numpy()


def _jax_hidden(config, params, batch, expert):
  return np.asarray(MoteEncoder(config).apply(
      {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], expert=expert))


def _check_hidden(path, tokenizer, sentences, tower_mode, scan_layers):
  # Padded batch: lengths vary from a few tokens to the truncation limit.
  batch = _batch(tokenizer, sentences[:6] + [sentences[40] + " " + sentences[41], "Short."])
  assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
  eager = _torch_hidden(path, batch, "eager")  # BERT's own math, padding positions included
  sdpa = _torch_hidden(path, batch, "sdpa")  # transformers' default kernel
  config, params = from_hf(path, tower_mode=tower_mode, scan_layers=scan_layers)
  tokens = batch["attention_mask"][..., None].astype(bool)
  for expert in EXPERTS:
    hidden = _jax_hidden(config, params, batch, expert)
    assert hidden.shape == eager.shape
    np.testing.assert_allclose(hidden, eager, atol=1e-4, rtol=0)
    # sdpa's own error at padded query positions exceeds 1e-4 (measured against float64); compare real tokens.
    assert np.abs(np.where(tokens, hidden - sdpa, 0)).max() <= 1e-4


@pytest.mark.parametrize("tower_mode,scan_layers", [("siamese", False), ("mote", True), ("separated", False)])
def test_random_bert_matches_torch(random_bert_dir, tokenizer, scifact_sentences, tower_mode, scan_layers):
  _check_hidden(str(random_bert_dir), tokenizer, scifact_sentences, tower_mode, scan_layers)


@pytest.mark.parametrize("tower_mode,scan_layers", [("siamese", False), ("mote", False), ("mote", True)])
def test_minilm_matches_torch(minilm_path, tokenizer, scifact_sentences, tower_mode, scan_layers):
  _check_hidden(minilm_path, tokenizer, scifact_sentences, tower_mode, scan_layers)


def test_mlm_logits_match_torch(random_bert_dir, tokenizer, scifact_sentences):
  batch = _batch(tokenizer, scifact_sentences[:4])
  model = BertForMaskedLM.from_pretrained(random_bert_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    ref = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
  config, params = from_hf(random_bert_dir, tower_mode="mote")
  encoder = MoteEncoder(config)
  hidden = encoder.apply({"params": params}, batch["input_ids"], batch["attention_mask"], expert="passage")
  logits = np.asarray(encoder.apply({"params": params}, hidden, expert="passage", method=MoteEncoder.mlm_logits))
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_pytorch_bin_checkpoint_loads(random_bert_dir, tmp_path):
  """pytorch_model.bin checkpoints (with the 'bert.' prefix of BertForMaskedLM) load like safetensors."""
  model = BertForMaskedLM.from_pretrained(random_bert_dir)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text((random_bert_dir / "config.json").read_text())
  _, from_bin = from_hf(tmp_path, tower_mode="siamese")
  _, from_st = from_hf(random_bert_dir, tower_mode="siamese")
  jax.tree.map(np.testing.assert_array_equal, from_bin, from_st)


def test_sentence_transformers_encode(minilm_path, tokenizer, scifact_sentences):
  from sentence_transformers import SentenceTransformer
  texts = scifact_sentences[:40]
  reference = SentenceTransformer(minilm_path, device="cpu").encode(texts, batch_size=16, convert_to_numpy=True)
  config, params = from_hf(minilm_path, tower_mode="mote")
  assert (config.pooling, config.normalize) == ("mean", True)  # read from the sentence-transformers files
  batch = _batch(tokenizer, texts, max_length=256)
  for expert in EXPERTS:
    ours = np.asarray(MoteEncoder(config).apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], expert=expert, method=MoteEncoder.embed))
    cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert cosine.shape == (40,)
    assert cosine.min() >= 0.9999, cosine.min()
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
