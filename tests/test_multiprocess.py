"""Two JAX processes x 4 CPU devices (one 8-device mesh, coordinator on 127.0.0.1) against one process x 8 devices.

tests/multiprocess/worker.py runs, in each of the two processes: fine-tuning (SciFact train, BM25 negatives)
through `mote_jax.launch` with --coordinator_address / --num_processes / --process_id, an embedding-store encoding,
CoT-MAE pre-training of a tiny random MoTE on the real seqio pipeline (stopped by a SIGTERM to process 1 only),
and a restore-only run of the 1-process pre-training checkpoint. Meanwhile this process runs the same jobs on 8
devices: fine-tuning as is (its stream is the same for any process count), pre-training on the global batches two
hosts read (seqio shards documents per host, so a host count has its own stream by design). Both sides record
every host batch and the params of each training (mp_common.recording); then this process restores the
2-process checkpoint.

What is checked: no example is seen by two processes and their rows make up the single-process global batch; the
contrastive loss is the global-batch loss (negatives of both processes), not a per-process one; losses and
params match the single process within 1e-5; checkpoints restore across process counts in both directions;
the 2-process embedding store equals the 1-process one; gin files, metrics.jsonl and HF exports are written by
process 0 only; SIGTERM on one process stops both at the same step. Plus: a gs:// MODEL_DIR stays whole through
the run-directory code (no GCS here: object-store access is faked).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multiprocess" / "worker.py"
sys.path.insert(0, str(WORKER.parent))

import mp_common  # noqa: E402

TIMEOUT_S = 900
TOLERANCE = 1e-5
TIMING_METRICS = {"steps_per_sec", "tokens_per_sec", "mfu"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _emulated_hosts(num_hosts: int):
  """The pre-training job's batch stream as `num_hosts` processes read it, their rows concatenated in process
  order: one process then trains on the global batches of a `num_hosts`-process run."""
  import jax
  from mote_jax.data import PairBatches
  from mote_jax.jobs import pretrain as job

  def stream(streams, seed, start_step, evaluation=False):
    hosts = [{spec.name: PairBatches(spec.task, batch_size=spec.batch_size, seed=seed, start_step=start_step,
                                     shard_index=h, num_shards=num_hosts,
                                     split=spec.eval_split if evaluation else "train", shuffle=not evaluation)
              for spec in streams} for h in range(num_hosts)]
    try:
      while True:
        rows = [{name: next(iterator) for name, iterator in host.items()} for host in hosts]
        yield jax.tree.map(lambda *parts: np.concatenate(parts), *rows)
    finally:
      for host in hosts:
        for iterator in host.values():
          iterator.close()

  original = job._batch_stream
  job._batch_stream = stream
  try:
    yield
  finally:
    job._batch_stream = original


def _reference(work: Path, data_dir: Path, bert_dir: Path, timings: dict) -> None:
  """The 1-process x 8-device runs; the pre-training checkpoint is then copied for the workers' restore-only run."""
  start = time.monotonic()
  initial = {}
  with mp_common.recording(work / "records" / "single", every_step=True, initial=initial):
    with _emulated_hosts(mp_common.NUM_HOSTS):
      mp_common.run_job(mp_common.pretrain_flags(work / "single" / "pretrain", data_dir))
    timings["reference pretrain"] = round(time.monotonic() - start, 1)
    mp_common.run_job(mp_common.finetune_flags(work / "single" / "finetune", data_dir, bert_dir))
  mp_common.encode_store(bert_dir, initial["finetune"], data_dir, work / "single" / "encode")
  shutil.copytree(work / "single" / "pretrain" / "checkpoints", work / "multi_from_single" / "pretrain" / "checkpoints")
  timings["reference"] = round(time.monotonic() - start, 1)


@dataclasses.dataclass
class Runs:
  work: Path
  data_dir: Path
  bert_dir: Path
  status: list[dict]
  logs: list[str]
  stop_step: int  # where SIGTERM stopped the 2-process pre-training (both processes agree: see its test)

  def records(self, side: str, job: str, process: int = 0) -> dict[int, dict[str, np.ndarray]]:
    return mp_common.load_records(self.work / "records" / side / job, process)

  def params(self, side: str, job: str, name: str | int = "final") -> dict[str, np.ndarray]:
    """Recorded params: 'initial', 'final', or those after a step."""
    path = self.work / "records" / side / job
    path = path / f"{name}.npz" if isinstance(name, str) else path / "params" / f"{name:04d}.npz"
    return mp_common.load_params(path)

  def metrics(self, side: str, job: str) -> list[dict]:
    lines = (self.work / side / job / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]

  def steps(self, job: str) -> int:
    """Steps the 2-process run trained."""
    return self.stop_step if job == "pretrain" else mp_common.FINETUNE_STEPS


# The two-process runs below take about 170 s on 2 cores: the tests that read them are in the slow tier
# (tests/test_retrieval_multiprocess.py keeps a two-process encoding and evaluation in the default tier).
uses_runs = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, minilm_path) -> Runs:
  work = tmp_path_factory.mktemp("multiprocess")
  timings = {}
  start = time.monotonic()
  bert_dir = work / "tiny_bert" / "passage"  # written below, while the workers start
  mp_common.write_json(work / "setup.json", {"port": _free_port(), "work": str(work), "data_dir": str(data_dir),
                                             "bert_dir": str(bert_dir)})
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  log_paths = [work / f"worker{i}.log" for i in range(2)]
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(open(path, "w")) for path in log_paths]
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(work / "setup.json"), str(i)], cwd=REPO, env=env,
                                stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
      try:  # while the workers run: they wait for the tiny BERT, and for the rest only before their last run
        mp_common.make_tiny_bert(work / "tiny_bert", minilm_path)
        _reference(work, data_dir, bert_dir, timings)
      except BaseException:
        (work / "reference_failed").touch()
        raise
      (work / "reference_done").touch()
      deadline = start + TIMEOUT_S
      try:
        for worker in workers:
          worker.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        pass  # killed below; the exit status check shows the logs
    finally:
      for worker in workers:
        if worker.poll() is None:  # one failed process leaves the other waiting in a collective
          worker.kill()
          worker.wait()
  outputs = [path.read_text() for path in log_paths]
  for i, worker in enumerate(workers):
    assert worker.returncode == 0, f"process {i} exited with {worker.returncode}:\n{outputs[i][-6000:]}"
  timings["workers"] = round(time.monotonic() - start, 1)
  stops = re.findall(r"stopped after saving a checkpoint of step (\d+)", outputs[0])
  assert stops, f"the 2-process pre-training was not stopped:\n{outputs[0][-6000:]}"

  # The 2-process checkpoint, restored by one process (a restore-only run: NUM_STEPS is the checkpoint's step).
  shutil.copytree(work / "multi" / "pretrain" / "checkpoints", work / "single_from_multi" / "pretrain" / "checkpoints")
  with mp_common.recording(work / "records" / "single_from_multi"):
    mp_common.run_job(mp_common.pretrain_flags(work / "single_from_multi" / "pretrain", data_dir,
                                               num_steps=int(stops[0])))
  timings["total"] = round(time.monotonic() - start, 1)
  status = [json.loads((work / f"status-p{i}.json").read_text()) for i in range(2)]
  for i in range(2):
    timings[f"process {i}"] = status[i]["timings"]
  print("multi-process test timings (s):", json.dumps(timings))
  return Runs(work, data_dir, bert_dir, status, outputs, int(stops[0]))


def _restored_tokens(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The unmasked text of masked rows: labels hold the original id wherever masking changed something."""
  return np.where(labels != -100, labels, ids)


def _row_set(array: np.ndarray) -> set[bytes]:
  return {row.tobytes() for row in array.reshape(array.shape[0], -1)}


def _max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
  assert a.keys() == b.keys()
  return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@uses_runs
def test_runs_use_two_processes_of_four_devices(runs):
  for status in runs.status:
    assert status["devices"] == {"processes": 2, "local": 4, "global": 8}


@uses_runs
@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_no_example_is_seen_by_two_processes(runs, job):
  """Each step's global batch is process 0's rows then process 1's, exactly the batch the reference trained on,
  and no example is in both processes' batches, at any step. Fine-tuning's stream does not depend on the process
  count, so there the reference batch is also the 1-process run's own."""
  single = runs.records("single", job)
  hosts = [runs.records("multi", job, p) for p in range(2)]
  steps = list(range(1, runs.steps(job) + 1))
  assert sorted(hosts[0]) == sorted(hosts[1]) == steps and set(steps) <= set(single)
  examples = [set(), set()]
  for step in steps:
    for key, value in single[step].items():
      np.testing.assert_array_equal(np.concatenate([hosts[0][step][key], hosts[1][step][key]]), value,
                                    err_msg=f"step {step} {key}")
    for p in range(2):
      batch = hosts[p][step]
      if job == "finetune":
        examples[p] |= _row_set(batch["query_input_ids"])
      else:  # a pair's texts before masking; a pair and its reverse come from one document, so one host
        stream = next(k.split("/")[0] for k in batch)
        for side in ("anchor", "context"):
          examples[p] |= _row_set(_restored_tokens(batch[f"{stream}/{side}_input_ids"],
                                                   batch[f"{stream}/{side}_labels"]))
  if job == "finetune":
    assert len(examples[0]) == len(examples[1]) == 4 * len(steps)  # 4 queries a step, none repeated
  assert min(map(len, examples)) >= 2 * len(steps) and examples[0].isdisjoint(examples[1])


@uses_runs
def test_contrastive_loss_uses_negatives_of_both_processes(runs):
  """The first step's loss (params still initial, no dropout) is InfoNCE over all 8 queries' 16 passages, not
  the mean of each process's 4 queries over its own 8 passages."""
  import jax
  from mote_jax.hf_interop import load_mote_config
  from mote_jax.objectives.contrastive import ContrastiveConfig, ContrastiveModel
  config = load_mote_config(runs.work / "multi" / "finetune" / "hf")  # the run's config: dropout off
  assert config.hidden_dropout == config.attention_dropout == 0.0
  params = mp_common.unflatten(runs.params("multi", "finetune", "initial"))
  model = ContrastiveModel(config, ContrastiveConfig(temperature=mp_common.TEMPERATURE))
  loss = jax.jit(lambda p, b: model.loss_fn(p, b, None, True)[0])
  hosts = [runs.records("multi", "finetune", p)[1] for p in range(2)]
  global_loss = float(loss(params, {k: np.concatenate([hosts[0][k], hosts[1][k]]) for k in hosts[0]}))
  per_process_loss = float(np.mean([loss(params, host) for host in hosts]))
  logged = next(r for r in runs.metrics("multi", "finetune") if r["step"] == 1)["loss"]
  assert abs(logged - global_loss) <= TOLERANCE
  assert abs(global_loss - per_process_loss) > 0.05, (global_loss, per_process_loss)


@uses_runs
@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_losses_and_params_match_one_process(runs, job):
  steps = runs.steps(job)
  single = {r["step"]: r for r in runs.metrics("single", job)}
  multi = {r["step"]: r for r in runs.metrics("multi", job)}
  assert sorted(multi) == list(range(1, steps + 1)) and set(multi) <= set(single)
  for step in multi:
    assert single[step].keys() == multi[step].keys()
    for name in single[step].keys() - TIMING_METRICS - {"step"}:
      np.testing.assert_allclose(multi[step][name], single[step][name], rtol=TOLERANCE, atol=TOLERANCE,
                                 err_msg=f"{job} step {step} {name}")
  assert _max_difference(runs.params("multi", job, steps), runs.params("single", job, steps)) <= TOLERANCE
  # Both started from the same params, and training moved them: a match of untrained params would prove little.
  initial = runs.params("single", job, "initial")
  assert _max_difference(runs.params("multi", job, "initial"), initial) <= TOLERANCE
  assert _max_difference(runs.params("single", job, steps), initial) > 1e-3


@uses_runs
def test_checkpoints_restore_across_process_counts(runs):
  """The pre-training state (params and AdamW moments of encoder and decoder) of the 1-process run restored by
  the 2 processes, and that of the 2-process run by 1 process, each with its own mesh's shardings, by a relaunch
  of the job that finds its run complete. (Fine-tuning saves its state the same way.)"""
  cases = [("multi_from_single", runs.params("single", "pretrain", mp_common.PRETRAIN_STEPS)),
           ("single_from_multi", runs.params("multi", "pretrain", runs.stop_step))]
  for restored, expected in cases:
    assert not runs.records(restored, "pretrain"), f"{restored} trained instead of restoring"
    got = runs.params(restored, "pretrain")
    assert got.keys() == expected.keys()
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{restored} {key}")
  assert "resumed from" in runs.logs[0]


@uses_runs
def test_encoding_over_two_processes_matches_one(runs):
  from mote_jax.retrieval import EmbeddingStore
  single = EmbeddingStore.open(runs.work / "single" / "encode")
  multi = EmbeddingStore.open(runs.work / "multi" / "encode")
  assert multi.ids == single.ids and len(single.ids) == 45
  np.testing.assert_allclose(multi.load(), single.load(), atol=TOLERANCE, rtol=0)
  assert [s["encode"]["shards_encoded"] for s in runs.status] == [3, 2]  # shards 0, 2, 4 and 1, 3


@uses_runs
def test_files_are_written_once_by_process_zero(runs):
  writes = [status["writes"] for status in runs.status]
  for job in ("pretrain", "finetune"):
    for name in ("config.gin", "metrics.jsonl"):
      assert f"multi/{job}/{name}" in writes[0]
    steps = [r["step"] for r in runs.metrics("multi", job)]
    assert len(steps) == len(set(steps))  # one writer: no record twice
    assert list((runs.work / "multi" / job / "tensorboard").iterdir())
  assert "multi/finetune/operative_config.gin" in writes[0]  # (the stopped pre-training never got there)
  assert any(re.match(r"multi/finetune/\.hf\.tmp-[^/]+/passage/config\.json$", w) for w in writes[0])
  # BM25 is sharded: each process wrote its own part of the run into the shared cache, and only its own.
  part = r"multi/finetune/cache/bm25/scifact-train-[^/]+/\.?part-{:05d}-of-00002\.npz"
  for p in (0, 1):
    assert any(re.match(part.format(p), w) for w in writes[p]), writes[p]
    assert not any(re.match(part.format(1 - p), w) for w in writes[p])
  # Process 1 wrote nothing else of the runs' own files but the metadata of its checkpoint shards (the shards
  # themselves go through tensorstore, not Python)...
  others = [w for w in writes[1]
            if w.startswith(("multi/pretrain/", "multi/finetune/")) and not re.match(part.format(1), w)]
  assert all(re.search(r"/checkpoints/.*/array_metadatas/process_1$", w) for w in others), others
  # ... but the audit does see its writes: its own shards of the embedding store.
  assert any(w.startswith("multi/encode/") and "00001" in w for w in writes[1])

  # The export of the 2-process run holds its final params, gathered from both processes' shards.
  from safetensors.numpy import load_file
  from mote_jax.hf_interop import export_tower, load_mote_config
  hf = runs.work / "multi" / "finetune" / "hf"
  final = mp_common.unflatten(runs.params("multi", "finetune"))
  for expert in ("query", "passage"):
    exported = load_file(str(hf / expert / "model.safetensors"))
    expected = export_tower(load_mote_config(hf), final, expert)
    assert exported.keys() == expected.keys()
    for name in expected:
      np.testing.assert_array_equal(exported[name], expected[name], err_msg=f"{expert} {name}")


@uses_runs
def test_sigterm_on_one_process_stops_both_at_the_same_step(runs):
  assert [status["pretrain_exit"] for status in runs.status] == [143, 143]
  stops = [re.findall(r"stopped after saving a checkpoint of step (\d+)", log) for log in runs.logs]
  assert stops[0] == stops[1] == [str(runs.stop_step)], stops
  assert mp_common.SIGTERM_AFTER_STEP < runs.stop_step < mp_common.PRETRAIN_STEPS
  records = runs.work / "records" / "multi" / "pretrain"
  assert (records / "sigterm-sent-p1").exists() and not (records / "sigterm-sent-p0").exists()  # process 1 only
  # Without JAX's preemption service, the all-gathered vote: a flag on process 1 alone stops both.
  assert [status["allgather_vote"] for status in runs.status] == [[False, True], [False, True]]
  checkpoints = [p.name for p in (runs.work / "multi" / "pretrain" / "checkpoints").iterdir()]
  # complete (orbax renames a finished save), nothing else but the run's recorded data state
  assert sorted(checkpoints) == sorted([str(runs.stop_step), "data_state.json"])
  # Both trained exactly that many steps (their batch records) and the state matches the reference's at that step
  # (test_losses_and_params_match_one_process); the checkpoint restores (test_checkpoints_restore_...).


# --- gs:// run directories (one process; object storage faked) -------------------------------------------------


class _FakeObjectStore:
  """An etils.epath backend for gs:// paths that keeps objects under a local directory, and, like an object store,
  has neither appends nor renames (a writer that relies on them fails here)."""

  def __init__(self, root: Path):
    from etils.epath import backend
    self.root = root
    self._os = backend.os_backend
    self.writes: list[str] = []  # gs:// paths opened for writing, in order

  def local(self, path) -> str:
    path = os.fspath(path)
    assert path.startswith("gs://"), path
    return os.path.join(self.root, path[len("gs://"):])

  def open(self, path, mode):
    if "a" in mode or "+" in mode:
      raise OSError(f"{path}: an object store cannot append (mode {mode!r})")
    if "w" in mode or "x" in mode:
      self.writes.append(os.fspath(path))
      os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)  # object stores have no directories
    return self._os.open(self.local(path), mode)

  def rename(self, path, dst):
    raise OSError(f"{path}: an object store cannot rename")

  replace = rename

  def glob(self, path):
    return ["gs://" + os.path.relpath(p, self.root) for p in self._os.glob(self.local(path))]

  def walk(self, top, **kwargs):
    for directory, dirs, files in self._os.walk(self.local(top), **kwargs):
      yield "gs://" + os.path.relpath(directory, self.root), dirs, files

  def __getattr__(self, name):  # exists, isdir, listdir, makedirs, mkdir, rmtree, remove, stat (one path each)
    method = getattr(self._os, name)
    return lambda path, *args, **kwargs: method(self.local(path), *args, **kwargs)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs:// epath I/O goes to a local directory; orbax and TensorBoard (which would reach for the network) are
  pointed there too, after the directory they were given is recorded in `store.given`."""
  from clu import metric_writers
  from etils.epath import gpath
  import orbax.checkpoint as ocp
  store = _FakeObjectStore(tmp_path / "gcs")
  store.given = {"checkpoints": [], "tensorboard": []}
  original_backend = gpath._GPath._backend
  monkeypatch.setattr(gpath._GPath, "_backend",
                      property(lambda p: store if p._uri_scheme == "gs" else original_backend.fget(p)))
  real_manager, real_writer = ocp.CheckpointManager, metric_writers.SummaryWriter

  def manager(directory, *args, **kwargs):
    store.given["checkpoints"].append(os.fspath(directory))
    return real_manager(store.local(directory), *args, **kwargs)

  def writer(logdir, *args, **kwargs):
    store.given["tensorboard"].append(os.fspath(logdir))
    return real_writer(store.local(logdir), *args, **kwargs)

  monkeypatch.setattr(ocp, "CheckpointManager", manager)
  monkeypatch.setattr(metric_writers, "SummaryWriter", writer)
  return store


def _regression_trainer(model_dir: str, num_steps: int):
  """A linear regression on the 8-device mesh: the trainer's writers without a model to compile."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from mote_jax.partitioning import MeshConfig, Partitioner
  from mote_jax.training.optimizer import OptimizerConfig
  from mote_jax.training.trainer import Trainer, TrainerConfig

  class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
      kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.5), ("embed", "mlp")),
                          (8, 4))
      return x @ kernel

  def init(rng):
    return Linear().init(rng, jnp.ones((1, 8)))["params"]

  def loss_fn(params, batch, rng, deterministic):
    loss = jnp.mean((Linear().apply({"params": params}, batch["x"]) - batch["y"]) ** 2)
    return loss, {"mse": loss}

  partitioner = Partitioner.create(MeshConfig(data=8))
  params, shardings = partitioner.init(init, jax.random.PRNGKey(0))
  config = TrainerConfig(num_steps=num_steps, log_every=1, eval_every=0, checkpoint_every=2,
                         async_checkpointing=False, progress_bar=False)
  trainer = Trainer(config, OptimizerConfig(learning_rate=0.05, total_steps=num_steps), partitioner, loss_fn,
                    model_dir, shardings)
  return trainer, params, jax.eval_shape(lambda: nn.unbox(init(jax.random.PRNGKey(0))))


def _regression_batches(start):
  for step in range(start, 10**9):
    x = np.random.default_rng(step).standard_normal((16, 8)).astype(np.float32)
    yield {"x": x, "y": 2 * x[:, :4]}


def test_gs_model_dir_reaches_every_writer_whole(fake_gcs):
  """`run` with MODEL_DIR=gs://bucket/run: the job gets the string as given; config.gin, operative_config.gin,
  checkpoints, TensorBoard and metrics.jsonl land under gs://bucket/run (no "gs:/bucket" local directory), and a
  relaunch adds its records to metrics.jsonl without appending to an object."""
  from etils import epath
  from mote_jax import jobs
  from mote_jax.training.checkpointing import Checkpointer

  def job(model_dir):
    assert model_dir == "gs://bucket/run"
    for num_steps in (4, 6):  # a run, then a relaunch that resumes it
      trainer, params, abstract = _regression_trainer(model_dir, num_steps)
      checkpointer = Checkpointer(epath.Path(model_dir) / "checkpoints", save_every=2, async_save=False)
      state = trainer.restore_or_init(checkpointer, lambda: params, abstract)
      trainer.train(state, _regression_batches, checkpointer)
      checkpointer.close()
    return "done"

  assert jobs.run(job=job, model_dir="gs://bucket/run") == "done"
  root = Path(fake_gcs.local("gs://bucket/run"))
  assert (root / "config.gin").exists() and (root / "operative_config.gin").exists()
  records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert fake_gcs.given == {"checkpoints": ["gs://bucket/run/checkpoints"] * 2,
                            "tensorboard": ["gs://bucket/run/tensorboard"] * 2}
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["2", "4", "6"]
  assert list((root / "tensorboard").iterdir())
  assert not Path("gs:").exists()


def test_export_to_gs_builds_locally_and_copies(fake_gcs):
  from safetensors.numpy import load_file
  from mote_jax.hf_interop import export_tower, load_mote_config, serving_config, to_hf_anywhere
  from mote_jax.model import MoteConfig
  config = MoteConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                      max_position_embeddings=32, tower_mode="mote")
  params = mp_common.random_params(config)
  out = to_hf_anywhere(config, params, "gs://bucket/run/hf", tokenizer=None)
  assert os.fspath(out) == "gs://bucket/run/hf"
  assert fake_gcs.writes[-1] == "gs://bucket/run/hf/mote_config.json"  # the completion marker comes last
  assert {w.split("/hf/")[1] for w in fake_gcs.writes} >= {"query/model.safetensors", "passage/config.json"}
  local = Path(fake_gcs.local(out))
  assert load_mote_config(local) == serving_config(config)  # the serving lengths it was exported with
  for expert in ("query", "passage"):
    expected = export_tower(config, params, expert)
    exported = load_file(str(local / expert / "model.safetensors"))
    assert exported.keys() == expected.keys()
    for name in expected:
      np.testing.assert_array_equal(exported[name], expected[name], err_msg=f"{expert} {name}")
  with pytest.raises(FileExistsError):
    to_hf_anywhere(config, params, "gs://bucket/run/hf", tokenizer=None)
  to_hf_anywhere(config, params, "gs://bucket/run/hf", tokenizer=None, overwrite=True)


def test_jobs_derive_gs_paths_from_model_dir(fake_gcs, monkeypatch, data_dir, minilm_path, tmp_path):
  """The pre-training and fine-tuning jobs with MODEL_DIR=gs://...: checkpoints under it (each job is stopped
  when it builds its Checkpointer), the BM25 cache written there and read back; a missing gs:// input is named
  before any work."""
  from mote_jax.jobs import finetune as finetune_job
  from mote_jax.jobs import pretrain as pretrain_job

  class Built(Exception):
    pass

  built = []

  def checkpointer(directory, **kwargs):
    built.append(os.fspath(directory))
    raise Built()

  monkeypatch.setattr(pretrain_job, "Checkpointer", checkpointer)
  monkeypatch.setattr(finetune_job, "Checkpointer", checkpointer)
  monkeypatch.setenv("MOTE_JAX_LOCAL_CACHE", str(tmp_path / "local_cache"))  # where gs:// cache entries are mapped
  with pytest.raises(Built):
    mp_common.run_job(mp_common.pretrain_flags("gs://bucket/pre", data_dir))
  assert built == ["gs://bucket/pre/checkpoints"]
  assert Path(fake_gcs.local("gs://bucket/pre/config.gin")).exists()

  bert_dir = mp_common.make_tiny_bert(tmp_path / "tiny_bert", minilm_path)
  with pytest.raises(Built):
    mp_common.run_job(mp_common.finetune_flags("gs://bucket/ft", data_dir, bert_dir))
  assert built[-1] == "gs://bucket/ft/checkpoints"
  (cache,) = [w for w in fake_gcs.writes if w.startswith("gs://bucket/ft/cache/bm25/scifact-train-")
              and w.endswith("/part-00000-of-00001.npz")]
  tokens = [w for w in fake_gcs.writes if w.startswith("gs://bucket/ft/cache/tokens/")]
  assert {w.rsplit("/", 1)[1] for w in tokens} == {"ids.npy", "offsets.npy", "meta.json"}
  assert tokens[-1].endswith("meta.json")  # the completion mark comes last
  data = finetune_job.training_groups(str(data_dir / "scifact"), "train", num_negatives=4,
                                      cache_dir="gs://bucket/ft/cache")  # read back from the cache
  assert len(data) == 809 and fake_gcs.writes.count(cache) == 1

  # Evaluation and mining outputs go to gs:// too now (tests/test_gcs.py runs them against a GCS emulator); an
  # input that does not exist stops the job, named, before any work (no Checkpointer built).
  with pytest.raises(FileNotFoundError, match="finetune.eval_data: gs://bucket/nope/corpus.jsonl"):
    mp_common.run_job([*mp_common.finetune_flags("gs://bucket/ft2", data_dir, bert_dir),
                       "--gin.finetune.eval_data=gs://bucket/nope"])
  assert built[-1] == "gs://bucket/ft/checkpoints"
  assert finetune_job.mined_negatives_path("gs://bucket/ft") == "gs://bucket/ft/mined_negatives.jsonl"


@pytest.mark.slow  # about 110 s on the shared 2-core machine (two JAX processes start, each builds the groups)
def test_bm25_negatives_are_sharded_over_two_processes(tmp_path, data_dir):
  """2 processes x 4 devices build SciFact train's BM25 groups: each retrieves its half of the queries (process 0
  the first half), both get the same groups, equal to those of one process retrieving every query itself."""
  from mote_jax.jobs.finetune import training_groups
  from mote_jax.retrieval.beir import load_beir
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  port = _free_port()
  script = REPO / "tests" / "multiprocess" / "bm25_worker.py"
  logs = [tmp_path / f"bm25_worker{i}.log" for i in range(2)]
  workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(port), str(i), str(data_dir)],
                              cwd=REPO, env=env, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT)
             for i in range(2)]
  try:
    reference = training_groups(str(data_dir / "scifact"), "train", num_negatives=4).groups  # no cache, 1 process
    for worker in workers:
      worker.wait(timeout=600)
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.wait()
  for i, worker in enumerate(workers):
    assert worker.returncode == 0, f"BM25 worker {i} failed:\n{logs[i].read_text()[-5000:]}"
  queries = list(load_beir(data_dir / "scifact", "train").queries.values())
  half = len(queries) // 2
  records = [json.loads((tmp_path / f"retrieved-p{i}.json").read_text()) for i in range(2)]
  assert [(r["processes"], r["devices"], r["local_devices"]) for r in records] == [(2, 8, 4)] * 2
  assert records[0]["queries"] == queries[:half] and records[1]["queries"] == queries[half:]
  assert sorted(p.name for p in (tmp_path / "cache" / "bm25").glob("*/part-*")) == [
      "part-00000-of-00002.npz", "part-00001-of-00002.npz"]
  for i in range(2):
    groups = np.load(tmp_path / f"groups-p{i}.npz")
    assert tuple(groups["query_ids"]) == reference.query_ids
    for name in ("positive_offsets", "positives", "negative_offsets", "negatives", "judged_offsets", "judged"):
      np.testing.assert_array_equal(groups[name], getattr(reference, name), err_msg=f"process {i}: {name}")
