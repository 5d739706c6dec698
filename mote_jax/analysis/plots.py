"""Figures of the tower-mode comparison (matplotlib, PNG).

Figures are built with `matplotlib.figure.Figure` directly, not pyplot, so no GUI backend or global figure
state is involved (PNG is rendered by Agg); each builder returns the Figure so callers and tests can inspect
its axes, and `save_png` writes it atomically.

  similarity_figure       one panel per tower mode: the cosine-similarity histograms of random query-query,
                          passage-passage and query-passage pairs and of the positive (query, passage) pairs
                          (from `embedding_space.analyse`; several seeds' histograms are averaged);
  alignment_uniformity    alignment against uniformity (Wang & Isola 2020), one point per mode and seed;
  differences_figure      per comparison, each query's score difference against the baseline, sorted.
"""

from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from mote_jax.retrieval import files

DISTRIBUTIONS = (("query_query", "query-query"), ("passage_passage", "passage-passage"),
                 ("query_passage", "query-passage"), ("positive_pairs", "positive pairs"))


def similarity_figure(analyses: Mapping[str, Sequence[Mapping]], *, title: str = "") -> Figure:
  """`analyses`: {mode: [analysis dict of each seed]}; every analysis must use the same bins."""
  modes = list(analyses)
  fig = Figure(figsize=(4.2 * len(modes), 3.4), layout="constrained")
  axes = fig.subplots(1, len(modes), sharey=True, squeeze=False)[0]
  for ax, mode in zip(axes, modes):
    runs = list(analyses[mode])
    edges = np.asarray(runs[0]["cosine"]["bins"])
    centres = (edges[:-1] + edges[1:]) / 2
    for key, label in DISTRIBUTIONS:
      hist = np.mean([np.asarray(a["cosine"][key]["histogram"], np.float64) for a in runs], axis=0)
      fraction = hist / max(hist.sum(), 1.0)
      mean = np.mean([a["cosine"][key]["mean"] for a in runs])
      ax.plot(centres, fraction, drawstyle="steps-mid", label=f"{label} (mean {mean:.2f})")
    ax.set_title(f"{mode} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("fraction of pairs")
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  return fig


def alignment_uniformity_figure(analyses: Mapping[str, Sequence[Mapping]], *, title: str = "") -> Figure:
  """Alignment (lower: positives closer) against pooled uniformity (lower: more uniform), a point per seed."""
  fig = Figure(figsize=(5.2, 4.0), layout="constrained")
  ax = fig.subplots()
  for mode, runs in analyses.items():
    ax.scatter([a["uniformity"]["pooled"] for a in runs], [a["alignment"] for a in runs], label=mode)
  ax.set_xlabel("uniformity, queries and passages pooled (log E exp(-2||x-y||²))")
  ax.set_ylabel("alignment (E ||q - p+||²)")
  ax.legend()
  ax.set_title(title or "alignment and uniformity (one point per seed)")
  return fig


def differences_figure(differences: Mapping[str, np.ndarray], *, measure: str, baseline: str,
                       title: str = "") -> Figure:
  """`differences`: {label: per-query differences (system - baseline) [n]}; one panel each, sorted."""
  labels = list(differences)
  fig = Figure(figsize=(4.6 * len(labels), 3.4), layout="constrained")
  axes = fig.subplots(1, len(labels), sharey=True, squeeze=False)[0]
  for ax, label in zip(axes, labels):
    d = np.sort(np.asarray(differences[label], np.float64))[::-1]
    colours = np.where(d > 0, "tab:green", np.where(d < 0, "tab:red", "tab:gray"))
    ax.bar(np.arange(len(d)), d, width=1.0, color=colours)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_title(f"{label}: {int((d > 0).sum())} better, {int((d < 0).sum())} worse, mean {d.mean():+.4f}",
                 fontsize=9)
    ax.set_xlabel("query (sorted by difference)")
    ax.set_ylabel(f"{measure} difference vs {baseline}")
  if title:
    fig.suptitle(title)
  return fig


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> str:
  """Renders `fig` as PNG and writes it atomically; returns the path."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  return os.fspath(files.write_bytes(path, buffer.getvalue()))
