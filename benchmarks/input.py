"""Section: the online pre-training input pipeline (`mote_jax.data.online`) on one CPU core.

Records of MS MARCO document length are synthetic: word-piece ids drawn uniformly from the vocabulary's real
pieces (so '##' continuations occur at the vocabulary's share and whole-word masking has words to find),
sentences of lognormal length (median ~22 ids), documents of 1,300-2,000 ids (about 1,000-1,500 words). The
process pins itself to CPU 0 (`os.sched_setaffinity`, what `taskset -c 0` does) before TensorFlow starts, so
tf.data, the TF ops and numpy share one core. Measured: masked rows/s at the recipe's shape (1,024 rows of 128
ids per step = 512 distinct span pairs, each in both directions): masked rows/s and distinct span pairs/s of
wall time, and distinct span pairs per CPU-second of the pinned process (all its threads share the one core, so
on a quiet machine that is the wall rate; on a shared one it is the rate the core would give alone), and the time from building the stream to its first batch at
start step 10^6 against step 0 (the O(1)-resume target: <= 2x).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from benchmarks.common import load1, section_main


def _write_records(directory: str, num_docs: int, vocab, seed: int = 0) -> dict:
  import numpy as np
  from array_record.python.array_record_module import ArrayRecordWriter

  from mote_jax.data import records

  rng = np.random.default_rng(seed)
  pieces = vocab.info.replacement_ids
  shards = 4
  total_ids = 0
  for shard in range(shards):
    path = os.path.join(directory, f"records-{shard:05d}-of-{shards:05d}{records.SHARD_SUFFIX}")
    writer = ArrayRecordWriter(path, records.WRITER_OPTIONS)
    for k in range(shard, num_docs, shards):
      target = int(rng.integers(1300, 2001))
      lengths = []
      while sum(lengths) < target:
        lengths.append(int(np.clip(rng.lognormal(3.1, 0.5), 3, 120)))
      ids = rng.choice(pieces, sum(lengths))
      total_ids += len(ids)
      sentences = np.split(ids, np.cumsum(lengths)[:-1])
      writer.write(records.serialize(f"doc{k}", [s.tolist() for s in sentences]))
    writer.close()
  return {"documents": num_docs, "mean_ids_per_document": round(total_ids / num_docs, 1)}


def run(quick: bool = False) -> dict:
  os.sched_setaffinity(0, {0})  # one core for everything below (TF, tf.data, numpy), like `taskset -c 0`
  from mote_jax import hf_interop
  from mote_jax.data import WordPieceVocabulary
  from mote_jax.data.online import RecordBatches, register_records_task

  batch_size, max_len = 1024, 128
  num_docs, warmup, timed = (400, 1, 3) if quick else (5000, 3, 30)
  result = {"load1_before": load1(), "cores": "one core (sched_setaffinity to CPU 0, as taskset -c 0)",
            "batch_rows": batch_size, "max_len": max_len, "text": "synthetic ids (MS MARCO document length)"}
  vocab = WordPieceVocabulary(str(hf_interop.resolve_checkpoint("all-MiniLM-L6-v2")))
  with tempfile.TemporaryDirectory(prefix="mote_input_bench_") as directory:
    result["records"] = _write_records(directory, num_docs, vocab)
    task = register_records_task("bench.input.spans", directory, vocab=vocab, max_len=max_len, overwrite=True)

    def first_batch_s(start_step: int) -> float:
      started = time.perf_counter()
      stream = RecordBatches(task, batch_size=batch_size, seed=0, start_step=start_step)
      next(stream)
      elapsed = time.perf_counter() - started
      stream.close()
      return elapsed

    first = {0: [], 10**6: []}
    for _ in range(3 if quick else 5):  # alternated, so a load change affects both alike
      for start in first:
        first[start].append(first_batch_s(start))
    result["first_batch_s"] = {str(k): {"median": statistics.median(v), "all": v} for k, v in first.items()}
    result["first_batch_ratio"] = (result["first_batch_s"][str(10**6)]["median"]
                                   / result["first_batch_s"]["0"]["median"])

    stream = RecordBatches(task, batch_size=batch_size, seed=0, start_step=10**6)
    for _ in range(warmup):
      next(stream)
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(timed):
      batch = next(stream)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    stream.close()
  masked = (batch["anchor_labels"] != -100).sum() / batch["anchor_attention_mask"].sum()
  pairs = timed * batch_size // task.rows_per_example  # distinct span pairs (each gives rows_per_example rows)
  result.update(timed_batches=timed, seconds_timed=elapsed, cpu_seconds_timed=cpu,
                rows_per_s=timed * batch_size / elapsed, distinct_pairs_per_s=pairs / elapsed,
                distinct_pairs_per_cpu_s=pairs / cpu, anchor_masked_share=float(masked), load1_after=load1())
  return result


if __name__ == "__main__":
  section_main("input", run)
