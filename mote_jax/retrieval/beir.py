"""BEIR datasets: corpus.jsonl, queries.jsonl and qrels/<split>.tsv, validated on load.

Layout (https://github.com/beir-cellar/beir):
  corpus.jsonl      {"_id", "title", "text", ...} per line; the passage text is BEIR's `title + " " + text`
  queries.jsonl     {"_id", "text", ...} per line
  qrels/<split>.tsv header "query-id<TAB>corpus-id<TAB>score", then one judgement per line (LF or CRLF)

Every problem is reported with the file and line (or the offending ids), not as a KeyError later on. Paths may be
local or on an object store (`gs://...`): every file goes through `etils.epath`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterator, Mapping

from etils import epath

log = logging.getLogger(__name__)


class BeirFormatError(ValueError):
  """Malformed or inconsistent BEIR files; the message names the file, line, id or field."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Documents in file order: ids[i], titles[i], texts[i]."""

  ids: tuple[str, ...]
  titles: tuple[str, ...]
  texts: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.ids)

  def passages(self) -> list[str]:
    """The texts the passage encoder sees: BEIR's `(title + " " + text).strip()`."""
    return [f"{title} {text}".strip() for title, text in zip(self.titles, self.texts)]


@dataclasses.dataclass(frozen=True)
class BeirDataset:
  """One split of a BEIR dataset.

  `queries` holds the judged queries of the split (query id -> text, in queries.jsonl order), as BEIR evaluates;
  `qrels` maps query id -> {doc id: relevance}.
  """

  name: str
  split: str
  corpus: Corpus
  queries: dict[str, str]
  qrels: dict[str, dict[str, int]]


def _lines(path: epath.Path) -> Iterator[tuple[int, str]]:
  """(line number, line without its LF or CRLF) of a UTF-8 text file, local or on an object store."""
  with path.open("rb") as f:
    for line_no, raw in enumerate(f, 1):
      try:
        yield line_no, raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        raise BeirFormatError(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _jsonl(path: epath.Path) -> Iterator[tuple[int, dict]]:
  """(line number, object) for every non-blank line; malformed JSON raises with file:line."""
  for line_no, line in _lines(path):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise BeirFormatError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
      raise BeirFormatError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    yield line_no, obj


def _field(obj: dict, name: str, where: str, *, required: bool = True, id_like: bool = False) -> str:
  if name not in obj:
    if required:
      raise BeirFormatError(f"{where}: missing field {name!r}")
    return ""
  value = obj[name]
  if id_like and isinstance(value, int) and not isinstance(value, bool):
    return str(value)  # some exports write numeric ids; qrels always name them as strings
  if value is None and not required:
    return ""
  if not isinstance(value, str):
    raise BeirFormatError(f"{where}: field {name!r} is {type(value).__name__}, expected a string")
  return value


def load_corpus(path: str | os.PathLike) -> Corpus:
  """corpus.jsonl -> Corpus; duplicate `_id`s raise BeirFormatError naming them (and their lines)."""
  path = epath.Path(path)
  ids, titles, texts, first_line, duplicates = [], [], [], {}, {}
  for line_no, obj in _jsonl(path):
    where = f"{path}:{line_no}"
    doc_id = _field(obj, "_id", where, id_like=True)
    if doc_id in first_line:
      duplicates.setdefault(doc_id, [first_line[doc_id]]).append(line_no)
      continue
    first_line[doc_id] = line_no
    ids.append(doc_id)
    titles.append(_field(obj, "title", where, required=False))
    texts.append(_field(obj, "text", where))
  if duplicates:
    shown = ", ".join(f"{doc_id!r} (lines {', '.join(map(str, lines))})"
                      for doc_id, lines in list(duplicates.items())[:10])
    raise BeirFormatError(f"{path}: {len(duplicates)} duplicate document ids: {shown}"
                          + (" ..." if len(duplicates) > 10 else ""))
  if not ids:
    raise BeirFormatError(f"{path}: no documents")
  return Corpus(tuple(ids), tuple(titles), tuple(texts))


def load_queries(path: str | os.PathLike) -> dict[str, str]:
  """queries.jsonl -> {query id: text}; duplicate ids and empty (or blank) texts raise naming the id and line."""
  path = epath.Path(path)
  queries, first_line = {}, {}
  for line_no, obj in _jsonl(path):
    where = f"{path}:{line_no}"
    query_id = _field(obj, "_id", where, id_like=True)
    text = _field(obj, "text", where)
    if query_id in first_line:
      raise BeirFormatError(f"{where}: duplicate query id {query_id!r} (first on line {first_line[query_id]})")
    if not text.strip():
      raise BeirFormatError(f"{where}: query {query_id!r} has an empty text")
    first_line[query_id] = line_no
    queries[query_id] = text
  return queries


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
  """qrels/<split>.tsv -> {query id: {doc id: relevance}}; CRLF line endings are accepted.

  A first line starting with "query-id" is the header. Rows must have 3 tab-separated columns with an integer
  score; a repeated (query, doc) pair with a different score is an error.
  """
  path = epath.Path(path)
  qrels: dict[str, dict[str, int]] = {}
  for line_no, line in _lines(path):
    if not line.strip() or (line_no == 1 and line.startswith("query-id")):
      continue
    columns = line.split("\t")
    if len(columns) != 3:
      raise BeirFormatError(f"{path}:{line_no}: expected 3 tab-separated columns "
                            f"(query-id, corpus-id, score), got {len(columns)}: {line[:200]!r}")
    query_id, doc_id, score_text = (c.strip() for c in columns)
    try:
      score = int(score_text)
    except ValueError:
      try:  # some exports write "1.0"
        value = float(score_text)
      except ValueError:
        value = None
      if value is None or not value.is_integer():
        raise BeirFormatError(f"{path}:{line_no}: score {score_text!r} is not an integer") from None
      score = int(value)
    if not query_id or not doc_id:
      raise BeirFormatError(f"{path}:{line_no}: empty query-id or corpus-id")
    judged = qrels.setdefault(query_id, {})
    if doc_id in judged and judged[doc_id] != score:
      raise BeirFormatError(f"{path}:{line_no}: ({query_id!r}, {doc_id!r}) judged {score} here and "
                            f"{judged[doc_id]} before")
    judged[doc_id] = score
  if not qrels:
    raise BeirFormatError(f"{path}: no judgements")
  return qrels


def check_qrels(qrels: Mapping[str, Mapping[str, int]], query_ids, doc_ids, qrels_path: str | os.PathLike,
                allow_unknown_ids: bool = False) -> dict[str, dict[str, int]]:
  """Qrels restricted to known ids; unknown query or doc ids raise (or, if allowed, warn and are dropped).

  The message counts the unknown ids and the judgements naming them, and shows a few of each.
  """
  query_ids, doc_ids = set(query_ids), set(doc_ids)
  unknown_queries = sorted(q for q in qrels if q not in query_ids)
  unknown_docs = sorted({d for q, judged in qrels.items() for d in judged if d not in doc_ids})
  if not unknown_queries and not unknown_docs:
    return {q: dict(judged) for q, judged in qrels.items()}
  bad_docs = set(unknown_docs)
  rows = sum(len(qrels[q]) for q in unknown_queries) + sum(
      1 for q, judged in qrels.items() if q in query_ids for d in judged if d in bad_docs)
  message = (f"{qrels_path}: {rows} judgements name unknown ids: {len(unknown_queries)} query ids not in "
             f"queries.jsonl {unknown_queries[:5]}{' ...' if len(unknown_queries) > 5 else ''}, "
             f"{len(unknown_docs)} document ids not in corpus.jsonl {unknown_docs[:5]}"
             f"{' ...' if len(unknown_docs) > 5 else ''}")
  if not allow_unknown_ids:
    raise BeirFormatError(message + " (pass allow_unknown_ids=True to drop them with a warning)")
  log.warning("%s; dropping them", message)
  kept = {}
  for q, judged in qrels.items():
    if q in query_ids:
      judged = {d: r for d, r in judged.items() if d in doc_ids}
      if judged:
        kept[q] = judged
  if not kept:
    raise BeirFormatError(f"{qrels_path}: no judgements left after dropping unknown ids")
  return kept


def load_beir(directory: str | os.PathLike, split: str = "test", *, allow_unknown_ids: bool = False) -> BeirDataset:
  """Loads and validates one split of the BEIR dataset in `directory`.

  Raises BeirFormatError for malformed JSON (file:line), duplicate document ids (named), empty queries (named),
  bad qrels rows (file:line), and qrels that name unknown query or document ids (counted; with
  `allow_unknown_ids=True` those judgements are dropped with a warning instead).
  """
  directory = epath.Path(directory)
  qrels_path = directory / "qrels" / f"{split}.tsv"
  for path in (directory / "corpus.jsonl", directory / "queries.jsonl", qrels_path):
    if not path.exists():
      available = sorted(p.stem for p in (directory / "qrels").glob("*.tsv"))
      hint = f" (splits available: {available})" if path == qrels_path else ""
      raise FileNotFoundError(f"{path}: not found{hint}")
  corpus = load_corpus(directory / "corpus.jsonl")
  all_queries = load_queries(directory / "queries.jsonl")
  qrels = check_qrels(load_qrels(qrels_path), all_queries, corpus.ids, qrels_path, allow_unknown_ids)
  queries = {q: text for q, text in all_queries.items() if q in qrels}
  log.info("%s/%s: %d documents, %d judged queries, %d judgements", directory.name, split, len(corpus),
           len(queries), sum(map(len, qrels.values())))
  return BeirDataset(directory.name, split, corpus, queries, qrels)


def write_subset(data: BeirDataset, out: str | os.PathLike, splits: Mapping[str, list[str]],
                 doc_ids: set[str]) -> epath.Path:
  """Writes a BEIR directory holding `data`'s documents in `doc_ids` (file order), the queries of `splits` and
  each split's qrels (`splits`: split name -> query ids of `data`); e.g. a small dataset cut from a large one, or a
  dev split carved from train. Returns `out`."""
  out = epath.Path(out)
  (out / "qrels").mkdir(parents=True, exist_ok=True)
  with (out / "corpus.jsonl").open("w") as f:
    for doc_id, title, text in zip(data.corpus.ids, data.corpus.titles, data.corpus.texts):
      if doc_id in doc_ids:
        f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
  with (out / "queries.jsonl").open("w") as f:
    for q in dict.fromkeys(q for ids in splits.values() for q in ids):
      f.write(json.dumps({"_id": q, "text": data.queries[q]}) + "\n")
  for split, ids in splits.items():
    rows = [f"{q}\t{d}\t{r}" for q in ids for d, r in data.qrels[q].items()]
    (out / "qrels" / f"{split}.tsv").write_text("\n".join(["query-id\tcorpus-id\tscore", *rows]) + "\n")
  return out
