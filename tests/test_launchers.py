"""The launchers in launch/: golden dry-run output, argument errors, quoting, and the commands run for real
against stand-ins (fake gcloud, ssh, sbatch, srun, python) that record what they were given.

Regenerate the golden files with `UPDATE_GOLDEN=1 python -m pytest tests/test_launchers.py`.
"""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
GOLDEN = Path(__file__).resolve().parent / "golden" / "launchers"
sys.path.insert(0, str(LAUNCH))  # the scripts import their shared module, launch/_launchers.py


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"mote_launch_{name}", LAUNCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


SCRIPTS = {name: _load(name) for name in ("tpu_vm", "slurm", "multinode")}

NOTE = "--gin.run.note=it's \"quoted\" & $HOME; a b"  # quotes, spaces and shell metacharacters
PRETRAIN = ["--gin_file=runs/pretrain_cotmote.gin", "--gin.MODEL_DIR=gs://BUCKET/cotmote",
            "--gin.CORPUS=gs://BUCKET/msmarco/corpus.jsonl"]
TPU = ["--zone=us-central2-b", "--project=my-project"]

CASES = {
    "tpu_vm_up_v4_64": ("tpu_vm", ["up", "cotmote", *TPU, "--accelerator-type=v4-64", "--spot",
                                   "--source=/home/me/mote_jax", "--env=TPU_STDERR_LOG_LEVEL=2", "--dry-run",
                                   "--", *PRETRAIN, NOTE]),
    "tpu_vm_create_v5p": ("tpu_vm", ["create", "cotmote-v5p", "--zone=us-east5-a", "--accelerator-type=v5p-64",
                                     "--preemptible", "--create-option=--service-account=tpu@my-project.iam"
                                     ".gserviceaccount.com", "--create-option=--internal-ips", "--dry-run"]),
    "tpu_vm_install_git": ("tpu_vm", ["install", "cotmote", *TPU, "--git-url=https://github.com/me/mote_jax.git",
                                      "--git-ref=v0.1.0", "--remote-dir=code/mote", "--dry-run"]),
    "tpu_vm_run_no_follow": ("tpu_vm", ["run", "cotmote", "--zone=us-central2-b", "--no-follow", "--dry-run",
                                        "--", "--gin_file=runs/finetune_scifact_cpu.gin",
                                        "--gin.MODEL_DIR=gs://BUCKET/ft", "--distributed"]),
    "tpu_vm_logs": ("tpu_vm", ["logs", "cotmote", *TPU, "--worker=all", "--dry-run"]),
    "tpu_vm_stop": ("tpu_vm", ["stop", "cotmote", *TPU, "--dry-run"]),
    "tpu_vm_delete": ("tpu_vm", ["delete", "cotmote", *TPU, "--yes", "--dry-run"]),
    "slurm_per_node": ("slurm", ["--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--time=2-00:00:00",
                                 "--account=my-account", "--job-name=cotmote", "--output=logs/%x-%j.out",
                                 "--cpus-per-task=32", "--sbatch-option=--exclusive",
                                 "--sbatch-option=--signal=TERM@300",
                                 "--setup=source ~/venvs/mote/bin/activate",
                                 "--env=XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true", "--dry-run",
                                 "--", "--gin_file=runs/pretrain_cotmote.gin", "--gin.MODEL_DIR=/shared/runs/cotmote",
                                 "--gin.CORPUS=/shared/msmarco/corpus.jsonl", NOTE]),
    "slurm_per_gpu": ("slurm", ["--nodes=2", "--gpus-per-node=4", "--process-per=gpu", "--coordinator-port=23456",
                                "--chdir=/shared/mote_jax", "--srun-option=--container-image=nvcr.io#me/mote:latest",
                                "--python=/opt/venv/bin/python", "--script=jobs/ft.sbatch", "--dry-run",
                                "--", "--gin_file=runs/finetune_scifact_cpu.gin", "--gin.MODEL_DIR=/shared/runs/ft"]),
    "multinode_run": ("multinode", ["run", "--hosts=gpu1,alice@gpu2,gpu3", "--workdir=/shared/mote_jax",
                                    "--coordinator-port=23456", "--python=.venv/bin/python",
                                    "--env=NCCL_DEBUG=WARN", "--dry-run",
                                    "--", "--gin_file=runs/pretrain_cotmote.gin",
                                    "--gin.MODEL_DIR=/shared/runs/cotmote", NOTE]),
    "multinode_run_setup": ("multinode", ["run", "--hosts=10.0.0.1,10.0.0.2", "--workdir=mote_jax",
                                          "--coordinator-host=10.0.0.1", "--ssh=ssh -p 2222", "--no-follow",
                                          "--setup=source ~/venvs/mote/bin/activate", "--dry-run",
                                          "--", "--gin_file=runs/pretrain_tiny_smoke.gin",
                                          "--gin.MODEL_DIR=/tmp/smoke"]),
    "multinode_logs": ("multinode", ["logs", "--hosts=gpu1,gpu2", "--workdir=/shared/mote_jax", "--process=1",
                                     "--dry-run"]),
    "multinode_stop": ("multinode", ["stop", "--hosts=gpu1,gpu2", "--workdir=/shared/mote_jax", "--signal=INT",
                                     "--dry-run"]),
}


def _dry_run(script: str, argv: list[str], capsys) -> str:
  assert SCRIPTS[script].main(argv) == 0
  captured = capsys.readouterr()
  assert captured.err == ""
  return captured.out


def _golden_text(script: str, argv: list[str], output: str) -> str:
  return f"$ {shlex.join(['python', f'launch/{script}.py', *argv])}\n{output}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_matches_golden(case, capsys):
  script, argv = CASES[case]
  text = _golden_text(script, argv, _dry_run(script, argv, capsys))
  path = GOLDEN / f"{case}.txt"
  if os.environ.get("UPDATE_GOLDEN"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1"
  assert text == path.read_text(), f"{case}: output differs from {path} (UPDATE_GOLDEN=1 regenerates it)"


def test_every_golden_file_has_a_case():
  assert sorted(p.stem for p in GOLDEN.glob("*.txt")) == sorted(CASES)


ERRORS = [
    ("tpu_vm", ["create", "cotmote", "--accelerator-type=v4-8"], "the following arguments are required: --zone"),
    ("tpu_vm", ["create", "cotmote", "--zone=z"], "the following arguments are required: --accelerator-type"),
    ("tpu_vm", ["create", "cotmote", "--zone=z", "--accelerator-type=v4-8", "--spot", "--preemptible"],
     "not allowed with argument"),
    ("tpu_vm", ["create", "Bad_Name", "--zone=z", "--accelerator-type=v4-8"], "TPU name 'Bad_Name'"),
    ("tpu_vm", ["create", "cotmote", "--zone=z", "--accelerator-type=tpu4"], "--accelerator-type 'tpu4'"),
    ("tpu_vm", ["run", "cotmote", "--zone=z"], "go after `--`"),
    ("tpu_vm", ["run", "cotmote", "--zone=z", "--", "--gin.MODEL_DIR=/x"], "no --gin_file"),
    ("tpu_vm", ["run", "cotmote", "--zone=z", "--", "--gin_file=a.gin", "--process_id=0"],
     "--process_id is set per process"),
    ("tpu_vm", ["run", "cotmote", "--zone=z", "--env=1X=2", "--", "--gin_file=a.gin"], "--env '1X=2'"),
    ("tpu_vm", ["run", "cotmote", "--zone=z", "--env=NOVALUE", "--", "--gin_file=a.gin"], "--env 'NOVALUE'"),
    ("tpu_vm", ["create", "cotmote", "--zone=z", "--accelerator-type=v4-8", "--create-option=reserved"],
     "--create-option 'reserved'"),
    ("tpu_vm", ["install", "cotmote", "--zone=z", "--remote-dir=~/mote"], "a quoted ~ does not expand"),
    ("tpu_vm", ["install", "cotmote", "--zone=z", "--source=.", "--git-url=u"], "not allowed with argument"),
    ("tpu_vm", ["logs", "cotmote", "--zone=z", "--worker=first"], "--worker 'first'"),
    ("tpu_vm", ["delete", "cotmote", "--zone=z", "--", "--gin_file=a.gin"], "delete takes no launch flags"),
    ("tpu_vm", ["destroy", "cotmote"], "invalid choice: 'destroy'"),
    ("slurm", ["--gpus-per-node=8", "--", "--gin_file=a.gin"], "the following arguments are required: --nodes"),
    ("slurm", ["--nodes=2", "--gpus-per-node=0", "--", "--gin_file=a.gin"], "expected a positive integer"),
    ("slurm", ["--nodes=2", "--gpus-per-node=8", "--process-per=core", "--", "--gin_file=a.gin"],
     "invalid choice: 'core'"),
    ("slurm", ["--nodes=2", "--gpus-per-node=8"], "go after `--`"),
    ("slurm", ["--nodes=2", "--gpus-per-node=8", "--job-name=my job", "--", "--gin_file=a.gin"],
     "--job-name 'my job'"),
    ("slurm", ["--nodes=2", "--gpus-per-node=8", "--sbatch-option=exclusive", "--", "--gin_file=a.gin"],
     "'exclusive'"),
    ("multinode", ["run", "--", "--gin_file=a.gin"], "the following arguments are required: --hosts"),
    ("multinode", ["run", "--hosts=a,,b", "--", "--gin_file=a.gin"], "empty host name"),
    ("multinode", ["run", "--hosts=a,b,a", "--", "--gin_file=a.gin"], "a host appears twice"),
    ("multinode", ["run", "--hosts=a,b", "--", "--gin_file=a.gin", "--coordinator_address=a:1"],
     "--coordinator_address is set per process"),
    ("multinode", ["run", "--hosts=a,b", "--coordinator-port=70000", "--", "--gin_file=a.gin"], "not a TCP port"),
    ("multinode", ["logs", "--hosts=a,b", "--process=2"], "there are 2 hosts"),
    ("multinode", ["stop", "--hosts=a,b", "--", "--gin_file=a.gin"], "stop takes no launch flags"),
]


def _with_dry_run(argv: list[str]) -> list[str]:
  """`argv` with --dry-run among the launcher's own flags (before any `--`)."""
  cut = argv.index("--") if "--" in argv else len(argv)
  return [*argv[:cut], "--dry-run", *argv[cut:]]


@pytest.mark.parametrize("script,argv,message", ERRORS, ids=[f"{s}:{' '.join(a)[:40]}" for s, a, _ in ERRORS])
def test_argument_errors(script, argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    SCRIPTS[script].main(_with_dry_run(argv))
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "usage:" in captured.err and message in captured.err, captured.err


def _remote_commands(output: str) -> list[str]:
  """The remote shell commands of the printed gcloud/ssh lines (the --command value or ssh's last word)."""
  commands = []
  for line in output.splitlines():
    argv = shlex.split(line)
    if argv[0] == "gcloud" and "--command" in argv:
      commands.append(argv[argv.index("--command") + 1])
    elif argv[0] == "ssh":
      commands.append(argv[-1])
  return commands


def test_quoting_round_trips_through_two_shells(capsys):
  launch = ["--gin_file=runs/pretrain_cotmote.gin", NOTE, "--gin.x.empty=", "--gin.x.path=/a b/c'd"]
  tpu = _dry_run("tpu_vm", ["run", "cotmote", "--zone=z", "--dry-run", "--", *launch], capsys)
  multi = _dry_run("multinode", ["run", "--hosts=a,b", "--workdir=/w", "--dry-run", "--", *launch], capsys)
  starts = [c for c in _remote_commands(tpu) + _remote_commands(multi) if "nohup" in c]
  assert len(starts) == 3
  for command in starts:
    words = shlex.split(command)
    start = words.index("mote_jax.launch") + 1
    assert words[start:start + len(launch)] == launch


def test_quoting_in_the_sbatch_script(capsys):
  launch = ["--gin_file=runs/pretrain_cotmote.gin", NOTE]
  output = _dry_run("slurm", ["--nodes=2", "--gpus-per-node=8", "--dry-run", "--", *launch], capsys)
  srun = [line for line in output.splitlines() if line.startswith("srun ")]
  assert len(srun) == 1
  assert shlex.split(srun[0])[-3:] == [*launch, "--distributed"]


def test_default_tpu_runtime_by_generation():
  runtime = SCRIPTS["tpu_vm"].default_runtime
  assert runtime("v4-64") == "tpu-ubuntu2204-base"
  assert runtime("v5p-64") == "v2-alpha-tpuv5"
  assert runtime("v5litepod-16") == "v2-alpha-tpuv5-lite"
  assert runtime("v6e-16") == "v2-alpha-tpuv6e"


# --- the commands run for real, against stand-ins ------------------------------------------------------------

def _stand_in(path: Path, body: str) -> Path:
  """An executable Python script at `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(f"#!{sys.executable}\nimport json, os, sys\n{body}\n")
  path.chmod(0o755)
  return path


RECORD_ARGV = "json.dump(sys.argv[1:], open(f'argv-{os.getpid()}.json', 'w'))"


def _recorded_argvs(directory: Path, count: int) -> list[list[str]]:
  """The argv lists that fake pythons (started in the background) wrote to `directory`, waiting up to 10 s."""
  deadline = time.monotonic() + 10
  while len(list(directory.glob("argv-*.json"))) < count and time.monotonic() < deadline:
    time.sleep(0.02)
  files = sorted(directory.glob("argv-*.json"))
  assert len(files) == count, f"{len(files)} of {count} processes started"
  for _ in range(100):  # the file exists before json.dump finished writing it
    try:
      return [json.loads(f.read_text()) for f in files]
    except json.JSONDecodeError:
      time.sleep(0.02)
  raise AssertionError("unreadable argv record")


def test_tpu_run_command_in_a_real_shell(tmp_path, capsys):
  """The remote command, run by bash in a stand-in home directory: detached start, log, pid file, guard."""
  launch = ["--gin_file=runs/pretrain_cotmote.gin", NOTE]
  output = _dry_run("tpu_vm", ["run", "cotmote", "--zone=z", "--env=MOTE_X=a b", "--dry-run", "--", *launch], capsys)
  start, follow = _remote_commands(output)
  checkout = tmp_path / "mote_jax"
  _stand_in(checkout / ".venv" / "bin" / "python",
            f"{RECORD_ARGV}\nprint('MOTE_X=' + os.environ['MOTE_X'])")
  done = subprocess.run(["bash", "-c", start], cwd=tmp_path, capture_output=True, text=True, timeout=10)
  assert done.returncode == 0, done.stderr
  assert "started pid" in done.stdout
  [argv] = _recorded_argvs(checkout, 1)
  assert argv == ["-m", "mote_jax.launch", *launch, "--distributed"]
  assert (checkout / "run.pid").read_text().strip().isdigit()
  deadline = time.monotonic() + 10
  while "MOTE_X=a b" not in (checkout / "run.log").read_text() and time.monotonic() < deadline:
    time.sleep(0.02)
  assert "MOTE_X=a b" in (checkout / "run.log").read_text()
  assert follow == "cd mote_jax && tail -n 100 -F run.log"

  (checkout / "run.pid").write_text(f"{os.getpid()}\n")  # a live process: the run must not start twice
  again = subprocess.run(["bash", "-c", start], cwd=tmp_path, capture_output=True, text=True, timeout=10)
  assert again.returncode == 1 and "already runs" in again.stderr
  assert len(list(checkout.glob("argv-*.json"))) == 1


def test_slurm_script_under_fake_srun(tmp_path):
  """The sbatch script, run by bash with stand-in scontrol and srun: coordinator, devices, argv."""
  launch = ["--gin_file=runs/pretrain_cotmote.gin", NOTE]
  bin_dir = tmp_path / "bin"
  _stand_in(bin_dir / "scontrol", "assert sys.argv[1:] == ['show', 'hostnames', 'node[007-008]']\n"
                                  "print('node007'); print('node008')")
  _stand_in(bin_dir / "srun", "json.dump(dict(argv=sys.argv[1:], coordinator=os.environ['JAX_COORDINATOR_ADDRESS'], "
                              "devices=os.environ['JAX_LOCAL_DEVICE_IDS']), open('srun.json', 'w'))")
  script = SCRIPTS["slurm"].render_script(SCRIPTS["slurm"].parse_flags(["--nodes=2", "--gpus-per-node=4", "--",
                                                                        *launch]))
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="1000",
             SLURM_JOB_NODELIST="node[007-008]")
  done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=10)
  assert done.returncode == 0, done.stderr
  record = json.loads((tmp_path / "srun.json").read_text())
  assert record["coordinator"] == f"node007:{1000 % 4096 + 61440}"
  assert record["devices"] == "0,1,2,3"
  assert record["argv"] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m", "mote_jax.launch",
                            *launch, "--distributed"]


def test_slurm_dry_run_output_is_the_submission(tmp_path, capsys):
  """Running the printed dry run (with a stand-in sbatch) writes the same script that submitting writes."""
  launch = ["--gin_file=runs/pretrain_cotmote.gin", NOTE]
  output = _dry_run("slurm", ["--nodes=2", "--gpus-per-node=4", "--output=logs/%j.out", "--dry-run",
                              "--", *launch], capsys)
  bin_dir = tmp_path / "bin"
  _stand_in(bin_dir / "sbatch", "open('sbatch.json', 'w').write(json.dumps(sys.argv[1:]))")
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  by_shell, by_script = tmp_path / "shell", tmp_path / "script"
  by_shell.mkdir(), by_script.mkdir()
  subprocess.run(["bash", "-c", output], cwd=by_shell, env=env, check=True, timeout=10)
  submit = subprocess.run([sys.executable, str(LAUNCH / "slurm.py"), "--nodes=2", "--gpus-per-node=4",
                           "--output=logs/%j.out", "--", *launch],
                          cwd=by_script, env=env, capture_output=True, text=True, timeout=10)
  assert submit.returncode == 0, submit.stderr
  for directory in (by_shell, by_script):
    assert json.loads((directory / "sbatch.json").read_text()) == ["mote_jax.sbatch"]
    assert (directory / "logs").is_dir()
  assert (by_shell / "mote_jax.sbatch").read_text() == (by_script / "mote_jax.sbatch").read_text()


def test_multinode_runs_over_fake_ssh(tmp_path):
  """Not a dry run: each host's command goes through a stand-in ssh that runs it here; every process starts."""
  workdir = tmp_path / "work"
  _stand_in(workdir / "fake-python", RECORD_ARGV)
  ssh = _stand_in(tmp_path / "fake-ssh", "host, command = sys.argv[-2:]\n"
                                         "sys.exit(os.spawnvp(os.P_WAIT, 'bash', ['bash', '-c', command]))")
  launch = ["--gin_file=runs/pretrain_cotmote.gin", NOTE]
  done = subprocess.run([sys.executable, str(LAUNCH / "multinode.py"), "run", "--hosts=h0,h1,h2",
                         f"--workdir={workdir}", f"--ssh={ssh}", "--python=./fake-python", "--no-follow",
                         "--", *launch], capture_output=True, text=True, timeout=20)
  assert done.returncode == 0, done.stderr
  assert done.stderr.count("+ ") == 3
  argvs = sorted(_recorded_argvs(workdir, 3), key=lambda argv: argv[-1])
  for i, argv in enumerate(argvs):
    assert argv == ["-m", "mote_jax.launch", *launch, "--coordinator_address=h0:12345", "--num_processes=3",
                    f"--process_id={i}"]
    assert (workdir / "logs" / f"process-{i}.pid").exists()


def test_tpu_vm_runs_the_printed_commands(tmp_path, capsys):
  """Not a dry run: a stand-in gcloud receives exactly the dry run's commands; a failure stops the rest."""
  argv = ["up", "cotmote", *TPU, "--accelerator-type=v4-64", f"--source={REPO}", "--no-follow",
          "--", "--gin_file=runs/pretrain_cotmote.gin", NOTE]
  printed = [shlex.split(line) for line in _dry_run("tpu_vm", _with_dry_run(argv), capsys).splitlines()]
  bin_dir = tmp_path / "bin"
  _stand_in(bin_dir / "gcloud", "open(os.environ['GCLOUD_LOG'], 'a').write(json.dumps(sys.argv) + '\\n')\n"
                                "sys.exit(int(os.environ.get('GCLOUD_FAIL_ON', '') in sys.argv))")
  _stand_in(bin_dir / "tar", "open(os.environ['GCLOUD_LOG'], 'a').write(json.dumps(sys.argv) + '\\n')")
  log = tmp_path / "calls.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GCLOUD_LOG=str(log))
  done = subprocess.run([sys.executable, str(LAUNCH / "tpu_vm.py"), *argv], env=env, capture_output=True,
                        text=True, timeout=20)
  assert done.returncode == 0, done.stderr
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert [[Path(call[0]).name, *call[1:]] for call in calls] == printed

  log.unlink()
  failed = subprocess.run([sys.executable, str(LAUNCH / "tpu_vm.py"), *argv], env=dict(env, GCLOUD_FAIL_ON="scp"),
                          capture_output=True, text=True, timeout=20)
  assert failed.returncode == 1 and "error: exit status 1 from: gcloud compute tpus tpu-vm scp" in failed.stderr
  assert [Path(call[0]).name for call in map(json.loads, log.read_text().splitlines())] == ["gcloud", "tar", "gcloud"]


def test_missing_program_is_named(capsys):
  code = SCRIPTS["multinode"].main(["stop", "--hosts=a", "--workdir=/w", "--ssh=no-such-ssh-program -p 22"])
  assert code == 127
  assert "error: no-such-ssh-program not found" in capsys.readouterr().err


def test_scripts_have_help():
  for name in SCRIPTS:
    done = subprocess.run([sys.executable, str(LAUNCH / f"{name}.py"), "--help"], capture_output=True, text=True,
                          timeout=10)
    assert done.returncode == 0 and "usage:" in done.stdout and "--dry-run" in done.stdout, done.stderr
