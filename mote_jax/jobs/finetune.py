"""Jobs: contrastive fine-tuning (Tevatron recipe), hard-negative mining, evaluation, HF export.

Stage 1 trains with BM25 negatives; `mine_negatives` retrieves the train queries with the stage-1 model and
writes the top-ranked non-positives as a Tevatron jsonl; stage 2 trains from the initial checkpoint again with
BM25 and mined negatives together (see t5x_configs/runs/msmarco_*.gin).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from etils import epath

from mote_jax import hf_interop
from mote_jax.data.finetune import (FinetuneBatches, FinetuneStream, SamplingConfig, TrainGroup,
                                    beir_groups, bm25_run, tevatron_groups, write_negatives)
from mote_jax.model import EXPERTS, MoteConfig, init_params
from mote_jax.objectives.contrastive import ContrastiveConfig, ContrastiveModel
from mote_jax.partitioning import MeshConfig, Partitioner
from mote_jax.retrieval import beir, encode, metrics, search
from mote_jax.retrieval.evaluate import evaluate
from mote_jax.training.checkpointing import Checkpointer, is_uri
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
  """Per query, the negatives of every source (in source order, duplicates dropped); positives of the first."""
  merged: dict[str, TrainGroup] = {}
  for groups in groups_lists:
    for g in groups:
      if g.query_id not in merged:
        merged[g.query_id] = g
        continue
      old = merged[g.query_id]
      seen = {p.docid for p in old.negatives}
      extra = tuple(p for p in g.negatives if p.docid not in seen)
      merged[g.query_id] = dataclasses.replace(old, negatives=old.negatives + extra)
  return list(merged.values())


@gin.configurable
def training_groups(beir_dir: str, split: str = "train", negatives: Sequence[str] = ("bm25",),
                    bm25_depth: int = 100, num_negatives: int = 30, cache_dir: str | None = None
                    ) -> list[TrainGroup]:
  """Training groups of a BEIR split with negatives from each source in `negatives`: 'bm25' (bm25s over the
  corpus; the run is cached as a TREC file in `cache_dir`), or the path of a Tevatron jsonl (e.g. mined)."""
  data = beir.load_beir(beir_dir, split)
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
                                 num_negatives=num_negatives))
    else:
      sources.append(tevatron_groups(source))
  groups = _merge(sources)
  log.info("%d training groups from %s/%s, negatives from %s (mean %.1f per query)", len(groups), beir_dir,
           split, list(negatives), np.mean([len(g.negatives) for g in groups]))
  return groups


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
def finetune(model_dir: str, *, model: ModelSource = gin.REQUIRED, train_data: str = gin.REQUIRED,
             train_split: str = "train", groups_fn=training_groups, batch_size: int = 16,
             sampling: SamplingConfig = SamplingConfig(), contrastive: ContrastiveConfig = ContrastiveConfig(),
             optimizer: OptimizerConfig = OptimizerConfig(), trainer: TrainerConfig = TrainerConfig(),
             mesh: MeshConfig = MeshConfig(), data_seed: int = 0, eval_data: str | None = None,
             eval_split: str = "test", eval_method: str = "exact",
             eval_measures: Sequence[str] = metrics.DEFAULT_MEASURES,
             encode_options: encode.EncodeOptions = encode.EncodeOptions(),
             scann_config: search.ScannConfig = search.ScannConfig(), mine_negatives_to: str | None = None,
             export_hf: bool = True) -> dict:
  """Fine-tunes with InfoNCE over the global batch (queries: query expert, passages: passage expert).

  Resumes from MODEL_DIR/checkpoints. At the end: MODEL_DIR/hf towers, an evaluation of `eval_data` (report in
  MODEL_DIR/eval), and optionally hard negatives of the train split mined with the fine-tuned model.
  Returns {"eval": report or None, "negatives": path or None}.
  """
  run_dir = epath.Path(model_dir)  # local or gs://...; pathlib would collapse the "//"
  if eval_data:
    _check_local(run_dir / "eval", "finetune's evaluation")
  if mine_negatives_to:
    _check_local(run_dir / "mining", "finetune's negative mining")
    _check_local(mine_negatives_to, "finetune's negative mining")
  partitioner = Partitioner.create(mesh)
  config, host_params, tokenizer_dir = model.load()
  tokenizer = _tokenizer(tokenizer_dir)
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

  try:
    state = loop.train(state, batches, checkpointer)
  finally:
    checkpointer.close()
  params = state.params
  if export_hf:
    # Each tower serves at the length it was trained at.
    hf_interop.to_hf_anywhere(config, params, run_dir / "hf", tokenizer=tokenizer_dir,
                              max_seq_length={"query": sampling.query_max_len, "passage": sampling.passage_max_len},
                              overwrite=True)
  report = None
  if eval_data:
    report = evaluate(config, params, tokenizer, eval_data, eval_split, out_dir=Path(model_dir) / "eval",
                      method=eval_method, encode_options=encode_options, scann_config=scann_config,
                      partitioner=partitioner, measures=eval_measures)
  negatives = None
  if mine_negatives_to:
    # When the evaluation searched the same corpus, its encoding (same model) is reused, not recomputed.
    same_corpus = eval_data is not None and Path(eval_data) == Path(train_data)
    negatives = mine_negatives(config, params, tokenizer, train_data, train_split, mine_negatives_to,
                               out_dir=Path(model_dir) / "mining", encode_options=encode_options,
                               partitioner=partitioner,
                               corpus_dir=Path(model_dir) / "eval" / "corpus" if same_corpus else None)
  return {"eval": report, "negatives": negatives}


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

