"""`python -m mote_jax.launch` for tests/test_gcs.py, with orbax checkpoint directories on gs:// kept locally.

Everything else of the job reads and writes gs:// through the GCS emulator; orbax's arrays go through tensorstore's
OCDBT driver, whose manifest reads fail against gcp-storage-emulator ("Malformed StorageGeneration": the
emulator's object generations are not what tensorstore's conditional reads and writes accept), so
`orbax.checkpoint.CheckpointManager` is given `$MOTE_TEST_LOCAL_CHECKPOINTS/<bucket>/<path>` for a
`gs://<bucket>/<path>` directory (the in-process fake of tests/test_multiprocess.py does the same). Needs
MOTE_JAX_MALLOC_TUNING=0 (no re-exec of the launcher) and the repository on PYTHONPATH.
"""

import os
import runpy
import sys

import orbax.checkpoint as ocp

_ROOT = os.environ["MOTE_TEST_LOCAL_CHECKPOINTS"]
_manager = ocp.CheckpointManager


def _local_manager(directory, *args, **kwargs):
  path = os.fspath(directory)
  if path.startswith("gs://"):
    path = os.path.join(_ROOT, path[len("gs://"):])
  return _manager(path, *args, **kwargs)


ocp.CheckpointManager = _local_manager
sys.argv = ["mote_jax.launch", *sys.argv[1:]]
runpy.run_module("mote_jax.launch", run_name="__main__", alter_sys=True)
