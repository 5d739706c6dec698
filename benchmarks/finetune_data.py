"""Section: fine-tuning data at MS MARCO scale (`mote_jax.data.finetune`, `mote_jax.data.bm25`).

Synthetic text: words drawn from the all-MiniLM-L6-v2 vocabulary's whole words (no '##' pieces, no special or
unused tokens) with Zipf-distributed ranks (exponent 1.1, as word frequencies in English text roughly follow),
passages of 40-80 words (MS MARCO passages average ~56), queries of 3-8 words. Tokenised with the model's
WordPiece tokenizer, so the token arrays have MS MARCO-like sizes.

Measured, in a fresh spawned process (so its peak RSS is the build's own):
- building the fine-tuning data of a 1M-passage corpus, 50k queries x 200 negatives: the texts in memory (as a
  BEIR load holds them), the groups from a synthetic run (`beir_groups` over a `RankedRun` of 200 random rows per
  query, one judged positive each), then `FinetuneStream.build` (corpus and queries tokenised into the token
  cache, memory-mapped; negatives shuffled). Peak RSS by `resource.getrusage` (ru_maxrss) after the build;
- drawing a batch of 64 groups x (1 + 7) passages of 128 tokens (`FinetuneBatches`): consecutive steps across an
  epoch boundary (training's pattern; the epoch's permutation is drawn once), and single batches at random steps
  of five epochs (a resume: mostly a new epoch, so a permutation each);
- BM25 (bm25s, NumPy backend) queries/s over a smaller corpus (100k passages, 5,000 queries, top 200), with 1 and
  2 threads, interleaved.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import tempfile
import time

from benchmarks.common import load1, section_main


def _words(seed: int = 0):
  """(whole words of the vocabulary, Zipf sampler of word indices)."""
  import numpy as np
  from transformers import AutoTokenizer

  from mote_jax import hf_interop
  tokenizer = AutoTokenizer.from_pretrained(str(hf_interop.resolve_checkpoint("all-MiniLM-L6-v2")))
  vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
  words = np.array([w for w, _ in vocab if w.isalpha() and not w.startswith("##") and len(w) > 1])
  rng = np.random.default_rng(seed)
  weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1
  weights /= weights.sum()
  return tokenizer, words, lambda n: rng.choice(len(words), size=n, p=weights)


def _texts(words, draw, count: int, low: int, high: int, seed: int, chunk: int = 10_000) -> list[str]:
  """`count` texts of low..high words, drawn chunk by chunk (a whole corpus of word arrays would dwarf the
  texts themselves)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  vocabulary = words.tolist()
  texts = []
  for start in range(0, count, chunk):
    lengths = rng.integers(low, high + 1, min(chunk, count - start))
    flat = draw(int(lengths.sum())).tolist()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    texts += [" ".join([vocabulary[w] for w in flat[bounds[i]:bounds[i + 1]]]) for i in range(len(lengths))]
  return texts


def _build_and_draw(num_passages: int, num_queries: int, num_negatives: int, batch: int, timed: int) -> dict:
  """In a spawned process: build the fine-tuning data, then time batch draws."""
  import numpy as np

  from mote_jax.data import flat_tokens
  from mote_jax.data.finetune import (FinetuneBatches, FinetuneStream, RankedRun, SamplingConfig, TrainingData,
                                      beir_groups)
  tokenizer, words, draw = _words()
  base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  started = time.perf_counter()
  corpus_ids = [f"p{i}" for i in range(num_passages)]
  passages = _texts(words, draw, num_passages, 40, 80, seed=1)
  query_ids = [f"q{i}" for i in range(num_queries)]
  queries = dict(zip(query_ids, _texts(words, draw, num_queries, 3, 8, seed=2)))
  rng = np.random.default_rng(3)
  positive = rng.integers(num_passages, size=num_queries)
  qrels = {q: {corpus_ids[positive[i]]: 1} for i, q in enumerate(query_ids)}
  run = RankedRun(tuple(query_ids), rng.integers(num_passages, size=(num_queries, num_negatives + 1), dtype=np.int32),
                  np.sort(rng.random((num_queries, num_negatives + 1), dtype=np.float32))[:, ::-1])
  texts_s = time.perf_counter() - started
  started = time.perf_counter()
  groups = beir_groups(corpus_ids, queries, qrels, run, num_negatives=num_negatives)
  del run
  groups_s = time.perf_counter() - started
  sampling = SamplingConfig(negatives=7, query_max_len=32, passage_max_len=128)
  with tempfile.TemporaryDirectory(prefix="mote_ft_data_bench_") as cache:
    started = time.perf_counter()
    data = TrainingData(groups, corpus_ids, passages, tuple(queries[q] for q in groups.query_ids),
                        flat_tokens.texts_fingerprint(passages, corpus_ids))
    stream = FinetuneStream.build(data, tokenizer, sampling, seed=0, cache_dir=cache)
    build_s = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = int(stream.passages.offsets[-1])
    steps_per_epoch = len(stream) // batch
    steps = np.random.default_rng(4).integers(0, 5 * steps_per_epoch, size=timed)
    times = []
    for step in steps:
      t = time.perf_counter()
      next(FinetuneBatches(stream, batch_size=batch, start_step=int(step)))
      times.append(time.perf_counter() - t)
    # Training's pattern: consecutive steps (here across an epoch boundary, whose permutation is drawn once).
    sequential = FinetuneBatches(stream, batch_size=batch, start_step=max(steps_per_epoch - timed // 2, 0))
    consecutive = []
    for _ in range(timed):
      t = time.perf_counter()
      next(sequential)
      consecutive.append(time.perf_counter() - t)
  return {"passages": num_passages, "queries": num_queries, "negatives_per_query": num_negatives,
          "groups": len(groups), "corpus_tokens": tokens, "rss_after_imports_mb": round(base_mb, 1),
          "peak_rss_mb": round(peak_mb, 1), "seconds": {"texts": texts_s, "groups": groups_s,
                                                        "tokenise_and_stream": build_s},
          "batch_groups": batch, "batch_passages": 1 + sampling.negatives, "passage_max_len": sampling.passage_max_len,
          "draw_random_steps_ms": {"median": 1e3 * statistics.median(times), "max": 1e3 * max(times),
                                   "timed": timed},
          "draw_consecutive_ms": {"median": 1e3 * statistics.median(consecutive), "max": 1e3 * max(consecutive),
                                  "mean": 1e3 * statistics.mean(consecutive), "timed": timed}}


def _bm25(num_passages: int, num_queries: int, depth: int, rounds: int) -> dict:
  from mote_jax.data import bm25
  _, words, draw = _words(seed=5)
  passages = _texts(words, draw, num_passages, 40, 80, seed=6)
  queries = _texts(words, draw, num_queries, 3, 8, seed=7)
  started = time.perf_counter()
  retriever = bm25.build_index(passages, k1=0.82, b=0.68)
  index_s = time.perf_counter() - started
  times = {1: [], 2: []}
  for _ in range(rounds):
    for threads in times:
      started = time.perf_counter()
      bm25.retrieve(retriever, queries, depth, n_threads=threads)
      times[threads].append(time.perf_counter() - started)
  return {"passages": num_passages, "queries": num_queries, "depth": depth, "index_s": index_s,
          "queries_per_s": {str(t): num_queries / statistics.median(v) for t, v in times.items()},
          "seconds": {str(t): v for t, v in times.items()}}


def run(quick: bool = False) -> dict:
  sizes = dict(num_passages=20_000, num_queries=2_000, num_negatives=200, batch=64, timed=50) if quick else \
      dict(num_passages=1_000_000, num_queries=50_000, num_negatives=200, batch=64, timed=200)
  result = {"load1_before": load1(), "text": "synthetic text (Zipf-distributed vocabulary words), WordPiece "
            "tokenised", "cores": os.cpu_count()}
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    result["build"] = pool.apply(_build_and_draw, (), sizes)
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    result["bm25"] = pool.apply(_bm25, (), dict(num_passages=5_000, num_queries=500, depth=200, rounds=2)
                                if quick else dict(num_passages=100_000, num_queries=5_000, depth=200, rounds=3))
  result["load1_after"] = load1()
  return result


if __name__ == "__main__":
  section_main("finetune_data", run)
