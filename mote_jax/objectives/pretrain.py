"""CoT-MAE pre-training of a MoTE encoder: encoder MLM + context-decoder MLM (+ optional DupMAE bag of words).

A training example is a pair of neighbouring texts: anchor A (encoded with the expert of `anchor_type`) and
context B (decoded with the embeddings and MLM head of `context_type`'s tower), both masked independently.

  encoder MLM   A's masked tokens from A's encoder states (the tied MLM head of A's tower).
  decoder MLM   B's masked tokens from [A's last-layer CLS; B's token embeddings 1:] through `decoder_layers`
                BERT layers and the MLM head of B's tower.
  bag of words  DupMAE (RetroMAE-2): A's ordinary-token states -> MLM logits -> max-pool -> predict the set of
                ids of unmasked A (optional, `bow_weight > 0`).

  loss = encoder_mlm_weight * encoder MLM + decoder_mlm_weight * decoder MLM + bow_weight * bag of words

`PretrainModel` is stateless: params are the tree {"encoder": MoteEncoder params, "decoder": decoder params}.
Text types are static Python strings, so each (anchor_type, context_type) stream is traced separately and a
call computes exactly one expert per text.

Typical use on a mesh:
  model = PretrainModel(config, ObjectiveConfig())
  params, shardings = partitioner.init(model.init, rng)            # fresh encoder and decoder, born sharded
  # or from a BERT checkpoint (host arrays), with a fresh or copied decoder:
  #   config, encoder = hf_interop.from_hf(path, tower_mode="mote")
  #   decoder = nn.unbox(model.init_decoder(rng))  # or model.decoder_from_encoder(encoder)
  #   shardings = partitioner.param_shardings(jax.eval_shape(model.init, rng))
  #   params = partitioner.shard({"encoder": encoder, "decoder": decoder}, shardings)
  loss_fn = functools.partial(model.loss_fn, anchor_type="passage", context_type="passage")
  grads = partitioner.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))(params, partitioner.global_batch(batch))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mote_jax.model.config import EXPERTS, MoteConfig
from mote_jax.model.encoder import MoteEncoder, init_params as init_encoder_params
from mote_jax.objectives import losses
from mote_jax.objectives.decoder import (CotMaeDecoder, decoder_config, decoder_params_from_encoder,
                                         init_decoder_params)

PyTree = Any
Batch = Mapping[str, jax.Array]

BATCH_FIELDS = ("anchor_input_ids", "anchor_attention_mask", "anchor_labels",
                "context_input_ids", "context_attention_mask", "context_labels")
DECODER_INITS = ("random", "encoder")
STREAM_WEIGHTINGS = ("tokens", "mean")
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static (hashable) settings of the pre-training objective.

  decoder_layers: depth of the CoT-MAE decoder (2 in the paper).
  decoder_init: "random" (fresh BERT init, as CoT-MAE) or "encoder" (copies of the encoder's last
    `decoder_layers` layers, FFN of `decoder_init_expert`'s expert).
  *_weight: loss weights; a component with weight 0 is not computed at all.
  bow_activation: "none" (raw MLM logits, DupMAE's pre-training code) or "log1p_relu" (SPLADE-style).
  special_token_ids: ids that are not words of the bag (and whose positions are not pooled); default is
    bert-base-uncased's [PAD], [UNK], [CLS], [SEP], [MASK] (`tokenizer.all_special_ids` gives them).
  encoder_max_predictions / decoder_max_predictions: None computes MLM logits at every position; an int P
    computes them only at the first P masked positions of each row (see `losses.gather_masked`). The encoder
    needs all positions when the bag-of-words loss is on, and then ignores its P.
  stream_weighting: how `multi_stream_loss_fn` combines streams, see there.
  """

  decoder_layers: int = 2
  decoder_init: str = "random"
  decoder_init_expert: str = "passage"
  encoder_mlm_weight: float = 1.0
  decoder_mlm_weight: float = 1.0
  bow_weight: float = 0.0
  bow_activation: str = "none"
  special_token_ids: tuple[int, ...] = losses.BERT_UNCASED_SPECIAL_IDS
  encoder_max_predictions: int | None = None
  decoder_max_predictions: int | None = None
  stream_weighting: str = "tokens"

  def __post_init__(self):
    if self.decoder_layers < 1:
      raise ValueError(f"ObjectiveConfig.decoder_layers={self.decoder_layers}: expected at least 1")
    if self.decoder_init not in DECODER_INITS:
      raise ValueError(f"ObjectiveConfig.decoder_init={self.decoder_init!r}: expected one of {DECODER_INITS}")
    if self.decoder_init_expert not in EXPERTS:
      raise ValueError(f"ObjectiveConfig.decoder_init_expert={self.decoder_init_expert!r}: "
                       f"expected one of {EXPERTS}")
    if self.bow_activation not in losses.BOW_ACTIVATIONS:
      raise ValueError(f"ObjectiveConfig.bow_activation={self.bow_activation!r}: "
                       f"expected one of {losses.BOW_ACTIVATIONS}")
    if self.stream_weighting not in STREAM_WEIGHTINGS:
      raise ValueError(f"ObjectiveConfig.stream_weighting={self.stream_weighting!r}: "
                       f"expected one of {STREAM_WEIGHTINGS}")
    for name in ("encoder_mlm_weight", "decoder_mlm_weight", "bow_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"ObjectiveConfig.{name}={getattr(self, name)}: expected >= 0")
    for name in ("encoder_max_predictions", "decoder_max_predictions"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"ObjectiveConfig.{name}={value}: expected None or a positive int")
    # Lists from gin/json would make the config unhashable (it is a static jit argument).
    object.__setattr__(self, "special_token_ids", tuple(int(i) for i in self.special_token_ids))

  def replace(self, **changes) -> "ObjectiveConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Stream:
  """A homogeneous stream of pairs: every anchor is an `anchor_type` text, every context a `context_type` one."""

  name: str
  anchor_type: str
  context_type: str

  def __post_init__(self):
    for field in ("anchor_type", "context_type"):
      if getattr(self, field) not in EXPERTS:
        raise ValueError(f"Stream {self.name!r}: {field}={getattr(self, field)!r}, expected one of {EXPERTS}")


def _constrain_logits(logits):
  # Keeps the largest activation ([..., V] logits) split over the vocabulary on model-parallel meshes.
  if logits.ndim != 3:
    return logits
  return nn.with_logical_constraint(logits, LOGITS_AXES)


def _safe_mean(total, count):
  return total / jnp.maximum(count, 1.0)


def finalize(parts: Mapping[str, jax.Array], objective: ObjectiveConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sums and counts (`PretrainModel.loss_parts`) -> (weighted loss, metrics); a component without any
  predicted token contributes 0 (torch would give NaN)."""
  loss = jnp.zeros((), jnp.float32)
  metrics = {}
  for name, weight in (("encoder_mlm", objective.encoder_mlm_weight),
                       ("decoder_mlm", objective.decoder_mlm_weight)):
    if f"{name}_sum" not in parts:
      continue
    value = _safe_mean(parts[f"{name}_sum"], parts[f"{name}_count"])
    loss = loss + weight * value
    metrics[f"{name}_loss"] = value
    metrics[f"{name}_accuracy"] = _safe_mean(parts[f"{name}_correct"], parts[f"{name}_count"])
    metrics[f"{name}_tokens"] = parts[f"{name}_count"]
    if f"{name}_dropped" in parts:
      metrics[f"{name}_dropped"] = parts[f"{name}_dropped"]
  if "bow_sum" in parts:
    value = _safe_mean(parts["bow_sum"], parts["bow_count"])
    loss = loss + objective.bow_weight * value
    metrics["bow_loss"] = value
    metrics["bow_examples"] = parts["bow_count"]
  metrics["loss"] = loss
  return loss, metrics


@dataclasses.dataclass(frozen=True)
class PretrainModel:
  """Stateless CoT-MAE pre-training model over params {"encoder": ..., "decoder": ...}."""

  config: MoteConfig
  objective: ObjectiveConfig = ObjectiveConfig()

  @property
  def encoder(self) -> MoteEncoder:
    return MoteEncoder(self.config)

  @property
  def decoder_config(self) -> MoteConfig:
    return decoder_config(self.config, self.objective.decoder_layers)

  @property
  def decoder(self) -> CotMaeDecoder:
    return CotMaeDecoder(self.decoder_config)

  # --- parameters ---------------------------------------------------------------------------------------------
  def init(self, rng: jax.Array, batch_shape=(1, 8)) -> PyTree:
    """Boxed (logically partitioned) {"encoder", "decoder"} params; pass to `Partitioner.init` to create them
    sharded. With `decoder_init="encoder"` the decoder starts as copies of the fresh encoder's last layers."""
    encoder_rng, decoder_rng = jax.random.split(rng)
    encoder = init_encoder_params(self.config, encoder_rng, batch_shape)
    if self.objective.decoder_init == "encoder":
      decoder = self.decoder_from_encoder(encoder)
    else:
      decoder = init_decoder_params(self.decoder_config, decoder_rng, batch_shape)
    return {"encoder": encoder, "decoder": decoder}

  def init_decoder(self, rng: jax.Array, batch_shape=(1, 8)) -> PyTree:
    """Boxed fresh decoder params (e.g. beside encoder params loaded with `hf_interop.from_hf`)."""
    return init_decoder_params(self.decoder_config, rng, batch_shape)

  def decoder_from_encoder(self, encoder_params: PyTree) -> PyTree:
    """Decoder params copied from the encoder's last layers (expert `objective.decoder_init_expert`).

    Boxed encoder params give boxed decoder params (with the decoder's logical names); unboxed (numpy or jax)
    give unboxed ones, e.g. for encoder params from `hf_interop.from_hf`.
    """
    copied = decoder_params_from_encoder(self.config, encoder_params, self.objective.decoder_layers,
                                         self.objective.decoder_init_expert)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    if not any(is_box(leaf) for leaf in jax.tree.leaves(encoder_params, is_leaf=is_box)):
      return copied
    template = jax.eval_shape(lambda: self.init_decoder(jax.random.PRNGKey(0)))
    return jax.tree.map(lambda box, value: box.replace_boxed(value), template, copied, is_leaf=is_box)

  # --- losses -------------------------------------------------------------------------------------------------
  def _mlm_parts(self, hidden, labels, max_predictions, expert, encoder_vars, prefix):
    """MLM sums and counts of hidden [B, L, H] against labels [B, L], at every or only masked positions."""
    parts = {}
    if max_predictions is not None:
      parts[f"{prefix}_dropped"] = losses.dropped_predictions(labels, max_predictions)
      hidden, labels = losses.gather_masked(hidden, labels, max_predictions)
    logits = _constrain_logits(self.encoder.apply(encoder_vars, hidden, expert=expert,
                                                  method=MoteEncoder.mlm_logits))
    parts.update({f"{prefix}_{k}": v for k, v in losses.token_cross_entropy(logits, labels).items()})
    return parts

  def loss_parts(self, params: PyTree, batch: Batch, *, anchor_type: str, context_type: str,
                 rng: jax.Array | None = None, deterministic: bool = True) -> dict[str, jax.Array]:
    """Float32 sums and counts of every enabled loss component for one homogeneous batch (see `loss_fn`)."""
    missing = [name for name in BATCH_FIELDS if name not in batch]
    if missing:
      raise KeyError(f"pre-training batch lacks fields {missing} (has {sorted(batch)})")
    if not deterministic and rng is None:
      raise ValueError("loss_fn(deterministic=False) needs a dropout `rng`")
    obj, encoder = self.objective, self.encoder
    keys = (None,) * 3 if deterministic else tuple(jax.random.split(rng, 3))
    rngs = lambda key: None if key is None else {"dropout": key}  # noqa: E731
    encoder_vars = {"params": params["encoder"]}
    parts = {}

    a_ids, a_mask, a_labels = batch["anchor_input_ids"], batch["anchor_attention_mask"], batch["anchor_labels"]
    hidden = encoder.apply(encoder_vars, a_ids, a_mask, expert=anchor_type, deterministic=deterministic,
                           rngs=rngs(keys[0]))  # [B, L, H]

    use_bow = obj.bow_weight > 0
    if use_bow:
      # One [B, L, V] logits tensor serves both the encoder MLM and the bag of words.
      logits = _constrain_logits(encoder.apply(encoder_vars, hidden, expert=anchor_type,
                                               method=MoteEncoder.mlm_logits))
      if obj.encoder_mlm_weight > 0:
        parts.update({f"encoder_mlm_{k}": v for k, v in losses.token_cross_entropy(logits, a_labels).items()})
      original = losses.restore_input_ids(a_ids, a_labels)
      token_mask = losses.ordinary_token_mask(original, a_mask, obj.special_token_ids)
      # Over the real vocabulary (the padding columns are not words).
      representation = losses.bow_representation(logits[..., :self.config.vocab_size], token_mask,
                                                  obj.bow_activation)
      targets = losses.bow_targets(original, token_mask, self.config.vocab_size)
      parts.update({f"bow_{k}": v for k, v in losses.bow_loss(representation, targets).items()})
    joint_head = self.joint_mlm_head(anchor_type, context_type)
    if obj.encoder_mlm_weight > 0 and not use_bow and not joint_head:
      parts.update(self._mlm_parts(hidden, a_labels, obj.encoder_max_predictions, anchor_type, encoder_vars,
                                   "encoder_mlm"))

    if obj.decoder_mlm_weight > 0:
      c_ids, c_mask = batch["context_input_ids"], batch["context_attention_mask"]
      embeddings = encoder.apply(encoder_vars, c_ids, expert=context_type, deterministic=deterministic,
                                 rngs=rngs(keys[1]), method=MoteEncoder.embed_tokens)  # [B, L, H]
      decoded = self.decoder.apply({"params": params["decoder"]}, hidden[:, 0], embeddings, c_mask,
                                   deterministic, rngs=rngs(keys[2]))  # [B, L, H]
      if joint_head:
        parts.update(self._joint_mlm_parts(hidden, a_labels, decoded, batch["context_labels"], anchor_type,
                                           encoder_vars))
      else:
        parts.update(self._mlm_parts(decoded, batch["context_labels"], obj.decoder_max_predictions,
                                     context_type, encoder_vars, "decoder_mlm"))
    return parts

  def joint_mlm_head(self, anchor_type: str, context_type: str) -> bool:
    """Whether the encoder and decoder MLM losses share one MLM-head call (`_joint_mlm_parts`): both on, at
    masked positions only, no bag of words, and both text types routed to the same tower (so the same head)."""
    obj = self.objective
    return (obj.encoder_mlm_weight > 0 and obj.decoder_mlm_weight > 0 and obj.bow_weight == 0
            and obj.encoder_max_predictions is not None and obj.decoder_max_predictions is not None
            and self.config.route(anchor_type)[0] == self.config.route(context_type)[0])

  def _joint_mlm_parts(self, hidden, labels, decoded, context_labels, anchor_type, encoder_vars):
    """Encoder and decoder MLM sums and counts from one MLM-head call over both sets of masked positions.

    hidden / decoded: [B, L, H] and [B, L', H] states; labels / context_labels: [B, L] and [B, L']. The first
    P and P' masked positions of each row are gathered and joined along the position axis ([B, P + P', H], so
    a batch-sharded layout stays batch-sharded): the head's three vocabulary GEMMs run once with B (P + P')
    rows instead of twice, and the embedding and output-bias gradients come out as one [V, H] and one [V]
    array instead of two to be added. The head is row-wise, so every logit is the one separate calls give (up
    to the GEMMs' summation order).
    """
    obj = self.objective
    parts = {"encoder_mlm_dropped": losses.dropped_predictions(labels, obj.encoder_max_predictions),
             "decoder_mlm_dropped": losses.dropped_predictions(context_labels, obj.decoder_max_predictions)}
    enc_hidden, enc_labels = losses.gather_masked(hidden, labels, obj.encoder_max_predictions)
    dec_hidden, dec_labels = losses.gather_masked(decoded, context_labels, obj.decoder_max_predictions)
    logits = _constrain_logits(self.encoder.apply(encoder_vars, jnp.concatenate([enc_hidden, dec_hidden], axis=1),
                                                  expert=anchor_type, method=MoteEncoder.mlm_logits))
    terms = losses.token_cross_entropy_terms(logits, jnp.concatenate([enc_labels, dec_labels], axis=1))
    split = enc_labels.shape[1]
    for name, value in terms.items():
      parts[f"encoder_mlm_{name}"] = value[:, :split].sum()
      parts[f"decoder_mlm_{name}"] = value[:, split:].sum()
    return parts

  def loss_fn(self, params: PyTree, batch: Batch, *, anchor_type: str, context_type: str,
              rng: jax.Array | None = None, deterministic: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted loss, metrics) of one homogeneous batch of (anchor, context) pairs.

    batch: int [B, L] fields `anchor_input_ids`, `anchor_attention_mask`, `anchor_labels`, `context_input_ids`,
    `context_attention_mask`, `context_labels` (labels: the original id at masked positions, -100 elsewhere;
    anchor and context may have different lengths). Each loss is the mean over its predicted tokens (bag of
    words: over anchors with at least one ordinary token). `anchor_type` / `context_type` are static.
    """
    parts = self.loss_parts(params, batch, anchor_type=anchor_type, context_type=context_type, rng=rng,
                            deterministic=deterministic)
    return finalize(parts, self.objective)

  def multi_stream_loss_fn(self, params: PyTree, batches: Mapping[str, Batch], streams: Sequence[Stream], *,
                           rng: jax.Array | None = None,
                           deterministic: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One loss over several homogeneous streams (`batches[stream.name]`, static types per `Stream`).

    stream_weighting "tokens": each component is averaged over the predicted tokens of all streams together,
      i.e. the loss of one batch made of every stream's rows (a stream weighs by its masked-token count).
    stream_weighting "mean": the plain mean of the streams' `loss_fn` losses (every stream weighs the same,
      however short its texts).
    metrics: "loss" as weighted, the token-pooled components of all streams, and "{name}/{metric}" per stream.
    """
    if not streams:
      raise ValueError("multi_stream_loss_fn needs at least one stream")
    names = [stream.name for stream in streams]
    if len(set(names)) != len(names):
      raise ValueError(f"stream names must be unique, got {names}")
    keys = [None] * len(streams) if rng is None else list(jax.random.split(rng, len(streams)))
    metrics, pooled, stream_losses = {}, {}, []
    for stream, key in zip(streams, keys):
      parts = self.loss_parts(params, batches[stream.name], anchor_type=stream.anchor_type,
                              context_type=stream.context_type, rng=key, deterministic=deterministic)
      stream_loss, stream_metrics = finalize(parts, self.objective)
      stream_losses.append(stream_loss)
      metrics.update({f"{stream.name}/{k}": v for k, v in stream_metrics.items()})
      for k, v in parts.items():
        pooled[k] = pooled.get(k, 0.0) + v
    loss, pooled_metrics = finalize(pooled, self.objective)
    if self.objective.stream_weighting == "mean":
      loss = jnp.mean(jnp.stack(stream_losses))
      pooled_metrics["loss"] = loss
    metrics.update(pooled_metrics)
    return loss, metrics
