"""Datasheet peaks by device kind (for MFU) and the "auto" compute dtype per platform."""

import logging

import jax.numpy as jnp
import pytest

from mote_jax.model import MoteConfig
from mote_jax.model.config import resolve_dtype
from mote_jax.training.flops import peak_flops_per_device, resolve_peak_flops

T = 1e12


@pytest.mark.parametrize("kind, dtype, tflops", [
    # device_kind strings as JAX reports them; figures from the vendors' datasheets (dense, per JAX device).
    ("TPU v4", "bfloat16", 275.0),
    ("TPU v5 lite", "bfloat16", 197.0),  # v5e
    ("TPU v5", "bfloat16", 459.0),  # v5p
    ("TPU v5p", "bfloat16", 459.0),
    ("TPU v6 lite", "bfloat16", 918.0),  # v6e
    ("TPU v4", "float32", 275.0),  # default precision: one bf16 pass
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("NVIDIA A100-SXM4-80GB", "float32", 156.0),  # TF32
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "bfloat16", 989.4),
    ("NVIDIA H200", jnp.float32, 494.7),
    ("NVIDIA H200 NVL", "bfloat16", 835.5),
    ("NVIDIA B200", "bfloat16", 2250.0),
    ("NVIDIA B200", jnp.dtype("bfloat16"), 2250.0),
    ("NVIDIA GB200", "bfloat16", 2500.0),
])
def test_peak_lookup(kind, dtype, tflops):
  assert peak_flops_per_device(kind, dtype) == pytest.approx(tflops * T)


def test_unknown_kinds_and_dtypes_give_none():
  assert peak_flops_per_device("cpu", "float32") is None
  assert peak_flops_per_device("Tesla V100-SXM2-16GB", "bfloat16") is None
  assert peak_flops_per_device("TPU v4 lite", "bfloat16") is None  # not the training v4
  assert peak_flops_per_device("TPU v5 lite", "float16") is None  # no fp16 figure for TPUs
  with pytest.raises(ValueError, match="int8"):
    peak_flops_per_device("TPU v4", "int8")


def test_resolution_configured_automatic_and_unknown(caplog):
  assert resolve_peak_flops(0.0, "TPU v4", "bfloat16") == 0.0  # 0 disables even where the table knows
  assert resolve_peak_flops(1e12, "cpu", "float32") == 1e12  # by hand wins
  assert resolve_peak_flops(None, "TPU v5 lite", "bfloat16") == 197e12
  with caplog.at_level(logging.INFO, logger="mote_jax.training.flops"):
    assert resolve_peak_flops(None, "some new chip", "bfloat16") == 0.0
    assert resolve_peak_flops(None, "some new chip", "bfloat16") == 0.0
  assert caplog.text.count("MFU not reported") == 1  # logged once


@pytest.mark.parametrize("platform, expected", [("tpu", "bfloat16"), ("gpu", "bfloat16"), ("cuda", "bfloat16"),
                                                ("rocm", "bfloat16"), ("cpu", "float32"), ("METAL", "float32")])
def test_auto_dtype_per_platform(platform, expected):
  assert resolve_dtype("auto", platform) == expected
  config = MoteConfig(hidden_size=32, num_heads=2, dtype="auto").for_platform(platform)
  assert config.dtype == expected and config.param_dtype == "float32"  # parameters stay fp32
  assert config.compute_dtype == jnp.dtype(expected)
  # An explicit dtype is kept on every platform.
  assert MoteConfig(dtype="float32").for_platform(platform).dtype == "float32"


def test_unresolved_auto_follows_the_default_backend_and_param_dtype_cannot_be_auto():
  assert MoteConfig(dtype="auto").compute_dtype == jnp.float32  # the tests run on CPU
  with pytest.raises(ValueError, match="param_dtype='auto'"):
    MoteConfig(param_dtype="auto")
