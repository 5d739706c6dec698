"""Peak matmul FLOP/s per device from the vendor's datasheet, keyed on `jax.Device.device_kind`, for MFU.

Figures are dense (without 2:4 structured sparsity; NVIDIA's sparse figures halved) tensor-core / MXU peaks per
JAX device. The "float32" column is the rate of JAX's *default* precision for float32 matmuls, which is what a
float32 model runs at: TF32 tensor cores on NVIDIA GPUs from Ampere on, one bfloat16 pass on TPUs (so the TPU
float32 entries equal the bfloat16 ones; see JAX's "Matmul precision" page). A model run with
`jax_default_matmul_precision='highest'` does several passes and would need its own figure.

Each TPU chip listed here is one JAX device (v4 and v5p cores run as one "megacore" device; v5e and v6e have one
TensorCore per chip). A kind the table does not know gives None: MFU is then not reported unless
`TrainerConfig.peak_flops_per_device` is set by hand.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger(__name__)

# (substring of device_kind, {dtype: TFLOP/s}); the first match wins, so specific names precede their prefixes.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float] | None], ...] = (
    # Cloud TPU system architecture pages (per chip).
    ("TPU v4 lite", None),  # v4i, an inference chip: not listed
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),  # v5e
    ("TPU v5p", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),  # v5p reports "TPU v5"
    ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),  # v6e (Trillium)
    # NVIDIA datasheets: bf16 (= fp16) and TF32 tensor-core peaks, dense.
    ("GB200", {"bfloat16": 2500.0, "float16": 2500.0, "float32": 1250.0}),
    ("B200", {"bfloat16": 2250.0, "float16": 2250.0, "float32": 1100.0}),
    ("H200 NVL", {"bfloat16": 835.5, "float16": 835.5, "float32": 417.5}),
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),  # SXM; GH200 has the same tensor cores
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 417.5}),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),  # SXM5
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 183.0}),
    ("L40", {"bfloat16": 181.0, "float16": 181.0, "float32": 90.5}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0}),
)

_DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                "float32": "float32", "fp32": "float32"}


def _dtype_name(dtype: Any) -> str:
  name = getattr(dtype, "name", None) or getattr(getattr(dtype, "dtype", None), "name", None) or str(dtype)
  if name not in _DTYPE_NAMES:
    raise ValueError(f"dtype {dtype!r}: expected one of {sorted(set(_DTYPE_NAMES.values()))}")
  return _DTYPE_NAMES[name]


def peak_flops_per_device(device_kind: str, dtype: Any = "bfloat16") -> Optional[float]:
  """Datasheet peak FLOP/s of one device of `device_kind` ('TPU v4', 'NVIDIA H100 80GB HBM3', ...) for matmuls
  in `dtype` ('bfloat16', 'float32', a numpy/jnp dtype); None when the kind or the dtype is not listed."""
  dtype_name = _dtype_name(dtype)
  for name, peaks in PEAK_TFLOPS:
    if name in device_kind:
      if peaks is None or dtype_name not in peaks:
        return None
      return peaks[dtype_name] * 1e12
  return None


_logged_unknown: set[tuple[str, str]] = set()


def resolve_peak_flops(configured: Optional[float], device_kind: str, dtype: Any) -> float:
  """The per-device peak to report MFU against: `configured` when given (0 disables MFU), else the table's
  figure for `device_kind` and `dtype`, else 0 with one log line saying why MFU is not reported."""
  if configured is not None:
    return float(configured)
  peak = peak_flops_per_device(device_kind, dtype)
  if peak is None:
    key = (device_kind, _dtype_name(dtype))
    if key not in _logged_unknown:
      _logged_unknown.add(key)
      log.info("no datasheet peak for %s in %s: MFU not reported (set TrainerConfig.peak_flops_per_device to "
               "report it)", device_kind, key[1])
    return 0.0
  return peak
