"""mote_jax: CoT-MoTE pre-training, fine-tuning and evaluation of dense retrievers in JAX/Flax."""

__version__ = "0.1.0"
