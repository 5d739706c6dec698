"""What the 2-process workers (worker.py) and the 1-process reference (tests/test_multiprocess.py) share: the runs'
flags, the encoding workload, and test hooks that record what each process feeds the trainer.

Both sides run the real jobs through gin and `jobs.run`, so they differ only in the process count.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import numpy as np

PRETRAIN_STEPS = 6
FINETUNE_STEPS = 4
TEMPERATURE = 0.05
# AdamW's update of a gradient at float-noise level (a sum that cancels to ~0) is +-lr whatever its size with eps
# 1e-8, so a last-bit difference between meshes could move a parameter by lr; eps 1e-6 keeps such updates tiny.
EPS = 1e-6
CHECKPOINT_EVERY = 1000  # saves cost seconds each on 2 busy cores: only the final (and the SIGTERM) checkpoints
SIGTERM_AFTER_STEP = 2  # process 1 of the 2-process pre-training gets SIGTERM once this step is done
NUM_HOSTS = 2


def pretrain_flags(model_dir: Path | str, data_dir: Path, num_steps: int = PRETRAIN_STEPS) -> list[str]:
  """`python -m mote_jax.launch` flags: the tiny smoke run (1 encoder and 1 decoder layer), 8 pairs per batch."""
  return ["--gin_file=runs/pretrain_tiny_smoke.gin", f"--gin.MODEL_DIR={model_dir}",
          f"--gin.NUM_STEPS={num_steps}",
          "--gin.spans/register_beir_corpus_task.name=mp_scifact_span_pairs",
          f"--gin.spans/register_beir_corpus_task.corpus={data_dir / 'scifact' / 'corpus.jsonl'}",
          "--gin.MoteConfig.num_layers=1", "--gin.ObjectiveConfig.decoder_layers=1",
          f"--gin.OptimizerConfig.eps={EPS}", "--gin.TrainerConfig.log_every=1", "--gin.TrainerConfig.eval_every=0",
          f"--gin.TrainerConfig.checkpoint_every={CHECKPOINT_EVERY}",
          "--gin.TrainerConfig.progress_bar=False"]


def finetune_flags(model_dir: Path | str, data_dir: Path, bert_dir: Path) -> list[str]:
  """SciFact train with BM25 negatives (the top 4 of each query: less to tokenise), 8 queries x (1 + 1) passages
  per batch, no dropout, no evaluation (test or dev), temperature 0.05 (the tiny model's embeddings are normalised)."""
  return ["--gin_file=runs/finetune_scifact_cpu.gin", f"--gin.MODEL_DIR={model_dir}",
          f"--gin.NUM_STEPS={FINETUNE_STEPS}", f"--gin.ModelSource.checkpoint={bert_dir}",
          "--gin.ModelSource.overrides={'hidden_dropout': 0.0, 'attention_dropout': 0.0}",
          f"--gin.finetune.train_data={data_dir / 'scifact'}", "--gin.finetune.eval_data=None",
          "--gin.finetune.dev=None",
          "--gin.training_groups.num_negatives=4",
          "--gin.finetune.batch_size=8", "--gin.SamplingConfig.query_max_len=32",
          "--gin.SamplingConfig.passage_max_len=64", f"--gin.ContrastiveConfig.temperature={TEMPERATURE}",
          "--gin.OptimizerConfig.learning_rate=1e-3", "--gin.OptimizerConfig.warmup_steps=1",
          f"--gin.OptimizerConfig.eps={EPS}",
          "--gin.EncodeOptions.max_length=64", "--gin.TrainerConfig.log_every=1",
          f"--gin.TrainerConfig.checkpoint_every={CHECKPOINT_EVERY}", "--gin.TrainerConfig.progress_bar=False"]


def run_job(flags: list[str]):
  """Parses `flags` like `python -m mote_jax.launch` (no distributed setup) and runs the job; clears gin after."""
  import gin
  from mote_jax import jobs, launch
  gin.clear_config()
  launch.parse_gin(launch.parse_flags(flags))
  try:
    return jobs.run()
  finally:
    gin.clear_config()


def random_params(config) -> dict:
  """BERT-style random params of `config` as host arrays, without compiling an init (only its shapes are traced):
  LayerNorm scales 1, biases 0, every other weight N(0, 0.02)."""
  import flax.linen as nn
  import jax
  from mote_jax.model import init_params
  abstract = nn.unbox(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
  rng = np.random.default_rng(3)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name.endswith("scale"):
      return np.ones(leaf.shape, leaf.dtype)
    if name.endswith("bias"):
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, abstract)


def make_tiny_bert(out: Path, tokenizer_dir: str) -> Path:
  """A random 2-layer HF BERT directory with the bert-base-uncased tokenizer (written by our own `to_hf`).

  Mean pooling and L2 normalisation (sentence-transformers modules beside the weights): a random BERT's [CLS]
  vector is nearly the same for every text, which makes a flat contrastive loss whose tiny gradients AdamW
  turns into sign noise; mean pooling gives texts distinct embeddings and the loss a real gradient."""
  from mote_jax.hf_interop import to_hf
  from mote_jax.model import MoteConfig
  config = MoteConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128,
                      tower_mode="siamese", pooling="mean", normalize=True)
  to_hf(config, random_params(config), out, tokenizer=tokenizer_dir, max_seq_length=64)
  return out / "passage"


def encode_workload(data_dir: Path):
  """(texts, ids, options) of the store-encoding check: 45 SciFact documents in 5 shards of 10 (3 on process 0,
  2 on process 1)."""
  from mote_jax.retrieval import EncodeOptions, load_beir
  corpus = load_beir(data_dir / "scifact", "test").corpus
  texts = list(corpus.passages())[:45]
  ids = list(corpus.ids)[:45]
  return texts, ids, EncodeOptions(batch_size=8, max_length=64, length_step=32, shard_size=10, progress=False)


def encode_store(bert_dir: Path, params: dict[str, np.ndarray], data_dir: Path, out: Path):
  """Encodes the workload's passages into an embedding store at `out` (a collective in multi-process runs), with
  the tiny BERT as a MoTE model: `params` (flat host arrays) are the fine-tuning run's initial ones, which spares
  another `from_hf` (it compiles a whole-model init)."""
  from transformers import AutoTokenizer
  from mote_jax.hf_interop import config_from_hf
  from mote_jax.retrieval.encode import Embedder, encode_to_store
  config = config_from_hf(bert_dir, "mote")
  params = unflatten(params)
  texts, ids, options = encode_workload(data_dir)
  return encode_to_store(Embedder(config, params), AutoTokenizer.from_pretrained(str(bert_dir)), texts, ids,
                         "passage", out, options)


# --- recording ------------------------------------------------------------------------------------------------


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
  """{'a/b': array} of a nested dict of arrays."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return out
  return {prefix: np.asarray(tree)}


def host_params(params) -> dict[str, np.ndarray]:
  """Flat host copy of (possibly multi-process sharded) params; a collective when they are not addressable."""
  import jax
  from jax.experimental import multihost_utils

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return flatten(jax.tree.map(fetch, params))


@contextlib.contextmanager
def recording(root: Path, every_step: bool = False, sigterm_after: tuple[str, int] | None = None,
              initial: dict | None = None) -> Iterator[None]:
  """Patches `Trainer.train` and `Checkpointer.maybe_save` for the duration, to record under root/<run dir name>:

    p<process>/<step>.npz   every host batch this process feeds the trainer
    initial.npz             the params when training starts (process 0 writes what it gathered)
    params/<step>.npz       the params after `step`: at every step with `every_step`, else at the forced saves
                            (the last step, a SIGTERM stop); `maybe_save` runs on every process with the same
                            arguments, so the gather there is a well-formed collective
    final.npz               the params `train` returns (after a restore-only run: the restored ones)

  `sigterm_after` = (run dir name, step): in that run, process 1 sends itself SIGTERM when asked for the batch
  after that step, then sleeps 2 s so JAX's preemption service settles the stop step before the next
  collective: the stop then comes one step later on both processes.
  `initial`: gets {run dir name: the initial params (flat, host)} on every process.
  """
  import jax
  from mote_jax.training.checkpointing import Checkpointer
  from mote_jax.training.trainer import Trainer
  original_train, original_save = Trainer.train, Checkpointer.maybe_save

  def dump(path: Path, params) -> dict[str, np.ndarray]:
    gathered = host_params(params)
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      np.savez(path, **gathered)
    return gathered

  def maybe_save(self, step, state, *, force=False):
    if (every_step or force) and hasattr(state, "params"):  # training states only (not e.g. the best-dev params)
      dump(root / Path(os.fspath(self.directory)).parent.name / "params" / f"{step:04d}.npz", state.params)
    return original_save(self, step, state, force=force)

  def train(self, state, train_batches, checkpointer, eval_batches=None, **kwargs):
    run = root / Path(os.fspath(self.model_dir)).name
    host_dir = run / f"p{jax.process_index()}"
    host_dir.mkdir(parents=True, exist_ok=True)

    def recorded(start):
      inner = train_batches(start)
      try:
        for step in itertools.count(start + 1):
          if sigterm_after == (run.name, step - 1) and jax.process_index() == 1:
            (run / f"sigterm-sent-p{jax.process_index()}").touch()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2.0)
          batch = next(inner)
          np.savez(host_dir / f"{step:04d}.npz", **flatten(batch))
          yield batch
      finally:
        close = getattr(inner, "close", None)
        if close is not None:
          close()

    params = dump(run / "initial.npz", state.params)  # before the loop: the step donates the state's buffers
    if initial is not None:
      initial[run.name] = params
    state = original_train(self, state, recorded, checkpointer, eval_batches, **kwargs)
    dump(run / "final.npz", state.params)
    return state

  Trainer.train, Checkpointer.maybe_save = train, maybe_save
  try:
    yield
  finally:
    Trainer.train, Checkpointer.maybe_save = original_train, original_save


def load_records(run: Path, process: int) -> dict[int, dict[str, np.ndarray]]:
  """{step: flat host batch} recorded by `recording` for one process of a run."""
  out = {}
  for path in sorted((run / f"p{process}").glob("*.npz")):
    with np.load(path) as data:
      out[int(path.stem)] = {k: data[k] for k in data.files}
  return out


def load_params(path: Path) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  """The nested dict of a `flatten`ed one."""
  out: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = out
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return out


def audit_writes(root: Path, log: list[str]) -> None:
  """Appends to `log` every file under `root` that this process opens for writing through Python (`open`,
  `os.open`: gin files, metrics.jsonl, JSON and .npy files; not tensorstore or safetensors, which write from
  native code)."""
  import sys
  root_str = os.fspath(root)
  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

  def hook(event, args):
    if event != "open":
      return
    path, mode, flags = args
    if not isinstance(path, (str, os.PathLike)):
      return
    path = os.fspath(path)
    writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
    if writing and path.startswith(root_str):
      log.append(os.path.relpath(path, root_str))

  sys.addaudithook(hook)


def write_json(path: Path, value) -> None:
  path.write_text(json.dumps(value, indent=1, sort_keys=True))
