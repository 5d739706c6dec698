"""CoT-MAE's span and context sampling and BERT masking over a batch of document records, vectorised in numpy.

Everything random is a pure function of (seed, global example index): the draws come from a counter-based hash
(`uniforms`: SplitMix64's finaliser over (key, purpose, slot)), never from a stateful generator, so any example
is recomputed alone, in any batch, on any host, and a resume at step t reads no earlier step. There is no Python
loop over examples: the loops below run over sentence positions (the span packing is sequential within a
document) with every document of the batch in one numpy vector.

The distribution follows caskcsg/ir `cotmae/make_cotmae_data.py` and `cotmae/data.py` (the reference), redrawn
every epoch from the records (the reference draws it once, offline):

  spans     sentences packed greedily; a span closes once its length exceeds its target; each span's target is
            uniform in [2, max_len] with probability `short_span_prob` (0.15), else max_len.
  anchor    one uniform span of the document per example (`CotMAEDataset.__getitem__`).
  context   one of the configured types, uniformly (`data_type='mixed'` in `CotMAECollator`):
            nearby   span i-1 or i+1, uniformly among those that exist;
            random   a uniform span within +-window_size of i other than i (i itself when there is none);
            overlap  the last k sentences of span i, k uniform in [1, floor(n_i / 2)] (1 when that bound is < 2),
                     then the following sentences until max_len ids are reached; for the last span its first k
                     sentences, then the preceding ones backwards.
  truncate  a text longer than max_len - 2 loses a uniform number of ids on the left and the rest on the right
            (`CotMAECollator._truncate`), then becomes [CLS] ... [SEP].

Ours, not the reference's: a document that packs into a single span (the offline job drops those) pairs its span
with itself; each text is truncated once per pair (the reference truncates again for every encoding); the mask
draws whole words with the stochastic-rounded count of `masking.py` (the reference rounds a piece count).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from mote_jax.data.masking import IGNORE_LABEL, MaskingConfig
from mote_jax.data.vocabulary import VocabInfo

CONTEXT_TYPES = ("nearby", "overlap", "random")

# Purposes of the random draws (the hash's second input): distinct streams per use.
_SHORT, _TARGET, _ANCHOR, _TYPE, _NEARBY, _RANDOM, _OVERLAP, _TRUNC, _QUERY = range(1, 10)
_MASK_COUNT, _MASK_SCORE = 20, 21

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser, elementwise on uint64 (a bijection with full avalanche)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def example_keys(seed: int, indices: np.ndarray, stream: int = 0) -> np.ndarray:
  """uint64 [n] keys of examples `indices` (int64 [n]) of a run seeded by `seed`; `stream` separates uses."""
  with np.errstate(over="ignore"):
    base = _mix(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], np.uint64) * _GOLDEN + np.uint64(stream))
    return _mix(base ^ _mix(np.asarray(indices).astype(np.uint64) + _GOLDEN))


def uniforms(keys: np.ndarray, purpose: int, count: int) -> np.ndarray:
  """float64 [n, count] in [0, 1): draw `j` of purpose `purpose` for each key (a pure function of the three)."""
  with np.errstate(over="ignore"):
    salt = _mix(np.asarray([purpose], np.uint64) * _GOLDEN)
    x = _mix(keys[:, None] ^ salt + np.arange(count, dtype=np.uint64)[None, :] * _GOLDEN)
  return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _randint(u: np.ndarray, low, high) -> np.ndarray:
  """Uniform integers in [low, high] (inclusive, like `random.randint`) from uniforms `u`."""
  return (low + np.floor(u * (np.asarray(high) - low + 1))).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SpanSampling:
  """Settings of the span/context sampling (the reference's defaults; `max_len` is the text length in ids with
  [CLS] and [SEP], the span target and overlap budget are `max_len` too, as in the reference's recipe)."""

  short_span_prob: float = 0.15
  window_size: int = 100
  context_types: tuple[str, ...] = CONTEXT_TYPES  # drawn uniformly per example; one type = that type only
  # "one": one uniform anchor span per document per epoch (the reference's CotMAEDataset); "all": as many anchors
  # per document and epoch as it has spans at the full target, anchor slot j of M drawn from the j-th of M equal
  # strata of the epoch's spans (so every span can be an anchor and each document weighs by its length).
  anchors: str = "one"

  def __post_init__(self):
    if not 0.0 <= self.short_span_prob <= 1.0:
      raise ValueError(f"SpanSampling.short_span_prob={self.short_span_prob}: expected a value in [0, 1]")
    if self.window_size < 1:
      raise ValueError(f"SpanSampling.window_size={self.window_size}: expected >= 1")
    if self.anchors not in ("one", "all"):
      raise ValueError(f"SpanSampling.anchors={self.anchors!r}: expected 'one' or 'all'")
    bad = [t for t in self.context_types if t not in CONTEXT_TYPES]
    if bad or not self.context_types:
      raise ValueError(f"SpanSampling.context_types={self.context_types}: expected a non-empty subset of "
                       f"{CONTEXT_TYPES}")


def _dense(values: np.ndarray, splits: np.ndarray, fill=0) -> tuple[np.ndarray, np.ndarray]:
  """Ragged (values, row_splits) -> (dense [n, max_len] padded with `fill`, lengths [n])."""
  lengths = np.diff(splits)
  width = max(int(lengths.max(initial=0)), 1)
  col = np.arange(width)[None, :]
  valid = col < lengths[:, None]
  dense = np.full((len(lengths), width), fill, values.dtype)
  dense[valid] = values
  return dense, lengths


def segment(sentence_lengths: np.ndarray, num_sentences: np.ndarray, keys: np.ndarray, max_len: int,
            short_span_prob: float) -> dict[str, np.ndarray]:
  """Greedy span packing of a batch of documents.

  Args:
    sentence_lengths: int [n, S], ids per sentence, 0 past each document's `num_sentences`.
    num_sentences: int [n].
    keys: uint64 [n], the examples' keys.
    max_len: the span target (ids).
    short_span_prob: probability that a span's target is uniform in [2, max_len].

  Returns:
    num_spans int [n]; span_start int [n, S + 1]: first sentence of span k, `num_sentences` at k = num_spans;
    target int [n, S]: span k's target length.
  """
  n, width = sentence_lengths.shape
  short = uniforms(keys, _SHORT, width) < short_span_prob
  target = np.where(short, _randint(uniforms(keys, _TARGET, width), 2, max_len), max_len)
  rows = np.arange(n)
  span = np.zeros(n, np.int64)
  current = np.zeros(n, np.int64)
  span_start = np.zeros((n, width + 1), np.int64)
  opened = np.zeros(n, bool)
  for s in range(width):  # over sentence positions; every document of the batch at once
    valid = s < num_sentences
    starting = valid & ~opened
    span_start[rows[starting], span[starting]] = s
    opened |= starting
    current = current + np.where(valid, sentence_lengths[:, s], 0)
    close = valid & (current > target[rows, span])
    span = span + close
    current = np.where(close, 0, current)
    opened &= ~close
  num_spans = span + opened
  span_start[rows, num_spans] = num_sentences
  return {"num_spans": num_spans, "span_start": span_start, "target": target}


def full_target_span_counts(sentence_lengths: np.ndarray, num_sentences: np.ndarray, max_len: int) -> np.ndarray:
  """int [n]: spans per document when every target is `max_len` (the anchor slots of `anchors='all'`)."""
  keys = np.zeros(len(num_sentences), np.uint64)
  return segment(sentence_lengths, num_sentences, keys, max_len, 0.0)["num_spans"]


def sample_spans(sentence_lengths: np.ndarray, num_sentences: np.ndarray, keys: np.ndarray, *, max_len: int,
                 sampling: SpanSampling, anchor_slot: np.ndarray | None = None,
                 anchor_slots: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Anchor and context token ranges of a batch of documents (before truncation).

  Args: as `segment`, `max_len` the text length with [CLS] and [SEP]; `anchor_slot`, `anchor_slots` int [n]
  (`anchors='all'`): the anchor is drawn from stratum `anchor_slot` of `anchor_slots` equal strata of the spans
  (None: uniformly among all spans).

  Returns int64 [n] arrays: anchor_start, anchor_end, context_start, context_end (token offsets in the document),
  context_type (index into CONTEXT_TYPES), anchor_span, context_span (span indices; -1 for an overlap context),
  num_spans, anchor_short (the anchor span's target was below max_len).
  """
  n, width = sentence_lengths.shape
  rows = np.arange(n)
  seg = segment(sentence_lengths, num_sentences, keys, max_len, sampling.short_span_prob)
  m, span_start = seg["num_spans"], seg["span_start"]
  offsets = np.zeros((n, width + 1), np.int64)
  np.cumsum(sentence_lengths, axis=1, out=offsets[:, 1:])

  u = uniforms(keys, _ANCHOR, 1)[:, 0]
  if anchor_slot is not None:
    u = (anchor_slot + u) / np.maximum(anchor_slots, 1)
  anchor = np.minimum(np.floor(u * m).astype(np.int64), m - 1)
  s0, s1 = span_start[rows, anchor], span_start[rows, anchor + 1]

  # nearby: i - 1 or i + 1, whichever exist, uniformly.
  up = uniforms(keys, _NEARBY, 1)[:, 0] < 0.5
  nearby = np.where(anchor == 0, 1, np.where(anchor == m - 1, anchor - 1, np.where(up, anchor + 1, anchor - 1)))
  nearby = np.where(m < 2, anchor, nearby)
  # random: uniform in [i - W, i + W] within the document, i excluded.
  low = np.maximum(anchor - sampling.window_size, 0)
  high = np.minimum(anchor + sampling.window_size, m - 1)
  count = high - low
  pick = low + np.floor(uniforms(keys, _RANDOM, 1)[:, 0] * count).astype(np.int64)
  random_span = np.where(count > 0, pick + (pick >= anchor), anchor)
  # overlap: k sentences of the anchor span, then neighbours until max_len ids.
  half = (s1 - s0) // 2
  k = np.where(half < 2, 1, _randint(uniforms(keys, _OVERLAP, 1)[:, 0], 1, np.maximum(half, 1)))
  col = np.arange(width + 1)[None, :]
  last = anchor == m - 1
  # not last: sentences [s1 - k, e), e the first sentence boundary >= s1 with >= max_len ids, else the end.
  base = offsets[rows, s1 - k]
  forward = (col >= s1[:, None]) & (col <= num_sentences[:, None]) & (offsets >= (base + max_len)[:, None])
  end_sentence = np.where(forward.any(1), forward.argmax(1), num_sentences)
  # last: sentences [x, s0 + k), x the last boundary <= s0 with >= max_len ids, else 0.
  end_token = offsets[rows, s0 + k]
  backward = (col <= s0[:, None]) & (offsets <= (end_token - max_len)[:, None])
  start_sentence = np.where(backward.any(1), width - backward[:, ::-1].argmax(1), 0)
  overlap_start = np.where(last, offsets[rows, start_sentence], base)
  overlap_end = np.where(last, end_token, offsets[rows, end_sentence])

  types = np.asarray([CONTEXT_TYPES.index(t) for t in sampling.context_types])
  kind = types[np.minimum(np.floor(uniforms(keys, _TYPE, 1)[:, 0] * len(types)).astype(np.int64), len(types) - 1)]
  context_span = np.where(kind == 0, nearby, np.where(kind == 2, random_span, -1))
  span_or_zero = np.maximum(context_span, 0)
  context_start = np.where(kind == 1, overlap_start, offsets[rows, span_start[rows, span_or_zero]])
  context_end = np.where(kind == 1, overlap_end, offsets[rows, span_start[rows, span_or_zero + 1]])
  return {
      "anchor_start": offsets[rows, s0], "anchor_end": offsets[rows, s1],
      "context_start": context_start, "context_end": context_end, "context_type": kind,
      "anchor_span": anchor, "context_span": context_span, "num_spans": m,
      "anchor_short": seg["target"][rows, anchor] < max_len,
  }


def truncate(start: np.ndarray, end: np.ndarray, u: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ranges longer than `budget` lose a uniform number (from `u` [n]) of ids on the left, the rest right."""
  excess = np.maximum(end - start - budget, 0)
  start = start + _randint(u, 0, excess)
  return start, np.minimum(end, start + budget)


def gather_texts(tokens: np.ndarray, doc_offset: np.ndarray, start: np.ndarray, end: np.ndarray, max_len: int,
                 info: VocabInfo) -> np.ndarray:
  """int32 [n, max_len]: [CLS] tokens[doc_offset + start : doc_offset + end] [SEP] [PAD]... (end - start <= L-2)."""
  length = end - start
  col = np.arange(max_len)[None, :]
  inside = (col >= 1) & (col <= length[:, None])
  flat = np.clip((doc_offset + start)[:, None] + col - 1, 0, max(len(tokens) - 1, 0))
  ids = np.where(inside, tokens[flat] if len(tokens) else 0, info.pad_id)
  ids[:, 0] = info.cls_id
  ids[np.arange(len(start)), length + 1] = info.sep_id
  return ids.astype(np.int32)


def mask_batch(ids: np.ndarray, keys: np.ndarray, *, ratio: float, info: VocabInfo, whole_word: bool = True,
               mask_token_prob: float = 0.8, random_token_prob: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """`masking.mask_tokens`'s rule over a batch: ids int32 [n, L], keys uint64 [n] -> (input_ids, labels) [n, L].

  floor(ratio * units + u) units (words with `whole_word`, else pieces) among the maskable positions, uniformly;
  each piece of a chosen unit -> [MASK] / a random real piece / unchanged with 80/10/10. Labels: the original id
  where chosen, -100 elsewhere.
  """
  n, length = ids.shape
  maskable = ~info.never_mask[ids]
  if whole_word:
    after_maskable = np.concatenate([np.zeros((n, 1), bool), maskable[:, :-1]], 1)
    starts = maskable & ~(info.continuation[ids] & after_maskable)
  else:
    starts = maskable
  count = np.floor(ratio * starts.sum(1) + uniforms(keys, _MASK_COUNT, 1)[:, 0])
  # One 64-bit draw per position gives its score (16 bits), action (16 bits) and random piece (32 bits).
  with np.errstate(over="ignore"):
    salt = _mix(np.asarray([_MASK_SCORE], np.uint64) * _GOLDEN)
    bits = _mix(keys[:, None] ^ salt + np.arange(length, dtype=np.uint64)[None, :] * _GOLDEN)
  # A uniform subset of `count` units: those with the `count` smallest scores, a score being 16 random bits
  # above the position (unique within a row); other positions score above every unit.
  position = np.arange(length, dtype=np.uint32)[None, :]
  scores = np.where(starts, ((bits & np.uint64(0xFFFF)).astype(np.uint32) << np.uint32(16)) | position,
                    np.uint32(0xFFFFFFFF))
  threshold = np.take_along_axis(np.sort(scores, axis=1), np.maximum(count - 1, 0).astype(np.int64)[:, None], 1)
  chosen = starts & (scores <= threshold) & (count > 0)[:, None]
  if whole_word:  # spread each chosen word start over its '##' pieces
    inside = maskable & ~starts
    while True:
      spread = chosen | (inside & np.concatenate([np.zeros((n, 1), bool), chosen[:, :-1]], 1))
      if np.array_equal(spread, chosen):
        break
      chosen = spread
  action = ((bits >> np.uint64(16)) & np.uint64(0xFFFF)).astype(np.float32) * (1.0 / 65536)
  replacement = info.replacement_ids[((bits >> np.uint64(32)) * np.uint64(len(info.replacement_ids))
                                      >> np.uint64(32)).astype(np.int64)]
  replaced = np.where(action < mask_token_prob, info.mask_id,
                      np.where(action < mask_token_prob + random_token_prob, replacement, ids))
  return (np.where(chosen, replaced, ids).astype(np.int32),
          np.where(chosen, ids, IGNORE_LABEL).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class PairSampler:
  """Records -> masked pairs: the whole per-batch computation of the online pipeline (one numpy call).

  `pairing`: "span_pairs" (CoT-MAE), "passage_to_query" or "query_to_passage" (cotmae-qc's query contexts: the
  document's ids and one of its queries, uniformly). `both_directions` (span pairs): every example gives two rows,
  (anchor, context) and (context, anchor), as the reference encodes both texts with the encoder and both with the
  decoder.
  """

  max_len: int
  info: VocabInfo
  masking: MaskingConfig
  sampling: SpanSampling = SpanSampling()
  pairing: str = "span_pairs"
  both_directions: bool = True

  @property
  def rows_per_example(self) -> int:
    return 2 if self.both_directions and self.pairing == "span_pairs" else 1

  def texts(self, parsed: Mapping[str, np.ndarray], indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Unmasked texts: parsed records (ragged as values + row_splits) of examples `indices` -> int32 [n, L]
    `anchor_tokens`, `context_tokens` (one row per example, before `both_directions`) and diagnostics."""
    keys = example_keys(seed, indices)
    n = len(indices)
    tokens, token_splits = parsed["tokens"], parsed["tokens_splits"]
    doc_offset = token_splits[:-1].astype(np.int64)
    budget = self.max_len - 2
    trunc = uniforms(keys, _TRUNC, 2)
    if self.pairing == "span_pairs":
      sentence_lengths, num_sentences = _dense(parsed["sentence_lengths"], parsed["sentence_lengths_splits"])
      if (num_sentences == 0).any():
        raise ValueError(f"span_pairs: records without sentences at example indices "
                         f"{indices[num_sentences == 0][:5].tolist()}; the offline job must drop empty documents")
      out = sample_spans(sentence_lengths.astype(np.int64), num_sentences, keys, max_len=self.max_len,
                         sampling=self.sampling, anchor_slot=parsed.get("anchor_slot"),
                         anchor_slots=parsed.get("anchor_slots"))
      a_start, a_end = truncate(out["anchor_start"], out["anchor_end"], trunc[:, 0], budget)
      c_start, c_end = truncate(out["context_start"], out["context_end"], trunc[:, 1], budget)
      out["anchor_tokens"] = gather_texts(tokens, doc_offset, a_start, a_end, self.max_len, self.info)
      out["context_tokens"] = gather_texts(tokens, doc_offset, c_start, c_end, self.max_len, self.info)
      return out
    # Query pairs: the whole document and one uniformly drawn query.
    query_lengths, num_queries = _dense(parsed["query_lengths"], parsed["query_lengths_splits"])
    if (num_queries == 0).any():
      raise ValueError(f"{self.pairing}: records without queries at example indices "
                       f"{indices[num_queries == 0][:5].tolist()}; query pairs need records with query_tokens")
    pick = np.minimum(np.floor(uniforms(keys, _QUERY, 1)[:, 0] * num_queries).astype(np.int64), num_queries - 1)
    query_offsets = np.zeros((n, query_lengths.shape[1] + 1), np.int64)
    np.cumsum(query_lengths, axis=1, out=query_offsets[:, 1:])
    rows = np.arange(n)
    q_start, q_end = query_offsets[rows, pick], query_offsets[rows, pick + 1]
    p_start, p_end = truncate(np.zeros(n, np.int64), np.diff(token_splits).astype(np.int64), trunc[:, 0], budget)
    q_start, q_end = truncate(q_start, q_end, trunc[:, 1], budget)
    passage = gather_texts(tokens, doc_offset, p_start, p_end, self.max_len, self.info)
    query = gather_texts(parsed["query_tokens"], parsed["query_tokens_splits"][:-1].astype(np.int64), q_start,
                         q_end, self.max_len, self.info)
    anchor, context = (passage, query) if self.pairing == "passage_to_query" else (query, passage)
    return {"anchor_tokens": anchor, "context_tokens": context, "query": pick}

  def __call__(self, parsed: Mapping[str, np.ndarray], indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Masked pairs of examples `indices` (int64 [n]): {anchor,context}_{input_ids,attention_mask,labels} int32
    [n * rows_per_example, L]; with both directions rows 2j, 2j + 1 are example j's two directions."""
    texts = self.texts(parsed, indices, seed)
    anchor, context = texts["anchor_tokens"], texts["context_tokens"]
    rows = self.rows_per_example
    if rows == 2:
      anchor, context = (np.stack([anchor, context], 1).reshape(-1, self.max_len),
                         np.stack([context, anchor], 1).reshape(-1, self.max_len))
    # Mask keys: (example, direction, side), independent of the batch the example lands in.
    direction = np.tile(np.arange(rows), len(indices))
    row_index = np.repeat(np.asarray(indices, np.int64), rows) * 2 + direction
    out = {}
    for side, ids, ratio in (("anchor", anchor, self.masking.encoder_ratio),
                             ("context", context, self.masking.decoder_ratio)):
      keys = example_keys(seed, row_index, stream=1 if side == "anchor" else 2)
      out[f"{side}_input_ids"], out[f"{side}_labels"] = mask_batch(
          ids, keys, ratio=ratio, info=self.info, whole_word=self.masking.whole_word,
          mask_token_prob=self.masking.mask_token_prob, random_token_prob=self.masking.random_token_prob)
      out[f"{side}_attention_mask"] = (ids != self.info.pad_id).astype(np.int32)
    return out
