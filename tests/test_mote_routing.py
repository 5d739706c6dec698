"""MoTE routing: experts start as copies of the BERT FFN, and only the routed expert learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mote_jax.hf_interop import from_hf
from mote_jax.model import EXPERTS, MoteEncoder


def _batch(tokenizer, sentences):
  return dict(tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="np"))


def test_mote_equals_siamese_after_import(minilm_path, tokenizer, scifact_sentences):
  batch = _batch(tokenizer, scifact_sentences[:8])
  outputs = {}
  for mode in ("siamese", "mote"):
    config, params = from_hf(minilm_path, tower_mode=mode)
    for expert in EXPERTS:
      outputs[mode, expert] = np.asarray(MoteEncoder(config).apply(
          {"params": params}, batch["input_ids"], batch["attention_mask"], expert=expert))
  for expert in EXPERTS:
    np.testing.assert_array_equal(outputs["mote", expert], outputs["siamese", "query"])


def test_one_step_on_passages_moves_only_the_passage_expert(random_bert_dir, tokenizer, scifact_sentences):
  config, params = from_hf(random_bert_dir, tower_mode="mote")
  encoder = MoteEncoder(config)
  batch = _batch(tokenizer, scifact_sentences[:8])
  rng = np.random.default_rng(0)
  labels = np.where(rng.random(batch["input_ids"].shape) < 0.3, batch["input_ids"], -100)
  labels[batch["attention_mask"] == 0] = -100

  def loss_fn(p):  # passage-only data: MLM on passages through the passage expert
    hidden = encoder.apply({"params": p}, batch["input_ids"], batch["attention_mask"], expert="passage")
    logits = encoder.apply({"params": p}, hidden, expert="passage", method=MoteEncoder.mlm_logits)
    valid = labels >= 0
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return (losses * valid).sum() / valid.sum()

  # Adam has no weight decay: an update is exactly zero where the gradient is zero.
  optimizer = optax.adam(1e-3)
  grads = jax.grad(loss_fn)(params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  new = optax.apply_updates(params, updates)

  query, passage = EXPERTS.index("query"), EXPERTS.index("passage")
  for i in range(config.num_layers):
    for name, old in params["tower"]["encoder"][f"layer_{i}"]["ffn"].items():
      moved = np.asarray(new["tower"]["encoder"][f"layer_{i}"]["ffn"][name])
      np.testing.assert_array_equal(moved[query], old[query], err_msg=f"query expert {name} changed")
      assert not np.array_equal(moved[passage], old[passage]), f"passage expert {name} did not change"
    attention = params["tower"]["encoder"][f"layer_{i}"]["attention"]["query_kernel"]
    assert not np.array_equal(new["tower"]["encoder"][f"layer_{i}"]["attention"]["query_kernel"], attention)
