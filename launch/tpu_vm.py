#!/usr/bin/env python3
"""Cloud TPU VM slices (single host or pod) for mote_jax, through `gcloud compute tpus tpu-vm`.

  python launch/tpu_vm.py create  NAME --zone=Z --accelerator-type=v4-64 [--version=V] [--spot | --preemptible]
                                       [--create-option=--reserved ...]
  python launch/tpu_vm.py install NAME --zone=Z [--source=DIR | --git-url=URL [--git-ref=REF]]
  python launch/tpu_vm.py run     NAME --zone=Z [--env=K=V ...] [--no-follow] -- LAUNCH FLAGS
  python launch/tpu_vm.py logs    NAME --zone=Z [--worker=0]
  python launch/tpu_vm.py stop    NAME --zone=Z [--signal=TERM]
  python launch/tpu_vm.py delete  NAME --zone=Z [--yes]
  python launch/tpu_vm.py up      NAME --zone=Z --accelerator-type=... -- LAUNCH FLAGS   (create, install, run)

Every subcommand takes --project and --dry-run (print the commands, one per line, and run nothing).

install: packs the checkout (without .git, .venv, caches) into one tarball, copies it to every worker and
unpacks it into --remote-dir (default `mote_jax` in the home directory), or clones --git-url there; then
creates `.venv` with Python >= 3.11 (uv; the TPU images ship Python 3.10, which JAX no longer supports) and runs
`pip install -e '.[tpu]'` in it, on all workers at once.

run: starts `python -m mote_jax.launch LAUNCH FLAGS --distributed` on all workers (`--worker=all`), detached
(nohup), appending to --log (default run.log in --remote-dir) on each worker, then streams worker 0's log
(Ctrl-C stops the streaming, not the run). `jax.distributed.initialize()` finds the other workers itself.
MODEL_DIR must be storage every worker sees (gs://BUCKET/...).

stop: sends SIGTERM to the run on every worker (the trainer saves a checkpoint and exits; running the same
`run` again resumes).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import Sequence

import _launchers as common

TPU_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
ACCELERATOR_TYPE = re.compile(r"v\d+[a-z]*-\d+")
BUNDLE_EXCLUDES = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "build", "dist")
VENV_PYTHON = ".venv/bin/python"


def default_runtime(accelerator_type: str) -> str:
  """The TPU software version (runtime image) for a generation: v6e, v5p and v5e have their own."""
  generation = accelerator_type.split("-", 1)[0]
  if generation == "v6e":
    return "v2-alpha-tpuv6e"
  if generation == "v5p":
    return "v2-alpha-tpuv5"
  if generation in ("v5litepod", "v5e"):
    return "v2-alpha-tpuv5-lite"
  return "tpu-ubuntu2204-base"


# --- commands ------------------------------------------------------------------------------------------------

def gcloud(verb: str, flags: argparse.Namespace, *args: str, positional: Sequence[str] | None = None) -> list[str]:
  """`gcloud compute tpus tpu-vm VERB NAME --zone=Z [--project=P] ARGS` (`positional` instead of NAME: scp)."""
  argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *(positional or [flags.name]), f"--zone={flags.zone}"]
  if flags.project:
    argv.append(f"--project={flags.project}")
  return [*argv, *args]


def ssh(flags: argparse.Namespace, worker: str, command: str) -> list[str]:
  return gcloud("ssh", flags, f"--worker={worker}", "--command", command)


def create_commands(flags: argparse.Namespace) -> list[list[str]]:
  version = flags.version or default_runtime(flags.accelerator_type)
  argv = gcloud("create", flags, f"--accelerator-type={flags.accelerator_type}", f"--version={version}")
  if flags.spot:
    argv.append("--spot")
  if flags.preemptible:
    argv.append("--preemptible")
  return [[*argv, *flags.create_option]]


def bundle_path(flags: argparse.Namespace) -> str:
  return f"/tmp/mote_jax-{flags.name}.tar.gz"


def venv_and_pip(flags: argparse.Namespace) -> list[str]:
  """Shell steps (run in the checkout): a Python >= 3.11 venv made by uv if missing, then the editable install."""
  make_venv = (f"python3 -m pip install --user --quiet uv && "
               f"python3 -m uv venv --seed --python {shlex.quote(flags.python_version)} .venv")
  return [f"if [ ! -x {VENV_PYTHON} ]; then {make_venv}; fi",
          f"{VENV_PYTHON} -m pip install -e {shlex.quote(f'.[{flags.extras}]')}"]


def install_commands(flags: argparse.Namespace) -> list[list[str]]:
  remote = shlex.quote(flags.remote_dir)
  if flags.git_url:
    fetch = [f"(test -d {remote}/.git || git clone {shlex.quote(flags.git_url)} {remote})", f"cd {remote}",
             "git fetch --quiet origin", f"git checkout --quiet --detach {shlex.quote(flags.git_ref)}"]
    return [ssh(flags, "all", " && ".join([*fetch, *venv_and_pip(flags)]))]
  local, remote_bundle = bundle_path(flags), f"mote_jax-{flags.name}.tar.gz"
  tar = ["tar", "-czf", local, *(f"--exclude={pattern}" for pattern in BUNDLE_EXCLUDES), "-C", flags.source, "."]
  copy = gcloud("scp", flags, "--worker=all", positional=[local, f"{flags.name}:{remote_bundle}"])
  unpack = [f"mkdir -p {remote}", f"tar -xzf {remote_bundle} -C {remote}", f"rm -f {remote_bundle}", f"cd {remote}"]
  return [tar, copy, ssh(flags, "all", " && ".join([*unpack, *venv_and_pip(flags)]))]


def run_commands(flags: argparse.Namespace) -> list[list[str]]:
  extra = [] if "--distributed" in flags.launch_args else ["--distributed"]
  argv = common.launch_argv(flags.python, flags.launch_args, extra, flags.env)
  commands = [ssh(flags, "all", common.start_in_background(flags.remote_dir, argv, flags.log, flags.pid_file))]
  if not flags.no_follow:
    commands.append(ssh(flags, "0", common.follow_log(flags.remote_dir, flags.log)))
  return commands


def logs_commands(flags: argparse.Namespace) -> list[list[str]]:
  return [ssh(flags, flags.worker, common.follow_log(flags.remote_dir, flags.log))]


def stop_commands(flags: argparse.Namespace) -> list[list[str]]:
  return [ssh(flags, "all", common.signal_process(flags.remote_dir, flags.pid_file, flags.signal))]


def delete_commands(flags: argparse.Namespace) -> list[list[str]]:
  return [gcloud("delete", flags, *(["--quiet"] if flags.yes else []))]


def up_commands(flags: argparse.Namespace) -> list[list[str]]:
  return [*create_commands(flags), *install_commands(flags), *run_commands(flags)]


# --- flags ---------------------------------------------------------------------------------------------------

def _parents() -> dict[str, argparse.ArgumentParser]:
  """Flag groups shared between subcommands (argparse parents)."""
  base = argparse.ArgumentParser(add_help=False)
  base.add_argument("name", help="TPU VM name (lowercase letters, digits, hyphens)")
  base.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a (v5p)")
  base.add_argument("--project", help="GCP project (default: gcloud's configured one)")
  base.add_argument("--dry-run", action="store_true", help="print the commands, one per line; run nothing")

  remote = argparse.ArgumentParser(add_help=False)
  remote.add_argument("--remote-dir", default="mote_jax",
                      help="checkout on each worker, relative to the home directory (default: %(default)s)")

  files = argparse.ArgumentParser(add_help=False)
  files.add_argument("--log", default="run.log", help="log file in --remote-dir (default: %(default)s)")
  files.add_argument("--pid-file", default="run.pid", help="pid file in --remote-dir (default: %(default)s)")

  create = argparse.ArgumentParser(add_help=False)
  create.add_argument("--accelerator-type", required=True, help="e.g. v4-64, v5p-64, v5litepod-16, v6e-16")
  create.add_argument("--version", help="TPU software version (default: by generation: tpu-ubuntu2204-base, "
                                        "v2-alpha-tpuv5, v2-alpha-tpuv5-lite, v2-alpha-tpuv6e)")
  capacity = create.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="Spot capacity (can be reclaimed any time)")
  capacity.add_argument("--preemptible", action="store_true", help="preemptible capacity (older form of --spot)")
  create.add_argument("--create-option", action="append", default=[], metavar="OPTION",
                      help="extra `gcloud ... create` flag, e.g. --reserved, --internal-ips, "
                           "--service-account=SA (repeatable)")

  install = argparse.ArgumentParser(add_help=False)
  source = install.add_mutually_exclusive_group()
  source.add_argument("--source", default=str(common.REPO), help="local checkout to copy (default: this one)")
  source.add_argument("--git-url", help="clone this repository on each worker instead of copying --source")
  install.add_argument("--git-ref", default="origin/HEAD",
                       help="with --git-url: commit, tag or remote branch to check out (default: %(default)s)")
  install.add_argument("--python-version", default="3.11", help="Python of the workers' venv (default: %(default)s)")
  install.add_argument("--extras", default="tpu", help="pip extras to install (default: %(default)s)")

  run = argparse.ArgumentParser(add_help=False)
  common.add_env_flag(run)
  run.add_argument("--python", default=VENV_PYTHON,
                   help="interpreter, relative to --remote-dir (default: %(default)s)")
  run.add_argument("--no-follow", action="store_true", help="start the run without streaming worker 0's log")
  return dict(base=base, remote=remote, files=files, create=create, install=install, run=run)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="tpu_vm.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  p = _parents()
  groups = {
      "create": (create_commands, "create the TPU VM slice", ["base", "create"]),
      "install": (install_commands, "copy or clone the code to every worker and pip install it",
                  ["base", "remote", "install"]),
      "run": (run_commands, "start the run on every worker (flags for mote_jax.launch after --)",
              ["base", "remote", "files", "run"]),
      "logs": (logs_commands, "stream a worker's log", ["base", "remote", "files"]),
      "stop": (stop_commands, "signal the run on every worker", ["base", "remote", "files"]),
      "delete": (delete_commands, "delete the TPU VM slice", ["base"]),
      "up": (up_commands, "create + install + run", ["base", "remote", "files", "create", "install", "run"]),
  }
  for command, (handler, help_text, parents) in groups.items():
    subparser = sub.add_parser(command, help=help_text, description=help_text,
                               parents=[p[name] for name in parents],
                               epilog=common.LAUNCH_EPILOG if command in ("run", "up") else None)
    subparser.set_defaults(handler=handler, subparser=subparser)
    if command == "logs":
      subparser.add_argument("--worker", default="0", help="worker index, or `all` (default: %(default)s)")
    if command == "stop":
      subparser.add_argument("--signal", default="TERM",
                             help="signal name (default: %(default)s; KILL: no checkpoint)")
    if command == "delete":
      subparser.add_argument("--yes", action="store_true", help="do not ask for confirmation (gcloud --quiet)")
  return parser


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  own, launch_args = common.split_launch_args(argv)
  flags = build_parser().parse_args(own)
  flags.launch_args = launch_args
  check_flags(flags.subparser, flags)
  return flags


def check_flags(parser: argparse.ArgumentParser, flags: argparse.Namespace) -> None:
  if not TPU_NAME.fullmatch(flags.name):
    parser.error(f"TPU name {flags.name!r}: lowercase letters, digits and hyphens, starting with a letter")
  if getattr(flags, "accelerator_type", None) and not ACCELERATOR_TYPE.fullmatch(flags.accelerator_type):
    parser.error(f"--accelerator-type {flags.accelerator_type!r}: expected e.g. v4-64, v5p-64, v5litepod-16")
  for option in getattr(flags, "create_option", []):
    if not option.startswith("-"):
      parser.error(f"--create-option {option!r}: a gcloud flag such as --reserved")
  if hasattr(flags, "remote_dir"):
    common.check_remote_path(parser, "--remote-dir", flags.remote_dir)
  if hasattr(flags, "worker") and not (flags.worker == "all" or flags.worker.isdigit()):
    parser.error(f"--worker {flags.worker!r}: a worker index or `all`")
  if hasattr(flags, "signal") and not re.fullmatch(r"[A-Z0-9]+", flags.signal):
    parser.error(f"--signal {flags.signal!r}: a signal name such as TERM, INT or KILL")
  if flags.command in ("run", "up"):
    common.check_env(parser, flags.env)
    common.check_launch_args(parser, flags.launch_args)
  elif flags.launch_args:
    parser.error(f"{flags.command} takes no launch flags after `--`")


def main(argv: Sequence[str] | None = None) -> int:
  flags = parse_flags(sys.argv[1:] if argv is None else argv)
  return common.execute(flags.handler(flags), flags.dry_run)


if __name__ == "__main__":
  sys.exit(main())
