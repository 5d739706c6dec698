"""Entry point: `python -m mote_jax.launch --gin_file=RUN.gin [--gin.NAME=VALUE ...]`.

t5x-style flags:
  --gin_file=PATH          repeatable; later files override earlier ones
  --gin_search_paths=DIRS  comma-separated directories where gin files and their includes are looked up
                           (the repository's t5x_configs/ is always searched last)
  --gin.NAME=VALUE         a gin binding, e.g. --gin.MODEL_DIR=/tmp/run or --gin.run.seed=3; a VALUE that is
                           not a Python literal or gin reference is taken as a string
  --gin_bindings=BINDING   repeatable raw gin binding
Multi-process runs (one process per host) pass --coordinator_address, --num_processes and --process_id, or set
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; on Cloud TPU `jax.distributed.initialize()` needs
none of them (--distributed).

The run's gin files bind `run.job` to a job function (see mote_jax/jobs); the parsed config is written to
MODEL_DIR/config.gin before the job starts and the operative config (what the job used) to
MODEL_DIR/operative_config.gin when it ends.

On Linux the command restarts itself once with glibc malloc settings that keep XLA:CPU's per-step buffers
resident (mote_jax/host_malloc.py; MOTE_JAX_MALLOC_TUNING=0 opts out).
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
from pathlib import Path

from mote_jax import host_malloc

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "t5x_configs"


def _gin_value(value: str) -> str:
  """Quotes VALUE unless it already is a Python literal, a gin reference (@x, %X) or a container."""
  stripped = value.strip()
  if stripped.startswith(("@", "%", "(", "[", "{", "'", '"')) or stripped in ("None", "True", "False"):
    return stripped
  try:
    ast.literal_eval(stripped)
    return stripped
  except (ValueError, SyntaxError):
    return repr(value)


def parse_flags(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m mote_jax.launch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  parser.add_argument("--gin_search_paths", action="append", default=[], help="comma-separated dirs")
  parser.add_argument("--gin_bindings", action="append", default=[], help="raw gin binding (repeatable)")
  parser.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
  parser.add_argument("--num_processes", type=int, default=os.environ.get("JAX_NUM_PROCESSES"))
  parser.add_argument("--process_id", type=int, default=os.environ.get("JAX_PROCESS_ID"))
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() with auto-detection (Cloud TPU, SLURM)")
  parser.add_argument("--log_level", default="INFO")
  gin_overrides, rest = [], []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      gin_overrides.append(f"{name} = {_gin_value(value)}")
    else:
      rest.append(arg)
  flags = parser.parse_args(rest)
  if not flags.gin_file:
    parser.error("at least one --gin_file is required")
  flags.gin_bindings = flags.gin_bindings + gin_overrides
  flags.gin_search_paths = [p for chunk in flags.gin_search_paths for p in chunk.split(",") if p]
  return flags


def initialize_distributed(flags: argparse.Namespace) -> None:
  import jax
  if flags.coordinator_address or flags.distributed:
    kwargs = {}
    if flags.coordinator_address:
      kwargs = dict(coordinator_address=flags.coordinator_address, num_processes=flags.num_processes,
                    process_id=flags.process_id)
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def find_gin_file(name: str, search_paths: list[str]) -> str:
  """`name` itself if it exists, else the first search path holding it; a clear error otherwise."""
  for base in ["", *search_paths]:
    candidate = Path(base) / name
    if candidate.is_file():
      return str(candidate)
  raise FileNotFoundError(f"--gin_file={name}: not found in the current directory or {search_paths}")


def parse_gin(flags: argparse.Namespace) -> None:
  import gin
  search_paths = [*flags.gin_search_paths, str(REPO_CONFIGS)]
  for path in search_paths:
    gin.add_config_file_search_path(path)
  files = [find_gin_file(name, search_paths) for name in flags.gin_file]
  gin.parse_config_files_and_bindings(files, flags.gin_bindings, finalize_config=True)


class _GinLookupNoise(logging.Filter):
  """gin logs every search-path miss of an include at ERROR level on the root logger; they are not errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not (record.name == "root" and (message.startswith("Path not found")
                                           or message.startswith("system_path_file_exists")))


def setup_logging(level: str) -> None:
  logging.basicConfig(level=level.upper(), stream=sys.stderr, force=True,  # one handler, whatever came before
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for handler in logging.getLogger().handlers:
    handler.addFilter(_GinLookupNoise())
  for noisy in ("absl", "jax._src", "tensorflow", "h5py", "urllib3", "httpx"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def keep_tensorflow_off_accelerators() -> None:
  """TF only feeds data (seqio); without this it would claim GPU memory that JAX needs."""
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")


def main(argv: list[str] | None = None):
  if argv is None:  # a command-line run: restart with the malloc settings that keep XLA's buffers resident
    host_malloc.reexec_with_settings(["-m", "mote_jax.launch", *sys.argv[1:]])
  flags = parse_flags(sys.argv[1:] if argv is None else argv)
  setup_logging(flags.log_level)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  keep_tensorflow_off_accelerators()
  initialize_distributed(flags)
  from mote_jax import jobs  # registers the gin configurables of every job
  from mote_jax.training.trainer import TrainingInterrupted
  parse_gin(flags)
  try:
    return jobs.run()
  except TrainingInterrupted as e:
    # Preemption: the checkpoint is written; relaunching the same command resumes. 128 + SIGTERM, like a
    # process the signal killed, so schedulers see the job as not finished.
    logging.warning("%s; relaunch the same command to resume", e)
    sys.exit(143)


if __name__ == "__main__":
  main()
