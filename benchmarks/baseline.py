"""Same-run comparison with another git revision: `python -m benchmarks --only pretrain --baseline_rev REV`.

The revision is checked out with `git worktree add --detach` into a temporary directory; each chosen section then
runs `rounds` times from this tree and from the baseline tree alternately (ours, baseline, ours, baseline, ...),
every run in its own process on the same machine (`common.run_module` with `repo=` the tree to import), so a
change in the machine's load falls on both alike. `key_figures` picks each section's headline figures (step
ratios to PyTorch, MFU, mote/siamese, encoding against sentence-transformers, step times); `compare` gives, per
figure, the medians over the rounds and `change` = how much better this tree is (> 1: better; a figure falling by
more than 5% against the baseline shows `change` < 0.95).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from benchmarks.common import REPO

TOLERANCE = 0.95  # a figure may fall by at most 5% against the baseline


@contextlib.contextmanager
def checkout(rev: str, repo: Path = REPO) -> Iterator[tuple[Path, str]]:
  """(a temporary worktree of `rev`, its full commit id); the worktree is removed afterwards."""
  sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True,
                       text=True, check=False)
  if sha.returncode != 0:
    raise ValueError(f"--baseline_rev {rev!r}: not a commit of {repo} ({sha.stderr.strip()})")
  sha = sha.stdout.strip()
  parent = Path(tempfile.mkdtemp(prefix="mote_bench_baseline_"))
  tree = parent / sha[:12]
  subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), sha], check=True,
                 capture_output=True, text=True)
  try:
    yield tree, sha
  finally:
    subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False,
                   capture_output=True)
    subprocess.run(["git", "-C", str(repo), "worktree", "prune"], check=False, capture_output=True)


def key_figures(section: str, result: dict) -> dict[str, tuple[float, bool]]:
  """{figure name: (value, higher is better)} of one section's result (empty for a failed one)."""
  if "error" in result:
    return {}
  out = {}
  if section in ("pretrain", "finetune_step"):
    for shape, s in result.get("shapes", {}).items():
      for name, ratio in s.get("ratios", {}).items():
        out[f"{shape}: {name}"] = (ratio, True)
      for name, row in s.get("rows", {}).items():
        if name.startswith("jax"):
          out[f"{shape}: {name} MFU"] = (row["mfu"], True)
          out[f"{shape}: {name} s/step"] = (row["median_s"], False)
  elif section == "mote":
    out["mote / siamese step time"] = (result["mote_over_siamese"], False)
  elif section == "encode":
    out["encoding JAX / sentence-transformers"] = (result["jax_over_st"], True)
    if "jax_over_best_st" in result:
      out["encoding JAX / best sentence-transformers"] = (result["jax_over_best_st"], True)
  elif section == "variants":
    for name, row in result.get("rows", {}).items():
      out[f"{name} s/step"] = (row["median_s"], False)
  return out


def compare(ours: list[dict], baseline: list[dict], section: str) -> dict:
  """Per figure of `section`: this tree's and the baseline's values over the rounds, their medians and `change`
  (ours / baseline for a higher-is-better figure, baseline / ours otherwise: > 1 means this tree is better)."""
  figures = {}
  ours_figs = [key_figures(section, r) for r in ours]
  base_figs = [key_figures(section, r) for r in baseline]
  names = [n for n in dict.fromkeys(n for f in ours_figs for n in f) if any(n in f for f in base_figs)]
  for name in names:
    a = [f[name][0] for f in ours_figs if name in f]
    b = [f[name][0] for f in base_figs if name in f]
    higher = next(f[name][1] for f in ours_figs if name in f)
    ma, mb = statistics.median(a), statistics.median(b)
    change = (ma / mb if higher else mb / ma) if ma and mb else float("nan")
    figures[name] = {"ours": a, "baseline": b, "ours_median": ma, "baseline_median": mb,
                     "higher_is_better": higher, "change": change, "within_5pct": change >= TOLERANCE}
  errors = {f"ours round {i + 1}": r["error"][:300] for i, r in enumerate(ours) if "error" in r}
  errors.update({f"baseline round {i + 1}": r["error"][:300] for i, r in enumerate(baseline) if "error" in r})
  return {"figures": figures, "errors": errors, "rounds": len(ours)}


def lines(b: dict, fmt) -> list[str]:
  """RESULTS.md lines of a comparison (`results['baseline']`)."""
  out = [f"Each section below ran from this tree and from `{b['rev']}` ({b['sha'][:12]}) alternately, every run in "
         f"its own process on this machine (`python -m benchmarks --only SECTION --baseline_rev {b['rev']} "
         f"--baseline_rounds N [--options ...]`; N and the options per section below). Change: > 1 means this tree "
         f"is better; a figure falling by more than 5% shows < 0.95.", ""]
  for section, c in b["sections"].items():
    options = f", `--options` `{json.dumps({c.get('section', section): c['options']})}`" if c.get("options") else ""
    out += [f"### {section}", "", f"{c['rounds']} rounds of each tree{options}"
            + (f", measured {c['measured_at']}" if c.get("measured_at") else "") + ".", ""]
    if c["errors"]:
      out += [f"- {k}: {v}" for k, v in c["errors"].items()] + [""]
    rows = [[name, fmt(f["baseline_median"], 4), fmt(f["ours_median"], 4), "higher" if f["higher_is_better"]
             else "lower", fmt(f["change"], 3, "x"), "yes" if f["within_5pct"] else "**no**"]
            for name, f in c["figures"].items()]
    if rows:
      out += ["| figure | baseline (median) | this tree (median) | better | change | within 5% |",
              "|---|---|---|---|---|---|"] + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows] + [""]
  return out
