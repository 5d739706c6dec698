"""One process of tests/test_multiprocess.py's 2-process BM25 test.

    python tests/multiprocess/bm25_worker.py WORK PORT PROCESS_ID DATA_DIR

Joins a 2-process JAX run (4 CPU devices each, set by the test's XLA_FLAGS), builds SciFact train's training
groups with BM25 negatives through `jobs.finetune.training_groups` with a shared cache directory (WORK/cache), and
records the query texts this process retrieved (`mote_jax.data.bm25.retrieve` wrapped) and the groups it got.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's mote_jax


def main(work: str, port: str, process_id: str, data_dir: str) -> None:
  import jax
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
  from mote_jax.data import bm25
  from mote_jax.jobs.finetune import training_groups
  retrieved: list[str] = []
  real = bm25.retrieve

  def recording(retriever, queries, k, n_threads=1):
    retrieved.extend(queries)
    return real(retriever, queries, k, n_threads)

  bm25.retrieve = recording
  data = training_groups(str(Path(data_dir) / "scifact"), "train", num_negatives=4,
                         cache_dir=str(Path(work) / "cache"), bm25_threads=2)
  g = data.groups
  np.savez(Path(work) / f"groups-p{process_id}.npz", query_ids=np.array(g.query_ids),
           **{name: getattr(g, name) for name in ("positive_offsets", "positives", "negative_offsets", "negatives",
                                                  "judged_offsets", "judged")})
  (Path(work) / f"retrieved-p{process_id}.json").write_text(json.dumps(
      {"queries": retrieved, "devices": jax.device_count(), "local_devices": jax.local_device_count(),
       "processes": jax.process_count()}))


if __name__ == "__main__":
  main(*sys.argv[1:])
