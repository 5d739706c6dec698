"""IR metrics (ir_measures, pytrec_eval backend), TREC run files and evaluation reports.

A run is {query id: {doc id: score}}; qrels are {query id: {doc id: relevance}}. Metric names are ir_measures'
(nDCG@10, RR@10 = MRR@10, R@k = Recall@k, AP = MAP over the run's depth).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from mote_jax.retrieval import files

log = logging.getLogger(__name__)

DEFAULT_MEASURES: tuple[str, ...] = ("nDCG@10", "RR@10", "R@10", "R@100", "R@1000", "AP")

Run = dict[str, dict[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


class RunFormatError(ValueError):
  """A malformed TREC run file; the message names file:line."""


def ranking_to_run(query_ids: Sequence[str], doc_ids: Sequence[str], scores: np.ndarray,
                   indices: np.ndarray) -> Run:
  """Search output (scores, corpus row indices [Q, k]) -> run {query id: {doc id: score}}, best first."""
  if len(query_ids) != len(scores) or scores.shape != indices.shape:
    raise ValueError(f"{len(query_ids)} query ids, scores {scores.shape}, indices {indices.shape}")
  return {q: {doc_ids[i]: float(s) for s, i in zip(row_scores, row_indices)}
          for q, row_scores, row_indices in zip(query_ids, scores, indices)}


def compute_metrics(qrels: Qrels, run: Mapping[str, Mapping[str, float]],
                    measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, float]:
  """Mean of each measure over the judged queries, by name; judged queries missing from the run count as 0.

  (pytrec_eval on its own skips judged queries that have no run entry, which would inflate the means.)
  """
  per_query = per_query_metrics(qrels, run, measures)
  return {name: float(np.mean([values[name] for values in per_query.values()])) for name in measures}


def per_query_metrics(qrels: Qrels, run: Mapping[str, Mapping[str, float]],
                      measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, dict[str, float]]:
  """{judged query id: {measure name: value}}; a judged query without results scores 0 on every measure."""
  import ir_measures
  parsed = {name: ir_measures.parse_measure(name) for name in measures}
  by_measure = {measure: name for name, measure in parsed.items()}
  qrels = {q: dict(judged) for q, judged in qrels.items() if judged}
  missing = [q for q in qrels if not run.get(q)]
  if missing:
    log.warning("%d judged queries have no results in the run (they score 0): %s", len(missing), missing[:5])
  out = {q: {name: 0.0 for name in measures} for q in qrels}
  judged_run = {q: dict(run[q]) for q in qrels if run.get(q)}
  for metric in ir_measures.iter_calc(list(parsed.values()), qrels, judged_run):
    out[metric.query_id][by_measure[metric.measure]] = float(metric.value)
  return out


def write_run(path: str | os.PathLike, run: Mapping[str, Mapping[str, float]], tag: str = "mote_jax") -> epath.Path:
  """Writes a TREC run file atomically: `qid Q0 docid rank score tag`, best first, ranks from 1.

  Scores are written with Python's shortest round-trip repr, so reading the file gives back the same floats.
  """
  return files.write_text(path, format_run(run, tag))


def format_run(run: Mapping[str, Mapping[str, float]], tag: str = "mote_jax") -> str:
  """The TREC run lines of `run` (see `write_run`), e.g. one block of queries of a run written block by block."""
  if not tag or any(c.isspace() for c in tag):
    raise ValueError(f"run tag {tag!r} must be a non-empty string without whitespace")
  lines = []
  for query_id, docs in run.items():
    for doc_id in (query_id, *docs):
      if not doc_id or any(c.isspace() for c in doc_id):
        raise ValueError(f"id {doc_id!r} (query {query_id!r}) cannot be written to a TREC run: empty or has "
                         "whitespace")
    ranked = sorted(docs.items(), key=lambda item: (-item[1], item[0]))
    for rank, (doc_id, score) in enumerate(ranked, 1):
      if not math.isfinite(score):
        raise ValueError(f"query {query_id!r}, doc {doc_id!r}: score {score} is not finite")
      lines.append(f"{query_id} Q0 {doc_id} {rank} {float(score)!r} {tag}\n")
  return "".join(lines)


def read_run(path: str | os.PathLike) -> Run:
  """Reads a TREC run file (6 whitespace-separated columns); malformed lines raise RunFormatError (file:line)."""
  path = epath.Path(path)
  run: Run = {}
  with path.open("rb") as f:  # local or object store (gs://...)
    for line_no, raw in enumerate(f, 1):
      line = raw.decode("utf-8")
      if not line.strip():
        continue
      columns = line.split()
      if len(columns) != 6:
        raise RunFormatError(f"{path}:{line_no}: expected 6 columns (qid Q0 docid rank score tag), "
                             f"got {len(columns)}: {line.rstrip()[:200]!r}")
      query_id, _, doc_id, rank, score, _ = columns
      try:
        int(rank)
        value = float(score)
      except ValueError:
        raise RunFormatError(f"{path}:{line_no}: rank {rank!r} or score {score!r} is not a number") from None
      docs = run.setdefault(query_id, {})
      if doc_id in docs:
        raise RunFormatError(f"{path}:{line_no}: document {doc_id!r} listed twice for query {query_id!r}")
      docs[doc_id] = value
  return run


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> epath.Path:
  """One evaluation's report as JSON, written atomically."""
  return files.write_json(path, report)
