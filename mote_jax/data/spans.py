"""Contextual span pairs (CoT-MAE): sentences -> spans of at most `max_len` tokens -> neighbouring-span pairs.

A document is split into sentences (`split_sentences`), each sentence is tokenized, and consecutive sentences are
packed greedily into spans of at most `max_len - 2` word pieces, so that a span with [CLS] and [SEP] fits in
`max_len`. A sentence longer than that is cut into pieces at word boundaries. Every two adjacent spans of a
document give two pairs, (s_i, s_{i+1}) and (s_{i+1}, s_i): each span is the anchor of its neighbours and their
context. A document of a single span gives no pair.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

# A sentence ends at '.', '!' or '?' (possibly followed by closing quotes or brackets) and whitespace. An
# abbreviation ("et al. ") ends a "sentence" too; that only moves span boundaries, never loses text.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\)\]]*\s+")


def split_sentences(text: str) -> list[str]:
  """Non-blank sentences of `text` in order; lines are split separately (a newline always ends a sentence)."""
  sentences = []
  for line in text.splitlines():
    start = 0
    for match in _SENTENCE_END.finditer(line):
      sentences.append(line[start:match.end()].strip())
      start = match.end()
    sentences.append(line[start:].strip())
  return [s for s in sentences if s]


def _word_cut(ids: Sequence[int], limit: int, continuation: np.ndarray) -> int:
  """Largest cut <= limit that does not split a word (falls back to `limit` for a word longer than `limit`)."""
  cut = limit
  while cut > 0 and continuation[ids[cut]]:
    cut -= 1
  return cut or limit


def truncate(ids: Sequence[int], budget: int, continuation: np.ndarray) -> list[int]:
  """The first at most `budget` pieces of `ids`, cut at a word boundary."""
  ids = list(ids)
  return ids if len(ids) <= budget else ids[:_word_cut(ids, budget, continuation)]


def chunk(ids: Sequence[int], budget: int, continuation: np.ndarray) -> list[list[int]]:
  """`ids` cut into consecutive pieces of at most `budget` ids, at word boundaries where possible."""
  ids, pieces = list(ids), []
  while len(ids) > budget:
    cut = _word_cut(ids, budget, continuation)
    pieces.append(ids[:cut])
    ids = ids[cut:]
  if ids:
    pieces.append(ids)
  return pieces


def group_spans(sentences: Sequence[Sequence[int]], budget: int, continuation: np.ndarray) -> list[list[int]]:
  """Consecutive tokenized sentences packed greedily into spans of at most `budget` ids."""
  if budget < 1:
    raise ValueError(f"span budget {budget} < 1: max_len must leave room for [CLS] and [SEP]")
  spans, current = [], []
  for sentence in sentences:
    for unit in chunk(sentence, budget, continuation):
      if current and len(current) + len(unit) > budget:
        spans.append(current)
        current = []
      current += unit
  if current:
    spans.append(current)
  return spans


def neighbour_pairs(num_spans: int) -> list[tuple[int, int]]:
  """(anchor, context) span indices: each adjacent pair in both directions, in document order."""
  pairs = []
  for i in range(num_spans - 1):
    pairs += [(i, i + 1), (i + 1, i)]
  return pairs


def document_span_pairs(text: str, encode_batch, max_len: int, cls_id: int, sep_id: int,
                        continuation: np.ndarray) -> list[tuple[list[int], list[int]]]:
  """(anchor, context) token ids, each `[CLS] span [SEP]` of length <= max_len, of one document.

  Args:
    text: the document.
    encode_batch: list[str] -> list[list[int]], token ids without special tokens (`WordPieceVocabulary`'s).
    max_len: the longest sequence, [CLS] and [SEP] included.
    cls_id, sep_id: special token ids.
    continuation: bool [vocab_size], True for '##' continuation pieces.
  """
  sentences = split_sentences(text)
  if not sentences:
    return []
  spans = group_spans(encode_batch(sentences), max_len - 2, continuation)
  wrapped = [[cls_id] + s + [sep_id] for s in spans]
  return [(wrapped[a], wrapped[c]) for a, c in neighbour_pairs(len(spans))]
