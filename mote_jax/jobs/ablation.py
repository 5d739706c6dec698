"""Job: the tower-mode ablation, tower modes x seeds x datasets with the same budget per cell, and its report.

  for mode in modes, seed in seeds:
    [pre-training]  MODEL_DIR/pretrain/<mode>/seed<k>          the checkpoint imported as `mode`, CoT-MoTE
                                                               pre-training on the corpus bound in gin (shared by
                                                               every dataset; skipped when its hf/ export exists)
    for dataset in datasets:
      MODEL_DIR/<dataset>/<mode>/seed<k>/finetune              fine-tuning on the dataset's train split
      MODEL_DIR/<dataset>/<mode>/seed<k>/eval/<target>         evaluation of each target (BEIR dir, split); targets
                                                               of one BEIR dir share one corpus encoding
      MODEL_DIR/<dataset>/<mode>/seed<k>/cell.json             written last: metrics, per-query scores and the
                                                               embedding-space analysis of every target
  MODEL_DIR/ablation.md, ablation.json, ablation_figures/*.png  the report

Every stage is an ordinary resumable job directory; a cell whose cell.json exists is reused as it is, so a
re-run of the same command only runs what is missing. The seed of a cell seeds the pre-training data stream and
fresh parameters, the fine-tuning data order and negatives, and (through `pretrain_trainer` /
`finetune_trainer`) dropout. Every dataset's splits are checked before anything trains.

Statistics (`mote_jax.analysis.significance`): per cell and measure the mean +- sample std over seeds; per target,
each mode against `baseline` on the per-query scores of `measure`, each query's score averaged over seeds first:
a paired t-test and a paired randomisation test, Holm-adjusted over all (dataset, target, mode) comparisons of the
report, separately per test. Figures (`mote_jax.analysis.plots`) go beside the markdown report, which embeds them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import gin
import jax
import numpy as np

from mote_jax import hf_interop
from mote_jax.analysis import plots, significance
from mote_jax.analysis.embedding_space import analyse
from mote_jax.data.online import register_records_task
from mote_jax.jobs import finetune as finetune_lib
from mote_jax.jobs import preprocess as preprocess_lib
from mote_jax.jobs import pretrain as pretrain_lib
from mote_jax.jobs import quickstart as quickstart_lib
from mote_jax.retrieval import beir, encode, files, metrics, search
from mote_jax.retrieval.evaluate import evaluate
from mote_jax.retrieval.store import EmbeddingStore
from mote_jax.training.trainer import TrainerConfig

log = logging.getLogger(__name__)

CELL_MARKER = "cell.json"


@dataclasses.dataclass(frozen=True)
class Target:
  """One evaluation: `split` of the BEIR dataset in `beir_dir`, reported as `label`."""
  label: str
  beir_dir: str
  split: str


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Fine-tuning data (`train_dir`'s `train_split`) and the evaluations of the fine-tuned model."""
  name: str
  train_dir: str
  train_split: str
  targets: tuple[Target, ...]


def parse_datasets(spec: Mapping[str, Mapping[str, Any]]) -> list[Dataset]:
  """`ablation.datasets` -> [Dataset]. Each entry: {name: {'train': dir, 'train_split': 'train' (default),
  'evaluate': {label: [dir, split]}}}; an unknown or missing key raises ValueError naming it."""
  out = []
  for name, entry in spec.items():
    where = f"ablation.datasets[{name!r}]"
    unknown = set(entry) - {"train", "train_split", "evaluate"}
    if unknown or "train" not in entry or not entry.get("evaluate"):
      raise ValueError(f"{where}: expected keys 'train', 'evaluate' and optionally 'train_split', got "
                       f"{sorted(entry)}")
    targets = []
    for label, value in entry["evaluate"].items():
      if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{where}['evaluate'][{label!r}]: expected [beir_dir, split], got {value!r}")
      targets.append(Target(str(label), str(value[0]), str(value[1])))
    out.append(Dataset(str(name), str(entry["train"]), str(entry.get("train_split", "train")), tuple(targets)))
  return out


def check_splits(datasets: Sequence[Dataset]) -> None:
  """Raises FileNotFoundError naming the dataset, directory and split of every split that is missing (all of
  them, in one message), so a bad configuration fails before any training starts."""
  problems = []
  for ds in datasets:
    wanted = [("train", ds.train_dir, ds.train_split)] + [(t.label, t.beir_dir, t.split) for t in ds.targets]
    for role, directory, split in wanted:
      root = Path(directory)
      for name in ("corpus.jsonl", "queries.jsonl"):
        if not (root / name).is_file():
          problems.append(f"dataset {ds.name!r} ({role}): {root / name} not found")
      if not (root / "qrels" / f"{split}.tsv").is_file():
        available = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        problems.append(f"dataset {ds.name!r} ({role}): no split {split!r} in {root} (qrels/{split}.tsv missing; "
                        f"splits available: {available})")
  if problems:
    raise FileNotFoundError("ablation: " + "; ".join(problems))


def passage_analysis_rows(store: EmbeddingStore, keep_ids: set[str], max_rows: int, seed: int = 0
                          ) -> tuple[np.ndarray, list[str]]:
  """Embeddings [n, H] and ids of the passages in `keep_ids` plus a uniform sample of the others, at most
  about `max_rows` in all, read shard by shard (a large corpus is never loaded whole)."""
  rng = np.random.default_rng(seed)
  fraction = min(1.0, max_rows / max(len(store), 1))
  rows, ids = [], []
  for _, shard_ids, embeddings in store.iter_shards():
    mask = rng.random(len(shard_ids)) < fraction
    mask |= np.array([i in keep_ids for i in shard_ids])
    rows.append(embeddings[mask])
    ids += [i for i, m in zip(shard_ids, mask) if m]
  return np.concatenate(rows), ids


def analyse_eval_dir(eval_dir: Path, corpus_dir: Path, qrels: Mapping[str, Mapping[str, int]], split: str,
                     method: str, max_passages: int = 200_000) -> dict:
  """`embedding_space.analyse` of one evaluation's stored embeddings and run."""
  queries = EmbeddingStore.open(eval_dir / f"queries-{split}")
  positives = {p for judged in qrels.values() for p, rel in judged.items() if rel > 0}
  passages, passage_ids = passage_analysis_rows(EmbeddingStore.open(corpus_dir), positives, max_passages)
  run = metrics.read_run(eval_dir / f"run-{split}-{method}.trec")
  return analyse(queries.load(), queries.ids, passages, passage_ids, qrels, run)


@gin.configurable
def ablation(model_dir: str, *, datasets: Mapping[str, Mapping[str, Any]] = gin.REQUIRED,
             modes: Sequence[str] = ("mote", "siamese", "separated"), seeds: Sequence[int] = (0, 1, 2),
             checkpoint: str = "sentence-transformers/all-MiniLM-L6-v2", pretrain: bool = True,
             baseline: str = "siamese", measure: str = "nDCG@10",
             measures: Sequence[str] = ("nDCG@10", "RR@10", "R@100"), method: str = "exact", k: int = 1000,
             encode_options: encode.EncodeOptions = encode.EncodeOptions(),
             scann_config: search.ScannConfig = search.ScannConfig(),
             pretrain_trainer: TrainerConfig | None = None, finetune_trainer: TrainerConfig | None = None,
             n_resamples: int = 10_000, alpha: float = 0.05, analysis_max_passages: int = 200_000,
             pretrain_corpus: str | None = None, pretrain_batch_size: int = 8, pretrain_max_len: int = 128,
             span_task_fn=register_records_task, preprocess_fn=preprocess_lib.preprocess,
             pretrain_fn=pretrain_lib.pretrain, finetune_fn=finetune_lib.finetune) -> dict:
  """Runs every missing cell, then writes the report; returns its JSON content.

  Stage settings come from the gin bindings of `pretrain` and `finetune` (see
  t5x_configs/runs/ablation_scifact_cpu.gin); this job sets per cell: the tower mode, the seeds, the
  fine-tuning data (`datasets`) and turns finetune's own evaluation and mining off (it evaluates every target
  itself). `pretrain_trainer` / `finetune_trainer`, when given, are the stages' TrainerConfigs with their dropout
  seed replaced by the cell's.

  Pre-training data: with `pretrain_corpus` (a BEIR directory or its corpus.jsonl, as in the SciFact gin) the
  corpus is made into document records once, in MODEL_DIR/records (the Beam job, reused on a re-run; see
  `quickstart.corpus_records`), and every cell pre-trains on `span_task_fn`'s span pairs of them,
  `pretrain_batch_size` rows a step, as the quickstart does. Without it, `pretrain` takes its streams from gin
  (`pretrain.streams`, as runs/ablation_msmarco.gin binds the paper's recipe).
  """
  start = time.perf_counter()
  root = Path(model_dir)
  parsed = parse_datasets(datasets)
  check_splits(parsed)
  if baseline not in modes:
    raise ValueError(f"ablation.baseline={baseline!r} is not among ablation.modes={list(modes)}")
  if measure not in measures:
    measures = (measure, *measures)
  stream_kwargs = {}
  if pretrain and pretrain_corpus is not None:
    corpus = Path(pretrain_corpus) / "corpus.jsonl" if Path(pretrain_corpus).is_dir() else Path(pretrain_corpus)
    if not corpus.is_file():
      raise FileNotFoundError(f"ablation.pretrain_corpus={pretrain_corpus!r}: {corpus} is not a file (give a "
                              "BEIR directory or its corpus.jsonl)")
    records_dir = quickstart_lib.corpus_records(root / "records", str(corpus),
                                                tokenizer=str(hf_interop.resolve_checkpoint(checkpoint)),
                                                max_len=pretrain_max_len, preprocess_fn=preprocess_fn)
    task = span_task_fn("ablation_span_pairs", str(records_dir), max_len=pretrain_max_len)
    stream_kwargs["streams"] = [pretrain_lib.PretrainStream(task, pretrain_batch_size)]
  cells: dict[tuple[str, str, int], dict] = {}
  for mode in modes:
    for seed in seeds:
      todo = [ds for ds in parsed if not (root / ds.name / mode / f"seed{seed}" / CELL_MARKER).exists()]
      source = finetune_lib.ModelSource(checkpoint, tower_mode=mode)
      if todo and pretrain:
        pre_dir = root / "pretrain" / mode / f"seed{seed}"
        if not (pre_dir / "hf" / "mote_config.json").exists():
          kwargs = {"trainer": dataclasses.replace(pretrain_trainer, seed=seed)} if pretrain_trainer else {}
          pretrain_fn(str(pre_dir), init_checkpoint=checkpoint, tower_mode=mode, data_seed=seed, init_seed=seed,
                      **stream_kwargs, **kwargs)
        source = finetune_lib.ModelSource(towers=str(pre_dir / "hf"))
      for ds in parsed:
        cell_dir = root / ds.name / mode / f"seed{seed}"
        if ds in todo:
          log.info("ablation cell %s / %s / seed %d", ds.name, mode, seed)
          run_cell(cell_dir, ds, source, seed, finetune_fn=finetune_fn, trainer=finetune_trainer,
                   measures=measures, method=method, k=k, encode_options=encode_options,
                   scann_config=scann_config, analysis_max_passages=analysis_max_passages)
        else:
          log.info("ablation cell %s / %s / seed %d: finished, reused", ds.name, mode, seed)
        cells[(ds.name, mode, seed)] = json.loads((cell_dir / CELL_MARKER).read_text())
  result = summarise(cells, parsed, modes, seeds, baseline=baseline, measure=measure, measures=measures,
                     n_resamples=n_resamples, alpha=alpha)
  if jax.process_index() == 0:
    write_report(root, result, cells, parsed, modes, seeds, baseline=baseline, measure=measure)
  log.info("ablation finished in %.1f min", (time.perf_counter() - start) / 60)
  return result


def run_cell(cell_dir: Path, ds: Dataset, source: finetune_lib.ModelSource, seed: int, *, finetune_fn,
             trainer: TrainerConfig | None, measures: Sequence[str], method: str, k: int,
             encode_options: encode.EncodeOptions, scann_config: search.ScannConfig,
             analysis_max_passages: int) -> None:
  """Fine-tunes, evaluates every target and writes cell.json (last, atomically)."""
  kwargs = {"trainer": dataclasses.replace(trainer, seed=seed)} if trainer else {}
  finetune_fn(str(cell_dir / "finetune"), model=source, train_data=ds.train_dir, train_split=ds.train_split,
              data_seed=seed, eval_data=None, mine_negatives_to=None, **kwargs)
  config, params, tokenizer_dir = finetune_lib.ModelSource(towers=str(cell_dir / "finetune" / "hf")).load()
  tokenizer = finetune_lib._tokenizer(tokenizer_dir)
  corpus_dirs: dict[str, Path] = {}
  targets = {}
  for target in ds.targets:
    out_dir = cell_dir / "eval" / target.label
    # Targets whose corpus.jsonl is the same file (e.g. symlinks to MS MARCO's) share one corpus encoding.
    corpus_dir = corpus_dirs.setdefault(str((Path(target.beir_dir) / "corpus.jsonl").resolve()), out_dir / "corpus")
    report = evaluate(config, params, tokenizer, target.beir_dir, target.split, out_dir=out_dir, method=method,
                      k=k, encode_options=encode_options, scann_config=scann_config, measures=measures,
                      corpus_dir=corpus_dir)
    if jax.process_index() != 0:
      continue
    qrels = beir.load_qrels(Path(target.beir_dir) / "qrels" / f"{target.split}.tsv")
    run = metrics.read_run(out_dir / f"run-{target.split}-{method}.trec")
    per_query = metrics.per_query_metrics(qrels, run, measures)
    targets[target.label] = {
        "beir_dir": target.beir_dir, "split": target.split, "metrics": report["metrics"],
        "per_query": {m: {q: v[m] for q, v in per_query.items()} for m in measures},
        "analysis": analyse_eval_dir(out_dir, corpus_dir, qrels, target.split, method, analysis_max_passages),
    }
  if jax.process_index() == 0:
    files.write_json(cell_dir / CELL_MARKER, {"dataset": ds.name, "tower_mode": config.tower_mode, "seed": seed,
                                              "targets": targets})
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"ablation cell {cell_dir}")


def summarise(cells: Mapping[tuple[str, str, int], dict], datasets: Sequence[Dataset], modes: Sequence[str],
              seeds: Sequence[int], *, baseline: str, measure: str, measures: Sequence[str], n_resamples: int,
              alpha: float) -> dict:
  """{"table": {dataset: {target: {mode: {measure: {"mean", "std", "per_seed"}}}}}, "tests": {"dataset/target/
  mode": paired tests + Holm}, settings}; the Holm family is every comparison of the report, per test."""
  table, raw = {}, {}
  for ds in datasets:
    for target in ds.targets:
      rows = table.setdefault(ds.name, {}).setdefault(target.label, {})
      for mode in modes:
        per_seed = {s: cells[(ds.name, mode, s)]["targets"][target.label] for s in seeds}
        rows[mode] = {}
        for m in measures:
          values = [per_seed[s]["metrics"][m] for s in seeds]
          mean, std = significance.mean_std(values)
          rows[mode][m] = {"mean": mean, "std": std, "per_seed": values}
      base = significance.average_over_seeds(
          {s: cells[(ds.name, baseline, s)]["targets"][target.label]["per_query"][measure] for s in seeds},
          name=baseline)
      for mode in modes:
        if mode == baseline:
          continue
        other = significance.average_over_seeds(
            {s: cells[(ds.name, mode, s)]["targets"][target.label]["per_query"][measure] for s in seeds}, name=mode)
        raw[f"{ds.name}/{target.label}/{mode}"] = significance.paired_tests(
            base, other, n_resamples=n_resamples, names=(baseline, mode))
  return {"table": table, "tests": significance.apply_holm(raw, alpha=alpha), "baseline": baseline,
          "measure": measure, "measures": list(measures), "modes": list(modes), "seeds": list(seeds),
          "alpha": alpha, "n_resamples": n_resamples,
          "seed_handling": "each query's score averaged over seeds before the paired tests",
          "correction": "Holm-Bonferroni over all comparisons of the report, separately per test"}


def _p(p: float, significant: bool) -> str:
  return f"**{p:.4f}**\\*" if significant else f"{p:.4f}"


def write_report(root: Path, result: dict, cells: Mapping, datasets: Sequence[Dataset], modes: Sequence[str],
                 seeds: Sequence[int], *, baseline: str, measure: str) -> None:
  """MODEL_DIR/ablation.md (tables, tests, embedded figures), ablation.json and ablation_figures/*.png."""
  figures = root / "ablation_figures"
  measures = result["measures"]
  lines = [f"# Tower-mode ablation: {', '.join(modes)} x seeds {list(seeds)}", "",
           f"Mean ± sample std over {len(seeds)} seeds. Paired tests of each mode against `{baseline}` on per-query "
           f"{measure}, each query's score averaged over seeds first: paired t-test (scipy `ttest_rel`) and "
           f"randomisation test (scipy `permutation_test`, paired, {result['n_resamples']} resamples), two-sided, "
           f"Holm-adjusted over the {len(result['tests'])} comparisons of this report (per test). "
           f"Bold with \\* = adjusted p < {result['alpha']}.", ""]
  for ds in datasets:
    lines += [f"## {ds.name} (fine-tuned on {ds.train_split})", ""]
    for target in ds.targets:
      rows = result["table"][ds.name][target.label]
      lines += [f"### {target.label} ({target.split})", "",
                "| mode | " + " | ".join(measures) + f" | Δ{measure} vs {baseline} | p t-test (Holm) | "
                "p randomisation (Holm) |", "|---" * (len(measures) + 4) + "|"]
      diffs = {}
      for mode in modes:
        cols = " | ".join(f"{rows[mode][m]['mean']:.4f} ± {rows[mode][m]['std']:.4f}" for m in measures)
        test = result["tests"].get(f"{ds.name}/{target.label}/{mode}")
        if test is None:
          lines.append(f"| {mode} | {cols} | (baseline) | | |")
          continue
        lines.append(f"| {mode} | {cols} | {test['mean_difference']:+.4f} | "
                     f"{_p(test['p_ttest_holm'], test['significant_ttest'])} (raw {test['p_ttest']:.4f}) | "
                     f"{_p(test['p_permutation_holm'], test['significant_permutation'])} "
                     f"(raw {test['p_permutation']:.4f}) |")
        per = lambda m: significance.average_over_seeds(  # noqa: E731
            {s: cells[(ds.name, m, s)]["targets"][target.label]["per_query"][measure] for s in seeds})
        ids, a, b = significance.aligned(per(baseline), per(mode))
        diffs[mode] = b - a
      lines.append("")
      if diffs:
        name = f"{ds.name}_{target.label}_differences.png"
        plots.save_png(plots.differences_figure(diffs, measure=measure, baseline=baseline,
                                                title=f"{ds.name} {target.label}: per-query {measure}, seed mean"),
                       figures / name)
        lines += [f"![per-query {measure} differences](ablation_figures/{name})", ""]
    target = ds.targets[0]
    analyses = {m: [cells[(ds.name, m, s)]["targets"][target.label]["analysis"] for s in seeds] for m in modes}
    sim, au = f"{ds.name}_similarities.png", f"{ds.name}_alignment_uniformity.png"
    plots.save_png(plots.similarity_figure(analyses, title=f"{ds.name} {target.label}"), figures / sim)
    plots.save_png(plots.alignment_uniformity_figure(analyses, title=f"{ds.name} {target.label}"), figures / au)
    lines += [f"Embedding spaces on {target.label}: cosine-similarity distributions per mode (histograms averaged "
              "over seeds) and alignment / uniformity per seed.", "",
              f"![similarity distributions](ablation_figures/{sim})", "",
              f"![alignment and uniformity](ablation_figures/{au})", ""]
  files.write_text(root / "ablation.md", "\n".join(lines))
  files.write_json(root / "ablation.json", result)
  print("\n".join(lines), flush=True)
