"""glibc malloc settings that keep XLA:CPU's per-step buffers resident; `mote_jax.launch` applies them on CPU-only
hosts.

XLA:CPU allocates every execution's temporaries with malloc (on the order of a gigabyte for a MiniLM-sized
pre-training step) and frees them when the step ends. By default glibc hands blocks that large back to the kernel
(they are mmap'd chunks, or trimmed from the heap), so each step page-faults them all in again. One arena, no
mmap'd chunks and no trimming keep those pages in the process (and transparent huge pages back the heap).
Measured by `python -m benchmarks --only flags`.

The price: the process never returns freed memory to the system, and its one heap can fragment (now and then a
step's temporaries no longer fit in the space the previous step freed, and the heap grows by another copy of
them). Where the host has an accelerator the step's temporaries live in device memory, and a single arena would
only serialise the allocations of the input pipeline's threads (tf.data, grain) for nothing: so the settings apply
on CPU-only hosts only.

Between phases that allocate differently (a fine-tuning run's training steps and its dev evaluations: corpus
encodings at other shapes, their compilations, search) the free space the one phase leaves is fragmented by what
the other keeps, so each switch can add a copy of the step's temporaries to the heap, all of it resident, since
nothing is trimmed. `release_free_memory()` (glibc `malloc_trim(0)`) hands every free page of the heap back to
the kernel, the holes in its middle included; jobs call it when such a phase ends, at the cost of faulting the
next step's temporaries in once.

glibc reads these variables only when a process starts, so `reexec_with_settings` restarts the interpreter with
them (once; values already in the environment win). Whether the host is CPU-only is decided before that restart,
without importing JAX (`cpu_only_host`): `JAX_PLATFORMS` when set (CPU-only when it names only `cpu`), otherwise
no accelerator device files (/dev/accel*, /dev/vfio/* on TPU VMs; /dev/nvidia*; /dev/kfd for ROCm) and no
TPU/GPU environment variables. `MOTE_JAX_MALLOC_TUNING=1` forces the settings on any host, `=0` turns them off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger(__name__)

SETTINGS = {
    "MALLOC_ARENA_MAX": "1",  # thread arenas are mmap'd heaps that glibc shrinks with MADV_DONTNEED
    "MALLOC_MMAP_MAX_": "0",  # big blocks from the heap, not mmap (munmap'd on free, faulted in on reuse)
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),  # never give the top of the heap back
    # glibc >= 2.35: madvise the heap for transparent huge pages (fewer TLB misses over the step's buffers;
    # ignored by older glibc or where THP is off)
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}
SWITCH = "MOTE_JAX_MALLOC_TUNING"  # "0": off; "1": on whatever the host; "applied": set by the re-executed process
# Device files of accelerators: TPU VMs (/dev/accel* up to v4, /dev/vfio/* from v5), NVIDIA GPUs, AMD GPUs (ROCm).
ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")
# Environment variables that name accelerators: Cloud TPU runtimes, CUDA and ROCm device selection.
ACCELERATOR_ENV = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID",
                   "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


def environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
  """`base` (default: this process's environment) with `SETTINGS` added where unset."""
  env = dict(os.environ if base is None else base)
  for name, value in SETTINGS.items():
    env.setdefault(name, value)
  return env


def cpu_only_host(env: Mapping[str, str] | None = None,
                  device_files: Callable[[str], list[str]] = glob.glob) -> bool:
  """Whether JAX will run on the CPU only in a process with `env` (default: this process's environment).

  `JAX_PLATFORMS` decides when set (CPU-only when every platform it names is `cpu`). Otherwise the host is
  CPU-only when it has no accelerator device files (`ACCELERATOR_DEVICES`, looked up with `device_files`) and no
  accelerator environment variable (`ACCELERATOR_ENV`; an empty value, or "-1"/"none"/"void" for the device
  lists, hides the devices and does not count).
  """
  env = os.environ if env is None else env
  platforms = [p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return all(p == "cpu" for p in platforms)
  if any(device_files(pattern) for pattern in ACCELERATOR_DEVICES):
    return False
  return not any(env.get(name, "").strip().lower() not in ("", "-1", "none", "void") for name in ACCELERATOR_ENV)


def wanted(env: Mapping[str, str] | None = None, device_files: Callable[[str], list[str]] = glob.glob) -> bool:
  """Whether a process with `env` should be re-executed with the settings: glibc Linux, not re-executed already,
  and `MOTE_JAX_MALLOC_TUNING=1`, or unset on a CPU-only host (`cpu_only_host`)."""
  env = os.environ if env is None else env
  switch = env.get(SWITCH, "")
  if not sys.platform.startswith("linux") or switch in ("0", "applied"):
    return False
  if switch == "1":
    return True
  if switch:
    raise ValueError(f"{SWITCH}={switch!r}: expected 0 (off), 1 (on) or unset (on for CPU-only hosts)")
  return cpu_only_host(env, device_files)


def reexec_with_settings(args: Sequence[str]) -> None:
  """Replaces this process by `python <args>` with `environment()`, unless `wanted()` says no (then returns).

  `args` are the interpreter arguments that run the same program again, e.g. ["-m", "mote_jax.launch", *argv].
  Call it first thing, before threads start or files are opened.
  """
  if not wanted():
    return
  env = environment()
  env[SWITCH] = "applied"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *args], env)


def release_free_memory() -> bool:
  """Returns the free pages of glibc's heaps to the kernel (`malloc_trim(0)`, which also releases free chunks in
  the middle of a heap, not only its top). Whatever the malloc settings; a no-op returning False where the C
  library has no malloc_trim (not glibc). True when memory was released."""
  trim = _malloc_trim()
  return bool(trim(0)) if trim is not None else False


_TRIM = None


def _malloc_trim():
  global _TRIM
  if _TRIM is None:
    try:
      libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
      _TRIM = libc.malloc_trim
      _TRIM.argtypes, _TRIM.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
      _TRIM = False
  return _TRIM or None
