"""MoTE encoder modules and their configuration."""

from mote_jax.model.config import EXPERTS, MoteConfig
from mote_jax.model.encoder import MoteEncoder, attention_bias, init_params, l2_normalize, pool

__all__ = ["EXPERTS", "MoteConfig", "MoteEncoder", "attention_bias", "init_params", "l2_normalize", "pool"]
