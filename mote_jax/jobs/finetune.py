"""Jobs: contrastive fine-tuning (Tevatron recipe), hard-negative mining, evaluation, HF export.

Model selection: with a `DevSelection`, a dev split (the dataset's own qrels/<split>.tsv, else a hash-split of
the train queries, left out of training) is evaluated at step 0 and every `TrainerConfig.eval_every` steps by the
same pipeline as the test evaluation (encode the corpus, search, ir_measures). The params of the best dev step,
step 0 included, are kept in MODEL_DIR/best and are the ones exported, evaluated and returned, so fine-tuning
never ships a model worse on dev than the one it started from. MODEL_DIR/report.{json,md} give the dev curve, the
chosen step, whether step 0 won, the test metrics, the process's peak RSS and its RSS per phase (data preparation,
each training range, each dev evaluation, export, test evaluation; `finetune.rss_interval`).

Stage 1 trains with BM25 negatives; `mine_negatives` retrieves the train queries with the stage-1 model and
writes the top-ranked non-positives as a Tevatron jsonl; stage 2 trains from the initial checkpoint again with
BM25 and mined negatives together (see t5x_configs/runs/msmarco_*.gin).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import json
import logging
import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from etils import epath

from mote_jax import hf_interop, host_malloc
from mote_jax.data.finetune import (FinetuneBatches, FinetuneStream, SamplingConfig, TrainGroup,
                                    beir_groups, bm25_run, split_dev, tevatron_groups, write_negatives)
from mote_jax.model import EXPERTS, MoteConfig, init_params
from mote_jax.objectives.contrastive import ContrastiveConfig, ContrastiveModel
from mote_jax.partitioning import MeshConfig, Partitioner
from mote_jax.retrieval import beir, encode, metrics, search
from mote_jax.retrieval.evaluate import evaluate, evaluate_dataset
from mote_jax.training.checkpointing import Checkpointer, is_uri
from mote_jax.training.memory import RssMonitor
from mote_jax.training.builder import build_trainer
from mote_jax.training.optimizer import OptimizerConfig
from mote_jax.training.trainer import TrainerConfig

log = logging.getLogger(__name__)
PyTree = Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where a job's encoder comes from: an HF BERT checkpoint (`checkpoint`, any tower mode) or a `to_hf` export
  of a MoTE model (`towers`, e.g. a pre-training run's MODEL_DIR/hf)."""

  checkpoint: str | None = None
  towers: str | None = None
  tower_mode: str = "mote"
  overrides: dict | None = None

  def load(self) -> tuple[MoteConfig, PyTree, Path]:
    """(config, host params, tokenizer directory)."""
    overrides = dict(self.overrides or {})
    if (self.checkpoint is None) == (self.towers is None):
      raise ValueError("ModelSource: set exactly one of checkpoint and towers")
    if self.towers is not None:
      config, params = hf_interop.from_hf_towers(self.towers, **overrides)
      if config.tower_mode != self.tower_mode:
        log.info("%s holds a %s model (ModelSource.tower_mode=%s ignored)", self.towers, config.tower_mode,
                 self.tower_mode)
      return config, params, Path(self.towers) / "passage"
    path = hf_interop.resolve_checkpoint(self.checkpoint)
    config, params = hf_interop.from_hf(path, tower_mode=self.tower_mode, **overrides)
    return config, params, path


def _tokenizer(path):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(path))


def _merge(groups_lists: Sequence[Sequence[TrainGroup]]) -> list[TrainGroup]:
  """Per query, the negatives of every source (in source order, duplicates dropped); positives of the first.
  Judged passages of any source are never negatives (a mined file may list them)."""
  merged: dict[str, TrainGroup] = {}
  for groups in groups_lists:
    for g in groups:
      if g.query_id not in merged:
        merged[g.query_id] = g
        continue
      old = merged[g.query_id]
      judged = tuple(dict.fromkeys(old.judged_ids() + g.judged_ids()))
      seen = {p.docid for p in old.negatives} | set(judged)
      extra = tuple(p for p in g.negatives if p.docid not in seen)
      negatives = tuple(p for p in old.negatives if p.docid not in judged) + extra
      merged[g.query_id] = dataclasses.replace(old, negatives=negatives, judged=judged)
  return list(merged.values())


@gin.configurable
def training_groups(beir_dir: str, split: str = "train", negatives: Sequence[str] = ("bm25",),
                    bm25_depth: int = 100, num_negatives: int = 30, cache_dir: str | None = None,
                    min_positive_grade: int = 1, data: beir.BeirDataset | None = None) -> list[TrainGroup]:
  """Training groups of a BEIR split with negatives from each source in `negatives`: 'bm25' (bm25s over the
  corpus; the run is cached as a TREC file in `cache_dir`), or the path of a Tevatron jsonl (e.g. mined).
  Positives are judged at `min_positive_grade` or above; no judged passage of any grade is a negative.
  `data`: the split already loaded (perhaps with dev queries taken out), instead of reading `beir_dir`."""
  data = data if data is not None else beir.load_beir(beir_dir, split)
  sources = []
  for source in negatives:
    if source == "bm25":
      cached = epath.Path(cache_dir) / f"bm25-{data.name}-{split}-{bm25_depth}.trec" if cache_dir else None
      if cached is not None and cached.exists():
        run = _read_run(cached)
      else:
        run = bm25_run(data.corpus.ids, data.corpus.passages(), data.queries, k=bm25_depth)
        if cached is not None and jax.process_index() == 0:
          _write_run(cached, run, tag="bm25s")
      sources.append(beir_groups(data.corpus.ids, data.corpus.passages(), data.queries, data.qrels, run,
                                 num_negatives=num_negatives, min_positive_grade=min_positive_grade))
    else:
      sources.append([g for g in tevatron_groups(source) if g.query_id in data.queries])
  groups = [_exclude_judged(g, data.qrels.get(g.query_id, {})) for g in _merge(sources)]
  log.info("%d training groups from %s/%s, negatives from %s (mean %.1f per query)", len(groups), beir_dir,
           split, list(negatives), np.mean([len(g.negatives) for g in groups]))
  return groups


def _exclude_judged(group: TrainGroup, qrels: dict[str, int]) -> TrainGroup:
  """`group` with every passage its qrels judge (any grade) among `judged` and none among its negatives."""
  judged = tuple(dict.fromkeys(group.judged_ids() + tuple(qrels)))
  negatives = tuple(p for p in group.negatives if p.docid not in set(judged))
  return dataclasses.replace(group, negatives=negatives, judged=judged)


def _read_run(path: epath.Path) -> metrics.Run:
  """`metrics.read_run` of a local file or, through a local copy, of an object-store one (gs://...)."""
  if not is_uri(path):
    return metrics.read_run(path)
  with tempfile.TemporaryDirectory() as tmp:
    local = Path(tmp) / path.name
    local.write_bytes(path.read_bytes())
    return metrics.read_run(local)


def _write_run(path: epath.Path, run, tag: str) -> None:
  """`metrics.write_run` to a local file or, through a local file, to an object store (one object write)."""
  if not is_uri(path):
    metrics.write_run(path, run, tag=tag)
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = metrics.write_run(Path(tmp) / path.name, run, tag=tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(Path(local).read_bytes())


def _check_local(path: str | os.PathLike, what: str) -> None:
  """Retrieval outputs (embedding stores, runs, reports, mined negatives) go through local file APIs: fail before
  training rather than write a gs://bucket path as a local 'gs:/bucket' directory."""
  if is_uri(path):
    raise NotImplementedError(f"{what} writes to {os.fspath(path)!r}, an object store: retrieval outputs need a "
                              "local or shared file system (mote_jax/retrieval writes with local file APIs); use a "
                              "local MODEL_DIR or turn the evaluation / mining off")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DevSelection:
  """Model selection on a dev split during fine-tuning (see the module docstring).

  split: the dataset's own dev qrels (`<train_data>/qrels/<split>.tsv`), used when the file exists; otherwise
  `fraction` of the train queries, chosen by `split_dev(seed)`, become the dev split and leave training.
  max_queries: evaluate only the first this many dev queries (in queries.jsonl order), to bound the cost; the
  corpus is always encoded whole. measure: the ir_measures name to maximise (ties keep the earlier step).
  """

  split: str = "dev"
  fraction: float = 0.1
  seed: int = 0
  max_queries: int | None = None
  measure: str = "nDCG@10"


def peak_rss_gb() -> float:
  """This process's peak resident set size so far, in GB (getrusage: kilobytes on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _dev_split(train_data: str, train_split: str, dev: DevSelection
               ) -> tuple[beir.BeirDataset, beir.BeirDataset, str]:
  """(train split without the dev queries, dev split, how the dev split was made)."""
  train = beir.load_beir(train_data, train_split)
  own = epath.Path(train_data) / "qrels" / f"{dev.split}.tsv"
  if own.exists():
    data, how = beir.load_beir(train_data, dev.split), f"{own}"
    overlap = set(data.queries) & set(train.queries)
    if overlap:
      train = dataclasses.replace(train, queries={q: t for q, t in train.queries.items() if q not in overlap})
  else:
    kept, held = split_dev(list(train.queries), dev.fraction, dev.seed)
    data = dataclasses.replace(train, split="dev", queries={q: train.queries[q] for q in held},
                               qrels={q: train.qrels[q] for q in held if q in train.qrels})
    train = dataclasses.replace(train, queries={q: train.queries[q] for q in kept},
                                qrels={q: train.qrels[q] for q in kept if q in train.qrels})
    how = (f"{len(held)} of the {len(kept) + len(held)} {train_split} queries (split_dev fraction={dev.fraction}, "
           f"seed={dev.seed})")
  if dev.max_queries is not None and len(data.queries) > dev.max_queries:
    ids = list(data.queries)[:dev.max_queries]
    data = dataclasses.replace(data, queries={q: data.queries[q] for q in ids},
                               qrels={q: data.qrels[q] for q in ids if q in data.qrels})
    how += f", first {dev.max_queries} evaluated"
  if not data.queries:
    raise ValueError(f"DevSelection: the dev split of {train_data} is empty ({how})")
  return train, data, how


class _Selection:
  """Evaluates the dev split at a step and keeps the best params (a one-slot orbax checkpoint in `directory`).

  The dev curve lives in `directory/curve.json` (written by process 0), so a resumed run knows its best step.
  Every process evaluates (each encodes its share) and gets the same report, so every process makes the same
  save decision (saves are collectives)."""

  def __init__(self, run_dir: epath.Path, evaluate_at, measure: str, discard=None):
    """`evaluate_at(step, params) -> evaluation report`; `discard(step)` drops a step's outputs that are no longer
    needed (its corpus encoding, once another step is better) on process 0."""
    self.directory = run_dir / "best"
    self._discard = discard
    self.measure = measure
    self._evaluate_at = evaluate_at
    self._checkpointer = Checkpointer(self.directory / "params", save_every=1 << 62, keep=1, async_save=False)
    curve_file = self.directory / "curve.json"
    self.curve: list[dict] = json.loads(curve_file.read_text())["curve"] if curve_file.exists() else []

  @property
  def best(self) -> dict | None:
    return max(reversed(self.curve), key=lambda r: r["metrics"][self.measure], default=None)

  def __call__(self, step: int, params) -> dict[str, float]:
    report = self._evaluate_at(step, params)
    values = report["metrics"]
    if self.measure not in values:
      raise KeyError(f"DevSelection.measure={self.measure!r} is not among the dev metrics {sorted(values)}")
    previous = self.best
    self.curve = [r for r in self.curve if r["step"] != step] + [{"step": step, "metrics": values}]
    improved = previous is None or values[self.measure] > previous["metrics"][self.measure]
    if improved:
      self._checkpointer.maybe_save(step, params, force=True)
      log.info("dev %s %.4f at step %d: the best so far", self.measure, values[self.measure], step)
    stale = (previous["step"] if previous is not None else None) if improved else step
    if self._discard is not None and jax.process_index() == 0 and stale not in (None, self.best["step"]):
      self._discard(stale)
    if jax.process_index() == 0:
      _write_json(self.directory / "curve.json", {"measure": self.measure, "curve": self.curve})
    return {f"dev/{name}": value for name, value in values.items()}

  def best_params(self, like):
    """The best step's params, restored with the shardings of `like` (the current params)."""
    step = self.best["step"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return self._checkpointer.restore(abstract, step)

  def close(self):
    self._checkpointer.close()


def _write_json(path: epath.Path, value) -> None:
  """JSON to `path` through a temporary file and a rename."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(value, indent=2) + "\n")
  tmp.replace(path)


def _write_report(run_dir: epath.Path, report: dict) -> None:
  """MODEL_DIR/report.json and a markdown rendering, report.md (process 0)."""
  if jax.process_index() != 0:
    return
  _write_json(run_dir / "report.json", report)
  lines = ["# Fine-tuning report", ""]
  selection = report.get("selection")
  if selection:
    measure = selection["measure"]
    lines += [f"Dev split: {selection['dev_split']}.", "",
              f"Chosen step: **{selection['chosen_step']}** (dev {measure} {selection['chosen_value']:.4f}); "
              + ("step 0, the starting model, won: fine-tuning did not improve the dev metric, so the starting "
                 "parameters were shipped." if selection["step0_won"] else
                 f"fine-tuning improved on step 0 (dev {measure} {selection['step0_value']:.4f})."), "",
              f"| step | dev {measure} | " + " | ".join(n for n in selection["other_measures"]) + " |",
              "|---:|---:|" + "---:|" * len(selection["other_measures"])]
    for row in selection["curve"]:
      mark = " (chosen)" if row["step"] == selection["chosen_step"] else ""
      lines.append(f"| {row['step']}{mark} | {row['metrics'][measure]:.4f} | "
                   + " | ".join(f"{row['metrics'][n]:.4f}" for n in selection["other_measures"]) + " |")
    lines.append("")
  if report.get("test"):
    test = report["test"]
    lines += [f"Test ({test['dataset']}/{test['split']}, {test['num_queries']} queries): "
              + ", ".join(f"{n} {v:.4f}" for n, v in test["metrics"].items()), ""]
  lines += [f"Peak RSS of the process: {report['peak_rss_gb']:.2f} GB "
            f"(after data and model preparation: {report['rss_gb']['prepared']:.2f} GB).", ""]
  phases = report.get("rss_phases_gb")
  if phases:
    lines += ["RSS by phase (GB; MODEL_DIR/rss.jsonl has the samples against the log lines):", "",
              "| phase | at start | peak | at end |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {p['start_gb']:.2f} | {p['peak_gb']:.2f} | {p['end_gb']:.2f} |"
              for name, p in phases.items()]
    lines.append("")
  tmp = run_dir / f".report.md.tmp-{os.getpid()}"
  tmp.write_text("\n".join(lines))
  tmp.replace(run_dir / "report.md")


_MONITOR: contextvars.ContextVar[RssMonitor] = contextvars.ContextVar("finetune_rss_monitor")


def _rss_monitored(job):
  """Runs `job(model_dir, ..., rss_interval=...)` under an `RssMonitor` (MODEL_DIR/rss.jsonl on process 0;
  `rss_interval` 0: phases measured at their boundaries only), which the job reads from `_MONITOR`."""
  default_interval = inspect.signature(job).parameters["rss_interval"].default

  @functools.wraps(job)
  def run(*args, **kwargs):
    interval = kwargs.get("rss_interval", default_interval)
    run_dir = epath.Path(args[0] if args else kwargs["model_dir"])
    sampled = bool(interval) and jax.process_index() == 0
    if sampled:
      run_dir.mkdir(parents=True, exist_ok=True)
    monitor = RssMonitor(run_dir / "rss.jsonl" if sampled else None, interval=interval, log_records=sampled,
                         phase="prepare: model, data")
    with monitor:
      token = _MONITOR.set(monitor)
      try:
        return job(*args, **kwargs)
      finally:
        _MONITOR.reset(token)

  return run


@gin.configurable
@_rss_monitored
def finetune(model_dir: str, *, model: ModelSource = gin.REQUIRED, train_data: str = gin.REQUIRED,
             train_split: str = "train", groups_fn=training_groups, batch_size: int = 16,
             sampling: SamplingConfig = SamplingConfig(), contrastive: ContrastiveConfig = ContrastiveConfig(),
             optimizer: OptimizerConfig = OptimizerConfig(), trainer: TrainerConfig = TrainerConfig(),
             mesh: MeshConfig = MeshConfig(), data_seed: int = 0, eval_data: str | None = None,
             eval_split: str = "test", eval_method: str = "exact",
             eval_measures: Sequence[str] = metrics.DEFAULT_MEASURES,
             encode_options: encode.EncodeOptions = encode.EncodeOptions(),
             scann_config: search.ScannConfig = search.ScannConfig(), mine_negatives_to: str | None = None,
             export_hf: bool = True, dev: DevSelection | None = None, rss_interval: float = 0.5,
             release_memory: bool = True) -> dict:
  """Fine-tunes with InfoNCE over the global batch (queries: query expert, passages: passage expert), masking
  passages judged for a query out of its denominator when `contrastive.mask_judged`.

  With `dev`, the dev split is evaluated at step 0 and every `trainer.eval_every` steps (MODEL_DIR/dev/step-N;
  `dev/<measure>` in metrics.jsonl and TensorBoard) and the best dev step's params are the result (see the module
  docstring). Resumes from MODEL_DIR/checkpoints. At the end: MODEL_DIR/hf towers, an evaluation of `eval_data`
  (report in MODEL_DIR/eval), MODEL_DIR/report.{json,md}, and optionally hard negatives of the train split mined
  with the result. Returns {"eval": report or None, "negatives": path or None, "selection": dict or None}.

  Memory: `rss_interval` seconds between RSS samples (MODEL_DIR/rss.jsonl, per-phase peaks in the report; 0: at
  phase boundaries only). `release_memory` hands the heap's free pages back to the kernel before and after each
  dev evaluation and after training (`host_malloc.release_free_memory`), so what one phase freed does not stay
  resident beside what the next allocates (see README, "Memory").
  """
  run_dir = epath.Path(model_dir)  # local or gs://...; pathlib would collapse the "//"
  if eval_data:
    _check_local(run_dir / "eval", "finetune's evaluation")
  if mine_negatives_to:
    _check_local(run_dir / "mining", "finetune's negative mining")
    _check_local(mine_negatives_to, "finetune's negative mining")
  monitor = _MONITOR.get()  # set by _rss_monitored
  partitioner = Partitioner.create(mesh)
  config, host_params, tokenizer_dir = model.load()
  tokenizer = _tokenizer(tokenizer_dir)
  dev_data = dev_how = None
  if dev is not None:
    _check_local(run_dir / "dev", "finetune's dev evaluation")
    if not trainer.eval_every:
      raise ValueError("finetune: DevSelection needs TrainerConfig.eval_every > 0 (the dev evaluation interval)")
    train_set, dev_data, dev_how = _dev_split(train_data, train_split, dev)
    log.info("dev split: %s", dev_how)
    groups = groups_fn(train_data, train_split, cache_dir=os.fspath(run_dir / "cache"), data=train_set)
    del train_set
  else:
    groups = groups_fn(train_data, train_split, cache_dir=os.fspath(run_dir / "cache"))
  stream = FinetuneStream(groups, tokenizer, sampling, seed=data_seed)

  contrastive_model = ContrastiveModel(config, contrastive)
  boxed = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  shardings = partitioner.param_shardings(boxed)

  def loss_fn(params, batch, rng, deterministic):
    return contrastive_model.loss_fn(params, batch, rng, deterministic)

  loop = build_trainer(trainer, optimizer, partitioner, loss_fn, model_dir, boxed,
                       routes=[config.route(t) for t in EXPERTS], loss_and_grads_fn=contrastive_model.loss_and_grads)
  checkpointer = Checkpointer(run_dir / "checkpoints", save_every=trainer.checkpoint_every,
                              keep=trainer.keep_checkpoints, async_save=trainer.async_checkpointing)
  state = loop.restore_or_init(checkpointer, lambda: partitioner.shard(host_params, shardings), nn.unbox(boxed))
  log.info("fine-tuning %s on mesh %s: %d groups, batch %d queries x (1 + %d) passages, %d steps (%.1f epochs)",
           config.tower_mode, dict(partitioner.mesh.shape), len(groups), batch_size, sampling.negatives,
           trainer.num_steps, trainer.num_steps * batch_size / len(groups))

  def batches(start):
    return FinetuneBatches(stream, batch_size=batch_size, start_step=start, shard_index=jax.process_index(),
                           num_shards=jax.process_count())

  rss = {"prepared": peak_rss_gb()}

  def release():
    if release_memory:
      host_malloc.release_free_memory()

  selection = None
  if dev is not None:
    dev_dir = Path(model_dir) / "dev"

    def evaluate_at(step, params):
      # The step's early outputs (the loss) are ready before it finishes; once the params are, its temporaries
      # are free and can be handed back.
      jax.block_until_ready(params)
      release()
      monitor.set_phase(f"dev evaluation, step {step}")
      report = evaluate_dataset(config, params, tokenizer, dev_data, out_dir=dev_dir / f"step-{step}",
                                method=eval_method, encode_options=encode_options, scann_config=scann_config,
                                partitioner=partitioner,
                                measures=tuple(dict.fromkeys((dev.measure, *eval_measures))))
      release()  # the encoding's and the search's free temporaries
      if step < trainer.num_steps:
        monitor.set_phase(f"train, steps {step + 1}-{min(step + trainer.eval_every, trainer.num_steps)}")
      return report
    selection = _Selection(run_dir, evaluate_at, dev.measure,
                           discard=lambda step: shutil.rmtree(dev_dir / f"step-{step}" / "corpus", ignore_errors=True))

  start = int(jax.device_get(state.step))
  if dev is None:
    monitor.set_phase("train")
  elif start > 0:  # resumed: no step-0 evaluation, which would name the phase
    next_eval = min((start // trainer.eval_every + 1) * trainer.eval_every, trainer.num_steps)
    monitor.set_phase(f"train, steps {start + 1}-{next_eval}")
  try:
    state = loop.train(state, batches, checkpointer, evaluate_fn=selection)
  finally:
    checkpointer.close()
  params = jax.block_until_ready(state.params)
  rss["trained"] = peak_rss_gb()
  release()
  selection_report = None
  if selection is not None:
    monitor.set_phase("model selection")
    best, first = selection.best, selection.curve[0] if selection.curve else None
    final_step = int(jax.device_get(state.step))
    if best["step"] != final_step:
      params = selection.best_params(params)
    selection.close()
    curve = sorted(selection.curve, key=lambda r: r["step"])
    first = curve[0]
    selection_report = {
        "dev_split": dev_how, "measure": dev.measure, "chosen_step": best["step"],
        "chosen_value": best["metrics"][dev.measure], "step0_won": best["step"] == 0,
        "step0_value": first["metrics"][dev.measure] if first["step"] == 0 else None,
        "final_step": final_step, "curve": curve,
        "other_measures": [m for m in best["metrics"] if m != dev.measure]}
    log.info("model selection: step %d of %d (dev %s %.4f)%s", best["step"], final_step, dev.measure,
             best["metrics"][dev.measure], "; step 0 won: the starting params are shipped" if best["step"] == 0
             else "")
  if export_hf:
    monitor.set_phase("export")
    # Each tower serves at the length it was trained at.
    hf_interop.to_hf_anywhere(config, params, run_dir / "hf", tokenizer=tokenizer_dir,
                              max_seq_length={"query": sampling.query_max_len, "passage": sampling.passage_max_len},
                              overwrite=True)
  report = None
  eval_corpus = Path(model_dir) / "eval" / "corpus"
  if eval_data:
    monitor.set_phase("test evaluation")
    # The chosen dev step's corpus encoding is the same model's encoding of the same corpus: reused, not redone.
    if selection_report is not None and Path(eval_data) == Path(train_data):
      chosen = Path(model_dir) / "dev" / f"step-{selection_report['chosen_step']}" / "corpus"
      eval_corpus = chosen if chosen.exists() else eval_corpus
    report = evaluate(config, params, tokenizer, eval_data, eval_split, out_dir=Path(model_dir) / "eval",
                      method=eval_method, encode_options=encode_options, scann_config=scann_config,
                      partitioner=partitioner, measures=eval_measures, corpus_dir=eval_corpus)
  rss["evaluated"] = peak_rss_gb()
  negatives = None
  if mine_negatives_to:
    monitor.set_phase("negative mining")
    # When the evaluation searched the same corpus, its encoding (same model) is reused, not recomputed.
    same_corpus = eval_data is not None and Path(eval_data) == Path(train_data)
    negatives = mine_negatives(config, params, tokenizer, train_data, train_split, mine_negatives_to,
                               out_dir=Path(model_dir) / "mining", encode_options=encode_options,
                               partitioner=partitioner,
                               corpus_dir=eval_corpus if same_corpus else None)
  _write_report(run_dir, {
      "selection": selection_report,
      "test": None if report is None else {k: report[k] for k in ("dataset", "split", "num_queries", "metrics")},
      "peak_rss_gb": peak_rss_gb(), "rss_gb": rss, "rss_phases_gb": monitor.summary()})
  return {"eval": report, "negatives": negatives, "selection": selection_report}


@gin.configurable
def mined_negatives_path(model_dir: str = gin.REQUIRED) -> str:
  """MODEL_DIR/mined_negatives.jsonl: where stage 1 leaves the negatives for stage 2."""
  return os.fspath(epath.Path(model_dir) / "mined_negatives.jsonl")


@gin.configurable(denylist=["config", "params", "tokenizer", "partitioner", "corpus_dir"])
def mine_negatives(config: MoteConfig, params: PyTree, tokenizer, beir_dir: str, split: str, out_path: str, *,
                   out_dir: str | Path, depth: int = 200, skip_first: int = 0, num_negatives: int = 30,
                   method: str = "exact", encode_options: encode.EncodeOptions = encode.EncodeOptions(),
                   partitioner: Partitioner | None = None, corpus_dir: str | Path | None = None) -> str:
  """Retrieves `split`'s queries with the model, drops judged positives, and writes the top-ranked rest
  (after `skip_first`) as Tevatron jsonl negatives at `out_path`."""
  evaluate(config, params, tokenizer, beir_dir, split, out_dir=out_dir, method=method, k=depth,
           encode_options=encode_options, partitioner=partitioner, corpus_dir=corpus_dir)
  data = beir.load_beir(beir_dir, split)
  run = metrics.read_run(Path(out_dir) / f"run-{split}-{method}.trec")
  groups = beir_groups(data.corpus.ids, data.corpus.passages(), data.queries, data.qrels, run,
                       num_negatives=num_negatives, skip_first=skip_first)
  if jax.process_index() == 0:
    write_negatives(out_path, groups)
  log.info("mined %d negatives for each of %d queries into %s", num_negatives, len(groups), out_path)
  return str(out_path)


@gin.configurable
def evaluate_job(model_dir: str, *, model: ModelSource = gin.REQUIRED, data: str = gin.REQUIRED,
                 split: str = "test", method: str = "exact", k: int = 1000, mesh: MeshConfig = MeshConfig(),
                 measures: Sequence[str] = metrics.DEFAULT_MEASURES,
                 encode_options: encode.EncodeOptions = encode.EncodeOptions(),
                 scann_config: search.ScannConfig = search.ScannConfig()) -> dict:
  """Evaluates a model (e.g. zero-shot) on a BEIR split; report in MODEL_DIR/eval (MODEL_DIR/eval/<name>
  when `data` is a list of BEIR directories, one report each)."""
  _check_local(model_dir, "evaluate_job")
  config, params, tokenizer_dir = model.load()
  tokenizer, partitioner = _tokenizer(tokenizer_dir), Partitioner.create(mesh)
  run_one = lambda directory, out: evaluate(  # noqa: E731
      config, params, tokenizer, directory, split, out_dir=out, method=method, k=k, encode_options=encode_options,
      scann_config=scann_config, partitioner=partitioner, measures=measures)
  if isinstance(data, (list, tuple)):
    return {Path(d).name: run_one(d, Path(model_dir) / "eval" / Path(d).name) for d in data}
  return run_one(data, Path(model_dir) / "eval")


@gin.configurable
def export_job(model_dir: str, *, model: ModelSource = gin.REQUIRED,
               max_seq_length: hf_interop.MaxSeqLength = None) -> str:
  """Writes MODEL_DIR/hf/{query,passage} from any model source (e.g. a pre-training checkpoint's towers).

  `max_seq_length` (one length or {expert: length}) overrides the towers' serving lengths; by default each keeps
  the source's (its training length, or what the source checkpoint declared)."""
  config, params, tokenizer_dir = model.load()
  return os.fspath(hf_interop.to_hf_anywhere(config, params, epath.Path(model_dir) / "hf", tokenizer=tokenizer_dir,
                                             max_seq_length=max_seq_length, overwrite=True))

