"""Kernel sets: how the model's products, dropout bits, attention and the gradient clip are computed.

`KernelConfig` names one implementation per operation. `KernelConfig.for_platform(platform)` gives the default of
each platform, and `resolve(kernels)` turns `None` (the default everywhere: "the platform's kernel set") into the
set for JAX's default backend. Values are strings, so a config is hashable and settable from gin.

  dense      'xla'       the dense layers' products as `jnp.dot`, differentiated by JAX
             'cpu_gemm'  the same values with a custom VJP whose kernel gradient comes out as one GEMM x^T dy in
                         the kernel's own orientation (from autodiff XLA:CPU transposes the cotangent in copies
                         fused with the elementwise backward before it)
  dropout    'jax_random' `jax.random.bernoulli` masks (honours `jax_default_prng_impl`, e.g. 'rbg' on TPU)
             'hashed'    a keyed integer hash of each element's position, two threefry seeds per call
  attention  'einsum'    einsum / softmax / einsum (the reference; attention dropout applied)
             'dot_product' `jax.nn.dot_product_attention` (cuDNN on GPU when available, XLA elsewhere)
             'pallas_flash' the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu`); runs on CPU
                         only in Pallas interpret mode (`pltpu.force_tpu_interpret_mode`), for tests
  grad_clip  'optax'     `optax.clip_by_global_norm`
             'scalar'    PyTorch's `clip_grad_norm_` form, one scalar coefficient (`kernels.clip`)

The fused attentions have no dropout on the attention probabilities: in training with `attention_dropout > 0` they
skip it (a warning says so once). The hidden-state dropouts are unaffected. Each CPU choice is A/B'd against plain
XLA by `python -m benchmarks --only kernel_ab`, which also checks that the CPU set keeps only >= 2% gains.
"""

from __future__ import annotations

import dataclasses

import jax

DENSE = ("xla", "cpu_gemm")
DROPOUT = ("jax_random", "hashed")
ATTENTION = ("einsum", "dot_product", "pallas_flash")
GRAD_CLIP = ("optax", "scalar")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """One implementation per operation (see the module docstring for the choices)."""

  dense: str = "xla"
  dropout: str = "jax_random"
  attention: str = "einsum"
  grad_clip: str = "optax"

  def __post_init__(self):
    for name, choices in (("dense", DENSE), ("dropout", DROPOUT), ("attention", ATTENTION),
                          ("grad_clip", GRAD_CLIP)):
      if getattr(self, name) not in choices:
        raise ValueError(f"KernelConfig.{name}={getattr(self, name)!r}: expected one of {choices}")

  @classmethod
  def for_platform(cls, platform: str) -> "KernelConfig":
    """The default set of `platform` ('cpu', 'gpu'/'cuda'/'rocm', 'tpu').

    TPU and GPU: plain XLA autodiff, `jax.random` dropout, `optax` clipping, and the fused attention (Pallas
    flash attention on TPU, `jax.nn.dot_product_attention` on GPU). CPU: the tuned set, only the choices that
    still measure a gain on XLA:CPU (`python -m benchmarks --only kernel_ab`).
    """
    platform = platform.lower()
    if platform == "cpu":
      return CPU
    if platform == "tpu":
      return cls(attention="pallas_flash")
    if platform in ("gpu", "cuda", "rocm"):
      return cls(attention="dot_product")
    raise ValueError(f"KernelConfig.for_platform: unknown platform {platform!r} (expected cpu, gpu, cuda, rocm "
                     f"or tpu)")

  def replace(self, **changes) -> "KernelConfig":
    return dataclasses.replace(self, **changes)


# The tuned XLA:CPU set; what it keeps is decided by an in-process A/B (`python -m benchmarks --only kernel_ab`).
# `dense='cpu_gemm'` is left out (the A/B shows no gain for it on either training step); it stays selectable.
CPU = KernelConfig(dense="xla", dropout="hashed", attention="einsum", grad_clip="optax")
# Plain XLA everywhere, the reference set (what the accelerators use, bar the fused attention).
XLA = KernelConfig()


def resolve(kernels: KernelConfig | None, platform: str | None = None) -> KernelConfig:
  """`kernels`, or the default set of `platform` (JAX's default backend when None)."""
  if kernels is not None:
    return kernels
  return KernelConfig.for_platform(platform or jax.default_backend())
