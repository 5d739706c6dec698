"""glibc malloc settings that keep XLA:CPU's per-step buffers resident; `mote_jax.launch` applies them.

XLA:CPU allocates every execution's temporaries with malloc (about 1 GB for the MiniLM-L6 pre-training step at
B=8, L=128) and frees them when the step ends. By default glibc hands blocks that large back to the kernel (they
are mmap'd chunks, or trimmed from the heap), so each step page-faults the whole gigabyte in again. One arena,
no mmap'd chunks and no trimming keep those pages in the process (and transparent huge pages back the heap):
benchmarks section 7b (benchmarks/RESULTS.md) measured 0.539 s/step and 203,107 minor faults per step with
glibc's defaults against 0.496-0.503 s and at most 150 faults with these settings (0.694 against 0.563-0.591 s
in an earlier run).
PyTorch's CPU allocator faults the same way; `python -m benchmarks` runs every contender with these settings.
The price: the process never returns freed memory to the system, and its one heap can fragment. Now and then a
step's temporaries no longer fit in the space the previous step freed, and the heap grows by another copy of them
(that step is slow while the new pages are faulted in). Measured (benchmarks/analysis.md, Scaling): the MiniLM
step at B=8, L=128 (707 MB of temporaries) grew by one copy at steps 46 and 199 and then stayed at 4.1 GB to
step 1,500; at L=512 (4.0 GB of temporaries) by one or two copies within 25 steps. Where memory is tight,
MOTE_JAX_MALLOC_TUNING=0 trades that for page faults every step.

glibc reads these variables only when a process starts, so `reexec_with_settings` restarts the interpreter with
them (once; values already in the environment win). Set MOTE_JAX_MALLOC_TUNING=0 to opt out.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

SETTINGS = {
    "MALLOC_ARENA_MAX": "1",  # thread arenas are mmap'd heaps that glibc shrinks with MADV_DONTNEED
    "MALLOC_MMAP_MAX_": "0",  # big blocks from the heap, not mmap (munmap'd on free, faulted in on reuse)
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30),  # never give the top of the heap back
    # glibc >= 2.35: madvise the heap for transparent huge pages (fewer TLB misses over the step's buffers;
    # ignored by older glibc or where THP is off)
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}
SWITCH = "MOTE_JAX_MALLOC_TUNING"  # "0": leave malloc alone; "applied": set by the re-executed process


def environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
  """`base` (default: this process's environment) with `SETTINGS` added where unset."""
  env = dict(os.environ if base is None else base)
  for name, value in SETTINGS.items():
    env.setdefault(name, value)
  return env


def wanted(env: Mapping[str, str] | None = None) -> bool:
  """Whether a process with `env` should be re-executed with the settings (glibc Linux, not opted out, not
  re-executed already)."""
  env = os.environ if env is None else env
  return sys.platform.startswith("linux") and env.get(SWITCH, "1") not in ("0", "applied")


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
