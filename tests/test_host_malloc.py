"""mote_jax.host_malloc: the launcher's re-exec with glibc malloc settings, and that they stop the page faults."""

import json
import os
import subprocess
import sys

import pytest

from mote_jax import host_malloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")

# mallocs, fills and frees 256 MiB three times (as XLA:CPU does with a step's temporaries; plain malloc, since
# numpy asks for huge pages), then reports the minor page faults of the last round.
_PROBE = """
import ctypes, json, os, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round_trip(size=256 * 2**20):
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
round_trip(); round_trip()
before = faults()
round_trip()
after = faults()
block = libc.malloc(256 * 2**20)
ctypes.memset(block, 1, 256 * 2**20)
with open("/proc/self/smaps_rollup") as f:
  huge_kb = sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
libc.free(block)
print(json.dumps({"faults": after - before, "huge_kb": huge_kb, "switch": os.environ.get("MOTE_JAX_MALLOC_TUNING"),
                  "arena_max": os.environ.get("MALLOC_ARENA_MAX")}))
"""


def _run(args, env_changes):
  env = {k: v for k, v in os.environ.items() if k not in host_malloc.SETTINGS and k != host_malloc.SWITCH}
  env.update(env_changes)
  out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_reexec_applies_the_settings_once_and_the_pages_stay():
  # A program that re-executes itself through host_malloc, then runs the probe.
  program = ("import sys\nfrom mote_jax import host_malloc\n"
             "host_malloc.reexec_with_settings(['-c', sys.argv[1]])\n" + "exec(sys.argv[1])\n")
  tuned = _run(["-c", program, _PROBE], {})
  assert tuned["switch"] == "applied" and tuned["arena_max"] == "1"
  plain = _run(["-c", program, _PROBE], {host_malloc.SWITCH: "0"})
  assert plain["switch"] == "0" and plain["arena_max"] is None
  # 256 MiB is 65,536 pages: glibc's defaults fault them all in again; the settings reuse them.
  assert plain["faults"] > 60_000
  assert tuned["faults"] < 1_000
  # And the heap is backed by transparent huge pages where the kernel offers them.
  with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
    thp = f.read()
  if "[never]" not in thp:
    assert tuned["huge_kb"] >= 128 * 1024


def test_values_already_set_win():
  env = host_malloc.environment({"MALLOC_ARENA_MAX": "4"})
  assert env["MALLOC_ARENA_MAX"] == "4" and env["MALLOC_MMAP_MAX_"] == "0"
  none = lambda pattern: []  # noqa: E731  (a host without accelerator device files)
  assert not host_malloc.wanted({host_malloc.SWITCH: "applied"}, none)
  assert not host_malloc.wanted({host_malloc.SWITCH: "0"}, none)
  assert host_malloc.wanted({}, none)


@pytest.mark.parametrize("env, devices, cpu_only", [
    ({}, [], True),
    ({"JAX_PLATFORMS": "cpu"}, ["/dev/nvidia0"], True),  # JAX_PLATFORMS decides when set
    ({"JAX_PLATFORMS": "tpu,cpu"}, [], False),
    ({"JAX_PLATFORMS": "cuda"}, [], False),
    ({}, ["/dev/accel0"], False),  # a TPU VM (v4 and before)
    ({}, ["/dev/vfio/0"], False),  # a TPU VM (v5 on)
    ({}, ["/dev/nvidia0"], False),
    ({}, ["/dev/kfd"], False),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, [], False),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, [], False),
    ({"CUDA_VISIBLE_DEVICES": ""}, [], True),  # devices hidden
    ({"CUDA_VISIBLE_DEVICES": "-1"}, [], True),
])
def test_settings_apply_on_cpu_only_hosts_unless_forced(env, devices, cpu_only):
  import fnmatch
  files = lambda pattern: fnmatch.filter(devices, pattern)  # noqa: E731
  assert host_malloc.cpu_only_host(env, files) is cpu_only
  assert host_malloc.wanted(env, files) is cpu_only
  assert host_malloc.wanted({**env, host_malloc.SWITCH: "1"}, files)
  assert not host_malloc.wanted({**env, host_malloc.SWITCH: "0"}, files)
  with pytest.raises(ValueError, match="MOTE_JAX_MALLOC_TUNING='yes'"):
    host_malloc.wanted({**env, host_malloc.SWITCH: "yes"}, files)


# Under the settings: fills 256 MiB, pins the heap above it with a small block (so it is a hole, not the heap's
# top), frees it, then calls release_free_memory; reports VmRSS (kB) at each point.
_HOLE_PROBE = """
import ctypes, json
from mote_jax import host_malloc
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
size = 256 * 2**20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
pin = libc.malloc(4096)
filled = rss()
libc.free(block)
freed = rss()
released = host_malloc.release_free_memory()
print(json.dumps({"filled": filled, "freed": freed, "trimmed": rss(), "released": released}))
"""


def test_release_free_memory_returns_a_hole_in_the_heap():
  program = ("import sys\nfrom mote_jax import host_malloc\n"
             "host_malloc.reexec_with_settings(['-c', sys.argv[1]])\n" + "exec(sys.argv[1])\n")
  out = _run(["-c", program, _HOLE_PROBE], {host_malloc.SWITCH: "1"})
  mib = 1024  # kB
  # The settings keep the freed block resident (nothing is trimmed or unmapped) ...
  assert out["freed"] > out["filled"] - 16 * mib
  # ... and release_free_memory hands its pages back although it lies below the pinned block.
  assert out["released"] and out["trimmed"] < out["freed"] - 240 * mib
