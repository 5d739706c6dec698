"""Jobs: contrastive fine-tuning (Tevatron recipe), hard-negative mining, evaluation, HF export.

Model selection: with a `DevSelection`, a dev split (the dataset's own qrels/<split>.tsv, else a hash-split of
the train queries, left out of training) is evaluated at step 0 and every `TrainerConfig.eval_every` steps by the
same pipeline as the test evaluation (encode the corpus, search, ir_measures). The params of the best dev step,
step 0 included, are kept in MODEL_DIR/best and are the ones exported, evaluated and returned, so fine-tuning
never ships a model worse on dev than the one it started from. MODEL_DIR/report.{json,md} give the dev curve, the
chosen step, whether step 0 won, the test metrics, the process's peak RSS and its RSS per phase (data preparation,
each training range, each dev evaluation, export, test evaluation; `finetune.rss_interval`).

Stage 1 trains with BM25 negatives; `mine_negatives` retrieves the train queries with the stage-1 model (the
search sharded over processes by query, see `retrieval.sharded`) and writes the top-ranked unjudged passages' ids
(one line per query in `mote_jax.data.finetune`'s ids format, never texts); stage 2 trains from the initial
checkpoint again with BM25 and mined negatives together (see t5x_configs/runs/msmarco_*.gin).

Paths: MODEL_DIR, the BEIR data, the negatives files and the model sources may be local or on an object store
(`gs://...`); every file goes through `etils.epath` / `tf.io.gfile`, and model sources on an object store are
read through a local copy (`hf_interop.local_copy`). Each job checks that every configured input exists before
any work starts (`check_inputs`).
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
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from etils import epath

from mote_jax import hf_interop, host_malloc
from mote_jax.data.finetune import (FinetuneBatches, FinetuneStream, GroupTable, SamplingConfig, TrainingData,
                                    beir_groups, corpus_rows, merge_groups, read_negatives, sharded_bm25_run,
                                    split_dev)
from mote_jax.data.flat_tokens import texts_fingerprint
from mote_jax.model import EXPERTS, MoteConfig, init_params
from mote_jax.objectives.contrastive import ContrastiveConfig, ContrastiveModel
from mote_jax.partitioning import MeshConfig, Partitioner
from mote_jax.retrieval import beir, encode, files, metrics, search
from mote_jax.retrieval.evaluate import Evaluator, StreamedText, evaluate, evaluate_dataset
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
  of a MoTE model (`towers`, e.g. a pre-training run's MODEL_DIR/hf). Either may be a `gs://` URI: it is
  copied to the local cache first (`hf_interop.local_copy`), and the tokenizer is read from that copy."""

  checkpoint: str | None = None
  towers: str | None = None
  tower_mode: str = "mote"
  overrides: dict | None = None

  def input_paths(self) -> dict[str, str]:
    """{gin name: path} of the inputs `load` reads from a file system (a hub id or bundled name is not one)."""
    if self.towers is not None:
      return {"ModelSource.towers": os.fspath(self.towers)}
    checkpoint = os.fspath(self.checkpoint) if self.checkpoint is not None else None
    if checkpoint is not None and (is_uri(checkpoint) or checkpoint.startswith((".", "/", "~"))):
      return {"ModelSource.checkpoint": checkpoint}
    return {}

  def load(self) -> tuple[MoteConfig, PyTree, Path]:
    """(config, host params, local tokenizer directory)."""
    overrides = dict(self.overrides or {})
    if (self.checkpoint is None) == (self.towers is None):
      raise ValueError("ModelSource: set exactly one of checkpoint and towers")
    if self.towers is not None:
      local = hf_interop.local_copy(self.towers)
      config, params = hf_interop.from_hf_towers(local, **overrides)
      if config.tower_mode != self.tower_mode:
        log.info("%s holds a %s model (ModelSource.tower_mode=%s ignored)", self.towers, config.tower_mode,
                 self.tower_mode)
      return config, params, local / "passage"
    path = hf_interop.resolve_checkpoint(self.checkpoint)
    config, params = hf_interop.from_hf(path, tower_mode=self.tower_mode, **overrides)
    return config, params, path


def _tokenizer(path):
  """The HF tokenizer of a local directory (`ModelSource.load` returns a local copy of a gs:// source)."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(path))


@gin.configurable
def training_groups(beir_dir: str, split: str = "train", negatives: Sequence[str] = ("bm25",),
                    bm25_depth: int = 100, num_negatives: int = 30, cache_dir: str | None = None,
                    min_positive_grade: int = 1, data: beir.BeirDataset | None = None, bm25_k1: float = 1.5,
                    bm25_b: float = 0.75, bm25_threads: int = -1) -> TrainingData:
  """Training groups (as corpus rows) of a BEIR split with negatives from each source in `negatives`: 'bm25'
  (bm25s over the corpus, NumPy backend, `bm25_threads` threads (-1: every core), the queries sharded across
  processes, the run cached in `cache_dir`; see `mote_jax.data.bm25` for k1/b per dataset), or the path of a
  negatives file (ids, e.g. stage 1's mined negatives, or Tevatron jsonl with text; doc ids must be in the corpus).
  Per query: the first source's positives, every source's negatives in order (duplicates dropped). Positives are
  judged at `min_positive_grade` or above; no judged passage of any grade is a negative. `data`: the split
  already loaded (perhaps with dev queries taken out), instead of reading `beir_dir`."""
  check_inputs({"training_groups.negatives": [s for s in negatives if s != "bm25"]}, "training_groups")
  data = data if data is not None else beir.load_beir(beir_dir, split)
  corpus_ids, passages = data.corpus.ids, data.corpus.passages()
  fingerprint = texts_fingerprint(passages, corpus_ids)
  index = corpus_rows(corpus_ids)
  tables = []
  for source in negatives:
    if source == "bm25":
      run = sharded_bm25_run(corpus_ids, passages, data.queries, depth=bm25_depth, k1=bm25_k1, b=bm25_b,
                             n_threads=bm25_threads, cache_dir=cache_dir, split=f"{data.name}-{split}",
                             corpus_fingerprint=fingerprint)
      tables.append(beir_groups(corpus_ids, data.queries, data.qrels, run, num_negatives=num_negatives,
                                min_positive_grade=min_positive_grade, corpus_index=index))
    else:
      tables.append(read_negatives(source, index, data.queries))
  judged = {q: [index[d] for d in rels if d in index] for q, rels in data.qrels.items()}
  groups = merge_groups(tables, judged)
  counts = groups.negative_counts()
  if (counts == 0).any():
    log.warning("left out %d queries whose sources hold no unjudged negative", int((counts == 0).sum()))
    keep = np.flatnonzero(counts > 0)
    groups = GroupTable.from_lists([groups.query_ids[i] for i in keep], [groups.positives_of(i) for i in keep],
                                   [groups.negatives_of(i) for i in keep], [groups.judged_of(i) for i in keep])
  log.info("%d training groups from %s/%s, negatives from %s (mean %.1f per query)", len(groups), beir_dir,
           split, list(negatives), groups.negative_counts().mean())
  return TrainingData(groups, corpus_ids, passages, tuple(data.queries[q] for q in groups.query_ids), fingerprint)


def _beir_files(directory: str | os.PathLike, split: str) -> list[epath.Path]:
  root = epath.Path(directory)
  return [root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv"]


def check_inputs(inputs: Mapping[str, Sequence[str | os.PathLike] | str | os.PathLike | None], job: str) -> None:
  """Raises FileNotFoundError naming every configured input that does not exist (`inputs`: {gin name: path or
  paths}, None entries skipped), so a mistyped local or gs:// path stops a job before any work (model loading,
  BM25, training) rather than after it. One metadata request per path on an object store."""
  missing = []
  for key, paths in inputs.items():
    if paths is None:
      continue
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
      if not epath.Path(path).exists():
        missing.append(f"{key}: {os.fspath(path)}")
  if missing:
    raise FileNotFoundError(f"{job}: {len(missing)} configured input path(s) do not exist: " + "; ".join(missing))


def _negatives_files(groups_fn) -> list[str]:
  """The negatives files (not 'bm25') that `training_groups` will read, from its gin binding."""
  if groups_fn is not training_groups:
    return []
  try:
    sources = gin.query_parameter("training_groups.negatives")
  except ValueError:  # not bound: the default, BM25 only
    return []
  resolved = [s.scoped_configurable_fn() if isinstance(s, gin.config.ConfigurableReference) else s  # %MACROs
              for s in (sources or ())]
  return [os.fspath(s) for s in resolved if s != "bm25"]


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
  """JSON to `path` through a temporary file and a rename (one object write on gs://)."""
  files.write_text(path, json.dumps(value, indent=2) + "\n")


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
  files.write_text(run_dir / "report.md", "\n".join(lines))


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
    # Started by the job once its inputs are checked (a job that stops on a missing input writes nothing).
    monitor = RssMonitor(run_dir / "rss.jsonl" if sampled else None, interval=interval, log_records=sampled,
                         phase="prepare: model, data")
    token = _MONITOR.set(monitor)
    try:
      return job(*args, **kwargs)
    finally:
      monitor.stop()
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
             export_hf: bool = True, dev: DevSelection | None = None,
             data_cache_dir: str | None = None, rss_interval: float = 0.5, release_memory: bool = True) -> dict:
  """Fine-tunes with InfoNCE over the global batch (queries: query expert, passages: passage expert), masking
  passages judged for a query out of its denominator when `contrastive.mask_judged`.

  With `dev`, the dev split is evaluated at step 0 and every `trainer.eval_every` steps (MODEL_DIR/dev/step-N;
  `dev/<measure>` in metrics.jsonl and TensorBoard) and the best dev step's params are the result (see the module
  docstring). Resumes from MODEL_DIR/checkpoints. At the end: MODEL_DIR/hf towers, an evaluation of `eval_data`
  (report in MODEL_DIR/eval), MODEL_DIR/report.{json,md}, and optionally hard negatives of the train split mined
  with the result. Returns {"eval": report or None, "negatives": path or None, "selection": dict or None}.

  `data_cache_dir` (default MODEL_DIR/cache): where the tokenised corpus and queries and the BM25 index and runs
  are cached (`mote_jax.data.flat_tokens`, `mote_jax.data.bm25`); point stage 1 and stage 2 at one directory to
  build them once. With several hosts it must be shared by all of them (a shared file system or gs://).
  Memory: `rss_interval` seconds between RSS samples (MODEL_DIR/rss.jsonl, per-phase peaks in the report; 0: at
  phase boundaries only). `release_memory` hands the heap's free pages back to the kernel before and after each
  dev evaluation and after training (`host_malloc.release_free_memory`), so what one phase freed does not stay
  resident beside what the next allocates (see README, "Memory").
  """
  run_dir = epath.Path(model_dir)  # local or gs://...; pathlib would collapse the "//"
  cache_dir = data_cache_dir or os.fspath(run_dir / "cache")
  check_inputs({**model.input_paths(), "finetune.train_data": _beir_files(train_data, train_split),
                "finetune.eval_data": _beir_files(eval_data, eval_split) if eval_data else None,
                "training_groups.negatives": _negatives_files(groups_fn)}, "finetune")
  monitor = _MONITOR.get()  # set by _rss_monitored; started here, after the inputs are checked
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
  monitor.start()
  partitioner = Partitioner.create(mesh)
  config, host_params, tokenizer_dir = model.load()
  tokenizer = _tokenizer(tokenizer_dir)
  dev_data = dev_how = None
  if dev is not None:
    if not trainer.eval_every:
      raise ValueError("finetune: DevSelection needs TrainerConfig.eval_every > 0 (the dev evaluation interval)")
    train_set, dev_data, dev_how = _dev_split(train_data, train_split, dev)
    log.info("dev split: %s", dev_how)
    data = groups_fn(train_data, train_split, cache_dir=cache_dir, data=train_set)
    del train_set
  else:
    data = groups_fn(train_data, train_split, cache_dir=cache_dir)
  stream = FinetuneStream.build(data, tokenizer, sampling, seed=data_seed, cache_dir=cache_dir)
  num_groups = len(data)
  del data

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
           config.tower_mode, dict(partitioner.mesh.shape), num_groups, batch_size, sampling.negatives,
           trainer.num_steps, trainer.num_steps * batch_size / num_groups)

  def batches(start):
    return FinetuneBatches(stream, batch_size=batch_size, start_step=start, shard_index=jax.process_index(),
                           num_shards=jax.process_count())

  rss = {"prepared": peak_rss_gb()}

  def release():
    if release_memory:
      host_malloc.release_free_memory()

  selection = None
  if dev is not None:
    dev_dir = run_dir / "dev"

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
                           discard=lambda step: _remove_tree(dev_dir / f"step-{step}" / "corpus"))

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
  eval_corpus = run_dir / "eval" / "corpus"
  if eval_data:
    monitor.set_phase("test evaluation")
    # The chosen dev step's corpus encoding is the same model's encoding of the same corpus: reused, not redone.
    if selection_report is not None and _same_path(eval_data, train_data):
      chosen = run_dir / "dev" / f"step-{selection_report['chosen_step']}" / "corpus"
      eval_corpus = chosen if chosen.exists() else eval_corpus
    report = evaluate(config, params, tokenizer, eval_data, eval_split, out_dir=run_dir / "eval",
                      method=eval_method, encode_options=encode_options, scann_config=scann_config,
                      partitioner=partitioner, measures=eval_measures, corpus_dir=eval_corpus)
  rss["evaluated"] = peak_rss_gb()
  negatives = None
  if mine_negatives_to:
    monitor.set_phase("negative mining")
    # When the evaluation searched the same corpus, its encoding (same model) is reused, not recomputed.
    same_corpus = eval_data is not None and _same_path(eval_data, train_data)
    negatives = mine_negatives(config, params, tokenizer, train_data, train_split, mine_negatives_to,
                               out_dir=run_dir / "mining", encode_options=encode_options,
                               partitioner=partitioner,
                               corpus_dir=eval_corpus if same_corpus else None)
  _write_report(run_dir, {
      "selection": selection_report,
      "test": None if report is None else {k: report[k] for k in ("dataset", "split", "num_queries", "metrics")},
      "peak_rss_gb": peak_rss_gb(), "rss_gb": rss, "rss_phases_gb": monitor.summary()})
  return {"eval": report, "negatives": negatives, "selection": selection_report}


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
  return epath.Path(a) == epath.Path(b)


def _remove_tree(path: epath.Path) -> None:
  """Deletes a directory (local or on an object store) if it exists."""
  if path.exists():
    path.rmtree()


@gin.configurable
def mined_negatives_path(model_dir: str = gin.REQUIRED) -> str:
  """MODEL_DIR/mined_negatives.jsonl: where stage 1 leaves the negatives (ids only) for stage 2."""
  return os.fspath(epath.Path(model_dir) / "mined_negatives.jsonl")


@gin.configurable(denylist=["config", "params", "tokenizer", "partitioner", "corpus_dir"])
def mine_negatives(config: MoteConfig, params: PyTree, tokenizer, beir_dir: str, split: str, out_path: str, *,
                   out_dir: str | os.PathLike, depth: int = 200, skip_first: int = 0, num_negatives: int = 30,
                   method: str = "exact", encode_options: encode.EncodeOptions = encode.EncodeOptions(),
                   scann_config: search.ScannConfig = search.ScannConfig(), min_positive_grade: int = 1,
                   partitioner: Partitioner | None = None, corpus_dir: str | os.PathLike | None = None,
                   block_rows: int | None = None) -> str:
  """Retrieves `split`'s queries with the model (top `depth`), drops every judged passage, and writes the
  top-ranked rest (after `skip_first`) to `out_path` (local or gs://), ids only, one json line per query:

      {"query_id": "q1", "positive_document_ids": [...], "negative_document_ids": ["d7", "d3", ...],
       "judged_document_ids": [...]}

  (`mote_jax.data.finetune`'s ids format; negatives best first, at most num_negatives)

  Queries without a positive judgement (grade >= `min_positive_grade`) or without a negative are left out
  (counted in the log). The search is sharded over processes (each searches its share of the queries, see
  `retrieval.sharded`); every block's results reach every process and process 0 streams the file, written
  once (temporary name, then renamed). out_dir holds the query embeddings (and the corpus's, unless `corpus_dir`,
  e.g. an evaluation's store of the same model and corpus, is given).
  """
  data = beir.load_beir(beir_dir, split)
  evaluator = Evaluator(config, params, tokenizer, method=method, k=depth, encode_options=encode_options,
                        scann_config=scann_config, partitioner=partitioner, block_rows=block_rows)
  target = epath.Path(out_path)
  text = StreamedText(target, jax.process_index() == 0)
  counts = {"written": 0, "without_positive": 0, "without_negative": 0}

  def consume(query_ids, doc_ids, scores, indices):
    lines = []
    for qid, row in zip(query_ids, indices):
      judged = data.qrels.get(qid, {})
      if not any(grade >= min_positive_grade for grade in judged.values()):
        counts["without_positive"] += 1
        continue
      ranked = [doc_ids[i] for i in row if i >= 0 and doc_ids[i] not in judged][skip_first:skip_first + num_negatives]
      if not ranked:
        counts["without_negative"] += 1
        continue
      positives = sorted((d for d, grade in judged.items() if grade >= min_positive_grade), key=lambda d: -judged[d])
      lines.append(json.dumps({"query_id": qid, "positive_document_ids": positives, "negative_document_ids": ranked,
                               "judged_document_ids": list(judged)}) + "\n")
    counts["written"] += len(lines)
    text.write("".join(lines))

  with text:
    found = evaluator.search(data, out_dir, consume, corpus_dir=corpus_dir)
  if jax.process_count() > 1:  # the file is complete when any process returns
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"mine_negatives {target}")
  log.info("mined up to %d negatives for each of %d queries into %s (left out: %d without a positive, %d without "
           "a negative; search %s)", num_negatives, counts["written"], target, counts["without_positive"],
           counts["without_negative"], found["search"])
  return os.fspath(target)


@gin.configurable
def evaluate_job(model_dir: str, *, model: ModelSource = gin.REQUIRED, data=gin.REQUIRED,
                 split: str = "test", method: str = "exact", k: int = 1000, mesh: MeshConfig = MeshConfig(),
                 measures: Sequence[str] = metrics.DEFAULT_MEASURES,
                 encode_options: encode.EncodeOptions = encode.EncodeOptions(),
                 scann_config: search.ScannConfig = search.ScannConfig(), recall_sample: int = 1000) -> dict:
  """Evaluates a model (e.g. zero-shot) on a BEIR split; report in MODEL_DIR/eval.

  `data`: a BEIR directory, or a list of them (each entry a directory, scored on `split`, or a [directory,
  split] pair), one report each in MODEL_DIR/eval/<name> (<name>-<split> for pairs). Query sets sharing a corpus
  (MS MARCO dev, TREC DL 2019 and 2020: one corpus.jsonl) encode it once, in MODEL_DIR/eval/corpora/<key>, and
  search one index; the datasets are loaded one at a time. `recall_sample`: queries on which ScaNN's recall@10
  against exact search is measured (method 'scann')."""
  entries = [(d, split, epath.Path(d).name) if isinstance(d, (str, os.PathLike)) else
             (d[0], d[1], f"{epath.Path(d[0]).name}-{d[1]}") for d in (data if isinstance(data, (list, tuple))
                                                                       else [data])]
  check_inputs({**model.input_paths(),
                "evaluate_job.data": [f for d, s, _ in entries for f in _beir_files(d, s)]}, "evaluate_job")
  config, params, tokenizer_dir = model.load()
  tokenizer, partitioner = _tokenizer(tokenizer_dir), Partitioner.create(mesh)
  options = dict(method=method, k=k, encode_options=encode_options, scann_config=scann_config,
                 partitioner=partitioner, measures=measures, recall_sample=recall_sample)
  eval_dir = epath.Path(model_dir) / "eval"
  if not isinstance(data, (list, tuple)):
    evaluator = Evaluator(config, params, tokenizer, **options)
    return evaluator.evaluate(beir.load_beir(data, split), eval_dir, beir_dir=data)
  names = [name for _, _, name in entries]
  if len(set(names)) != len(names):
    raise ValueError(f"evaluate_job.data: two entries share a report directory name: {names}")
  evaluator = Evaluator(config, params, tokenizer, corpus_root=eval_dir / "corpora", **options)
  return {name: evaluator.evaluate(beir.load_beir(directory, entry_split), eval_dir / name, beir_dir=directory)
          for directory, entry_split, name in entries}


@gin.configurable
def export_job(model_dir: str, *, model: ModelSource = gin.REQUIRED,
               max_seq_length: hf_interop.MaxSeqLength = None) -> str:
  """Writes MODEL_DIR/hf/{query,passage} from any model source (e.g. a pre-training checkpoint's towers).

  `max_seq_length` (one length or {expert: length}) overrides the towers' serving lengths; by default each keeps
  the source's (its training length, or what the source checkpoint declared)."""
  check_inputs(model.input_paths(), "export_job")
  config, params, tokenizer_dir = model.load()
  return os.fspath(hf_interop.to_hf_anywhere(config, params, epath.Path(model_dir) / "hf", tokenizer=tokenizer_dir,
                                             max_seq_length=max_seq_length, overwrite=True))

