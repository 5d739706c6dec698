"""What the launchers share: the `-- LAUNCH FLAGS` split, checks, shell quoting, and dry-run versus running.

Every command is an argv list. `--dry-run` prints each one as `shlex.join(argv)`, one per line, exactly what
would run; otherwise each is echoed to stderr (`+ ...`) and run with `subprocess.run(argv, check=True)`.
Commands that run on another machine (over ssh) are single shell strings built with `shlex.join`/`shlex.quote`,
so every launch flag, gin values with spaces and quotes included, reaches `python -m mote_jax.launch` unchanged.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Flags a launcher sets per process itself; passing them through would give every process the same value.
PER_PROCESS_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")
TAIL_LINES = 100
LAUNCH_EPILOG = ("After the options: -- LAUNCH FLAGS, the flags of `python -m mote_jax.launch` (at least one\n"
                 "--gin_file), e.g. -- --gin_file=runs/pretrain_cotmote.gin --gin.MODEL_DIR=gs://BUCKET/cotmote")


def split_launch_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the launcher's own arguments, the `python -m mote_jax.launch` flags after the first `--`)."""
  argv = list(argv)
  if "--" not in argv:
    return argv, []
  cut = argv.index("--")
  return argv[:cut], argv[cut + 1:]


def _flag_name(arg: str) -> str:
  return arg.split("=", 1)[0]


def check_launch_args(parser: argparse.ArgumentParser, launch_args: Sequence[str],
                      forbidden: Iterable[str] = PER_PROCESS_FLAGS) -> None:
  """Errors (argparse style, exit 2) unless the launch flags name a --gin_file and leave `forbidden` to us."""
  if not launch_args:
    parser.error("the flags for `python -m mote_jax.launch` go after `--`, e.g. "
                 "-- --gin_file=runs/pretrain_cotmote.gin --gin.MODEL_DIR=...")
  if not any(_flag_name(arg) == "--gin_file" for arg in launch_args):
    parser.error("no --gin_file among the flags after `--` (python -m mote_jax.launch needs one)")
  for arg in launch_args:
    if _flag_name(arg) in forbidden:
      parser.error(f"{_flag_name(arg)} is set per process by this launcher; leave it out of the flags after `--`")


def check_env(parser: argparse.ArgumentParser, assignments: Sequence[str]) -> None:
  """Each --env must be KEY=VALUE with a shell-variable KEY."""
  for assignment in assignments:
    key, sep, _ = assignment.partition("=")
    if not sep or not ENV_NAME.fullmatch(key):
      parser.error(f"--env {assignment!r}: expected KEY=VALUE with KEY a variable name")


def add_env_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="environment variable for the launch process (repeatable)")


def launch_argv(python: str, launch_args: Sequence[str], extra: Sequence[str] = (),
                env: Sequence[str] = ()) -> list[str]:
  """`[env K=V ...] PYTHON -m mote_jax.launch LAUNCH_ARGS EXTRA` as an argv list.

  `env` (the program) rather than `K=V` prefixes: a quoted `'K=V'` word is not an assignment to the shell.
  """
  prefix = ["env", *env] if env else []
  return [*prefix, python, "-m", "mote_jax.launch", *launch_args, *extra]


def start_in_background(workdir: str, argv: Sequence[str], log: str, pid_file: str,
                        setup: Sequence[str] = ()) -> str:
  """Shell code: in `workdir`, run the `setup` lines (verbatim shell), then start `argv` detached (nohup),
  appending to `log`, its pid in `pid_file`.

  Refuses to start while the process recorded in `pid_file` is alive. The command returns at once; the process
  outlives the ssh session. A run resumed after preemption appends to the same log.
  """
  workdir, log_q, pid_q = shlex.quote(workdir), shlex.quote(log), shlex.quote(pid_file)
  steps = [f"cd {workdir} || exit 1", *setup]
  log_dir = str(Path(log).parent)
  if log_dir != ".":
    steps.append(f"mkdir -p {shlex.quote(log_dir)}")
  steps += [
      f'if [ -f {pid_q} ] && kill -0 "$(cat {pid_q})" 2>/dev/null; then '
      f'echo "$(hostname): mote_jax.launch already runs as pid $(cat {pid_q}); stop it first" >&2; exit 1; fi',
      f"nohup {shlex.join(argv)} >> {log_q} 2>&1 < /dev/null & echo $! > {pid_q}",
      f'echo "$(hostname): started pid $(cat {pid_q})"',
  ]
  return "; ".join(steps)


def follow_log(workdir: str, log: str) -> str:
  """Shell code: stream `log` (the last lines, then everything appended; waits for the file to appear)."""
  return f"cd {shlex.quote(workdir)} && tail -n {TAIL_LINES} -F {shlex.quote(log)}"


def signal_process(workdir: str, pid_file: str, signal: str) -> str:
  """Shell code: send `signal` to the process recorded in `pid_file`."""
  pid_q = shlex.quote(pid_file)
  return (f'cd {shlex.quote(workdir)} && kill -{signal} "$(cat {pid_q})" && '
          f'echo "$(hostname): sent SIG{signal} to pid $(cat {pid_q})"')


def check_remote_path(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
  """Remote paths are quoted, so `~` would not expand: they must be absolute or relative to the home directory."""
  if not path or path.startswith("~"):
    parser.error(f"{flag} {path!r}: give a path relative to the remote home directory, or an absolute one "
                 "(a quoted ~ does not expand)")


def execute(commands: Sequence[Sequence[str]], dry_run: bool) -> int:
  """Prints (dry run) or runs each command in order; the first failure stops the rest.

  Ctrl-C during the last command (streaming a log) only stops the streaming: the run itself is detached.
  """
  for index, argv in enumerate(commands):
    line = shlex.join(argv)
    if dry_run:
      print(line)
      continue
    print(f"+ {line}", file=sys.stderr, flush=True)
    try:
      subprocess.run(list(argv), check=True)
    except subprocess.CalledProcessError as e:
      print(f"error: exit status {e.returncode} from: {line}", file=sys.stderr)
      return e.returncode or 1
    except FileNotFoundError:
      print(f"error: {argv[0]} not found (is it installed and on PATH?)", file=sys.stderr)
      return 127
    except KeyboardInterrupt:
      if index == len(commands) - 1:
        print("\nstopped streaming; the run goes on", file=sys.stderr)
        return 0
      raise
  return 0
