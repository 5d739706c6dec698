"""The CoT-MAE context decoder: a few BERT layers that reconstruct masked text B from text A's [CLS] vector.

As in the official CoT-MAE code, the decoder input is text B's token embeddings (word + position + type,
LayerNorm, from the encoder tower's own embeddings module) with position 0 replaced by the encoder's
last-layer [CLS] state of text A; its output goes through the encoder tower's tied MLM head. The layers are
`LayerStack` layers with a single expert, so they are exactly BERT layers and can start from copies of
encoder layers (`decoder_params_from_encoder`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mote_jax.model.config import MoteConfig
from mote_jax.model.encoder import attention_bias
from mote_jax.model.layers import LayerStack

PyTree = Any


def decoder_config(config: MoteConfig, num_layers: int) -> MoteConfig:
  """The encoder config with `num_layers` layers: same widths, dtypes, dropout, scan and remat choices."""
  if num_layers < 1:
    raise ValueError(f"decoder num_layers={num_layers}: expected at least 1")
  return config.replace(num_layers=num_layers)


class CotMaeDecoder(nn.Module):
  """`config.num_layers` BERT layers (one expert each) over [A's CLS; B's token embeddings 1:]."""

  config: MoteConfig  # a `decoder_config`

  @nn.compact
  def __call__(self, cls_hidden, context_embeddings, context_attention_mask, deterministic: bool = True):
    """cls_hidden: [B, H]; context_embeddings: [B, L, H]; context_attention_mask: int [B, L] -> [B, L, H]."""
    dtype = context_embeddings.dtype
    x = jnp.concatenate([cls_hidden[:, None].astype(dtype), context_embeddings[:, 1:]], axis=1)
    return LayerStack(self.config, 1, name="layers")(
        x, attention_bias(context_attention_mask), 0, deterministic)


def init_decoder_params(config: MoteConfig, rng: jax.Array, batch_shape=(1, 8)) -> PyTree:
  """Boxed (logically partitioned) parameters of a fresh `CotMaeDecoder(config)`."""
  batch, length = batch_shape
  embeddings = jnp.zeros((batch, length, config.hidden_size), config.compute_dtype)
  cls_hidden = jnp.zeros((batch, config.hidden_size), config.compute_dtype)
  mask = jnp.ones((batch, length), jnp.int32)
  return CotMaeDecoder(config).init(rng, cls_hidden, embeddings, mask)["params"]


def _copy(x):
  # Host arrays are copied so the decoder never aliases (and a later in-place edit never changes) the encoder.
  return np.array(x) if isinstance(x, np.ndarray) else x


def decoder_params_from_encoder(config: MoteConfig, encoder_params: PyTree, num_layers: int,
                                expert: str = "passage") -> PyTree:
  """Decoder parameters copied from the last `num_layers` layers of the tower and expert serving `expert`.

  config: the encoder's MoteConfig; encoder_params: unboxed MoteEncoder params (numpy or jax arrays; boxed
  ones are unboxed). Every FFN parameter carries a leading 'expert' axis (after the 'layers' axis when
  scanned); the decoder has one expert, so the `expert` slice is kept with its axis (size 1). Returns the
  unboxed tree of `CotMaeDecoder(decoder_config(config, num_layers))`.
  """
  if not 1 <= num_layers <= config.num_layers:
    raise ValueError(f"decoder num_layers={num_layers}: cannot copy from an encoder of {config.num_layers} layers")
  tower_name, expert_index = config.route(expert)
  stack = nn.unbox(encoder_params)[tower_name]["encoder"]
  first = config.num_layers - num_layers

  def take_expert(path, x, expert_axis):
    if any(getattr(key, "key", None) == "ffn" for key in path):
      x = x[(slice(None),) * expert_axis + (slice(expert_index, expert_index + 1),)]
    return _copy(x)

  if config.scan_layers:
    layers = jax.tree_util.tree_map_with_path(lambda p, x: take_expert(p, x[first:], 1), stack["layers"])
    return {"layers": {"layers": layers}}
  return {"layers": {
      f"layer_{j}": jax.tree_util.tree_map_with_path(lambda p, x: take_expert(p, x, 0), stack[f"layer_{first + j}"])
      for j in range(num_layers)}}
