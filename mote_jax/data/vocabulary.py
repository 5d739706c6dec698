"""BERT WordPiece vocabulary: a seqio `Vocabulary` over a HF fast tokenizer, and the token tables masking needs.

Tokenization runs in the HF `tokenizers` (Rust) backend, so the ids are exactly those of
`transformers.AutoTokenizer.from_pretrained(path)`, the tokenizer that fine-tuning and evaluation use. Inside a
tf.data pipeline it runs through `tf.numpy_function`; that costs the GIL and makes the pipeline unserialisable
(no tf.data service), which pre-training input rates on TPU/GPU hosts tolerate.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import numpy as np
import seqio
import tensorflow as tf

# Bracketed vocabulary entries ([PAD], [unused0], [CLS], ...) are never produced from text except [UNK].
_BRACKETED = re.compile(r"^\[[^\]]+\]$")


@dataclasses.dataclass(frozen=True, eq=False)
class VocabInfo:
  """Per-id tables of a WordPiece vocabulary, as numpy arrays of shape [vocab_size].

  Attributes:
    cls_id, sep_id, pad_id, mask_id: ids of the BERT special tokens.
    never_mask: bool [V]; the tokenizer's special tokens ([PAD], [UNK], [CLS], [SEP], [MASK]): never masked.
    continuation: bool [V]; WordPiece continuation pieces ('##...'), used by whole-word masking.
    replacement_ids: int32 [R]; ids the 10% random replacement draws from: every entry that is not bracketed
      ([PAD], [unusedN], [CLS], ...), so a replacement is always a real word piece.
  """

  cls_id: int
  sep_id: int
  pad_id: int
  mask_id: int
  never_mask: np.ndarray
  continuation: np.ndarray
  replacement_ids: np.ndarray

  @property
  def vocab_size(self) -> int:
    return int(self.never_mask.shape[0])

  @classmethod
  def from_tokens(cls, tokens: Sequence[str], special_tokens: dict[str, str]) -> "VocabInfo":
    """Builds the tables from the vocabulary in id order and the special-token strings.

    Args:
      tokens: the vocabulary, `tokens[i]` is the piece of id i.
      special_tokens: {'cls': '[CLS]', 'sep': '[SEP]', 'pad': '[PAD]', 'mask': '[MASK]', 'unk': '[UNK]'}.
    """
    index = {t: i for i, t in enumerate(tokens)}
    missing = [v for v in special_tokens.values() if v not in index]
    if missing:
      raise ValueError(f"special tokens {missing} are not in the vocabulary ({len(tokens)} entries)")
    ids = {k: index[v] for k, v in special_tokens.items()}
    never_mask = np.zeros(len(tokens), bool)
    never_mask[list(ids.values())] = True
    continuation = np.array([t.startswith("##") for t in tokens])
    replacement = np.array([i for i, t in enumerate(tokens) if not _BRACKETED.match(t)], np.int32)
    return cls(ids["cls"], ids["sep"], ids["pad"], ids["mask"], never_mask, continuation, replacement)


def _load_hf_tokenizer(path: str):
  """The HF fast tokenizer saved in `path` (a directory with vocab.txt and/or tokenizer.json)."""
  from transformers import AutoTokenizer  # deferred: transformers is slow to import and only needed here

  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
  tokenizer = AutoTokenizer.from_pretrained(path)
  if not getattr(tokenizer, "is_fast", False) or tokenizer.mask_token is None:
    raise ValueError(f"{path}: expected a fast BERT WordPiece tokenizer with a [MASK] token, got {type(tokenizer)}")
  return tokenizer


def as_str(value) -> str:
  """A tf.numpy_function string argument (bytes, or a 0-d object array of bytes in eager calls) as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class WordPieceVocabulary(seqio.Vocabulary):
  """seqio vocabulary of a BERT WordPiece tokenizer directory (e.g. bert-base-uncased's).

  `encode` never adds [CLS]/[SEP] (seqio convention: the pipeline adds them) and never truncates. BERT has no EOS,
  so `eos_id` is None and seqio adds none. Two vocabularies are equal when they have the same pieces in the same
  order and the same normalisation (lower-casing etc.), whatever their paths.
  """

  def __init__(self, path: str | os.PathLike):
    super().__init__(extra_ids=0)
    self._path = os.fspath(path)
    hf = _load_hf_tokenizer(self._path)
    # A private copy of the Rust tokenizer without the padding/truncation that tokenizer.json may carry
    # (all-MiniLM's pads and truncates to 128), so ids are never cut or padded here.
    from tokenizers import Tokenizer
    self._backend = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    self._backend.no_padding()
    self._backend.no_truncation()
    vocab = hf.get_vocab()
    tokens = [""] * len(vocab)
    for piece, i in vocab.items():
      tokens[i] = piece
    self._tokens = tuple(tokens)
    self._normalizer = repr(self._backend.normalizer)
    self._info = VocabInfo.from_tokens(self._tokens, {
        "cls": hf.cls_token, "sep": hf.sep_token, "pad": hf.pad_token, "mask": hf.mask_token,
        "unk": hf.unk_token})
    self._unk_id = hf.unk_token_id

  @property
  def path(self) -> str:
    return self._path

  @property
  def info(self) -> VocabInfo:
    return self._info

  @property
  def eos_id(self):
    return None

  @property
  def unk_id(self) -> int:
    return self._unk_id

  @property
  def pad_id(self) -> int:
    return self._info.pad_id

  @property
  def _base_vocab_size(self) -> int:
    return len(self._tokens)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens or truncation.

    One `encode` per text: as fast as `Tokenizer.encode_batch` on sentence-length texts, and it keeps the Rayon
    thread pool of `encode_batch` out of tf.data's threads.
    """
    return [self._backend.encode(t, add_special_tokens=False).ids for t in texts]

  def _encode(self, s: str) -> list[int]:
    return self._backend.encode(s, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """int32 [n] ids of a scalar string (rank 0 only: seqio's tokenize preprocessors call it per example)."""

    def encode(text) -> np.ndarray:
      return np.asarray(self._encode(as_str(text)), np.int32)

    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    return tf.ensure_shape(ids, [None])

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    def decode(x: np.ndarray) -> bytes:
      return self._decode(x.tolist()).encode("utf-8")

    return tf.ensure_shape(tf.numpy_function(decode, [ids], tf.string, stateful=False), [])

  def piece(self, token_id: int) -> str:
    return self._tokens[token_id]

  def __eq__(self, other) -> bool:
    return (isinstance(other, WordPieceVocabulary) and self._tokens == other._tokens
            and self._normalizer == other._normalizer)

  def __hash__(self) -> int:
    return hash((len(self._tokens), self._normalizer))

  def __repr__(self) -> str:
    return f"WordPieceVocabulary({self._path!r}, size={len(self._tokens)})"
