"""The tower-mode ablation: paired tests against independent references, Holm, figures, split checks, the job."""

import functools
import itertools
import json
import shutil

import numpy as np
import pytest
from scipy import stats

from mote_jax.analysis import plots, significance
from mote_jax.analysis.embedding_space import analyse
from mote_jax.jobs import ablation as ablation_lib
from mote_jax.retrieval import metrics


def _exact_sign_flip_p(d: np.ndarray) -> float:
  """Two-sided p of the paired randomisation test by enumerating all 2^n sign flips of the differences."""
  observed = abs(d.mean())
  flips = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
  null = np.abs((flips * d).mean(axis=1))
  return float(np.mean(null >= observed - 1e-12))


def test_paired_tests_equal_independent_computations():
  rng = np.random.default_rng(3)
  ids = [f"q{i}" for i in range(12)]
  a = {q: float(v) for q, v in zip(ids, rng.random(12))}
  b = {q: a[q] + float(v) for q, v in zip(ids, rng.normal(0.08, 0.1, 12))}
  result = significance.paired_tests(a, b, n_resamples=10_000)  # 2^12 = 4096 < 10,000: scipy enumerates exactly
  x, y = np.array([a[q] for q in ids]), np.array([b[q] for q in ids])
  d = y - x
  t_ref = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))  # the paired t statistic, by hand
  assert result["t_statistic"] == pytest.approx(t_ref, rel=1e-12)
  assert result["p_ttest"] == pytest.approx(2 * stats.t.sf(abs(t_ref), len(d) - 1), rel=1e-10)
  assert result["p_permutation"] == pytest.approx(_exact_sign_flip_p(d), abs=1e-12)
  assert result["mean_difference"] == pytest.approx(d.mean())


def test_holm_matches_the_step_down_definition():
  p = [0.01, 0.04, 0.03, 0.20]
  # sorted 0.01, 0.03, 0.04, 0.20 -> 4*0.01, 3*0.03, 2*0.04, 1*0.20, then running maximum
  assert significance.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.20])
  rng = np.random.default_rng(0)
  for _ in range(20):
    q = rng.random(7) ** 3
    m, order = len(q), np.argsort(q)
    ref = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
      running = max(running, min(1.0, (m - rank) * q[i]))
      ref[i] = running
    assert significance.holm(q) == pytest.approx(ref.tolist())


def _write_run_and_qrels(path, ranks: dict[str, int], depth: int = 20):
  """A run where query q's one relevant document d-q sits at ranks[q]; the others are non-relevant."""
  run = {}
  for q, r in ranks.items():
    docs = [f"n-{q}-{i}" for i in range(depth - 1)]
    docs.insert(r - 1, f"d-{q}")
    run[q] = {doc: float(depth - i) for i, doc in enumerate(docs)}
  metrics.write_run(path, run)
  return metrics.read_run(path)


def test_known_shift_is_significant_and_identical_runs_are_not(tmp_path):
  rng = np.random.default_rng(1)
  queries = [f"q{i}" for i in range(40)]
  qrels = {q: {f"d-{q}": 1} for q in queries}
  base_ranks = {q: int(r) for q, r in zip(queries, rng.integers(3, 11, len(queries)))}
  base = _write_run_and_qrels(tmp_path / "base.trec", base_ranks)
  better = _write_run_and_qrels(tmp_path / "better.trec", {q: r - 2 for q, r in base_ranks.items()})
  same = _write_run_and_qrels(tmp_path / "same.trec", base_ranks)
  per = lambda run: {q: v["nDCG@10"] for q, v in metrics.per_query_metrics(qrels, run, ["nDCG@10"]).items()}  # noqa
  expected_shift = np.mean([1 / np.log2(r - 1) - 1 / np.log2(r + 1) for r in base_ranks.values()])
  result = significance.compare_to_baseline({"siamese": {0: per(base)}, "mote": {0: per(better)},
                                             "separated": {0: per(same)}}, "siamese", n_resamples=2000)
  assert result["mote"]["mean_difference"] == pytest.approx(expected_shift)
  assert result["mote"]["significant_ttest"] and result["mote"]["significant_permutation"]
  assert result["mote"]["p_ttest_holm"] < 1e-3 and result["mote"]["p_permutation_holm"] < 0.01
  assert result["separated"]["mean_difference"] == 0.0
  assert not result["separated"]["significant_ttest"] and not result["separated"]["significant_permutation"]
  assert result["separated"]["p_ttest"] == 1.0 and result["separated"]["p_permutation"] == 1.0


def test_mismatched_queries_are_an_error():
  with pytest.raises(ValueError, match="only in mote"):
    significance.paired_tests({"a": 1.0}, {"a": 1.0, "b": 0.0}, names=("siamese", "mote"))


def _analysis(seed: int, spread: float) -> dict:
  rng = np.random.default_rng(seed)
  q, p = rng.normal(size=(30, 8)), rng.normal(size=(50, 8))
  p[:30] = q + spread * rng.normal(size=(30, 8))
  return analyse(q, [f"q{i}" for i in range(30)], p, [f"p{i}" for i in range(50)],
                 {f"q{i}": {f"p{i}": 1} for i in range(30)}, num_pairs=500)


def _check_png(path, fig):
  from PIL import Image
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200
  for ax in fig.axes:
    assert ax.get_xlabel() and ax.get_ylabel()


def test_figures_open_and_have_labelled_axes(tmp_path):
  analyses = {"mote": [_analysis(0, 0.3), _analysis(1, 0.3)], "siamese": [_analysis(2, 1.0), _analysis(3, 1.0)]}
  figs = {"sim.png": plots.similarity_figure(analyses, title="t"),
          "au.png": plots.alignment_uniformity_figure(analyses),
          "diff.png": plots.differences_figure({"mote": np.linspace(-0.2, 0.5, 30)}, measure="nDCG@10",
                                               baseline="siamese")}
  for name, fig in figs.items():
    plots.save_png(fig, tmp_path / name)
    _check_png(tmp_path / name, fig)
  assert len(figs["sim.png"].axes) == 2 and figs["sim.png"].axes[0].get_xlabel() == "cosine similarity"
  assert len(figs["sim.png"].axes[0].get_lines()) == 4  # query-query, passage-passage, query-passage, positives


def _small_beir(root, data_dir, n_test_queries=40, n_other_docs=80):
  """A BEIR dir of the documents judged for the first SciFact test queries plus the first other documents,
  with the train and test judgements on them."""
  src = data_dir / "scifact"
  root.mkdir()
  (root / "qrels").mkdir()
  test_rows = src.joinpath("qrels", "test.tsv").read_text().splitlines()[1:]
  first = list(dict.fromkeys(line.split("\t")[0] for line in test_rows))[:n_test_queries]
  wanted = {line.split("\t")[1].strip() for line in test_rows if line.split("\t")[0] in first}
  docs = [line for i, line in enumerate(src.joinpath("corpus.jsonl").read_text().splitlines())
          if i < n_other_docs or json.loads(line)["_id"] in wanted]
  (root / "corpus.jsonl").write_text("\n".join(docs) + "\n")
  doc_ids = {json.loads(line)["_id"] for line in docs}
  keep = set()
  for split in ("train", "test"):
    rows = [line for line in src.joinpath("qrels", f"{split}.tsv").read_text().splitlines()[1:]
            if line.split("\t")[1] in doc_ids]
    keep |= {line.split("\t")[0] for line in rows}
    (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
  queries = [line for line in src.joinpath("queries.jsonl").read_text().splitlines()
             if json.loads(line)["_id"] in keep]
  (root / "queries.jsonl").write_text("\n".join(queries) + "\n")
  return root


def test_missing_split_fails_before_any_training(tmp_path, data_dir):
  beir_dir = _small_beir(tmp_path / "tiny", data_dir)

  def no_training(*args, **kwargs):
    raise AssertionError("training started before the splits were checked")

  spec = {"tiny": {"train": str(beir_dir), "evaluate": {"test": [str(beir_dir), "test"]}},
          "other": {"train": str(beir_dir), "evaluate": {"dev": [str(beir_dir), "dev"]}}}
  with pytest.raises(FileNotFoundError, match=r"dataset 'other' \(dev\): no split 'dev'.*\['test', 'train'\]"):
    ablation_lib.ablation(str(tmp_path / "run"), datasets=spec, modes=["siamese"], seeds=[0],
                          pretrain_fn=no_training, finetune_fn=no_training)
  with pytest.raises(ValueError, match=r"ablation.datasets\['x'\]"):
    ablation_lib.parse_datasets({"x": {"train": "d", "evaluate": {"t": "d"}}})


def test_gin_files_parse():
  import gin
  from mote_jax import jobs  # noqa: F401  (registers the configurables)
  from mote_jax.launch import parse_flags, parse_gin
  for name, extra in (("runs/ablation_scifact_cpu.gin", []),
                      ("runs/ablation_msmarco.gin", ["--gin.MSMARCO=/m", "--gin.DL19=/a", "--gin.DL20=/b",
                                                    "--gin.DOC_RECORDS=/d", "--gin.QUERY_RECORDS=/q"])):
    gin.clear_config(clear_constants=True)
    try:
      parse_gin(parse_flags([f"--gin_file={name}", "--gin.MODEL_DIR=/tmp/x", *extra]))
      datasets = gin.query_parameter("ablation.datasets")
      assert gin.query_parameter("run.job").selector.endswith("ablation")
    finally:
      gin.clear_config(clear_constants=True)
    assert set(datasets) in ({"scifact"}, {"msmarco"})


def test_scifact_gin_gives_every_cell_its_pretraining_data(tmp_path, data_dir):
  """The CPU gin, run as its command runs it, reaches pre-training with span-pair streams of the SciFact records
  (made once in MODEL_DIR/records); only the Beam job and the training itself are replaced here."""
  import gin
  from mote_jax import jobs  # noqa: F401  (registers the configurables)
  from mote_jax.launch import parse_flags, parse_gin

  class Reached(Exception):
    pass

  made, seen = [], {}

  def fake_preprocess(model_dir, *, input, output, tokenizer, max_len, overwrite):
    made.append((input, output, max_len))

  def fake_task(name, directory, *, max_len):
    return f"{name}:{directory}:{max_len}"

  def pretrain_fn(model_dir, **kwargs):
    seen.update(kwargs, model_dir=model_dir)
    raise Reached

  gin.clear_config(clear_constants=True)
  try:
    parse_gin(parse_flags(["--gin_file=runs/ablation_scifact_cpu.gin", f"--gin.MODEL_DIR={tmp_path}",
                           f"--gin.SCIFACT='{data_dir / 'scifact'}'"]))
    with pytest.raises(Reached):
      ablation_lib.ablation(str(tmp_path), preprocess_fn=fake_preprocess, span_task_fn=fake_task,
                            pretrain_fn=pretrain_fn, finetune_fn=None)
  finally:
    gin.clear_config(clear_constants=True)
  assert made == [(str(data_dir / "scifact" / "corpus.jsonl"), str(tmp_path / "records"), 128)]
  (stream,) = seen["streams"]
  assert (stream.task, stream.batch_size) == (f"ablation_span_pairs:{tmp_path / 'records'}:128", 8)
  assert seen["model_dir"] == str(tmp_path / "pretrain" / "mote" / "seed0")
  assert (seen["tower_mode"], seen["data_seed"], seen["init_seed"], seen["trainer"].seed) == ("mote", 0, 0, 0)


@pytest.mark.slow  # 4 cells of fine-tuning + evaluation: minutes on a shared 2-core machine
def test_ablation_end_to_end_tiny(tmp_path, data_dir, random_bert_dir, minilm_path):
  from mote_jax.data.finetune import SamplingConfig
  from mote_jax.jobs import finetune as finetune_lib
  from mote_jax.retrieval.encode import EncodeOptions
  from mote_jax.training.optimizer import OptimizerConfig
  from mote_jax.training.trainer import TrainerConfig
  beir_dir = _small_beir(tmp_path / "tiny", data_dir)
  model = tmp_path / "bert"
  shutil.copytree(random_bert_dir, model)
  for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
    if (src := __import__("pathlib").Path(minilm_path) / name).exists():
      shutil.copy(src, model / name)
  trainer = TrainerConfig(num_steps=2, log_every=1, checkpoint_every=2, eval_every=0, progress_bar=False)
  finetune_fn = functools.partial(finetune_lib.finetune, batch_size=8,
                                  sampling=SamplingConfig(negatives=1, query_max_len=16, passage_max_len=32),
                                  optimizer=OptimizerConfig(learning_rate=1e-4, warmup_steps=1, total_steps=2),
                                  encode_options=EncodeOptions(max_length=32, batch_size=64))
  calls = []

  def counted(*args, **kwargs):
    calls.append(args[0])
    return finetune_fn(*args, **kwargs)

  spec = {"tiny": {"train": str(beir_dir), "evaluate": {"test": [str(beir_dir), "test"]}}}
  kwargs = dict(datasets=spec, modes=["siamese", "mote"], seeds=[0, 1], checkpoint=str(model), pretrain=False,
                encode_options=EncodeOptions(max_length=32, batch_size=64), finetune_trainer=trainer,
                n_resamples=999, finetune_fn=counted, measure="R@50", measures=["R@50", "nDCG@10"])
  run_dir = tmp_path / "run"
  result = ablation_lib.ablation(str(run_dir), **kwargs)
  assert len(calls) == 4
  report = json.loads((run_dir / "ablation.json").read_text())
  assert report == json.loads(json.dumps(result))

  # The report's p-values equal scipy's on the per-query scores read back from the cells, seed-averaged.
  cells = {(m, s): json.loads((run_dir / "tiny" / m / f"seed{s}" / "cell.json").read_text())
           for m in ("siamese", "mote") for s in (0, 1)}
  assert cells[("mote", 1)]["tower_mode"] == "mote" and cells[("siamese", 0)]["tower_mode"] == "siamese"
  per = {m: {q: np.mean([cells[(m, s)]["targets"]["test"]["per_query"]["R@50"][q] for s in (0, 1)])
             for q in cells[(m, 0)]["targets"]["test"]["per_query"]["R@50"]} for m in ("siamese", "mote")}
  ids = sorted(per["siamese"])
  a, b = np.array([per["siamese"][q] for q in ids]), np.array([per["mote"][q] for q in ids])
  test = report["tests"]["tiny/test/mote"]
  assert len(ids) >= 30 and np.any(b != a)
  assert test["p_ttest"] == pytest.approx(stats.ttest_rel(b, a).pvalue, rel=1e-9)
  ref = stats.permutation_test((b, a), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                               permutation_type="samples", n_resamples=999, rng=np.random.default_rng(0))
  assert test["p_permutation"] == pytest.approx(ref.pvalue)
  assert test["p_ttest_holm"] == pytest.approx(test["p_ttest"])  # a family of one comparison
  # mean +- std over seeds from the cells' metrics
  values = [cells[("mote", s)]["targets"]["test"]["metrics"]["R@50"] for s in (0, 1)]
  row = report["table"]["tiny"]["test"]["mote"]["R@50"]
  assert row["mean"] == pytest.approx(np.mean(values)) and row["std"] == pytest.approx(np.std(values, ddof=1))
  # the seeds differ (data order, dropout), so the two cells are not copies
  assert cells[("mote", 0)]["targets"]["test"]["analysis"]["alignment"] != pytest.approx(
      cells[("mote", 1)]["targets"]["test"]["analysis"]["alignment"], rel=1e-6)

  markdown = (run_dir / "ablation.md").read_text()
  pngs = sorted(p.name for p in (run_dir / "ablation_figures").glob("*.png"))
  assert pngs == ["tiny_alignment_uniformity.png", "tiny_similarities.png", "tiny_test_differences.png"]
  for name in pngs:
    assert f"(ablation_figures/{name})" in markdown
  assert "| mote |" in markdown and "ΔR@50 vs siamese" in markdown and "| siamese |" in markdown

  # A re-run reuses every finished cell.
  calls.clear()
  ablation_lib.ablation(str(run_dir), **kwargs)
  assert calls == []


def test_quickstart_report_embeds_its_figures(tmp_path):
  from types import SimpleNamespace
  from mote_jax.jobs import quickstart
  queries = [f"q{i}" for i in range(10)]
  qrels = {q: {f"d-{q}": 1} for q in queries}
  for mode, shift in (("siamese", 0), ("mote", 1)):
    (tmp_path / mode / "finetune" / "eval").mkdir(parents=True)
    _write_run_and_qrels(tmp_path / mode / "finetune" / "eval" / "run-test-exact.trec",
                         {q: 3 + i % 4 - shift for i, q in enumerate(queries)})
  markdown = quickstart._figures(tmp_path, SimpleNamespace(qrels=qrels),
                                 {"mote": _analysis(0, 0.3), "siamese": _analysis(1, 1.0)}, "exact")
  from PIL import Image
  for name in ("similarities.png", "alignment_uniformity.png", "differences.png"):
    assert f"(quickstart_figures/{name})" in markdown
    with Image.open(tmp_path / "quickstart_figures" / name) as image:
      assert image.format == "PNG"
