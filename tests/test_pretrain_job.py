"""The pre-training job through `python -m mote_jax.launch`: outputs, kill -9 resume, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _command(model_dir, data_dir, *extra):
  # The corpus comes from the `data_dir` fixture (MOTE_DATA_DIR), not from the config's path relative to the checkout.
  return [sys.executable, "-m", "mote_jax.launch", "--gin_file=runs/pretrain_tiny_smoke.gin",
          f"--gin.MODEL_DIR={model_dir}",
          f"--gin.spans/register_beir_corpus_task.corpus={data_dir / 'scifact' / 'corpus.jsonl'}", *extra]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # one CPU device: the job's own mesh; sharding is covered elsewhere
  return env


def _run(model_dir, data_dir, *extra, check=True):
  result = subprocess.run(_command(model_dir, data_dir, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


def _start(model_dir, data_dir, *extra):
  return subprocess.Popen(_command(model_dir, data_dir, *extra), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(model_dir, step, process, timeout=300):
  deadline = time.time() + timeout
  while not (Path(model_dir) / "checkpoints" / str(step)).is_dir():  # orbax renames when complete
    assert process.poll() is None, process.stderr.read()[-4000:]
    assert time.time() < deadline, f"no checkpoint {step} after {timeout}s"
    time.sleep(0.05)


def _final_params(model_dir, step):
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(Path(model_dir).absolute() / "checkpoints" / str(step) / "default")
  leaves = {}

  def collect(prefix, tree):
    if isinstance(tree, dict):
      for k, v in tree.items():
        collect(f"{prefix}/{k}", v)
    else:
      leaves[prefix] = np.asarray(tree)

  collect("", restored["params"])
  return leaves


STEPS = ["--gin.NUM_STEPS=24", "--gin.TrainerConfig.checkpoint_every=4"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
  model_dir = tmp_path_factory.mktemp("straight")
  _run(model_dir, data_dir, *STEPS)
  return model_dir


def test_outputs(straight_run):
  records = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == list(range(2, 25, 2))
  for key in ("encoder_mlm_loss", "decoder_mlm_loss", "encoder_mlm_accuracy", "learning_rate", "grad_norm",
              "steps_per_sec", "tokens_per_sec"):
    assert key in train[-1], key
  evals = [r for r in records if "eval/loss" in r] if any("eval/loss" in r for r in records) else []
  assert (straight_run / "tensorboard").is_dir() and list((straight_run / "tensorboard").iterdir())
  assert sorted(int(p.name) for p in (straight_run / "checkpoints").iterdir() if p.name.isdigit()) == \
      [4, 8, 12, 16, 20, 24]
  assert "pretrain.streams" in (straight_run / "config.gin").read_text()
  operative = (straight_run / "operative_config.gin").read_text()
  assert "NUM_STEPS = 24" in operative and "TrainerConfig.num_steps = %NUM_STEPS" in operative
  for tower in ("query", "passage"):
    assert (straight_run / "hf" / tower / "model.safetensors").exists()
  del evals


@pytest.mark.slow  # a second pre-training run, killed and relaunched: ~90 s on 2 cores (SIGTERM's checkpoint stays in the default tier)
def test_kill_9_then_relaunch_matches_an_uninterrupted_run(straight_run, tmp_path, data_dir):
  model_dir = tmp_path / "killed"
  process = _start(model_dir, data_dir, *STEPS)
  _wait_for_checkpoint(model_dir, 8, process)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert not (model_dir / "checkpoints" / "24").exists()
  result = _run(model_dir, data_dir, *STEPS)
  assert "resumed from" in result.stderr
  straight, resumed = _final_params(straight_run, 24), _final_params(model_dir, 24)
  assert straight.keys() == resumed.keys()
  assert max(np.abs(straight[k] - resumed[k]).max() for k in straight) <= 1e-6


def test_sigterm_saves_a_checkpoint_before_exit(tmp_path, data_dir):
  model_dir = tmp_path / "preempted"
  process = _start(model_dir, data_dir, "--gin.NUM_STEPS=100000", "--gin.TrainerConfig.checkpoint_every=1000")
  deadline = time.time() + 300
  def training_logged():  # a training record (not only the step-0 held-out evaluation)
    path = model_dir / "metrics.jsonl"
    return path.exists() and any('"loss"' in line and '"eval/' not in line for line in path.read_text().splitlines())

  while not training_logged():
    assert process.poll() is None, process.stderr.read()[-4000:]
    assert time.time() < deadline
    time.sleep(0.1)
  process.send_signal(signal.SIGTERM)
  stderr = process.communicate(timeout=120)[1]
  assert process.returncode == 143, stderr[-4000:]
  steps = [int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and steps[0] >= 2  # a checkpoint off the 1000-step interval: the SIGTERM save
  assert f"stopped after saving a checkpoint of step {steps[0]}" in stderr
