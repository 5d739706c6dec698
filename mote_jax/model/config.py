"""Static configuration of a MoTE encoder (hashable, so it can be a static jit argument)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from mote_jax.kernels import KernelConfig, resolve

TowerMode = Literal["siamese", "separated", "mote"]
Expert = Literal["query", "passage"]
EXPERTS: tuple[str, ...] = ("query", "passage")
POOLINGS = ("cls", "mean")
TOWER_MODES = ("siamese", "separated", "mote")
VOCAB_MULTIPLE = 128  # the vocabulary is padded to a multiple of this inside the model (`padded_vocab_size`)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Compute dtype of `dtype="auto"` per JAX platform: bfloat16 where matmul units run it natively (TPU MXUs, GPU
# tensor cores), float32 elsewhere (XLA:CPU computes bfloat16 matmuls slower than float32 ones).
AUTO_DTYPE_BY_PLATFORM = {"tpu": "bfloat16", "gpu": "bfloat16", "cuda": "bfloat16", "rocm": "bfloat16"}


def resolve_dtype(dtype: str, platform: str) -> str:
  """`dtype` itself, or for "auto" the compute dtype of `platform` (a `jax.Device.platform`: cpu, tpu, gpu)."""
  if dtype != "auto":
    return dtype
  return AUTO_DTYPE_BY_PLATFORM.get(platform.lower(), "float32")


@dataclasses.dataclass(frozen=True)
class MoteConfig:
  """Shape and behaviour of a BERT-shaped encoder with textual experts.

  The architecture fields mirror HF `BertConfig` so that BERT checkpoints load exactly.
  `dtype` is the compute dtype and `param_dtype` the storage dtype of parameters; both are
  given as strings ("float32", "bfloat16") so the config stays hashable and gin-friendly. `dtype="auto"` means
  bfloat16 activations on TPU / GPU and float32 on CPU (`resolve_dtype`); jobs resolve it on their mesh's
  platform at start (`for_platform`), and an unresolved "auto" follows JAX's default backend.
  `kernels` picks the implementations of the dense products, dropout bits and attention (`mote_jax.kernels`);
  None (the default) means the default set of the platform the model is traced on.
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  pad_token_id: int = 0

  tower_mode: TowerMode = "mote"
  pooling: str = "cls"
  normalize: bool = False

  # Serving settings: they do not change the model; exports write them into each tower's sentence-transformers
  # files. Read from the source checkpoint (`sentence_bert_config.json`) or set to the training lengths by the jobs.
  query_max_seq_length: int | None = None  # tokens per query, [CLS] and [SEP] included; None: unknown
  passage_max_seq_length: int | None = None  # tokens per passage
  st_do_lower_case: bool = False  # sentence-transformers' own lower-casing before the tokenizer

  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: bool = False
  kernels: KernelConfig | None = None

  def __post_init__(self):
    if isinstance(self.kernels, dict):  # from a JSON record
      object.__setattr__(self, "kernels", KernelConfig(**self.kernels))
    if self.tower_mode not in TOWER_MODES:
      raise ValueError(f"MoteConfig.tower_mode={self.tower_mode!r}: expected one of {TOWER_MODES}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"MoteConfig.pooling={self.pooling!r}: expected one of {POOLINGS}")
    for name, allowed in (("dtype", (*_DTYPES, "auto")), ("param_dtype", tuple(_DTYPES))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"MoteConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
    for name in ("query_max_seq_length", "passage_max_seq_length"):
      value = getattr(self, name)
      if value is not None and not 2 < value <= self.max_position_embeddings:
        raise ValueError(f"MoteConfig.{name}={value}: expected 2 < length <= max_position_embeddings="
                         f"{self.max_position_embeddings}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"MoteConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def padded_vocab_size(self) -> int:
    """`vocab_size` rounded up to a multiple of `VOCAB_MULTIPLE`: the rows of the word embeddings and the columns
    of the MLM logits inside the model, so that a 'model' mesh axis divides the vocabulary (an indivisible one
    replicates it). The padding rows stay zero and never leave the model (HF import pads, export cuts them);
    the MLM logits over them are masked to the float32 minimum."""
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  @property
  def kernel_set(self) -> KernelConfig:
    """`kernels`, or the default set of JAX's default backend."""
    return resolve(self.kernels)

  @property
  def compute_dtype(self):
    if self.dtype == "auto":
      import jax
      return _DTYPES[resolve_dtype("auto", jax.default_backend())]
    return _DTYPES[self.dtype]

  def for_platform(self, platform: str) -> "MoteConfig":
    """This config with `dtype="auto"` replaced by the compute dtype of `platform` ("cpu", "tpu", "gpu")."""
    return dataclasses.replace(self, dtype=resolve_dtype(self.dtype, platform))

  @property
  def storage_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def num_experts(self) -> int:
    """Experts per tower: two in `mote`, one otherwise (separated has one tower per type)."""
    return 2 if self.tower_mode == "mote" else 1

  @property
  def tower_names(self) -> tuple[str, ...]:
    return ("query_tower", "passage_tower") if self.tower_mode == "separated" else ("tower",)

  def route(self, expert: str) -> tuple[str, int]:
    """Maps a text type to (tower name, expert index within that tower)."""
    if expert not in EXPERTS:
      raise ValueError(f"expert={expert!r}: expected one of {EXPERTS}")
    if self.tower_mode == "separated":
      return f"{expert}_tower", 0
    if self.tower_mode == "mote":
      return "tower", EXPERTS.index(expert)
    return "tower", 0

  def max_seq_length(self, expert: str) -> int | None:
    """The serving length of `expert`'s tower (None when neither the source nor training set one)."""
    if expert not in EXPERTS:
      raise ValueError(f"expert={expert!r}: expected one of {EXPERTS}")
    return getattr(self, f"{expert}_max_seq_length")

  def replace(self, **changes) -> "MoteConfig":
    return dataclasses.replace(self, **changes)
