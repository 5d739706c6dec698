"""Job: the README's quickstart on SciFact, end to end, for every tower mode with the same budget.

  all-MiniLM-L6-v2 (zero-shot, siamese)  ->  evaluate
  SciFact corpus  ->  document records (the Beam preprocessing job, once, in MODEL_DIR/records)
  for mode in (mote, siamese, separated):
    import as `mode`  ->  short CoT-MoTE pre-training from the records (the online pipeline of
    `runs/pretrain_cotmote.gin`)  ->  fine-tuning on SciFact train (BM25 negatives)  ->  evaluation on SciFact
    test  ->  embedding-space analysis

Every stage is an ordinary job (preprocess / pretrain / finetune) in MODEL_DIR/..., so a re-run resumes where it
stopped: complete records (MODEL_DIR/records/stats.json) are reused when their inputs, tokenizer and max_len are
the run's. The table (also MODEL_DIR/quickstart.md and .json) prints every figure as measured.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import gin
import jax
import numpy as np

from mote_jax import hf_interop
from mote_jax.analysis import plots
from mote_jax.analysis.embedding_space import analyse
from mote_jax.data import records as records_lib
from mote_jax.data.finetune import bm25_run
from mote_jax.data.online import register_records_task
from mote_jax.jobs import finetune as finetune_lib
from mote_jax.jobs import preprocess as preprocess_lib
from mote_jax.jobs import pretrain as pretrain_lib
from mote_jax.retrieval import beir, metrics
from mote_jax.retrieval.store import EmbeddingStore

log = logging.getLogger(__name__)

PUBLISHED = {"BM25 (BEIR paper)": 0.686, "all-MiniLM-L6-v2 zero-shot (published, 256 tokens)": 0.645}


def _analysis(eval_dir: Path, data: beir.BeirDataset, split: str, method: str) -> dict:
  queries = EmbeddingStore.open(eval_dir / f"queries-{split}")
  corpus = EmbeddingStore.open(eval_dir / "corpus")
  run = metrics.read_run(eval_dir / f"run-{split}-{method}.trec")
  return analyse(queries.load(), queries.ids, np.concatenate([s for _, _, s in corpus.iter_shards()]),
                 corpus.ids, data.qrels, run)


@gin.configurable
def quickstart(model_dir: str, *, checkpoint: str = "sentence-transformers/all-MiniLM-L6-v2",
               data_dir: str = "../shared/data/scifact", modes: Sequence[str] = ("mote", "siamese", "separated"),
               pretrain_fn=pretrain_lib.pretrain, finetune_fn=finetune_lib.finetune,
               evaluate_fn=finetune_lib.evaluate_job, pretrain: bool = True, method: str = "exact",
               preprocess_fn=preprocess_lib.preprocess, span_task_fn=register_records_task,
               pretrain_batch_size: int = 8, pretrain_max_len: int = 128) -> dict:
  """Runs the quickstart; returns {row name: metrics}. Stage settings come from the gin bindings of
  `preprocess`, `register_records_task`, `pretrain`, `finetune` and `evaluate_job` (see
  t5x_configs/runs/quickstart_scifact.gin).

  Pre-training reads MODEL_DIR/records (see `corpus_records`) through `span_task_fn(name, directory,
  max_len=pretrain_max_len)`, the span-pair task of the online pipeline, `pretrain_batch_size` rows a step (both
  directions: half as many span pairs).
  """
  start = time.perf_counter()
  root = Path(model_dir)
  test = beir.load_beir(data_dir, "test")
  rows, analyses, timings, recalls = {}, {}, {}, {}

  streams = None
  if pretrain:
    t = time.perf_counter()
    records_dir = corpus_records(root / "records", str(Path(data_dir) / "corpus.jsonl"),
                                 tokenizer=str(hf_interop.resolve_checkpoint(checkpoint)),
                                 max_len=pretrain_max_len, preprocess_fn=preprocess_fn)
    task = span_task_fn("quickstart_scifact_span_pairs", str(records_dir), max_len=pretrain_max_len)
    streams = [pretrain_lib.PretrainStream(task, pretrain_batch_size)]
    timings["preprocess"] = time.perf_counter() - t

  t = time.perf_counter()
  report = evaluate_fn(str(root / "zero_shot"), model=finetune_lib.ModelSource(checkpoint, tower_mode="siamese"),
                       data=data_dir, split="test", method=method)
  max_length = report["encoding"]["options"]["max_length"]
  rows[f"all-MiniLM-L6-v2 zero-shot (this pipeline, {max_length} tokens)"] = report["metrics"]
  recalls["zero-shot"] = report["search"].get("recall_vs_exact_at_10")
  timings["zero_shot"] = time.perf_counter() - t

  t = time.perf_counter()
  run = bm25_run(test.corpus.ids, test.corpus.passages(), test.queries, k=1000).to_dict(test.corpus.ids)
  rows["BM25 (bm25s, this pipeline)"] = metrics.compute_metrics(test.qrels, run)
  timings["bm25"] = time.perf_counter() - t

  for mode in modes:
    t = time.perf_counter()
    mode_dir = root / mode
    if pretrain:
      pretrain_fn(str(mode_dir / "pretrain"), init_checkpoint=checkpoint, tower_mode=mode, streams=streams)
      source = finetune_lib.ModelSource(towers=str(mode_dir / "pretrain" / "hf"))
    else:
      source = finetune_lib.ModelSource(checkpoint, tower_mode=mode)
    result = finetune_fn(str(mode_dir / "finetune"), model=source)
    stages = "CoT-MoTE pre-training + fine-tuning" if pretrain else "fine-tuning"
    rows[f"{mode}: {stages}"] = result["eval"]["metrics"]
    recalls[mode] = result["eval"]["search"].get("recall_vs_exact_at_10")
    analyses[mode] = _analysis(mode_dir / "finetune" / "eval", test, "test", method)
    timings[mode] = time.perf_counter() - t

  table = _table(rows, analyses)
  if method == "scann":
    table += "\n\nScaNN recall@10 against exact search: " + ", ".join(
        f"{name} {value:.4f}" for name, value in recalls.items() if value is not None)
  if jax.process_index() == 0:
    table += "\n\n" + _figures(root, test, analyses, method)
    (root / "quickstart.md").write_text(table + "\n")
    (root / "quickstart.json").write_text(json.dumps(
        {"rows": rows, "published": PUBLISHED, "analysis": analyses, "seconds": timings, "method": method,
         "scann_recall_at_10": recalls}, indent=2))
  print(table, flush=True)
  log.info("quickstart finished in %.1f min (%s)", (time.perf_counter() - start) / 60,
           ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
  return rows


def corpus_records(output: Path, corpus: str, *, tokenizer: str, max_len: int,
                   preprocess_fn=preprocess_lib.preprocess) -> Path:
  """Document records of `corpus` in `output`, made by `preprocess_fn` (the Beam job; its other settings come
  from gin) unless `output` already holds a complete output of the same input, tokenizer, max_len and record
  format (one made otherwise is replaced)."""
  stats_path = output / records_lib.STATS_FILE
  wanted = {"inputs": [corpus], "tokenizer": tokenizer, "max_len": max_len, "record_format": records_lib.RECORD_FORMAT}
  if stats_path.exists():
    settings = json.loads(stats_path.read_text())["settings"]
    if all(settings.get(k) == v for k, v in wanted.items()):
      log.info("reusing the records in %s", output)
      return output
    log.info("the records in %s were made with %s, not %s; preprocessing again", output,
             {k: settings.get(k) for k in wanted}, wanted)
  preprocess_fn(str(output), input=corpus, output=str(output), tokenizer=tokenizer, max_len=max_len,
                overwrite=True)
  return output


def _figures(root: Path, test: beir.BeirDataset, analyses: dict, method: str, baseline: str = "siamese") -> str:
  """PNGs in MODEL_DIR/quickstart_figures (similarity distributions, alignment / uniformity, per-query nDCG@10
  differences against `baseline` when it ran); returns the markdown that embeds them."""
  if not analyses:
    return ""
  out, lines = root / "quickstart_figures", []
  single = {mode: [a] for mode, a in analyses.items()}
  plots.save_png(plots.similarity_figure(single, title="SciFact test"), out / "similarities.png")
  plots.save_png(plots.alignment_uniformity_figure(single), out / "alignment_uniformity.png")
  lines += ["![similarity distributions](quickstart_figures/similarities.png)", "",
            "![alignment and uniformity](quickstart_figures/alignment_uniformity.png)"]
  if baseline in analyses and len(analyses) > 1:
    per_query = {}
    for mode in analyses:
      run = metrics.read_run(root / mode / "finetune" / "eval" / f"run-test-{method}.trec")
      per_query[mode] = {q: v["nDCG@10"] for q, v in metrics.per_query_metrics(test.qrels, run, ["nDCG@10"]).items()}
    diffs = {m: np.array([per_query[m][q] - per_query[baseline][q] for q in sorted(per_query[baseline])])
             for m in analyses if m != baseline}
    plots.save_png(plots.differences_figure(diffs, measure="nDCG@10", baseline=baseline, title="SciFact test"),
                   out / "differences.png")
    lines += ["", "![per-query nDCG@10 differences](quickstart_figures/differences.png)"]
  return "\n".join(lines)


def _table(rows: dict, analyses: dict) -> str:
  lines = ["| SciFact test | nDCG@10 | RR@10 | R@100 | alignment | uniformity (q / p) | q-p cosine |",
           "|---|---|---|---|---|---|---|"]
  for name, values in rows.items():
    mode = name.split(":")[0]
    a = analyses.get(mode)
    extra = (f"{a['alignment']:.3f} | {a['uniformity']['queries']:.2f} / {a['uniformity']['passages']:.2f} | "
             f"{a['cosine']['query_passage']['mean']:.3f}") if a else " | | "
    lines.append(f"| {name} | {values['nDCG@10']:.4f} | {values['RR@10']:.4f} | {values['R@100']:.4f} | {extra} |")
  for name, value in PUBLISHED.items():
    lines.append(f"| {name} | {value:.3f} | | | | | |")
  return "\n".join(lines)

