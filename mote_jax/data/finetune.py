"""Contrastive fine-tuning data: training groups (query, positives, ranked negatives) -> fixed-shape batches.

Sources (all give `TrainGroup`s):
  tevatron_groups   Tevatron jsonl: {"query_id", "query", "positive_passages": [{"docid", "title", "text"}],
                    "negative_passages": [...]} per line, and optionally "judged_docids": [...] (every doc id
                    the qrels judge for the query; `write_negatives` writes it).
  beir_groups       a BEIR train split (corpus + queries + qrels) with negatives from a run: BM25 (`bm25_run`,
                    via the bm25s library) or a mined TREC run file. Positives are the passages judged at
                    `min_positive_grade` or above (highest grade first); every judged passage, of any grade, is
                    dropped from the negatives and listed in `TrainGroup.judged`.

Sampling (Tevatron's recipe, made deterministic): epoch e visits the groups in a permutation drawn from
(seed, e); a group's positive is positives[e % #positives]; its n negatives are a window of its negative list,
shuffled once per group from (seed, group), that advances by n every epoch, so every negative is used before
any repeats (lists shorter than n are sampled with replacement from (seed, group, e)). The k-th example of the
stream is therefore a pure function of (seed, k): `FinetuneBatches(start_step=t)` starts at step t without
replaying anything, and host h of n reads rows [h*B/n, (h+1)*B/n) of every global batch (disjoint, covering).

Batches (int32): query_input_ids / query_attention_mask [B/n, Lq]; passage_input_ids / passage_attention_mask
[B/n, 1 + negatives, Lp] with the positive first; passage_doc_index [B/n, 1 + negatives], each passage's index in
the stream's passage vocabulary (`FinetuneStream.doc_index`, -1 for a passage without a doc id), and
query_judged_index [B/n, J], the indices of every passage judged for the query (-1 padded; J is the largest
judged count of the groups), which the contrastive loss uses to mask false negatives over the global batch.

Dev split: `split_dev` carves a reproducible dev set out of the train queries by hashing (seed, query id).

`register_finetune_task` exposes the same stream as a seqio Task (a FunctionDataSource), for seqio mixtures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterator, Mapping, Sequence

import numpy as np
from etils import epath

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Passage:
  docid: str
  text: str  # title and body joined as BEIR does: (title + " " + text).strip()


@dataclasses.dataclass(frozen=True)
class TrainGroup:
  """One query's training data. `judged`: doc ids the qrels judge for the query at any grade (positives
  included); never used as its negatives, and masked out of its softmax denominator when they show up in the
  batch as other queries' passages. Empty: the positives' doc ids stand in."""

  query_id: str
  query: str
  positives: tuple[Passage, ...]  # by decreasing relevance grade
  negatives: tuple[Passage, ...]  # ranked (best first) or in file order
  judged: tuple[str, ...] = ()

  def judged_ids(self) -> tuple[str, ...]:
    """Every doc id judged for the query: `judged` and the positives' ids (non-empty ids only)."""
    return tuple(dict.fromkeys(d for d in self.judged + tuple(p.docid for p in self.positives) if d))


def _join(title: str, text: str) -> str:
  return f"{title} {text}".strip()


def tevatron_groups(path: str | os.PathLike) -> list[TrainGroup]:
  """Training groups of a Tevatron jsonl file; errors name file:line and field."""
  groups = []
  with epath.Path(path).open("rb") as f:  # local or gs://...
    for line_no, raw in enumerate(f, 1):
      line = raw.decode("utf-8")
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON ({e.msg})") from e
      try:
        passages = lambda key: tuple(  # noqa: E731
            Passage(str(p.get("docid", "")), _join(p.get("title", ""), p["text"])) for p in record.get(key, []))
        group = TrainGroup(str(record["query_id"]), record["query"], passages("positive_passages"),
                           passages("negative_passages"), judged=tuple(map(str, record.get("judged_docids", []))))
      except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: missing or malformed field {e}") from e
      if not group.query.strip():
        raise ValueError(f"{where}: query {group.query_id!r} is empty")
      if not group.positives:
        raise ValueError(f"{where}: query {group.query_id!r} has no positive_passages")
      groups.append(group)
  if not groups:
    raise ValueError(f"{path}: no training groups")
  return groups


def bm25_run(corpus_ids: Sequence[str], passages: Sequence[str], queries: Mapping[str, str], k: int = 100,
             k1: float = 1.5, b: float = 0.75) -> dict[str, dict[str, float]]:
  """BM25 (bm25s's Lucene variant, English stemming and stop words) top-k run: {query id: {doc id: score}}.

  k1=1.5, b=0.75 reproduce BEIR's published Elasticsearch BM25 on SciFact test (nDCG@10 0.686); Anserini's
  MS MARCO setting is k1=0.9, b=0.4.
  """
  import bm25s
  import Stemmer
  stemmer = Stemmer.Stemmer("english")
  retriever = bm25s.BM25(k1=k1, b=b)
  retriever.index(bm25s.tokenize(list(passages), stopwords="en", stemmer=stemmer, show_progress=False),
                  show_progress=False)
  query_ids = list(queries)
  tokens = bm25s.tokenize([queries[q] for q in query_ids], stopwords="en", stemmer=stemmer, show_progress=False)
  k = min(k, len(corpus_ids))
  indices, scores = retriever.retrieve(tokens, k=k, show_progress=False)
  return {q: {corpus_ids[i]: float(s) for i, s in zip(row, row_scores)}
          for q, row, row_scores in zip(query_ids, indices, scores)}


def beir_groups(corpus_ids: Sequence[str], passages: Sequence[str], queries: Mapping[str, str],
                qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
                num_negatives: int = 30, skip_first: int = 0, min_positive_grade: int = 1) -> list[TrainGroup]:
  """Groups of a BEIR train split: positives from qrels (grade >= `min_positive_grade`, highest grade first),
  negatives from `run` minus every judged passage (any grade, 0 and below included: a judged passage is a
  known quantity, not a sampled negative).

  `num_negatives` ranked candidates are kept per query (after dropping the first `skip_first`, as some recipes
  skip the very top of a run, where unjudged positives are most likely). Queries without a positive, or whose run
  holds no unjudged document, are dropped (counted in the log).
  """
  if min_positive_grade < 1:
    raise ValueError(f"min_positive_grade={min_positive_grade}: expected >= 1 (grade 0 means not relevant)")
  text = dict(zip(corpus_ids, passages))
  groups, without_positive, without_negative = [], 0, 0
  for qid, query in queries.items():
    judged = qrels.get(qid, {})
    graded = sorted((d for d, rel in judged.items() if rel >= min_positive_grade), key=lambda d: -judged[d])
    positives = tuple(Passage(d, text[d]) for d in graded)
    if not positives:
      without_positive += 1
      continue
    ranked = sorted(run.get(qid, {}).items(), key=lambda item: -item[1])
    candidates = [d for d, _ in ranked if d not in judged][skip_first:]
    negatives = tuple(Passage(d, text[d]) for d in candidates[:num_negatives])
    if not negatives:
      without_negative += 1
      continue
    groups.append(TrainGroup(qid, query, positives, negatives, judged=tuple(judged)))
  if without_positive or without_negative:
    log.warning("left out %d queries without a positive judgement and %d whose run has no negative",
                without_positive, without_negative)
  if not groups:
    raise ValueError("no training groups: no query has a positive judgement")
  return groups


def write_negatives(path: str | os.PathLike, groups: Sequence[TrainGroup]) -> epath.Path:
  """Writes groups as Tevatron jsonl (temp file, then rename; on an object store, one object write)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path if "://" in os.fspath(path) else path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with tmp.open("w") as f:
    for g in groups:
      record = {"query_id": g.query_id, "query": g.query,
                "positive_passages": [{"docid": p.docid, "title": "", "text": p.text} for p in g.positives],
                "negative_passages": [{"docid": p.docid, "title": "", "text": p.text} for p in g.negatives]}
      if g.judged:
        record["judged_docids"] = list(g.judged)
      f.write(json.dumps(record) + "\n")
  if tmp != path:
    tmp.replace(path)
  return path


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  negatives: int = 7  # hard negatives per query (Tevatron's train_n_passages = 1 + negatives)
  query_max_len: int = 32
  passage_max_len: int = 128


def split_dev(query_ids: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
  """(train ids, dev ids): a query goes to dev when sha256(f"{seed}:{query id}") / 2**64 < `fraction`, so the
  split depends on the id alone (not on file order or on the other queries) and is the same on every host."""
  import hashlib
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"dev fraction {fraction}: expected 0 < fraction < 1")
  def to_dev(qid):
    digest = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction
  dev = [q for q in query_ids if to_dev(q)]
  chosen = set(dev)
  return [q for q in query_ids if q not in chosen], dev


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


class FinetuneStream:
  """The deterministic example stream over tokenised groups; `example(k)` is a pure function of (seed, k)."""

  def __init__(self, groups: Sequence[TrainGroup], tokenizer, sampling: SamplingConfig = SamplingConfig(),
               seed: int = 0):
    self.groups = list(groups)
    self.sampling = sampling
    self.seed = seed
    self.pad_id = tokenizer.pad_token_id
    texts = {}  # docid/text -> token ids, each passage tokenised once
    for g in self.groups:
      for p in g.positives + g.negatives:
        texts.setdefault(p.text, None)
    passage_texts = list(texts)
    encode = lambda xs, n: tokenizer(xs, truncation=True, max_length=n)["input_ids"]  # noqa: E731
    self._passage_ids = dict(zip(passage_texts, encode(passage_texts, sampling.passage_max_len)))
    self._query_ids = encode([g.query for g in self.groups], sampling.query_max_len)
    self._negative_orders = [_rng(seed, 1, i).permutation(len(g.negatives)) for i, g in enumerate(self.groups)]
    # Passage vocabulary for false-negative masking: sorted doc ids, so every host numbers them alike.
    docids = sorted({p.docid for g in self.groups for p in g.positives + g.negatives if p.docid})
    self.doc_index = {d: i for i, d in enumerate(docids)}
    judged = [[self.doc_index[d] for d in g.judged_ids() if d in self.doc_index] for g in self.groups]
    self._judged = np.full((len(self.groups), max(map(len, judged), default=1) or 1), -1, np.int32)
    for i, row in enumerate(judged):
      self._judged[i, :len(row)] = row

  def __len__(self) -> int:
    return len(self.groups)

  @property
  def judged_width(self) -> int:
    """J, the width of `query_judged_index`."""
    return self._judged.shape[1]

  def example(self, k: int) -> tuple[list[int], list[list[int]]]:
    """(query ids, [positive ids, negative ids...]) of the k-th example of the stream."""
    index, passages = self._draw(k)
    return self._query_ids[index], [self._passage_ids[p.text] for p in passages]

  def _draw(self, k: int) -> tuple[int, list[Passage]]:
    """(group index, [positive, negatives...]) of the k-th example."""
    n_groups, n_neg = len(self.groups), self.sampling.negatives
    epoch, position = divmod(k, n_groups)
    index = int(_rng(self.seed, 0, epoch).permutation(n_groups)[position])
    group = self.groups[index]
    positive = group.positives[epoch % len(group.positives)]
    negatives = group.negatives
    if not negatives and n_neg:
      raise ValueError(f"query {group.query_id!r} has no negatives (needs {n_neg})")
    if len(negatives) >= n_neg:
      order = self._negative_orders[index]
      start = (epoch * n_neg) % len(negatives)
      picks = [order[(start + j) % len(negatives)] for j in range(n_neg)]
    else:
      picks = _rng(self.seed, 2, index, epoch).integers(len(negatives), size=n_neg)
    return index, [positive] + [negatives[i] for i in picks]

  def batch(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
    """Fixed-shape padded arrays for examples `rows`."""
    s = self.sampling
    q_ids = np.full((len(rows), s.query_max_len), self.pad_id, np.int32)
    p_ids = np.full((len(rows), 1 + s.negatives, s.passage_max_len), self.pad_id, np.int32)
    p_index = np.full((len(rows), 1 + s.negatives), -1, np.int32)
    q_judged = np.empty((len(rows), self._judged.shape[1]), np.int32)
    for r, k in enumerate(rows):
      index, passages = self._draw(k)
      query = self._query_ids[index]
      q_ids[r, :len(query)] = query
      q_judged[r] = self._judged[index]
      for j, p in enumerate(passages):
        ids = self._passage_ids[p.text]
        p_ids[r, j, :len(ids)] = ids
        p_index[r, j] = self.doc_index.get(p.docid, -1)
    # Every real sequence starts with [CLS], so a non-pad position is exactly an attended one.
    return {"query_input_ids": q_ids, "query_attention_mask": (q_ids != self.pad_id).astype(np.int32),
            "passage_input_ids": p_ids, "passage_attention_mask": (p_ids != self.pad_id).astype(np.int32),
            "passage_doc_index": p_index, "query_judged_index": q_judged}


class FinetuneBatches(Iterator[dict]):
  """One host's rows of every global batch from `start_step` on (no replay: O(1) resume)."""

  def __init__(self, stream: FinetuneStream, *, batch_size: int, start_step: int = 0, shard_index: int = 0,
               num_shards: int = 1):
    if batch_size % num_shards:
      raise ValueError(f"batch_size={batch_size} must be a multiple of num_shards={num_shards}")
    if not 0 <= shard_index < num_shards:
      raise ValueError(f"shard_index={shard_index} out of range for num_shards={num_shards}")
    self.stream = stream
    self.batch_size = batch_size
    self.local = batch_size // num_shards
    self.offset = shard_index * self.local
    self.step = start_step

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    first = self.step * self.batch_size + self.offset
    batch = self.stream.batch(range(first, first + self.local))
    self.step += 1
    return batch

  @property
  def steps_per_epoch(self) -> int:
    return max(len(self.stream) // self.batch_size, 1)


def register_finetune_task(name: str, stream: FinetuneStream):
  """The stream as a seqio Task (FunctionDataSource; shards by example index), e.g. for seqio mixtures."""
  import seqio
  import tensorflow as tf
  s = stream.sampling

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
    del split, shuffle_files, seed  # the stream's own seed fixes the order

    def generate():
      k = 0
      while True:
        batch = stream.batch([k])
        yield {key: value[0] for key, value in batch.items()}
        k += 1

    signature = {
        "query_input_ids": tf.TensorSpec((s.query_max_len,), tf.int32),
        "query_attention_mask": tf.TensorSpec((s.query_max_len,), tf.int32),
        "passage_input_ids": tf.TensorSpec((1 + s.negatives, s.passage_max_len), tf.int32),
        "passage_attention_mask": tf.TensorSpec((1 + s.negatives, s.passage_max_len), tf.int32),
        "passage_doc_index": tf.TensorSpec((1 + s.negatives,), tf.int32),
        "query_judged_index": tf.TensorSpec((stream.judged_width,), tf.int32),
    }
    return tf.data.Dataset.from_generator(generate, output_signature=signature)

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  source = seqio.FunctionDataSource(dataset_fn, splits=("train",))
  return seqio.TaskRegistry.add(name, source=source, output_features={}, preprocessors=[])
