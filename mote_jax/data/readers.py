"""Documents from local (or gfile) text and jsonl files, with file:line errors and counted skips.

A reader turns one file into `Document`s in file order. Formats:

* `TextFormat(mode="blocks")` (default): documents are separated by one or more blank lines, the format of
  BERT's pre-training corpora; each line of a block is a sentence or paragraph. `mode="lines"`: every line is a
  document (a blank line is then an empty document and is counted).
* `JsonlFormat`: one JSON object per line. The document text is `title_key` (optional, own line) followed by
  `text_key`; `id_key` names the document (default `file:line`). BEIR `corpus.jsonl` is
  `JsonlFormat(text_key="text", title_key="title", id_key="_id")`. With `queries_key` set, every record must hold
  a list of pseudo-queries, e.g. `{"_id": "d1", "title": "...", "text": "passage", "queries": ["q1", "q2"]}`;
  a record with no non-blank query counts as empty (with `require_queries=False` it is a document without
  queries). `text_key` and `id_key` may be tuples of alternatives (the first present one is used).
* `MsMarcoDocsFormat`: the MS MARCO documents TSV, `docid \\t url \\t title \\t body`.
* `DocTTTTTqueryFormat`: the published docTTTTTquery passage expansions: a collection TSV `pid \\t passage`
  joined by line number with expansion files of one predicted query per line.
* `TfdsFormat`: a TFDS dataset by name (text, optional title and id features).

A malformed jsonl line (invalid UTF-8 or JSON, not an object, missing or mistyped field) or TSV line (wrong
column count, invalid UTF-8) raises `DataFormatError`
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

  text_key: str | tuple[str, ...] = "text"
  title_key: Optional[str] = "title"
  id_key: Optional[str | tuple[str, ...]] = "_id"
  queries_key: Optional[str] = None
  skip_malformed: bool = False
  require_queries: bool = True  # False: a record without queries is a document with `queries=()`

  def parse_line(self, raw: bytes) -> tuple[str, str, str, tuple[str, ...]]:
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
      if isinstance(key, tuple):  # alternatives: the first one present
        present = [k for k in key if record.get(k) is not None]
        if not present:
          if required:
            raise ValueError("missing field " + " or ".join(repr(k) for k in key))
          return None
        key = present[0]
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
      values = field(self.queries_key, list, self.require_queries) or []
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
          doc_id, title, body, queries = self.parse_line(raw)
        except ValueError as e:
          where = f"{path}:{line_no}"
          if not self.skip_malformed:
            raise DataFormatError(f"{where}: {e}") from None
          file_stats.malformed += 1
          if file_stats.malformed <= _MAX_LOGGED_LINES:
            log.warning("%s: skipping malformed line: %s", where, e)
          continue
        if not body.strip() or (self.queries_key and self.require_queries and not queries):
          file_stats.empty += 1  # a title alone is no document
          continue
        file_stats.documents += 1
        yield Document(doc_id or f"{path}:{line_no}", _join(title, body), queries)
    _log_summary(path, file_stats)
    if stats is not None:
      stats.add(file_stats)


def _report(where: str, reason: str, skip: bool, stats: ReadStats) -> None:
  """Raises `DataFormatError` for a malformed record, or counts and (for the first few) logs it."""
  if not skip:
    raise DataFormatError(f"{where}: {reason}")
  stats.malformed += 1
  if stats.malformed <= _MAX_LOGGED_LINES:
    log.warning("%s: skipping malformed line: %s", where, reason)


def _tsv_lines(path: str) -> Iterator[tuple[int, str | None]]:
  """(line number, line without its newline) of a UTF-8 file; None for an undecodable line."""
  with tf.io.gfile.GFile(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      try:
        yield line_no, raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError:
        yield line_no, None


@dataclasses.dataclass(frozen=True)
class MsMarcoDocsFormat:
  """MS MARCO documents TSV (`msmarco-docs.tsv`): `docid \\t url \\t title \\t body` per line; the url is dropped.

  A line with another column count (or invalid UTF-8) is malformed; a document without a body is empty.
  """

  skip_malformed: bool = False

  def read(self, path: str, stats: Optional[ReadStats] = None) -> Iterator[Document]:
    file_stats = ReadStats()
    for line_no, line in _tsv_lines(path):
      where = f"{path}:{line_no}"
      if line is None:
        _report(where, "invalid UTF-8", self.skip_malformed, file_stats)
        continue
      if not line.strip():
        continue
      columns = line.split("\t")
      if len(columns) != 4:
        _report(where, f"expected 4 tab-separated columns (docid, url, title, body), found {len(columns)}",
                self.skip_malformed, file_stats)
        continue
      doc_id, _, title, body = columns
      if not doc_id.strip():
        _report(where, "empty docid", self.skip_malformed, file_stats)
        continue
      if not body.strip():
        file_stats.empty += 1
        continue
      file_stats.documents += 1
      yield Document(doc_id.strip(), _join(title, body.strip()))
    _log_summary(path, file_stats)
    if stats is not None:
      stats.add(file_stats)


@dataclasses.dataclass(frozen=True)
class DocTTTTTqueryFormat:
  """The published docTTTTTquery MS MARCO passage expansions, joined to the collection by line number.

  `read(path)` reads the collection TSV (`pid \\t passage`, e.g. `collection.tsv`); `expansions` are the
  expansion text files (e.g. `predicted_queries_topk_sample000.txt` ... `sample079.txt`), each one predicted
  query per line in collection order, so passage i gets line i of every file. A file with fewer or more lines
  than the collection is an error naming it.
  """

  expansions: tuple[str, ...] = ()
  skip_malformed: bool = False

  def read(self, path: str, stats: Optional[ReadStats] = None) -> Iterator[Document]:
    file_stats = ReadStats()
    if not self.expansions:
      raise ValueError("DocTTTTTqueryFormat.expansions: no expansion files given")
    files = [tf.io.gfile.GFile(p, "rb") for p in self.expansions]
    try:
      for line_no, line in _tsv_lines(path):
        queries = []
        for expansion_path, f in zip(self.expansions, files):
          raw = f.readline()
          if not raw:
            raise DataFormatError(f"{expansion_path}:{line_no}: ends before the collection {path} (no line "
                                  f"{line_no}); expansion files must have one line per passage")
          query = raw.decode("utf-8", errors="replace").strip()
          if query:
            queries.append(query)
        where = f"{path}:{line_no}"
        if line is None:
          _report(where, "invalid UTF-8", self.skip_malformed, file_stats)
          continue
        columns = line.split("\t")
        if len(columns) != 2 or not columns[0].strip():
          _report(where, f"expected 2 tab-separated columns (pid, passage), found {len(columns)}",
                  self.skip_malformed, file_stats)
          continue
        if not columns[1].strip():
          file_stats.empty += 1
          continue
        file_stats.documents += 1
        yield Document(columns[0].strip(), columns[1].strip(), tuple(queries))
      for expansion_path, f in zip(self.expansions, files):
        if f.readline():
          raise DataFormatError(f"{expansion_path}: has more lines than the collection {path}")
    finally:
      for f in files:
        f.close()
    _log_summary(path, file_stats)
    if stats is not None:
      stats.add(file_stats)


@dataclasses.dataclass(frozen=True)
class TfdsFormat:
  """A TFDS dataset: `read(name)` loads `name` (e.g. 'wikipedia/20230601.en:1.0.0') with `tfds.load`.

  The text is `title_key` (optional, own line) then `text_key`; `id_key` names the document (default
  `name/split:index`).
  """

  split: str = "train"
  text_key: str = "text"
  title_key: Optional[str] = None
  id_key: Optional[str] = None
  data_dir: Optional[str] = None

  def read(self, name: str, stats: Optional[ReadStats] = None) -> Iterator[Document]:
    import tensorflow_datasets as tfds
    file_stats = ReadStats()
    dataset = tfds.load(name, split=self.split, data_dir=self.data_dir, shuffle_files=False)

    def text(example, key):
      if key not in example:
        raise DataFormatError(f"{name}[{self.split}]: no feature {key!r}; features: {sorted(example)}")
      value = example[key]
      return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

    for index, example in enumerate(tfds.as_numpy(dataset)):
      body = text(example, self.text_key)
      if not body.strip():
        file_stats.empty += 1
        continue
      title = text(example, self.title_key) if self.title_key else ""
      doc_id = text(example, self.id_key) if self.id_key else f"{name}/{self.split}:{index}"
      file_stats.documents += 1
      yield Document(doc_id, _join(title, body.strip()))
    _log_summary(name, file_stats)
    if stats is not None:
      stats.add(file_stats)


FileFormat = TextFormat | JsonlFormat | MsMarcoDocsFormat | DocTTTTTqueryFormat | TfdsFormat

BEIR_CORPUS = JsonlFormat(text_key="text", title_key="title", id_key="_id")
