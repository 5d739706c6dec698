"""One process of the 2-process run of tests/test_multiprocess.py.

    python tests/multiprocess/worker.py SETUP_JSON PROCESS_ID

The test sets XLA_FLAGS=--xla_force_host_platform_device_count=4 and JAX_PLATFORMS=cpu, so the two processes
form one 8-device mesh (cross-process collectives over gloo, JAX's default on CPU). Phases, in order:

1. fine-tuning through `mote_jax.launch.main` with --coordinator_address / --num_processes / --process_id (this
   initializes jax.distributed);
2. encoding of a small corpus into an embedding store (`encode_to_store`);
3. pre-training through `mote_jax.launch.main`; process 1 sends itself SIGTERM after step 2, and both processes
   must save the same step and exit with 143 (caught here as SystemExit). The last training of the process:
   JAX's preemption service settles one stop step per process lifetime (a preempted process exits). Then the
   stop vote used where that service is off (an all-gather of each process's flag) is asked with and without a
   flag on process 1;
4. once the reference (the test, one process) is done: a restore-only pre-training run (nothing left to train)
   of the reference's final checkpoint, copied into multi_from_single/pretrain, with this run's mesh.

Every host batch and the final params of each training are recorded (mp_common.recording); the files each
process opens for writing are listed in status-p<PROCESS_ID>.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mp_common  # noqa: E402

REFERENCE_TIMEOUT_S = 600


def _wait_for(path: Path, work: Path) -> None:
  """Until the test (the reference process) has written `path`."""
  deadline = time.monotonic() + REFERENCE_TIMEOUT_S
  while not path.exists():
    if (work / "reference_failed").exists():
      raise RuntimeError("the single-process reference failed")
    if time.monotonic() > deadline:
      raise TimeoutError(f"no {path} after {REFERENCE_TIMEOUT_S}s")
    time.sleep(0.2)


def main(setup_path: str, process_id: int) -> None:
  setup = json.loads(Path(setup_path).read_text())
  work, data_dir, bert_dir = Path(setup["work"]), Path(setup["data_dir"]), Path(setup["bert_dir"])
  writes: list[str] = []
  mp_common.audit_writes(work, writes)
  status = {"process": process_id, "timings": {}}
  clock = time.monotonic()

  def lap(name):
    nonlocal clock
    now = time.monotonic()
    status["timings"][name] = round(now - clock, 1)
    clock = now

  from mote_jax import launch
  setup_logging = launch.setup_logging

  def verbose_setup_logging(level):  # launch.main calls it: keep orbax's save and barrier timings in the log
    setup_logging(level)
    logging.getLogger("absl").setLevel(logging.INFO)

  launch.setup_logging = verbose_setup_logging
  launch.setup_logging("INFO")  # before anything imports orbax, whose import configures the root logger
  distributed = [f"--coordinator_address=127.0.0.1:{setup['port']}", "--num_processes=2",
                 f"--process_id={process_id}"]
  initial = {}
  with mp_common.recording(work / "records" / "multi", sigterm_after=("pretrain", mp_common.SIGTERM_AFTER_STEP),
                           initial=initial):
    _wait_for(work / "tiny_bert", work)  # the test writes it while this process starts
    launch.main([*mp_common.finetune_flags(work / "multi" / "finetune", data_dir, bert_dir), *distributed])
    import gin
    import jax
    gin.clear_config()
    status["devices"] = {"processes": jax.process_count(), "local": jax.local_device_count(),
                         "global": jax.device_count()}
    lap("finetune")

    stats = mp_common.encode_store(bert_dir, initial["finetune"], data_dir, work / "multi" / "encode")
    status["encode"] = {"shards_encoded": stats.shards_encoded, "texts_encoded": stats.texts_encoded}
    lap("encode")

    try:
      launch.main(mp_common.pretrain_flags(work / "multi" / "pretrain", data_dir))
      status["pretrain_exit"] = 0
    except SystemExit as e:
      status["pretrain_exit"] = e.code
    gin.clear_config()
    lap("pretrain until SIGTERM")

  # The fallback without JAX's preemption service: each process's SIGTERM flag, all-gathered after every step.
  import signal
  from mote_jax.training.trainer import _StopRequest
  vote = _StopRequest(0)
  vote.mode = "allgather"  # as in a run with jax_enable_preemption_service=False
  status["allgather_vote"] = [vote.agreed(1)]
  if process_id == 1:
    vote._handler(signal.SIGTERM, None)  # as the Python handler does when the signal comes
  status["allgather_vote"].append(vote.agreed(2))

  _wait_for(work / "reference_done", work)
  lap("wait for the reference")
  with mp_common.recording(work / "records" / "multi_from_single"):
    mp_common.run_job(mp_common.pretrain_flags(work / "multi_from_single" / "pretrain", data_dir))
  lap("restore the reference's checkpoint")

  status["writes"] = sorted(set(writes))
  mp_common.write_json(work / f"status-p{process_id}.json", status)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
