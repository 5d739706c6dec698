"""Parity of the JAX encoder with HF PyTorch BERT and sentence-transformers (independent references)."""

import jax
import numpy as np
import pytest
import torch
from transformers import BertForMaskedLM, BertModel

from mote_jax.hf_interop import from_hf
from mote_jax.kernels import KernelConfig
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
  # The model pads the vocabulary to a multiple of 128; the padding columns are masked, the rest are HF's.
  v = config.vocab_size
  assert logits.shape[-1] == config.padded_vocab_size == 30592 > v == ref.shape[-1]
  np.testing.assert_allclose(logits[..., :v], ref, atol=1e-4, rtol=0)
  assert (logits[..., v:] == np.finfo(np.float32).min).all()


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


KERNEL_SETS = {"cpu": KernelConfig.for_platform("cpu"), "xla": KernelConfig(),
               "xla+dot_product": KernelConfig(attention="dot_product")}
# The Pallas TPU kernel's numerics are checked in Pallas interpret mode in tests/test_kernels.py (values and
# gradients against a float64 reference); the whole encoder in interpret mode took too long for this file.


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kernel_set", list(KERNEL_SETS))
def test_every_kernel_set_matches_torch(random_bert_dir, tokenizer, scifact_sentences, kernel_set, training):
  """Every kernel set with every attention implementation available on CPU (the Pallas TPU kernel in Pallas
  interpret mode) against HF eager BERT, in the inference branch and in the training branch
  (`deterministic=False`, dropout 0), to 1e-4."""
  from jax.experimental.pallas import tpu as pltpu
  batch = _batch(tokenizer, scifact_sentences[:3] + ["Short."])
  eager = _torch_hidden(str(random_bert_dir), batch, "eager")
  overrides = {"hidden_dropout": 0.0, "attention_dropout": 0.0} if training else {}
  config, params = from_hf(random_bert_dir, tower_mode="mote", kernels=KERNEL_SETS[kernel_set], **overrides)
  interpret = pltpu.force_tpu_interpret_mode() if config.kernels.attention == "pallas_flash" else None
  if interpret is not None:
    interpret.__enter__()
  try:
    hidden = np.asarray(MoteEncoder(config).apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
        expert="passage", deterministic=not training, rngs={"dropout": jax.random.PRNGKey(0)}))
  finally:
    if interpret is not None:
      interpret.__exit__(None, None, None)
  np.testing.assert_allclose(hidden, eager, atol=1e-4, rtol=0)
