"""Contrastive fine-tuning data: training groups held as integer ids -> fixed-shape batches.

Scale: the corpus and the queries are tokenised once into flat arrays (`mote_jax.data.flat_tokens`: ids int32 +
offsets int64, cached by fingerprint and memory-mapped by every host); a group is a few integers in CSR arrays
(`GroupTable`); negatives files hold doc ids, never text. Memory is therefore the token arrays (mapped, shared by
the page cache) plus 4 bytes per negative, and drawing a batch costs O(batch).

Sources (all give a `GroupTable` over the rows of a corpus):
  beir_groups       a BEIR train split (corpus + queries + qrels) with negatives from a run: BM25
                    (`mote_jax.data.bm25`, a `RankedRun`) or a mined run ({query id: {doc id: score}}). Positives are
                    the passages judged at `min_positive_grade` or above (highest grade first); every judged passage,
                    of any grade, is dropped from the negatives and listed among the group's judged rows.
  read_negatives    a negatives file: the ids format `write_negatives` writes, {"query_id", "positive_document_ids",
                    "negative_document_ids", "judged_document_ids"} per line (Tevatron 2's field names), or Tevatron
                    jsonl with text ({"query_id", "query", "positive_passages": [{"docid", "title", "text"}],
                    "negative_passages": [...]}), whose doc ids are mapped to corpus rows (the text is not read).
                    A doc id that is not in the corpus is an error naming the count and the first ids.
  tevatron_groups   Tevatron jsonl with text as `TrainGroup`s (no corpus needed); `FinetuneStream.from_train_groups`
                    builds a stream over them (its passage vocabulary: the groups' passages, sorted by doc id).

Sampling (Tevatron's recipe, made deterministic): epoch e visits the groups in a permutation drawn from
(seed, e), computed once per epoch; a group's positive is positives[e % #positives]; its n negatives are a window
of its negative list, shuffled once per group (one draw from (seed) for all groups, made when the stream is
built), that advances by n every epoch, so every negative is used before any repeats (lists shorter than n are
sampled with replacement from (seed, group, e)). The k-th example of the stream is therefore a pure function of
(seed, k): `FinetuneBatches(start_step=t)` starts at step t without replaying anything, and host h of n reads rows
[h*B/n, (h+1)*B/n) of every global batch (disjoint, covering).

Batches (int32): query_input_ids / query_attention_mask [B/n, Lq]; passage_input_ids / passage_attention_mask
[B/n, 1 + negatives, Lp] with the positive first; passage_doc_index [B/n, 1 + negatives], each passage's index in
the stream's passage vocabulary (the corpus row; -1 for a passage without a doc id), and query_judged_index
[B/n, J], the indices of every passage judged for the query (-1 padded; J is the largest judged count of the
groups), which the contrastive loss uses to mask false negatives over the global batch.

Dev split: `split_dev` carves a reproducible dev set out of the train queries by hashing (seed, query id).

`register_finetune_task` exposes the same stream as a seqio Task (a FunctionDataSource), for seqio mixtures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from etils import epath

from mote_jax.data.bm25 import RankedRun, bm25_run, sharded_bm25_run  # noqa: F401  (re-exported)
from mote_jax.data.flat_tokens import FlatTokens, cached_tokens, is_uri, texts_fingerprint

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class Passage:
  docid: str
  text: str  # title and body joined as BEIR does: (title + " " + text).strip()


@dataclasses.dataclass(frozen=True)
class TrainGroup:
  """One query's training data with passage text (Tevatron's text format; `FinetuneStream.from_train_groups`).
  `judged`: doc ids the qrels judge for the query at any grade (positives included); never used as its
  negatives, and masked out of its softmax denominator when they show up in the batch as other queries' passages.
  Empty: the positives' doc ids stand in."""

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


def _records(path) -> Iterator[tuple[str, dict]]:
  """(file:line, record) of each non-blank line of a jsonl file (local or gs://)."""
  with epath.Path(path).open("r") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{os.fspath(path)}:{line_no}"
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON ({e.msg})") from e


def tevatron_groups(path: str | os.PathLike) -> list[TrainGroup]:
  """Training groups of a Tevatron jsonl file with text; errors name file:line and field."""
  groups = []
  for where, record in _records(path):
    try:
      passages = lambda key: tuple(  # noqa: E731
          Passage(str(p.get("docid", "")), _join(p.get("title", ""), p["text"])) for p in record.get(key, []))
      group = TrainGroup(str(record["query_id"]), record["query"], passages("positive_passages"),
                         passages("negative_passages"), judged=tuple(map(str, record.get("judged_docids", []))))
    except (KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{where}: missing or malformed field {e}") from e
    if not group.query.strip():
      raise ValueError(f"{where}: query {group.query_id!r} is empty")
    if not group.positives:
      raise ValueError(f"{where}: query {group.query_id!r} has no positive_passages")
    groups.append(group)
  if not groups:
    raise ValueError(f"{path}: no training groups")
  return groups


def _csr(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(offsets int64 [N + 1], values int32 [sum of lengths]) of N integer lists."""
  offsets = np.zeros(len(lists) + 1, np.int64)
  offsets[1:] = np.cumsum(np.fromiter(map(len, lists), np.int64, count=len(lists)))
  values = (np.concatenate([np.asarray(row, np.int32).reshape(-1) for row in lists]) if len(lists)
            else np.zeros(0, np.int32))
  return offsets, values


@dataclasses.dataclass(frozen=True, eq=False)
class GroupTable:
  """G training groups as integer ids (CSR arrays; values are corpus rows, int32):
  query_ids [G]; positives of group i: positives[positive_offsets[i]:positive_offsets[i + 1]] (highest grade
  first); negatives likewise (ranked best first, or in file order); judged likewise (every passage judged for the
  query at any grade, positives included: never a negative, masked out of the query's softmax denominator)."""

  query_ids: tuple[str, ...]
  positive_offsets: np.ndarray
  positives: np.ndarray
  negative_offsets: np.ndarray
  negatives: np.ndarray
  judged_offsets: np.ndarray
  judged: np.ndarray

  @classmethod
  def from_lists(cls, query_ids: Sequence[str], positives: Sequence[Sequence[int]],
                 negatives: Sequence[Sequence[int]], judged: Sequence[Sequence[int]]) -> "GroupTable":
    if not len(query_ids) == len(positives) == len(negatives) == len(judged):
      raise ValueError("GroupTable.from_lists: lists of different lengths")
    return cls(tuple(query_ids), *_csr(positives), *_csr(negatives), *_csr(judged))

  def __len__(self) -> int:
    return len(self.query_ids)

  def __eq__(self, other) -> bool:
    return isinstance(other, GroupTable) and self.query_ids == other.query_ids and all(
        np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)[1:])

  def positives_of(self, i: int) -> np.ndarray:
    return self.positives[self.positive_offsets[i]:self.positive_offsets[i + 1]]

  def negatives_of(self, i: int) -> np.ndarray:
    return self.negatives[self.negative_offsets[i]:self.negative_offsets[i + 1]]

  def judged_of(self, i: int) -> np.ndarray:
    return self.judged[self.judged_offsets[i]:self.judged_offsets[i + 1]]

  def negative_counts(self) -> np.ndarray:
    return np.diff(self.negative_offsets)


def corpus_rows(corpus_ids: Sequence[str]) -> dict[str, int]:
  """{doc id: row} of a corpus."""
  return {d: i for i, d in enumerate(corpus_ids)}


def _unknown_error(where: str, what: str, unknown: list[str]) -> ValueError:
  return ValueError(f"{where}: {len(unknown)} {what} not in the corpus (first: {unknown[:5]}); negatives must come "
                    "from the corpus the training reads (the same BEIR corpus.jsonl)")


def beir_groups(corpus_ids: Sequence[str], queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
                run: RankedRun | Mapping[str, Mapping[str, float]], num_negatives: int = 30, skip_first: int = 0,
                min_positive_grade: int = 1, corpus_index: Mapping[str, int] | None = None) -> GroupTable:
  """Groups of a BEIR train split: positives from qrels (grade >= `min_positive_grade`, highest grade first),
  negatives from `run` minus every judged passage (any grade, 0 and below included: a judged passage is a
  known quantity, not a sampled negative).

  `run`: a `RankedRun` over the corpus rows, or {query id: {doc id: score}} (e.g. a mined TREC run). Judged doc
  ids outside the corpus are left out (they can never be drawn). `num_negatives` ranked candidates are kept per
  query (after dropping the first `skip_first`, as some recipes skip the very top of a run, where unjudged
  positives are most likely). Queries without a positive, or whose run holds no unjudged document, are dropped
  (counted in the log).
  """
  if min_positive_grade < 1:
    raise ValueError(f"min_positive_grade={min_positive_grade}: expected >= 1 (grade 0 means not relevant)")
  index = corpus_index if corpus_index is not None else corpus_rows(corpus_ids)
  position = {q: i for i, q in enumerate(run.query_ids)} if isinstance(run, RankedRun) else None
  qids, positives, negatives, judged_rows = [], [], [], []
  without_positive = without_negative = 0
  unknown: list[str] = []
  for qid in queries:
    judged = qrels.get(qid, {})
    graded = sorted((d for d, rel in judged.items() if rel >= min_positive_grade), key=lambda d: -judged[d])
    positive = [index[d] for d in graded if d in index]
    if not positive:
      without_positive += 1
      continue
    judged_here = np.fromiter((index[d] for d in judged if d in index), np.int64)
    if position is not None:
      ranked = run.rows[position[qid]] if qid in position else np.zeros(0, np.int32)
      ranked = ranked[ranked >= 0]
    else:
      docs = [d for d, _ in sorted(run.get(qid, {}).items(), key=lambda item: -item[1])]
      unknown += [d for d in docs if d not in index]
      ranked = np.fromiter((index[d] for d in docs if d in index), np.int64)
    candidates = ranked[~np.isin(ranked, judged_here)][skip_first:skip_first + num_negatives]
    if not len(candidates):
      without_negative += 1
      continue
    qids.append(qid)
    positives.append(positive)
    negatives.append(candidates)
    judged_rows.append(judged_here)
  if unknown:
    raise _unknown_error("beir_groups: the run", "doc ids", unknown)
  if without_positive or without_negative:
    log.warning("left out %d queries without a positive judgement and %d whose run has no negative",
                without_positive, without_negative)
  if not qids:
    raise ValueError("no training groups: no query has a positive judgement")
  return GroupTable.from_lists(qids, positives, negatives, judged_rows)


def read_negatives(path: str | os.PathLike, corpus_index: Mapping[str, int],
                   queries: Iterable[str] | None = None) -> GroupTable:
  """Groups of a negatives file (the ids format or Tevatron jsonl with text; see the module docstring), as corpus
  rows. Lines of queries outside `queries` (e.g. carved out as dev) are left out. Positives and negatives must be
  in the corpus (else an error with the count and the first ids); judged ids outside it are left out."""
  keep = None if queries is None else set(queries)
  qids, positives, negatives, judged = [], [], [], []
  unknown: list[str] = []
  lines = 0
  for where, record in _records(path):
    lines += 1
    try:
      qid = str(record["query_id"])
      if "positive_document_ids" in record or "negative_document_ids" in record:
        pos = [str(d) for d in record.get("positive_document_ids", [])]
        neg = [str(d) for d in record.get("negative_document_ids", [])]
        jud = [str(d) for d in record.get("judged_document_ids", [])]
      else:
        if not str(record["query"]).strip():
          raise ValueError(f"{where}: query {qid!r} is empty")
        ids = lambda key: [str(p["docid"]) for p in record.get(key, [])]  # noqa: E731
        pos, neg = ids("positive_passages"), ids("negative_passages")
        jud = [str(d) for d in record.get("judged_docids", [])]
    except (KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{where}: missing or malformed field {e}") from e
    if not pos:
      raise ValueError(f"{where}: query {qid!r} has no positives")
    if keep is not None and qid not in keep:
      continue
    unknown += [d for d in pos + neg if d not in corpus_index]
    qids.append(qid)
    positives.append([corpus_index[d] for d in pos if d in corpus_index])
    negatives.append([corpus_index[d] for d in neg if d in corpus_index])
    judged.append(list(dict.fromkeys(corpus_index[d] for d in jud + pos if d in corpus_index)))
  if unknown:
    raise _unknown_error(os.fspath(path), "positive or negative doc ids are", list(dict.fromkeys(unknown)))
  if not lines:
    raise ValueError(f"{path}: no training groups")
  return GroupTable.from_lists(qids, positives, negatives, judged)


def write_negatives(path: str | os.PathLike, groups: GroupTable, corpus_ids: Sequence[str]) -> epath.Path:
  """Writes groups in the ids format (doc ids only, no text; see the module docstring), through a temporary file
  and a rename (gs://: one object write, which is atomic)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path if is_uri(path) else path.parent / f".{path.name}.tmp-{os.getpid()}"
  ids = lambda rows: [corpus_ids[r] for r in rows]  # noqa: E731
  with tmp.open("w") as f:
    for i, qid in enumerate(groups.query_ids):
      f.write(json.dumps({"query_id": qid, "positive_document_ids": ids(groups.positives_of(i)),
                          "negative_document_ids": ids(groups.negatives_of(i)),
                          "judged_document_ids": ids(groups.judged_of(i))}) + "\n")
  if tmp != path:
    tmp.replace(path)
  return path


def merge_groups(tables: Sequence[GroupTable], judged: Mapping[str, Sequence[int]] | None = None) -> GroupTable:
  """Per query (in order of first appearance): the positives of the first table holding it, the negatives of
  every table in order (duplicates dropped), and the union of the judged rows of every table and of `judged`
  (e.g. the split's qrels), none of which stays a negative (a mined file may list them)."""
  judged = judged or {}
  holders: dict[str, list[tuple[GroupTable, int]]] = {}
  for table in tables:
    for i, qid in enumerate(table.query_ids):
      holders.setdefault(qid, []).append((table, i))
  qids, positives, negatives, judged_rows = [], [], [], []
  for qid, held in holders.items():
    first, i0 = held[0]
    known = _ordered_unique(np.concatenate([t.judged_of(i) for t, i in held]
                                           + [np.asarray(judged.get(qid, ()), np.int32), first.positives_of(i0)]))
    negative = _ordered_unique(np.concatenate([t.negatives_of(i) for t, i in held]))
    qids.append(qid)
    positives.append(first.positives_of(i0))
    negatives.append(negative[~np.isin(negative, known)])
    judged_rows.append(known)
  return GroupTable.from_lists(qids, positives, negatives, judged_rows)


def _ordered_unique(values: np.ndarray) -> np.ndarray:
  """`values` without repeats, in order of first occurrence."""
  _, first = np.unique(values, return_index=True)
  return values[np.sort(first)]


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """What a fine-tuning stream is built from: groups over the rows of a corpus, the corpus (ids and passage texts,
  row-aligned), the query text of each group, and the corpus fingerprint (`flat_tokens.texts_fingerprint`) that
  keys its caches."""

  groups: GroupTable
  corpus_ids: Sequence[str]
  passages: Sequence[str]
  query_texts: tuple[str, ...]
  corpus_fingerprint: str

  def __len__(self) -> int:
    return len(self.groups)


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
  """The deterministic example stream over a `GroupTable`; `example(k)` is a pure function of (seed, k).

  passages: the corpus's token sequences (row r = corpus row r); queries: row i = group i's query. `doc_index`
  int [corpus rows]: the index a passage row is given in `passage_doc_index` / `query_judged_index` (default the
  row itself; -1: a passage without a doc id)."""

  def __init__(self, groups: GroupTable, passages: FlatTokens, queries: FlatTokens, *, pad_id: int,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0, doc_index: np.ndarray | None = None):
    if len(queries) != len(groups):
      raise ValueError(f"FinetuneStream: {len(queries)} tokenised queries for {len(groups)} groups")
    if not len(groups):
      raise ValueError("FinetuneStream: no training groups")
    self.groups, self.passages, self.queries = groups, passages, queries
    self.sampling, self.seed, self.pad_id = sampling, seed, pad_id
    self.doc_index = None if doc_index is None else np.asarray(doc_index, np.int32)
    if (np.diff(groups.positive_offsets) == 0).any():
      raise ValueError(f"query {groups.query_ids[int(np.argmin(np.diff(groups.positive_offsets)))]!r} has no "
                       "positive")
    counts = groups.negative_counts()
    if sampling.negatives and (counts == 0).any():
      raise ValueError(f"query {groups.query_ids[int(np.argmin(counts))]!r} has no negatives (needs "
                       f"{sampling.negatives})")
    # Each group's negatives shuffled once: one random key per negative, sorted within its group.
    owner = np.repeat(np.arange(len(groups), dtype=np.int32), counts)
    order = np.lexsort((_rng(seed, 1).random(len(owner)), owner))
    self._shuffled = groups.negatives[order]
    self._judged_width = max(int(np.diff(groups.judged_offsets).max(initial=0)), 1)
    self._permutations: dict[int, np.ndarray] = {}

  @classmethod
  def build(cls, data: TrainingData, tokenizer, sampling: SamplingConfig = SamplingConfig(), seed: int = 0, *,
            cache_dir: str | os.PathLike | None = None,
            local_cache_dir: str | os.PathLike | None = None) -> "FinetuneStream":
    """The stream of `data`, its corpus and queries tokenised once into `cache_dir`'s token cache (memory-mapped;
    see `mote_jax.data.flat_tokens`; None: in memory)."""
    passages = cached_tokens("corpus", data.passages, tokenizer, sampling.passage_max_len, cache_dir,
                             fingerprint=data.corpus_fingerprint, local_cache_dir=local_cache_dir)
    queries = cached_tokens("queries", data.query_texts, tokenizer, sampling.query_max_len, cache_dir,
                            fingerprint=texts_fingerprint(data.query_texts, data.groups.query_ids),
                            local_cache_dir=local_cache_dir)
    return cls(data.groups, passages, queries, pad_id=tokenizer.pad_token_id, sampling=sampling, seed=seed)

  @classmethod
  def from_train_groups(cls, groups: Sequence[TrainGroup], tokenizer, sampling: SamplingConfig = SamplingConfig(),
                        seed: int = 0) -> "FinetuneStream":
    """A stream over text groups (tokenised in memory). Passage vocabulary: the groups' passages with a doc id,
    sorted by doc id, then those without one (index -1)."""
    texts: dict[str, str] = {}
    anonymous: dict[str, None] = {}
    for g in groups:
      for p in g.positives + g.negatives:
        if p.docid:
          texts.setdefault(p.docid, p.text)
        else:
          anonymous.setdefault(p.text, None)
    docids = sorted(texts)
    index = {d: i for i, d in enumerate(docids)}
    by_text = {t: len(docids) + i for i, t in enumerate(anonymous)}
    row = lambda p: index[p.docid] if p.docid else by_text[p.text]  # noqa: E731
    table = GroupTable.from_lists(
        [g.query_id for g in groups], [[row(p) for p in g.positives] for g in groups],
        [[row(p) for p in g.negatives] for g in groups],
        [[index[d] for d in g.judged_ids() if d in index] for g in groups])
    passages = cached_tokens("corpus", [texts[d] for d in docids] + list(anonymous), tokenizer,
                             sampling.passage_max_len, None)
    queries = cached_tokens("queries", [g.query for g in groups], tokenizer, sampling.query_max_len, None)
    doc_index = np.concatenate([np.arange(len(docids)), np.full(len(anonymous), -1)])
    return cls(table, passages, queries, pad_id=tokenizer.pad_token_id, sampling=sampling, seed=seed,
               doc_index=doc_index)

  def __len__(self) -> int:
    return len(self.groups)

  @property
  def judged_width(self) -> int:
    """J, the width of `query_judged_index`."""
    return self._judged_width

  def _permutation(self, epoch: int) -> np.ndarray:
    """The visiting order of `epoch`, computed once (the current and the previous epoch are kept)."""
    if epoch not in self._permutations:
      if len(self._permutations) >= 2:
        del self._permutations[min(self._permutations)]
      self._permutations[epoch] = _rng(self.seed, 0, epoch).permutation(len(self.groups))
    return self._permutations[epoch]

  def _draw(self, ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(group index [R], passage rows [R, 1 + negatives]: the positive, then the negatives) of examples `ks`."""
    ks = np.asarray(ks, np.int64).reshape(-1)
    g, n = self.groups, self.sampling.negatives
    epochs, positions = np.divmod(ks, len(g))
    index = np.empty(len(ks), np.int64)
    for epoch in np.unique(epochs):
      chosen = epochs == epoch
      index[chosen] = self._permutation(int(epoch))[positions[chosen]]
    first = g.positive_offsets[index]
    positive = g.positives[first + epochs % (g.positive_offsets[index + 1] - first)]
    start = g.negative_offsets[index]
    count = np.maximum(g.negative_offsets[index + 1] - start, 1)
    window = (epochs * n % count)[:, None] + np.arange(n)[None, :]
    negatives = self._shuffled[start[:, None] + window % count[:, None]]  # [R, n]
    for r in np.flatnonzero(count < n):  # short lists: sampled with replacement
      picks = _rng(self.seed, 2, index[r], epochs[r]).integers(count[r], size=n)
      negatives[r] = g.negatives[start[r] + picks]
    return index, np.concatenate([positive[:, None], negatives], axis=1)

  def example(self, k: int) -> tuple[list[int], list[list[int]]]:
    """(query ids, [positive ids, negative ids...]) of the k-th example of the stream."""
    (index,), (rows,) = self._draw([k])
    return self.queries[index].tolist(), [self.passages[r].tolist() for r in rows]

  def batch(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
    """Fixed-shape padded arrays for examples `rows`."""
    s = self.sampling
    index, passage_rows = self._draw(rows)
    q_ids = self.queries.padded(index, s.query_max_len, self.pad_id)
    p_ids = self.passages.padded(passage_rows, s.passage_max_len, self.pad_id)
    p_index = passage_rows if self.doc_index is None else self.doc_index[passage_rows]
    offsets = self.groups.judged_offsets
    first, count = offsets[index], offsets[index + 1] - offsets[index]
    width = np.arange(self._judged_width)
    inside = width[None, :] < count[:, None]
    judged = np.where(inside, self.groups.judged[np.where(inside, first[:, None] + width[None, :], 0)]
                      if len(self.groups.judged) else 0, -1)
    if self.doc_index is not None:
      judged = np.where(judged >= 0, self.doc_index[np.maximum(judged, 0)], -1)
    # Every real sequence starts with [CLS], so a non-pad position is exactly an attended one.
    return {"query_input_ids": q_ids, "query_attention_mask": (q_ids != self.pad_id).astype(np.int32),
            "passage_input_ids": p_ids, "passage_attention_mask": (p_ids != self.pad_id).astype(np.int32),
            "passage_doc_index": p_index.astype(np.int32), "query_judged_index": judged.astype(np.int32)}


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
