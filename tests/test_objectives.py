"""CoT-MAE / DupMAE pre-training objectives: parity with independent PyTorch code, expert routing, meshes."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from transformers import BertForMaskedLM
from transformers.models.bert.modeling_bert import BertLayer

from mote_jax.hf_interop import from_hf
from mote_jax.model import MoteConfig
from mote_jax.objectives import (IGNORE_INDEX, ObjectiveConfig, PretrainModel, Stream, gather_masked,
                                 token_cross_entropy)
from mote_jax.partitioning import MeshConfig, Partitioner, missing_annotations

SPECIAL_IDS = (0, 100, 101, 102, 103)  # bert-base-uncased [PAD] [UNK] [CLS] [SEP] [MASK]
MASK_ID = 103
HEAD_SHARPNESS = 10.0

SMALL = MoteConfig(vocab_size=30522, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                   max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0)


# --- test data ---------------------------------------------------------------------------------------------


def _mask_tokens(ids, attention_mask, rate, rng):
  """BERT masking of ordinary tokens: 80% [MASK], 10% random id, 10% kept; at least one per row."""
  ids = ids.copy()
  labels = np.full_like(ids, IGNORE_INDEX)
  candidates = attention_mask.astype(bool) & ~np.isin(ids, SPECIAL_IDS)
  chosen = candidates & (rng.random(ids.shape) < rate)
  for row in np.flatnonzero(~chosen.any(1)):
    chosen[row, np.flatnonzero(candidates[row])[0]] = True
  labels[chosen] = ids[chosen]
  draw = rng.random(ids.shape)
  ids[chosen & (draw < 0.8)] = MASK_ID
  replace = chosen & (draw >= 0.8) & (draw < 0.9)
  ids[replace] = rng.integers(1000, 30522, replace.sum())
  return ids, labels


def _pair_batch(tokenizer, sentences, rows=4, seed=0):
  """Masked (anchor, context) pairs of neighbouring SciFact sentences; padded, and of different lengths."""
  rng = np.random.default_rng(seed)
  anchors = sentences[0:2 * rows:2]
  contexts = sentences[1:2 * rows:2]
  anchors[-1] = "Short anchor."  # guarantees padding in the anchor batch
  batch = {}
  for prefix, texts, rate in (("anchor", anchors, 0.3), ("context", contexts, 0.45)):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    masked, labels = _mask_tokens(ids, mask, rate, rng)
    batch.update({f"{prefix}_input_ids": masked, f"{prefix}_attention_mask": mask, f"{prefix}_labels": labels})
  assert (batch["anchor_attention_mask"] == 0).any() and (batch["context_attention_mask"] == 0).any()
  return batch


def _perturbed(params, seed, scale=0.05):
  """Non-trivial LayerNorms and biases (fresh init has ones/zeros), so a mix-up of them cannot go unnoticed."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(np.shape(x)).astype(np.float32),
                      params)


def _loss(model, params, batch, anchor_type, context_type):
  fn = jax.jit(functools.partial(model.loss_fn, anchor_type=anchor_type, context_type=context_type))
  loss, metrics = fn(params, batch)
  return float(loss), jax.tree.map(float, metrics)


# --- an independent PyTorch CoT-MAE -----------------------------------------------------------------------


def _torch_decoder_layers(bert_config, decoder_params):
  """HF BertLayers holding the JAX decoder's weights (converted here, independently of hf_interop)."""
  h = bert_config.hidden_size
  layers = []
  stack = decoder_params["layers"]
  for j in range(len(stack)):
    p = jax.tree.map(lambda x: torch.tensor(np.asarray(x, np.float32)), stack[f"layer_{j}"])
    layer = BertLayer(bert_config).eval()
    att, ffn = p["attention"], p["ffn"]
    sd = {}
    for proj in ("query", "key", "value"):
      sd[f"attention.self.{proj}.weight"] = att[f"{proj}_kernel"].reshape(h, h).T
      sd[f"attention.self.{proj}.bias"] = att[f"{proj}_bias"].reshape(h)
    sd["attention.output.dense.weight"] = att["output_kernel"].reshape(h, h).T
    sd["attention.output.dense.bias"] = att["output_bias"]
    sd["attention.output.LayerNorm.weight"] = att["output_layer_norm"]["scale"]
    sd["attention.output.LayerNorm.bias"] = att["output_layer_norm"]["bias"]
    sd["intermediate.dense.weight"] = ffn["intermediate_kernel"][0].T
    sd["intermediate.dense.bias"] = ffn["intermediate_bias"][0]
    sd["output.dense.weight"] = ffn["output_kernel"][0].T
    sd["output.dense.bias"] = ffn["output_bias"][0]
    sd["output.LayerNorm.weight"] = ffn["layer_norm_scale"][0]
    sd["output.LayerNorm.bias"] = ffn["layer_norm_bias"][0]
    layer.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True)
    layers.append(layer)
  return layers


def _torch_losses(model, layers, batch, bow_activation="none", replace_cls=True, backward=False):
  """Encoder MLM, CoT-MAE decoder MLM and DupMAE bag-of-words losses, written the way the official code is.
  `backward`: also backpropagate encoder + decoder loss (the CoT-MAE objective) into the models' `.grad`."""
  t = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
  ce = torch.nn.CrossEntropyLoss(ignore_index=-100)
  with torch.set_grad_enabled(backward):
    out = model.bert(input_ids=t["anchor_input_ids"], attention_mask=t["anchor_attention_mask"])
    hidden = out.last_hidden_state
    logits = model.cls(hidden)
    vocab = logits.shape[-1]
    encoder_loss = ce(logits.reshape(-1, vocab), t["anchor_labels"].reshape(-1))

    # CoT-MAE: [A's last-layer CLS; embeddings(B)[1:]] -> decoder layers -> the tied head.
    embeddings = model.bert.embeddings(input_ids=t["context_input_ids"])
    x = torch.cat([hidden[:, :1], embeddings[:, 1:]], dim=1) if replace_cls else embeddings
    mask = t["context_attention_mask"][:, None, None, :].float()
    bias = (1.0 - mask) * torch.finfo(torch.float32).min
    for layer in layers:
      x = layer(x, attention_mask=bias)
      x = x[0] if isinstance(x, tuple) else x
    decoder_logits = model.cls(x)
    decoder_loss = ce(decoder_logits.reshape(-1, vocab), t["context_labels"].reshape(-1))

    # DupMAE: max-pool the MLM logits of ordinary tokens, softmax CE against the bag of unmasked ids.
    labels, ids = t["anchor_labels"], t["anchor_input_ids"]
    original = torch.where(labels != -100, labels, ids)
    ordinary = t["anchor_attention_mask"].bool() & ~torch.isin(original, torch.tensor(SPECIAL_IDS))
    scores = torch.log1p(torch.relu(logits)) if bow_activation == "log1p_relu" else logits
    pooled = scores.masked_fill(~ordinary[..., None], float("-inf")).max(dim=1).values
    weights = torch.zeros_like(pooled)
    for row in range(len(weights)):
      bag = torch.unique(original[row][ordinary[row]])
      weights[row, bag] = 1.0 / len(bag)
    bow = (-(weights * torch.log_softmax(pooled, dim=-1)).sum(-1)).mean()
    if backward:
      (encoder_loss + decoder_loss).backward()
  return float(encoder_loss.detach()), float(decoder_loss.detach()), float(bow.detach())


@pytest.fixture(scope="module")
def parity_setup(random_bert_dir, tokenizer, scifact_sentences):
  config, encoder_params = from_hf(random_bert_dir, tower_mode="mote")
  model = PretrainModel(config, ObjectiveConfig(decoder_layers=2))
  # Large decoder weights give peaked attention, so position 0 (A's CLS) steers B's predictions.
  decoder_params = _perturbed(nn.unbox(model.init_decoder(jax.random.PRNGKey(1))), seed=1, scale=0.3)
  torch_model = BertForMaskedLM.from_pretrained(random_bert_dir, attn_implementation="eager").eval()
  # A random BERT predicts a near-uniform vocabulary (every loss ~ log V); a sharper head in both models makes
  # the losses depend strongly on the hidden states, so a wrong decoder input cannot pass within tolerance.
  encoder_params["tower"]["mlm_head"]["transform_layer_norm"]["scale"] *= HEAD_SHARPNESS
  with torch.no_grad():
    torch_model.cls.predictions.transform.LayerNorm.weight.mul_(HEAD_SHARPNESS)
  params = {"encoder": encoder_params, "decoder": decoder_params}
  layers = _torch_decoder_layers(torch_model.config, decoder_params)
  batch = _pair_batch(tokenizer, list(scifact_sentences))
  return model, params, torch_model, layers, batch


def test_cotmae_losses_match_torch(parity_setup):
  model, params, torch_model, layers, batch = parity_setup
  ref_encoder, ref_decoder, _ = _torch_losses(torch_model, layers, batch)
  loss, metrics = _loss(model, params, batch, "query", "passage")
  assert abs(metrics["encoder_mlm_loss"] - ref_encoder) <= 1e-4, (metrics["encoder_mlm_loss"], ref_encoder)
  assert abs(metrics["decoder_mlm_loss"] - ref_decoder) <= 1e-4, (metrics["decoder_mlm_loss"], ref_decoder)
  assert abs(loss - (ref_encoder + ref_decoder)) <= 2e-4
  # The decoder loss depends on A's CLS vector: the reference without it is 50x the tolerance off.
  _, without_cls, _ = _torch_losses(torch_model, layers, batch, replace_cls=False)
  assert abs(without_cls - ref_decoder) > 5e-3, (without_cls, ref_decoder)
  assert metrics["encoder_mlm_tokens"] == (batch["anchor_labels"] != IGNORE_INDEX).sum()
  assert metrics["decoder_mlm_tokens"] == (batch["context_labels"] != IGNORE_INDEX).sum()
  assert 0.0 <= metrics["encoder_mlm_accuracy"] <= 1.0


@pytest.mark.parametrize("masked_only", [False, True])
def test_cotmae_gradients_match_torch(parity_setup, masked_only):
  """Gradients of encoder + decoder MLM loss against torch autograd of the reference, for every kind of
  product the model differentiates: the attention projections (`kernels.dense.linear`), the routed
  expert's FFN, the MLM head transform, the tied word embeddings (input, two MLM heads) and the decoder.
  masked_only: logits at the masked positions only, both losses through one MLM-head call (`_joint_mlm_parts`)."""
  model, params, torch_model, layers, batch = parity_setup
  if masked_only:
    most = int(max((batch[f"{p}_labels"] != IGNORE_INDEX).sum(1).max() for p in ("anchor", "context")))
    model = PretrainModel(model.config, model.objective.replace(encoder_max_predictions=most,
                                                                decoder_max_predictions=most))
    assert model.joint_mlm_head("query", "passage")
  torch_model.zero_grad(set_to_none=True)
  for layer in layers:
    layer.zero_grad(set_to_none=True)
  try:
    _torch_losses(torch_model, layers, batch, backward=True)
    grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, anchor_type="query", context_type="passage")[0]))(
        params)
    h = model.config.hidden_size
    expert = model.config.route("query")[1]
    enc = grads["encoder"]["tower"]["encoder"]
    bert = torch_model.bert.encoder.layer
    v = model.config.vocab_size
    word = grads["encoder"]["tower"]["embeddings"]["word_embeddings"]["embedding"]
    mlm_bias = grads["encoder"]["tower"]["mlm_head"]["bias"]
    # The vocabulary padding rows (`padded_vocab_size`) get no gradient at all.
    assert word.shape[0] == mlm_bias.shape[0] == model.config.padded_vocab_size > v
    assert not np.asarray(word[v:]).any() and not np.asarray(mlm_bias[v:]).any()
    pairs = {"word embeddings": (word[:v], torch_model.bert.embeddings.word_embeddings.weight),
             "mlm transform": (grads["encoder"]["tower"]["mlm_head"]["transform"]["kernel"].T,
                               torch_model.cls.predictions.transform.dense.weight),
             "mlm bias": (mlm_bias[:v], torch_model.cls.predictions.bias),
             # the position rows broadcast over the batch; rows past the sequence length get none
             "position embeddings": (grads["encoder"]["tower"]["embeddings"]["position_embeddings"]["embedding"],
                                     torch_model.bert.embeddings.position_embeddings.weight)}
    for i in (0, len(bert) - 1):
      att, ffn = enc[f"layer_{i}"]["attention"], enc[f"layer_{i}"]["ffn"]
      for proj in ("query", "key", "value"):
        pairs[f"layer {i} {proj}"] = (att[f"{proj}_kernel"].reshape(h, h).T,
                                      getattr(bert[i].attention.self, proj).weight)
        if proj != "key":  # the key bias adds a per-query constant to the logits: its gradient is exactly zero
          pairs[f"layer {i} {proj} bias"] = (att[f"{proj}_bias"].reshape(h),
                                             getattr(bert[i].attention.self, proj).bias)
      pairs[f"layer {i} attention output"] = (att["output_kernel"].reshape(h, h).T, bert[i].attention.output.dense.weight)
      pairs[f"layer {i} intermediate"] = (ffn["intermediate_kernel"][expert].T, bert[i].intermediate.dense.weight)
      pairs[f"layer {i} output"] = (ffn["output_kernel"][expert].T, bert[i].output.dense.weight)
      pairs[f"layer {i} output bias"] = (ffn["output_bias"][expert], bert[i].output.dense.bias)
      pairs[f"layer {i} intermediate bias"] = (ffn["intermediate_bias"][expert], bert[i].intermediate.dense.bias)
      pairs[f"layer {i} attention output bias"] = (att["output_bias"], bert[i].attention.output.dense.bias)
    for j, layer in enumerate(layers):
      dec = grads["decoder"]["layers"][f"layer_{j}"]
      pairs[f"decoder {j} query"] = (dec["attention"]["query_kernel"].reshape(h, h).T, layer.attention.self.query.weight)
      pairs[f"decoder {j} attention output"] = (dec["attention"]["output_kernel"].reshape(h, h).T,
                                                layer.attention.output.dense.weight)
      pairs[f"decoder {j} intermediate"] = (dec["ffn"]["intermediate_kernel"][0].T, layer.intermediate.dense.weight)
    for name, (ours, theirs) in pairs.items():
      ref = theirs.grad.numpy()
      scale = np.abs(ref).max()
      assert scale > 0, name
      np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=2e-4 * scale, err_msg=name)
    # The other expert is not reached: zero gradient.
    assert not np.asarray(enc["layer_0"]["ffn"]["intermediate_kernel"][1 - expert]).any()
  finally:
    torch_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("x_shape, kernel_shape", [((3, 7, 32), (32, 48)), ((2, 5, 32), (32, 4, 8)),
                                                   ((6, 32), (32, 101))])
def test_cpu_gemm_linear_has_the_values_and_gradients_of_autodiff(dtype, x_shape, kernel_shape):
  """`kernels.dense.linear_cpu_gemm` (a custom VJP whose kernel gradient is x^T dy in the kernel's orientation)
  against JAX's autodiff of `jnp.einsum` for the shapes the model uses (a dense layer, a head-split projection
  [H, N, D]): equal values, gradients to float32 rounding (one bfloat16 ulp)."""
  import jax.numpy as jnp

  from mote_jax.kernels.dense import linear
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], x_shape).astype(dtype)
  kernel = jax.random.normal(keys[1], kernel_shape).astype(dtype)
  out_shape = x_shape[:-1] + kernel_shape[1:]
  cotangent = jax.random.normal(keys[2], out_shape).astype(dtype)
  ours, ours_vjp = jax.vjp(lambda a, b: linear(a, b, "cpu_gemm"), x, kernel)
  ref, ref_vjp = jax.vjp(lambda a, b: jnp.tensordot(a, b, axes=1), x, kernel)
  assert ours.shape == ref.shape == out_shape and ours.dtype == ref.dtype
  ulp = 2.0 ** -7 if dtype == "bfloat16" else 1e-5
  want = np.asarray(ref.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(ours.astype(jnp.float32)), want, rtol=ulp, atol=ulp * np.abs(want).max())
  plain = linear(x, kernel, "xla")
  np.testing.assert_allclose(np.asarray(plain.astype(jnp.float32)), want, rtol=ulp, atol=ulp * np.abs(want).max())
  for got, want in zip(ours_vjp(cotangent), ref_vjp(cotangent)):
    assert got.dtype == want.dtype and got.shape == want.shape
    want = np.asarray(want.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=ulp, atol=ulp * np.abs(want).max())
  with pytest.raises(ValueError, match="KernelConfig.dense"):
    linear(x, kernel, "fast")


@pytest.mark.parametrize("activation", ["none", "log1p_relu"])
def test_bow_loss_matches_torch(parity_setup, activation):
  model, params, torch_model, layers, batch = parity_setup
  _, _, ref_bow = _torch_losses(torch_model, layers, batch, bow_activation=activation)
  bow_model = PretrainModel(model.config, ObjectiveConfig(encoder_mlm_weight=0.0, decoder_mlm_weight=0.0,
                                                          bow_weight=1.0, bow_activation=activation))
  loss, metrics = _loss(bow_model, params, batch, "passage", "passage")
  assert set(metrics) == {"loss", "bow_loss", "bow_examples"}  # disabled components are not computed
  assert abs(metrics["bow_loss"] - ref_bow) <= 1e-4, (metrics["bow_loss"], ref_bow)
  assert loss == metrics["bow_loss"]


def test_masked_position_logits_give_the_same_loss(parity_setup):
  model, params, _, _, batch = parity_setup
  _, full = _loss(model, params, batch, "passage", "passage")
  most = max((batch[f"{p}_labels"] != IGNORE_INDEX).sum(1).max() for p in ("anchor", "context"))
  gathered = PretrainModel(model.config, ObjectiveConfig(encoder_max_predictions=int(most),
                                                         decoder_max_predictions=int(most)))
  assert gathered.joint_mlm_head("passage", "passage")  # one head call for both losses
  separated = PretrainModel(model.config.replace(tower_mode="separated"), gathered.objective)
  assert not separated.joint_mlm_head("query", "passage")  # two towers: two heads
  assert not PretrainModel(model.config, gathered.objective.replace(bow_weight=0.5)).joint_mlm_head(
      "passage", "passage")
  _, sparse = _loss(gathered, params, batch, "passage", "passage")
  for key in ("encoder_mlm_loss", "decoder_mlm_loss", "encoder_mlm_accuracy", "decoder_mlm_tokens"):
    assert abs(sparse[key] - full[key]) <= 1e-5, key
  assert sparse["encoder_mlm_dropped"] == sparse["decoder_mlm_dropped"] == 0


def test_dropout_needs_an_rng_and_is_reproducible(parity_setup):
  model, params, _, _, batch = parity_setup
  assert model.config.hidden_dropout > 0
  with pytest.raises(ValueError, match="rng"):
    model.loss_fn(params, batch, anchor_type="passage", context_type="passage", deterministic=False)
  fn = jax.jit(functools.partial(model.loss_fn, anchor_type="passage", context_type="passage",
                                 deterministic=False))
  first, second, other = (float(fn(params, batch, rng=jax.random.PRNGKey(k))[0]) for k in (0, 0, 1))
  deterministic, _ = _loss(model, params, batch, "passage", "passage")
  assert first == second and first != other and first != deterministic


def test_gather_masked_and_cross_entropy():
  labels = np.array([[-100, 5, -100, 7, 2], [-100, -100, -100, -100, 3]], np.int32)
  hidden = np.arange(10, dtype=np.float32).reshape(2, 5, 1)
  h, lab = gather_masked(hidden, labels, 2)
  np.testing.assert_array_equal(lab, [[5, 7], [3, -100]])
  np.testing.assert_array_equal(h[..., 0], [[1, 3], [9, 5]])  # row 1 is filled with an unpredicted position
  logits = np.random.default_rng(0).standard_normal((2, 5, 9)).astype(np.float32)
  parts = token_cross_entropy(logits, labels)
  ref = torch.nn.CrossEntropyLoss()(torch.tensor(logits).reshape(-1, 9), torch.tensor(labels, dtype=torch.long)
                                    .reshape(-1))
  assert parts["count"] == 4
  assert abs(float(parts["sum"] / parts["count"]) - float(ref)) <= 1e-6


# --- routing ------------------------------------------------------------------------------------------------


def _ffn_grad_norms(grads):
  """{expert index: summed |grad| over every FFN parameter of that expert}."""
  tower = grads["encoder"]["tower"]["encoder"]
  norms = {0: 0.0, 1: 0.0}
  for path, g in jax.tree_util.tree_flatten_with_path(tower)[0]:
    if any(getattr(k, "key", None) == "ffn" for k in path):
      for expert in norms:
        norms[expert] += float(np.abs(np.asarray(g)[expert]).sum())
  return norms


def test_expert_routing_of_gradients(tokenizer, scifact_sentences):
  model = PretrainModel(SMALL, ObjectiveConfig(bow_weight=0.5))
  params = nn.unbox(model.init(jax.random.PRNGKey(0)))
  batch = _pair_batch(tokenizer, list(scifact_sentences))

  @functools.partial(jax.jit, static_argnames=("anchor_type", "context_type"))
  def grads(params, batch, anchor_type, context_type):
    return jax.grad(lambda p: model.loss_fn(p, batch, anchor_type=anchor_type, context_type=context_type)[0])(params)

  g = grads(params, batch, "passage", "passage")
  norms = _ffn_grad_norms(g)
  assert norms[0] == 0.0 and norms[1] > 0.0, norms  # the query expert is untouched by passage pairs
  assert all(float(np.abs(x).sum()) > 0 for x in jax.tree.leaves(g["decoder"]))

  norms = _ffn_grad_norms(grads(params, batch, "query", "passage"))
  # A query anchor trains the query expert; the passage context only feeds embeddings to the decoder.
  assert norms[0] > 0.0 and norms[1] == 0.0, norms


# --- decoder initialisation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decoder_copies_encoder_last_layers(scan_layers):
  config = SMALL.replace(scan_layers=scan_layers)
  model = PretrainModel(config, ObjectiveConfig(decoder_layers=2, decoder_init="encoder"))
  boxed = model.init(jax.random.PRNGKey(0))
  assert missing_annotations(boxed) == []
  params = nn.unbox(boxed)
  fresh = nn.unbox(model.init_decoder(jax.random.PRNGKey(0)))
  assert jax.tree.structure(params["decoder"]) == jax.tree.structure(fresh)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), params["decoder"], fresh)

  stack = params["encoder"]["tower"]["encoder"]
  for j, i in ((0, 1), (1, 2)):  # decoder layer j <- encoder layer i of 3
    if scan_layers:
      src = jax.tree.map(lambda x, i=i: x[i], stack["layers"])
      dst = jax.tree.map(lambda x, j=j: x[j], params["decoder"]["layers"]["layers"])
    else:
      src, dst = stack[f"layer_{i}"], params["decoder"]["layers"][f"layer_{j}"]
    jax.tree.map(np.testing.assert_array_equal, dst["attention"], src["attention"])
    jax.tree.map(lambda d, s: np.testing.assert_array_equal(d[0], s[1]), dst["ffn"], src["ffn"])  # passage

  # Unboxed host params (as from `from_hf`) give unboxed host copies.
  host = jax.tree.map(np.asarray, params["encoder"])
  copied = model.decoder_from_encoder(host)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(copied))
  jax.tree.map(np.testing.assert_array_equal, copied, params["decoder"])


# --- streams and meshes --------------------------------------------------------------------------------------


def test_multi_stream_weighting(tokenizer, scifact_sentences):
  model = PretrainModel(SMALL, ObjectiveConfig(bow_weight=0.3))
  params = _perturbed(nn.unbox(model.init(jax.random.PRNGKey(2))), seed=2, scale=0.01)
  full = _pair_batch(tokenizer, list(scifact_sentences), rows=8, seed=3)
  halves = {"a": jax.tree.map(lambda x: x[:4], full), "b": jax.tree.map(lambda x: x[4:], full)}
  streams = (Stream("a", "passage", "passage"), Stream("b", "passage", "passage"))
  whole, _ = _loss(model, params, full, "passage", "passage")

  fn = jax.jit(functools.partial(model.multi_stream_loss_fn, streams=streams))
  loss, metrics = fn(params, halves)
  assert abs(float(loss) - whole) <= 1e-5  # "tokens": the loss of the concatenated batch
  assert set(metrics) >= {"a/loss", "b/loss", "encoder_mlm_loss", "bow_loss"}

  mean_model = PretrainModel(SMALL, model.objective.replace(stream_weighting="mean"))
  loss, metrics = jax.jit(functools.partial(mean_model.multi_stream_loss_fn, streams=streams))(params, halves)
  assert abs(float(loss) - (float(metrics["a/loss"]) + float(metrics["b/loss"])) / 2) <= 1e-6
  a_loss, _ = _loss(model, params, halves["a"], "passage", "passage")
  assert abs(float(metrics["a/loss"]) - a_loss) <= 1e-5


@pytest.mark.parametrize("objective", [ObjectiveConfig(decoder_init="encoder", bow_weight=0.5),
                                       ObjectiveConfig(encoder_max_predictions=8, decoder_max_predictions=12)],
                         ids=["bow", "joint-mlm-head"])
def test_same_loss_on_one_device_and_a_4x2_mesh(tokenizer, scifact_sentences, objective):
  config = SMALL.replace(scan_layers=True)
  model = PretrainModel(config, objective)
  partitioner = Partitioner.create(MeshConfig(data=4, model=2))
  params, _ = partitioner.init(model.init, jax.random.PRNGKey(0))
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(params))
  batch = _pair_batch(tokenizer, list(scifact_sentences), rows=8, seed=4)
  fn = functools.partial(model.loss_fn, anchor_type="query", context_type="passage")
  sharded_loss, sharded_metrics = partitioner.jit(fn)(params, partitioner.global_batch(batch))

  device = jax.devices()[0]
  host_params = jax.device_put(jax.device_get(params), device)
  loss, metrics = jax.jit(fn)(host_params, jax.device_put(batch, device))
  assert abs(float(sharded_loss) - float(loss)) <= 1e-5, (float(sharded_loss), float(loss))
  for key in ("encoder_mlm_loss", "decoder_mlm_loss") + (("bow_loss",) if objective.bow_weight else ()):
    assert abs(float(sharded_metrics[key]) - float(metrics[key])) <= 1e-5, key
