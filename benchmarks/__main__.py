"""`python -m benchmarks [--quick] [--only NAME[,NAME]] [--out RESULTS.md]`: run the benchmarks, write RESULTS.md.

Each section runs in its own process (`python -m benchmarks.<section>`), so XLA flags, thread pools and peak
memory are its own. Full runs keep every section's raw result in `benchmarks/results.json`, so `--only` re-measures
some sections and re-renders RESULTS.md with the stored others.

`--baseline_rev REV [--baseline_rounds N]`: each chosen section also runs from git revision REV (a temporary
worktree), alternating with this tree's runs, and RESULTS.md gets a table of every headline figure of both with
its change (`benchmarks/baseline.py`); the section's own table shows this tree's last round.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import baseline as baseline_lib
from benchmarks import report
from benchmarks.common import DATA_DIR, load1, machine, run_module, wait_for_quiet

HERE = Path(__file__).resolve().parent
SECTIONS = ("gemm", "pretrain", "finetune_step", "mote", "encode", "search", "scaling", "gpu", "variants",
            "kernel_ab", "flags", "profile", "preprocess", "input", "finetune_data", "loop")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the code paths in a few minutes")
  parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
  parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
  parser.add_argument("--out", default=None, help="RESULTS.md path (default benchmarks/RESULTS.md; --quick: a "
                      "temporary directory)")
  parser.add_argument("--max-load", type=float, default=1.5, help="wait for the 1-min load to fall below this "
                      "before each section")
  parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for a quiet machine per section "
                      "(then measure anyway, with the load noted)")
  parser.add_argument("--section-timeout", type=float, default=1800.0)
  parser.add_argument("--baseline_rev", default=None, help="also run the chosen sections from this git revision, "
                      "alternating with this tree's runs, and compare their figures")
  parser.add_argument("--baseline_rounds", type=int, default=2, help="runs of each tree per section with "
                      "--baseline_rev")
  parser.add_argument("--options", default="{}", help="JSON {section: {keyword: value}} passed to those sections' "
                      "run() (both trees' with --baseline_rev), e.g. '{\"pretrain\": {\"shapes\": [\"minilm\"]}}'")
  args = parser.parse_args(argv)
  try:
    args.options = json.loads(args.options)
    if not isinstance(args.options, dict) or not all(isinstance(v, dict) for v in args.options.values()):
      raise ValueError("expected a JSON object of objects")
  except ValueError as e:
    parser.error(f"--options {args.options!r}: {e}")
  if set(args.options) - set(SECTIONS):
    parser.error(f"--options: unknown sections {sorted(set(args.options) - set(SECTIONS))}")

  chosen = [s for s in (args.only.split(",") if args.only else SECTIONS) if s]
  unknown = [s for s in chosen + [s for s in args.skip.split(",") if s] if s not in SECTIONS]
  if unknown:
    parser.error(f"unknown sections {unknown}; expected some of {SECTIONS}")
  chosen = [s for s in chosen if s not in args.skip.split(",")]
  if args.quick:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mote_bench_quick_")) / "RESULTS.md"
    store = out.with_name("results.json")
  else:
    out = Path(args.out) if args.out else HERE / "RESULTS.md"
    store = out.with_name("results.json")
  results = json.loads(store.read_text()) if store.exists() and args.only else {}
  results["machine"] = machine()
  notes = []
  command = "python -m benchmarks" + (" --quick" if args.quick else "")
  if args.baseline_rev:
    return _with_baseline(args, chosen, out, store, results, command)
  if set(chosen) & set(results.get("baseline", {}).get("sections", {})):
    del results["baseline"]  # a comparison with a section measured again without its baseline is stale
  with tempfile.TemporaryDirectory() as tmp:
    for name in chosen:
      waited = wait_for_quiet(args.max_load, 0 if args.quick else args.wait)
      if not waited["quiet"]:
        notes.append(f"{name}: started at 1-min load {waited['load1']} after waiting {waited['waited_s']:.0f}s "
                     f"for < {args.max_load}")
      started = time.time()
      result = run_module(f"benchmarks.{name}", Path(tmp) / f"{name}.json", quick=args.quick,
                          options=args.options.get(name), timeout=args.section_timeout)
      result["measured_at"] = datetime.datetime.now().isoformat(timespec="minutes")
      result["load1_at_start"] = waited["load1"]
      results[name] = result
      status = "error" if "error" in result else "ok"
      print(f"[bench] section {name}: {status} in {time.time() - started:.0f}s (load now {load1()})", flush=True)
      store.parent.mkdir(parents=True, exist_ok=True)
      store.write_text(json.dumps(results, indent=1, default=float))
      out.write_text(report.render(results, command))
  if notes:
    results["machine"]["notes"] = notes
  store.write_text(json.dumps(results, indent=1, default=float))
  out.write_text(report.render(results, command))
  print(f"[bench] wrote {out}")
  return 1 if any("error" in results.get(name, {}) for name in chosen) else 0


def _comparison_key(section: str, options: dict | None) -> str:
  """A comparison's name in `results['baseline']['sections']`: the section, and its options when it had some (so
  that e.g. pretrain over MiniLM and pretrain over bert-base, taken in two runs, are both kept)."""
  return f"{section} {json.dumps(options, sort_keys=True)}" if options else section


def _with_baseline(args, chosen, out, store, results, command) -> int:
  """Each section `--baseline_rounds` times from this tree and from `--baseline_rev`, alternately."""
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so the temporary worktree is removed
  comparison = {"rev": args.baseline_rev, "sections": {}, "measured_at":
                datetime.datetime.now().isoformat(timespec="minutes")}
  with baseline_lib.checkout(args.baseline_rev) as (tree, sha), tempfile.TemporaryDirectory() as tmp:
    comparison["sha"] = sha
    stored = results.get("baseline", {})
    if stored.get("sha") == sha:  # an earlier --only run against the same revision: keep its other sections
      comparison["sections"] = {k: v for k, v in stored.get("sections", {}).items()
                                if k not in [_comparison_key(n, args.options.get(n)) for n in chosen]}
    for name in chosen:
      runs = {"ours": [], "baseline": []}
      for r in range(args.baseline_rounds):
        for who, repo in (("ours", HERE.parent), ("baseline", tree)):
          waited = wait_for_quiet(args.max_load, 0 if args.quick else args.wait)
          if not (repo / "benchmarks" / f"{name}.py").exists():
            result = {"error": f"{who} ({repo}) has no benchmarks/{name}.py"}
          else:
            # Both trees read this tree's data directory (the baseline's default would be relative to it).
            result = run_module(f"benchmarks.{name}", Path(tmp) / f"{name}-{who}-{r}.json", quick=args.quick,
                                options=args.options.get(name), timeout=args.section_timeout, repo=repo,
                                env={"MOTE_DATA_DIR": str(DATA_DIR)})
          result["load1_at_start"] = waited["load1"]
          runs[who].append(result)
          print(f"[bench] {name} round {r + 1} {who}: {'error' if 'error' in result else 'ok'}", flush=True)
      results[name] = dict(runs["ours"][-1], measured_at=datetime.datetime.now().isoformat(timespec="minutes"))
      key = _comparison_key(name, args.options.get(name))
      comparison["sections"][key] = baseline_lib.compare(runs["ours"], runs["baseline"], name)
      comparison["sections"][key].update(raw=runs, section=name, options=args.options.get(name, {}),
                                         measured_at=datetime.datetime.now().isoformat(timespec="minutes"))
  results["baseline"] = comparison
  store.parent.mkdir(parents=True, exist_ok=True)
  store.write_text(json.dumps(results, indent=1, default=float))
  sections = dict.fromkeys(c.get("section", k) for k, c in comparison["sections"].items())
  out.write_text(report.render(results, command + f" --only {','.join(sections)} --baseline_rev {args.baseline_rev}"))
  for name, c in comparison["sections"].items():
    for figure, f in c["figures"].items():
      print(f"[bench] {name}: {figure}: baseline {f['baseline_median']:.4g}, ours {f['ours_median']:.4g}, "
            f"change {f['change']:.3f}x{'' if f['within_5pct'] else '  <-- falls by more than 5%'}")
  print(f"[bench] wrote {out}")
  return 1 if any("error" in r for c in comparison["sections"].values() for runs in c["raw"].values()
                   for r in runs) else 0


if __name__ == "__main__":
  sys.exit(main())
