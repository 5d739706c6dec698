#!/usr/bin/env python3
"""A multi-node GPU run of mote_jax without a scheduler: one process per host, started over ssh.

  python launch/multinode.py run  --hosts=h1,h2,... [--coordinator-port=12345] [--workdir=DIR] [--python=PY]
                                  [--setup='source venv/bin/activate'] [--env=K=V ...] [--no-follow] -- LAUNCH FLAGS
  python launch/multinode.py logs --hosts=h1,h2,... [--process=0]
  python launch/multinode.py stop --hosts=h1,h2,... [--signal=TERM]

run: on host i (of N, in --hosts order) starts, detached (nohup), in --workdir,
  python -m mote_jax.launch LAUNCH FLAGS --coordinator_address=h1:PORT --num_processes=N --process_id=i
appending to --log-dir/process-i.log (pid in process-i.pid), then streams process 0's log (Ctrl-C stops the
streaming, not the run). Each process uses all GPUs of its host. Process 0 (the first host) hosts the
coordinator, so PORT must be reachable from the other hosts; --coordinator-host overrides the address they use
(e.g. an internal IP). Hosts may be `user@host`. The code must be at --workdir on every host (a shared
filesystem, or the same checkout path; default: this checkout's path), installed with `pip install -e '.[gpu]'`.
MODEL_DIR must be storage every host sees (shared filesystem or gs://).

--dry-run prints the ssh commands, one per line, exactly what would run, and runs nothing.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import Sequence

import _launchers as common

DEFAULT_PORT = 12345


def log_files(flags: argparse.Namespace, process: int) -> tuple[str, str]:
  stem = f"{flags.log_dir}/process-{process}"
  return f"{stem}.log", f"{stem}.pid"


def ssh(flags: argparse.Namespace, host: str, command: str) -> list[str]:
  return [*shlex.split(flags.ssh), host, command]


def coordinator_address(flags: argparse.Namespace) -> str:
  host = flags.coordinator_host or flags.hosts[0].rsplit("@", 1)[-1]
  return f"{host}:{flags.coordinator_port}"


def process_command(flags: argparse.Namespace, process: int) -> str:
  """Shell code for host `process`: in --workdir, the setup lines, then the launch process in the background."""
  per_process = [f"--coordinator_address={coordinator_address(flags)}", f"--num_processes={len(flags.hosts)}",
                 f"--process_id={process}"]
  argv = common.launch_argv(flags.python, flags.launch_args, per_process, flags.env)
  log, pid_file = log_files(flags, process)
  return common.start_in_background(flags.workdir, argv, log, pid_file, flags.setup)


def run_commands(flags: argparse.Namespace) -> list[list[str]]:
  commands = [ssh(flags, host, process_command(flags, i)) for i, host in enumerate(flags.hosts)]
  if not flags.no_follow:
    commands.append(ssh(flags, flags.hosts[0], common.follow_log(flags.workdir, log_files(flags, 0)[0])))
  return commands


def logs_commands(flags: argparse.Namespace) -> list[list[str]]:
  log = log_files(flags, flags.process)[0]
  return [ssh(flags, flags.hosts[flags.process], common.follow_log(flags.workdir, log))]


def stop_commands(flags: argparse.Namespace) -> list[list[str]]:
  return [ssh(flags, host, common.signal_process(flags.workdir, log_files(flags, i)[1], flags.signal))
          for i, host in enumerate(flags.hosts)]


def host_list(text: str) -> list[str]:
  hosts = [host.strip() for host in text.split(",")]
  if not all(hosts):
    raise argparse.ArgumentTypeError(f"empty host name in {text!r}")
  if len(set(hosts)) != len(hosts):
    raise argparse.ArgumentTypeError(f"a host appears twice in {text!r} (one process per host)")
  return hosts


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="multinode.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  base = argparse.ArgumentParser(add_help=False)
  base.add_argument("--hosts", type=host_list, required=True, help="comma-separated hosts; the first is process 0")
  base.add_argument("--workdir", default=str(common.REPO),
                    help="the checkout on every host, absolute or relative to the home directory "
                         "(default: this checkout's path)")
  base.add_argument("--log-dir", default="logs", help="in --workdir (default: %(default)s)")
  base.add_argument("--ssh", default="ssh", help="ssh command, e.g. 'ssh -p 2222 -i KEY' (default: %(default)s)")
  base.add_argument("--dry-run", action="store_true", help="print the commands, one per line; run nothing")

  run = sub.add_parser("run", parents=[base], help="start one process per host (flags for mote_jax.launch after --)",
                       epilog=common.LAUNCH_EPILOG)
  run.add_argument("--coordinator-port", type=int, default=DEFAULT_PORT,
                   help="port of the coordinator on the first host (default: %(default)s)")
  run.add_argument("--coordinator-host", help="address the hosts reach the first one at (default: its name)")
  run.add_argument("--python", default="python", help="interpreter on the hosts (default: %(default)s)")
  run.add_argument("--setup", action="append", default=[], metavar="SHELL",
                   help="shell line run in --workdir on each host before the launch, verbatim, "
                        "e.g. 'source .venv/bin/activate' (repeatable)")
  common.add_env_flag(run)
  run.add_argument("--no-follow", action="store_true", help="start the run without streaming process 0's log")
  run.set_defaults(handler=run_commands, subparser=run)

  logs = sub.add_parser("logs", parents=[base], help="stream one process's log")
  logs.add_argument("--process", type=int, default=0, help="process index (default: %(default)s)")
  logs.set_defaults(handler=logs_commands, subparser=logs)

  stop = sub.add_parser("stop", parents=[base], help="signal the process on every host")
  stop.add_argument("--signal", default="TERM", help="signal name (default: %(default)s; KILL: no checkpoint)")
  stop.set_defaults(handler=stop_commands, subparser=stop)
  return parser


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  own, launch_args = common.split_launch_args(argv)
  flags = build_parser().parse_args(own)
  flags.launch_args = launch_args
  parser = flags.subparser
  common.check_remote_path(parser, "--workdir", flags.workdir)
  if not shlex.split(flags.ssh):
    parser.error("--ssh is empty")
  if flags.command == "run":
    if not 0 < flags.coordinator_port < 65536:
      parser.error(f"--coordinator-port {flags.coordinator_port}: not a TCP port")
    common.check_env(parser, flags.env)
    common.check_launch_args(parser, flags.launch_args)
  elif flags.launch_args:
    parser.error(f"{flags.command} takes no launch flags after `--`")
  if flags.command == "logs" and not 0 <= flags.process < len(flags.hosts):
    parser.error(f"--process {flags.process}: there are {len(flags.hosts)} hosts")
  if flags.command == "stop" and not re.fullmatch(r"[A-Z0-9]+", flags.signal):
    parser.error(f"--signal {flags.signal!r}: a signal name such as TERM, INT or KILL")
  return flags


def main(argv: Sequence[str] | None = None) -> int:
  flags = parse_flags(sys.argv[1:] if argv is None else argv)
  return common.execute(flags.handler(flags), flags.dry_run)


if __name__ == "__main__":
  sys.exit(main())
