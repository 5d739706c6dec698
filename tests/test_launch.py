"""The launcher: t5x-style flags, gin parsing, and the import job end to end in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mote_jax.launch import _gin_value, find_gin_file, parse_flags

REPO = Path(__file__).resolve().parents[1]


def test_gin_flags_become_bindings():
  flags = parse_flags(["--gin_file=runs/a.gin", "--gin_file=b.gin", "--gin.MODEL_DIR=/tmp/x",
                       "--gin.run.seed=3", "--gin.MeshConfig.model=2", "--gin.x.name='quoted'",
                       "--gin.x.ref=@foo()", "--gin.x.flag=True", "--gin_search_paths=a,b"])
  assert flags.gin_file == ["runs/a.gin", "b.gin"]
  assert flags.gin_bindings == ["MODEL_DIR = '/tmp/x'", "run.seed = 3", "MeshConfig.model = 2",
                                "x.name = 'quoted'", "x.ref = @foo()", "x.flag = True"]
  assert flags.gin_search_paths == ["a", "b"]
  assert _gin_value("gs://bucket/run") == "'gs://bucket/run'"
  assert _gin_value("1e-4") == "1e-4"


def test_missing_gin_file_is_named():
  with pytest.raises(FileNotFoundError, match="--gin_file=runs/nope.gin"):
    find_gin_file("runs/nope.gin", [str(REPO / "t5x_configs")])
  assert find_gin_file("runs/import_minilm_mote.gin", [str(REPO / "t5x_configs")]).endswith("import_minilm_mote.gin")


def _launch(args, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "mote_jax.launch", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_import_job_end_to_end(tmp_path, data_dir):
  model_dir = tmp_path / "run"
  result = _launch(["--gin_file=runs/import_minilm_mote.gin", f"--gin.MODEL_DIR={model_dir}",
                    f"--gin.import_hf.check_corpus={data_dir}/scifact/corpus.jsonl",
                    "--gin.import_hf.num_check_texts=16", "--gin.import_hf.batch_size=8",
                    "--gin.MeshConfig.model=2"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh {'data': 4, 'model': 2}" in result.stderr
  assert "min cosine between experts 1.0000" in result.stderr
  assert json.loads((model_dir / "hf" / "mote_config.json").read_text())["tower_mode"] == "mote"
  for tower in ("query", "passage"):
    assert (model_dir / "hf" / tower / "model.safetensors").exists()
  operative = (model_dir / "operative_config.gin").read_text()
  assert "import_hf.tower_mode = 'mote'" in operative


def test_unknown_gin_binding_is_gins_error(tmp_path):
  result = _launch(["--gin_file=runs/import_minilm_mote.gin", f"--gin.MODEL_DIR={tmp_path}",
                    "--gin.import_hf.no_such_arg=1"], tmp_path)
  assert result.returncode != 0
  assert "no_such_arg" in result.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "t5x_configs" / "runs").glob("*.gin")))
def test_every_run_config_parses(name):
  """Each run file (some, like the stage-2 overlays, are added to another), its includes and every configurable it
  names parse; values are only checked when a job runs."""
  import gin
  from mote_jax import jobs  # noqa: F401  (registers the configurables)
  gin.clear_config()
  gin.add_config_file_search_path(str(REPO / "t5x_configs"))
  try:
    gin.parse_config_files_and_bindings([str(REPO / "t5x_configs" / "runs" / name)], [], finalize_config=False)
  finally:
    gin.clear_config()
