#!/usr/bin/env python3
"""A SLURM batch script for a multi-node GPU run of mote_jax, written and submitted with sbatch.

  python launch/slurm.py --nodes=4 --gpus-per-node=8 [--partition=P] [--time=T] [--account=A] [--job-name=N]
                         [--output=PATTERN] [--setup='source venv/bin/activate' ...] [--dry-run] -- LAUNCH FLAGS

One process per node (default, --process-per=node) drives all the node's GPUs: `srun --ntasks-per-node=1`
starts `python -m mote_jax.launch LAUNCH FLAGS --distributed` on each node, and JAX_LOCAL_DEVICE_IDS lists every
local GPU (otherwise JAX's SLURM auto-detection would give each process only GPU SLURM_LOCALID, i.e. GPU 0).
--process-per=gpu starts one process per GPU instead (`--ntasks-per-node=GPUS`); each process then uses GPU
SLURM_LOCALID, which is JAX's SLURM default. The coordinator is the first node of the allocation
(`scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1`) at --coordinator-port (default: derived from the job
id, as JAX does, so two jobs sharing a node do not collide); process count and ids come from SLURM
(SLURM_NTASKS, SLURM_PROCID) through `jax.distributed.initialize()`.

--dry-run prints a shell snippet that writes the script (a here-document) and submits it, exactly what would
run, and runs nothing. Without it the script is written to --script and submitted with `sbatch`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Sequence

import _launchers as common

HEREDOC_END = "MOTE_SBATCH_EOF"
JOB_NAME = re.compile(r"[A-Za-z0-9._-]+")
# JAX's own choice when no port is given: the job id mapped into the top 4096 ports.
AUTO_PORT = "$((SLURM_JOB_ID % 4096 + 61440))"


def sbatch_directives(flags: argparse.Namespace) -> list[str]:
  tasks_per_node = 1 if flags.process_per == "node" else flags.gpus_per_node
  directives = [f"--job-name={flags.job_name}", f"--nodes={flags.nodes}", f"--ntasks-per-node={tasks_per_node}",
                f"--gpus-per-node={flags.gpus_per_node}", f"--output={flags.output}"]
  for name in ("partition", "time", "account", "cpus_per_task", "mem", "chdir"):
    value = getattr(flags, name)
    if value is not None:
      directives.append(f"--{name.replace('_', '-')}={value}")
  directives += flags.sbatch_option
  return [f"#SBATCH {directive}" for directive in directives]


def coordinator_lines(flags: argparse.Namespace) -> list[str]:
  port = AUTO_PORT if flags.coordinator_port is None else str(flags.coordinator_port)
  return ["# Process 0, on the first node, hosts the jax.distributed coordinator.",
          'coordinator=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
          f'export JAX_COORDINATOR_ADDRESS="$coordinator:{port}"']


def device_lines(flags: argparse.Namespace) -> list[str]:
  if flags.process_per == "gpu":
    return ["# One process per GPU: JAX gives each process GPU $SLURM_LOCALID."]
  gpus = ",".join(str(i) for i in range(flags.gpus_per_node))
  return ["# One process per node drives all its GPUs (JAX's SLURM default would be GPU $SLURM_LOCALID only).",
          f"export JAX_LOCAL_DEVICE_IDS={gpus}"]


def srun_line(flags: argparse.Namespace) -> str:
  tasks_per_node = 1 if flags.process_per == "node" else flags.gpus_per_node
  extra = [] if "--distributed" in flags.launch_args else ["--distributed"]
  argv = ["srun", f"--ntasks-per-node={tasks_per_node}", "--kill-on-bad-exit=1", *flags.srun_option,
          *common.launch_argv(flags.python, flags.launch_args, extra)]
  return shlex.join(argv)


def render_script(flags: argparse.Namespace) -> str:
  """The whole sbatch script."""
  per = "node" if flags.process_per == "node" else "GPU"
  lines = ["#!/bin/bash",
           f"# mote_jax: {flags.nodes} node(s) x {flags.gpus_per_node} GPU(s), one process per {per}. "
           "Written by launch/slurm.py.",
           *sbatch_directives(flags),
           "set -e", ""]
  if flags.setup:
    lines += [*flags.setup, ""]
  lines += [*coordinator_lines(flags), *device_lines(flags)]
  lines += [f"export {shlex.quote(assignment)}" for assignment in flags.env]
  lines += ['echo "mote_jax: nodes $SLURM_JOB_NODELIST, coordinator $JAX_COORDINATOR_ADDRESS"',
            "", srun_line(flags)]
  return "\n".join(lines) + "\n"


def output_dir(flags: argparse.Namespace) -> str | None:
  """The directory of --output when it needs creating (sbatch does not create it); None if there is none."""
  parent = os.path.dirname(flags.output)
  return parent if parent and "%" not in parent else None


def dry_run_text(flags: argparse.Namespace, script: str) -> str:
  """Shell code that does what submitting does: mkdir for the log, write the script, sbatch it."""
  lines = []
  if output_dir(flags):
    lines.append(shlex.join(["mkdir", "-p", output_dir(flags)]))
  lines += [f"cat > {shlex.quote(flags.script)} <<'{HEREDOC_END}'", script + HEREDOC_END,
            shlex.join(["sbatch", flags.script])]
  return "\n".join(lines)


def submit(flags: argparse.Namespace, script: str) -> int:
  if output_dir(flags):
    os.makedirs(output_dir(flags), exist_ok=True)
  path = Path(flags.script)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(script)
  print(f"wrote {path}", file=sys.stderr)
  return common.execute([["sbatch", flags.script]], dry_run=False)


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="slurm.py", description=__doc__, epilog=common.LAUNCH_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nodes", type=positive_int, required=True, help="number of nodes")
  parser.add_argument("--gpus-per-node", type=positive_int, required=True, help="GPUs on each node")
  parser.add_argument("--process-per", choices=("node", "gpu"), default="node",
                      help="one process per node with all its GPUs, or one per GPU (default: %(default)s)")
  parser.add_argument("--partition", help="SLURM partition")
  parser.add_argument("--time", help="time limit, e.g. 2-00:00:00")
  parser.add_argument("--account", help="account to charge")
  parser.add_argument("--job-name", default="mote_jax", help="job name, %%x in --output (default: %(default)s)")
  parser.add_argument("--output", default="%x-%j.out", help="log file pattern (default: %(default)s)")
  parser.add_argument("--cpus-per-task", type=positive_int, help="CPUs for each process")
  parser.add_argument("--mem", help="memory per node, e.g. 0 (all) or 500G")
  parser.add_argument("--chdir", help="working directory of the job (default: where sbatch runs)")
  parser.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                      help="extra #SBATCH line, e.g. --exclusive or --signal=TERM@300 (repeatable)")
  parser.add_argument("--srun-option", action="append", default=[], metavar="OPTION",
                      help="extra srun option, e.g. --container-image=IMAGE (repeatable)")
  parser.add_argument("--setup", action="append", default=[], metavar="SHELL",
                      help="shell line before the run, verbatim, e.g. 'source ~/venvs/mote/bin/activate' "
                           "or 'module load cuda/12.4' (repeatable)")
  common.add_env_flag(parser)
  parser.add_argument("--python", default="python", help="interpreter on the nodes (default: %(default)s)")
  parser.add_argument("--coordinator-port", type=positive_int,
                      help="coordinator port (default: from the job id, in 61440-65535)")
  parser.add_argument("--script", help="where to write the script (default: JOB_NAME.sbatch)")
  parser.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; run nothing")
  return parser


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  own, launch_args = common.split_launch_args(argv)
  parser = build_parser()
  flags = parser.parse_args(own)
  flags.launch_args = launch_args
  if not JOB_NAME.fullmatch(flags.job_name):
    parser.error(f"--job-name {flags.job_name!r}: letters, digits, '.', '_' and '-' only")
  for option in (*flags.sbatch_option, *flags.srun_option):
    if not option.startswith("-"):
      parser.error(f"{option!r}: --sbatch-option/--srun-option take options such as --exclusive")
  common.check_env(parser, flags.env)
  common.check_launch_args(parser, flags.launch_args)
  flags.script = flags.script or f"{flags.job_name}.sbatch"
  return flags


def main(argv: Sequence[str] | None = None) -> int:
  flags = parse_flags(sys.argv[1:] if argv is None else argv)
  script = render_script(flags)
  if flags.dry_run:
    print(dry_run_text(flags, script))
    return 0
  return submit(flags, script)


if __name__ == "__main__":
  sys.exit(main())
