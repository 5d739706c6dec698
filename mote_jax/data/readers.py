"""Documents from local (or gfile) text and jsonl files, with file:line errors and counted skips.

A reader turns one file into `Document`s in file order. Two formats:

* `TextFormat(mode="blocks")` (default): documents are separated by one or more blank lines, the format of
  BERT's pre-training corpora; each line of a block is a sentence or paragraph. `mode="lines"`: every line is a
  document (a blank line is then an empty document and is counted).
* `JsonlFormat`: one JSON object per line. The document text is `title_key` (optional, own line) followed by
  `text_key`; `id_key` names the document (default `file:line`). BEIR `corpus.jsonl` is
  `JsonlFormat(text_key="text", title_key="title", id_key="_id")`. With `queries_key` set, every record must hold
  a list of pseudo-queries, e.g. `{"_id": "d1", "title": "...", "text": "passage", "queries": ["q1", "q2"]}`;
  a record with no non-blank query counts as empty.

A malformed jsonl line (invalid UTF-8 or JSON, not an object, missing or mistyped field) raises `DataFormatError`
naming `file:line`, or with `skip_malformed=True` is counted and logged. Blank documents are always skipped,
counted and logged, with counts in the caller's `ReadStats`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterator, Literal, Optional, Sequence

import tensorflow as tf

log = logging.getLogger(__name__)

_MAX_LOGGED_LINES = 5  # malformed lines logged one by one per file; the rest only in the file's summary


class DataFormatError(ValueError):
  """A malformed input record; the message starts with `file:line:`."""


@dataclasses.dataclass
class ReadStats:
  """Counts of one read, owned by the caller (readers add to it)."""

  documents: int = 0
  empty: int = 0
  malformed: int = 0

  def add(self, other: "ReadStats") -> None:
    self.documents += other.documents
    self.empty += other.empty
    self.malformed += other.malformed


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: `text` holds the title (if any) on its own first line, then the body."""

  doc_id: str
  text: str
  queries: tuple[str, ...] = ()


def expand_paths(patterns: Sequence[str] | str) -> tuple[str, ...]:
  """Sorted files matching each glob pattern, in pattern order; an error names a pattern that matches nothing."""
  if isinstance(patterns, str):
    patterns = [patterns]
  paths = []
  for pattern in patterns:
    matches = sorted(tf.io.gfile.glob(str(pattern)))
    if not matches:
      raise FileNotFoundError(f"no file matches {pattern!r}")
    paths += matches
  return tuple(paths)


def _join(title: str, body: str) -> str:
  # The title becomes its own line so that sentence splitting keeps it a separate unit; tokenization treats the
  # newline as the space BEIR puts between title and text.
  title = title.strip()
  return f"{title}\n{body}" if title else body


def _log_summary(path: str, stats: ReadStats) -> None:
  level = logging.WARNING if stats.empty or stats.malformed else logging.INFO
  log.log(level, "%s: %d documents read, %d empty skipped, %d malformed lines skipped",
          path, stats.documents, stats.empty, stats.malformed)


@dataclasses.dataclass(frozen=True)
class TextFormat:
  """Plain text: `mode='blocks'` (blank-line-separated documents) or `mode='lines'` (one document per line)."""

  mode: Literal["blocks", "lines"] = "blocks"

  def __post_init__(self):
    if self.mode not in ("blocks", "lines"):
      raise ValueError(f"TextFormat.mode={self.mode!r}: expected 'blocks' or 'lines'")

  def read(self, path: str, stats: Optional[ReadStats] = None) -> Iterator[Document]:
    """Documents of one file in order; `doc_id` is `path:first_line`."""
    file_stats = ReadStats()
    block, block_start = [], 0
    with tf.io.gfile.GFile(path, "rb") as f:
      for line_no, raw in enumerate(f, 1):
        # Plain text has no record structure to report as malformed: undecodable bytes become U+FFFD.
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if self.mode == "lines":
          if line.strip():
            file_stats.documents += 1
            yield Document(f"{path}:{line_no}", line.strip())
          else:
            file_stats.empty += 1
        elif line.strip():
          if not block:
            block_start = line_no
          block.append(line.strip())
        elif block:
          file_stats.documents += 1
          yield Document(f"{path}:{block_start}", "\n".join(block))
          block = []
    if block:
      file_stats.documents += 1
      yield Document(f"{path}:{block_start}", "\n".join(block))
    _log_summary(path, file_stats)
    if stats is not None:
      stats.add(file_stats)


@dataclasses.dataclass(frozen=True)
class JsonlFormat:
  """JSON lines; see the module docstring for the fields."""

  text_key: str = "text"
  title_key: Optional[str] = "title"
  id_key: Optional[str] = "_id"
  queries_key: Optional[str] = None
  skip_malformed: bool = False

  def _parse(self, raw: bytes) -> tuple[str, str, str, tuple[str, ...]]:
    """(doc_id or '', title, body, queries) of one line; raises ValueError with the reason."""
    try:
      record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise ValueError(f"invalid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise ValueError(f"expected a JSON object, got {type(record).__name__}")

    def field(key, types, required):
      if key not in record or record[key] is None:
        if required:
          raise ValueError(f"missing field {key!r}")
        return None
      value = record[key]
      if not isinstance(value, types) or isinstance(value, bool):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(f"field {key!r} is a {type(value).__name__}, expected {expected}")
      return value

    text = field(self.text_key, str, True)
    title = field(self.title_key, str, False) if self.title_key else None
    doc_id = field(self.id_key, (str, int), False) if self.id_key else None
    queries = ()
    if self.queries_key:
      values = field(self.queries_key, list, True)
      bad = [type(q).__name__ for q in values if not isinstance(q, str)]
      if bad:
        raise ValueError(f"field {self.queries_key!r} must be a list of strings, holds a {bad[0]}")
      queries = tuple(q.strip() for q in values if q.strip())
    return ("" if doc_id is None else str(doc_id)), title or "", text, queries

  def read(self, path: str, stats: Optional[ReadStats] = None) -> Iterator[Document]:
    """Documents of one file in order; raises `DataFormatError` ('path:line: reason') unless skip_malformed."""
    file_stats = ReadStats()
    with tf.io.gfile.GFile(path, "rb") as f:
      for line_no, raw in enumerate(f, 1):
        if not raw.strip():
          continue  # blank line (e.g. a trailing newline): no record at all
        try:
          doc_id, title, body, queries = self._parse(raw)
        except ValueError as e:
          where = f"{path}:{line_no}"
          if not self.skip_malformed:
            raise DataFormatError(f"{where}: {e}") from None
          file_stats.malformed += 1
          if file_stats.malformed <= _MAX_LOGGED_LINES:
            log.warning("%s: skipping malformed line: %s", where, e)
          continue
        if not body.strip() or (self.queries_key and not queries):
          file_stats.empty += 1  # a title alone is no document
          continue
        file_stats.documents += 1
        yield Document(doc_id or f"{path}:{line_no}", _join(title, body), queries)
    _log_summary(path, file_stats)
    if stats is not None:
      stats.add(file_stats)


FileFormat = TextFormat | JsonlFormat

BEIR_CORPUS = JsonlFormat(text_key="text", title_key="title", id_key="_id")
