"""Offline preprocessing as an Apache Beam pipeline: corpus -> sentences -> word-piece ids -> sharded records.

  read (one DoFn per input file, `readers.*Format`, file:line errors)
    -> Reshuffle -> BatchElements -> encode (blingfire sentences, HF fast tokenizer on the whole batch)
    -> keep documents that give a pair -> shard by a hash of the input position -> sort by position -> write
  OUT/records-SSSSS-of-NNNNN.array_record   one `records.serialize` record per kept document
  OUT/stats.json                            counts, span-length histogram, settings, shards, fingerprint

Sentences: each line of a document (the title is its own first line) is split with blingfire's
`text_to_sentences`, a maintained splitter that needs no model download. Every sentence is tokenised without
special tokens; empty ones are dropped (as the reference does).

"Gives a pair" follows the reference's `_base_encode_one_span` (caskcsg/ir, cotmae/make_cotmae_data.py):
sentences are packed greedily and a span closes once its length exceeds the target; a document with < 2 spans
gives no pair. With target = max_len for every span a document gives a pair iff it yields >= 2 spans; shorter
targets only add spans, so such a document gives a pair under any sampled targets. For pseudo-query inputs a
document gives a pair iff it has >= 1 query. Documents that give no pair are counted and left out; when the
share of documents that give a pair is below `min_pair_share` the run stops with an error (`PairShareError`)
and writes nothing. The gate runs twice: first (`preflight`) on the first `preflight_documents` documents, read
and encoded in this process before the pipeline starts, so a corpus that cannot pass (MS MARCO passages) stops in
seconds rather than after hours of Beam work; then on the whole corpus after the pass.

Determinism: a document's key is its input position (input index, ordinal in that input). Its shard is
sha256(key) mod the shard count, and each shard is sorted by key, so the same input gives byte-identical shards
whatever the worker count or bundle order. The shard count is `num_shards`, or (0) ceil(records /
records_per_shard), a function of the input alone.

Atomic output: the pipeline writes into OUT/.preprocess-tmp (removed at the start of every run); after it
succeeds the shards are renamed into OUT and `stats.json` is written (to a temporary name, then renamed) LAST:
an output is complete iff OUT/stats.json exists. A killed run leaves no stats.json and no shards in OUT; running
it again gives byte-identical shards. OUT may be gs://: files go through tf.io.gfile; ArrayRecord writes a local
temporary file that is then copied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import tensorflow as tf

from mote_jax.data import readers, records

log = logging.getLogger(__name__)

TMP_DIR = ".preprocess-tmp"
SPLITTER = "blingfire.text_to_sentences"
HISTOGRAM_BINS = 32  # span-length histogram: bins of max_len / 8 tokens up to 4 x max_len, then one open bin
ARRAY_RECORD_OPTIONS = records.WRITER_OPTIONS  # one record per chunk (O(1) random access by index), snappy


class PairShareError(ValueError):
  """Too few documents give a pair for the recipe (the fidelity gate)."""


class EmptyCorpusError(ValueError):
  """The inputs hold no document."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Settings of one preprocessing run (see the module docstring)."""

  output: str
  tokenizer: str  # a local (or gs://) directory that `transformers.AutoTokenizer` loads (a fast tokenizer)
  max_len: int = 128  # the span target of the pair gate and histogram (the recipe's max_len)
  pair_kind: str = "spans"  # 'spans' (>= 2 spans) or 'queries' (>= 1 pseudo-query)
  min_pair_share: float = 0.5
  num_shards: int = 0  # 0: ceil(records / records_per_shard)
  records_per_shard: int = 50_000
  batch_size: int = 256  # documents per tokenizer call (upper bound of BatchElements)
  preflight_documents: int = 2000  # documents read before the pipeline for the early pair gate (0: none)
  overwrite: bool = False  # replace a complete output already in `output`

  def __post_init__(self):
    if self.pair_kind not in ("spans", "queries"):
      raise ValueError(f"pair_kind={self.pair_kind!r}: expected 'spans' or 'queries'")
    if self.max_len < 2:
      raise ValueError(f"max_len={self.max_len}: must be >= 2")
    if not 0.0 <= self.min_pair_share <= 1.0:
      raise ValueError(f"min_pair_share={self.min_pair_share}: must be in [0, 1]")
    if self.preflight_documents < 0:
      raise ValueError(f"preflight_documents={self.preflight_documents}: must be >= 0 (0 turns the pre-flight off)")


# --------------------------------------------------------------------------------------------------- algorithm


def split_sentences(text: str) -> list[str]:
  """Sentences of a document: every non-blank line split by blingfire (so a title line stays its own sentence)."""
  import blingfire
  sentences = []
  for line in text.split("\n"):
    if line.strip():
      sentences += [s for s in blingfire.text_to_sentences(line.strip()).split("\n") if s.strip()]
  return sentences


def greedy_span_lengths(sentence_lengths: Sequence[int], target: int) -> list[int]:
  """Span lengths of the reference's greedy packing at a fixed target: a span closes once its length > target."""
  spans, current = [], 0
  for n in sentence_lengths:
    if n <= 0:
      continue
    current += n
    if current > target:
      spans.append(current)
      current = 0
  if current:
    spans.append(current)
  return spans


def shard_of(key: str, num_shards: int) -> int:
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % num_shards


def _histogram_edges(max_len: int) -> list[int]:
  width = max(1, max_len // 8)
  return [i * width for i in range(HISTOGRAM_BINS)]


# ----------------------------------------------------------------------------------------------------- the DoFns


class _ReadInput(beam.DoFn):
  """(input index, path) -> ((input index, ordinal), Document) in file order; read counts to a tagged output."""

  def __init__(self, file_format):
    self.file_format = file_format

  def process(self, item):
    index, path = item
    stats = readers.ReadStats()
    for ordinal, doc in enumerate(self.file_format.read(path, stats)):
      yield (index, ordinal), doc
    yield beam.pvalue.TaggedOutput("read_stats", {"documents": stats.documents, "empty_skipped": stats.empty,
                                                  "malformed_skipped": stats.malformed})


def _local_tokenizer_dir(path: str) -> str:
  """`path` itself when local; a gs:// (any remote) directory is copied to a local temporary one first."""
  if "://" not in path:
    return path
  local = tempfile.mkdtemp(prefix="mote_tokenizer_")
  for name in tf.io.gfile.listdir(path):
    source = path.rstrip("/") + "/" + name
    if not tf.io.gfile.isdir(source):
      tf.io.gfile.copy(source, os.path.join(local, name), overwrite=True)
  return local


def load_tokenizer(path: str):
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(_local_tokenizer_dir(path))
  tokenizer.model_max_length = 1 << 40  # ids of whole sentences: no truncation, no length warning
  if not tokenizer.is_fast:
    raise ValueError(f"tokenizer {path}: not a fast (Rust) tokenizer; preprocessing needs tokenizer.json or a "
                     "vocabulary the fast tokenizer can load")
  return tokenizer


def vocab_hash(tokenizer) -> str:
  """sha256 of the (token, id) table: names the vocabulary whatever files hold it."""
  items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
  return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
  if not texts:
    return []
  return tokenizer(texts, add_special_tokens=False, truncation=False, return_attention_mask=False,
                   return_token_type_ids=False)["input_ids"]


def encode_documents(tokenizer, docs: Sequence, max_len: int, pair_kind: str) -> list[tuple]:
  """Documents -> (sentence ids, query ids, greedy span lengths at max_len, gives a pair) each: sentences split
  by blingfire, one tokenizer call for all sentences and one for all queries. The pipeline and the pre-flight
  gate both use it, so they apply the same "gives a pair" rule."""
  sentences = [split_sentences(doc.text) for doc in docs]
  ids = iter(_token_ids(tokenizer, [s for doc in sentences for s in doc]))
  query_ids = iter(_token_ids(tokenizer, [q for doc in docs for q in doc.queries]))
  out = []
  for doc, doc_sentences in zip(docs, sentences):
    sentence_ids = [x for x in (next(ids) for _ in doc_sentences) if x]
    queries = [x for x in (next(query_ids) for _ in doc.queries) if x]
    spans = greedy_span_lengths([len(x) for x in sentence_ids], max_len)
    gives_pair = len(spans) >= 2 if pair_kind == "spans" else len(queries) >= 1
    out.append((sentence_ids, queries, spans, gives_pair))
  return out


class _Encode(beam.DoFn):
  """A batch of (key, Document) -> (key string, record bytes) of documents that give a pair; counts tagged.

  The tokenizer is loaded once per worker (`setup`) and called once per batch on all its sentences and queries.
  """

  def __init__(self, tokenizer_path: str, max_len: int, pair_kind: str):
    self.tokenizer_path, self.max_len, self.pair_kind = tokenizer_path, max_len, pair_kind

  def setup(self):
    self.tokenizer = load_tokenizer(self.tokenizer_path)
    self.edges = _histogram_edges(self.max_len)
    self.done, self.started, self.last_log = 0, time.time(), time.time()

  def process(self, batch):
    counts = _zero_counts(len(self.edges))
    for (key, doc), (sentence_ids, queries, spans, gives_pair) in zip(
        batch, encode_documents(self.tokenizer, [doc for _, doc in batch], self.max_len, self.pair_kind)):
      counts["documents"] += 1
      if not gives_pair:
        counts["documents_without_pair"] += 1
        continue
      counts["records"] += 1
      counts["sentences"] += len(sentence_ids)
      counts["tokens"] += sum(len(s) for s in sentence_ids)
      counts["queries"] += len(queries)
      counts["spans"] += len(spans)
      for n in spans:
        counts["span_histogram"][_bin(n, self.edges)] += 1
      yield f"{key[0]:06d}:{key[1]:012d}", records.serialize(doc.doc_id, sentence_ids, queries)
    yield beam.pvalue.TaggedOutput("counts", counts)
    self.done += len(batch)
    if time.time() - self.last_log > 10:
      self.last_log = time.time()
      log.info("preprocess worker %d: %d documents, %.1f documents/s", os.getpid(), self.done,
               self.done / (self.last_log - self.started))


def _bin(n: int, edges: list[int]) -> int:
  width = edges[1] - edges[0] if len(edges) > 1 else 1
  return min(n // width, len(edges) - 1)


def _zero_counts(bins: int) -> dict:
  return {"documents": 0, "documents_without_pair": 0, "records": 0, "sentences": 0, "tokens": 0, "queries": 0,
          "spans": 0, "span_histogram": [0] * bins}


class _SumCounts(beam.CombineFn):
  """Sums count dicts (ints and equal-length int lists) key by key."""

  def create_accumulator(self):
    return {}

  def add_input(self, accumulator, counts):
    for key, value in counts.items():
      if isinstance(value, list):
        old = accumulator.get(key) or [0] * len(value)
        accumulator[key] = [a + b for a, b in zip(old, value)]
      else:
        accumulator[key] = accumulator.get(key, 0) + value
    return accumulator

  def merge_accumulators(self, accumulators):
    merged = {}
    for accumulator in accumulators:
      self.add_input(merged, accumulator)
    return merged

  def extract_output(self, accumulator):
    return accumulator


def shard_name(shard: int, num_shards: int) -> str:
  return f"records-{shard:05d}-of-{num_shards:05d}{records.SHARD_SUFFIX}"


def write_array_record(path: str, payloads: Iterable[bytes]) -> tuple[int, str]:
  """Writes `payloads` in order to an ArrayRecord file at `path` (local or gs://); (count, sha256 of payloads)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  digest, count = hashlib.sha256(), 0
  remote = "://" in path
  local = tempfile.mkstemp(suffix=records.SHARD_SUFFIX)[1] if remote else path
  writer = ArrayRecordWriter(local, ARRAY_RECORD_OPTIONS)
  try:
    for payload in payloads:
      writer.write(payload)
      digest.update(len(payload).to_bytes(8, "big"))
      digest.update(payload)
      count += 1
  finally:
    writer.close()
  if remote:
    tf.io.gfile.copy(local, path, overwrite=True)
    os.remove(local)
  return count, digest.hexdigest()


class _WriteShard(beam.DoFn):
  """(shard, [(key, record)]) -> writes the shard sorted by key into the temporary directory; yields its info."""

  def __init__(self, tmp_dir: str):
    self.tmp_dir = tmp_dir

  def process(self, item, num_shards: int):
    shard, keyed = item
    ordered = sorted(keyed, key=lambda kv: kv[0])
    name = shard_name(shard, num_shards)
    count, digest = write_array_record(f"{self.tmp_dir}/{name}", (record for _, record in ordered))
    yield {"shard": shard, "file": name, "records": count, "sha256": digest}


def _write_json(path: str, value: Any) -> None:
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(json.dumps(value, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------------------- pipeline


def build_pipeline(pipeline: beam.Pipeline, inputs: Sequence[str], file_format, config: PreprocessConfig,
                   tmp_dir: str) -> None:
  """Adds the preprocessing transforms to `pipeline`; they write shards, shards.json and counts.json to tmp_dir."""
  read = (pipeline
          | "Inputs" >> beam.Create(list(enumerate(inputs)))
          | "Read" >> beam.ParDo(_ReadInput(file_format)).with_outputs("read_stats", main="documents"))
  encoded = (read.documents
             | "Spread" >> beam.Reshuffle()
             | "Batch" >> beam.BatchElements(min_batch_size=min(16, config.batch_size),
                                             max_batch_size=config.batch_size)
             | "Encode" >> beam.ParDo(_Encode(config.tokenizer, config.max_len, config.pair_kind)
                                      ).with_outputs("counts", main="records"))
  num_records = encoded.records | "CountRecords" >> beam.combiners.Count.Globally()
  if config.num_shards > 0:
    num_shards = num_records | "NumShards" >> beam.Map(lambda _, n=config.num_shards: n)
  else:
    per_shard = config.records_per_shard
    num_shards = num_records | "NumShards" >> beam.Map(lambda n: max(1, math.ceil(n / per_shard)))
  num_shards_side = beam.pvalue.AsSingleton(num_shards)
  shards = (encoded.records
            | "AssignShard" >> beam.Map(lambda kv, n: (shard_of(kv[0], n), kv), num_shards_side)
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(_WriteShard(tmp_dir), num_shards_side))
  _ = (shards
       | "ShardList" >> beam.combiners.ToList()
       | "WriteShardList" >> beam.Map(lambda infos, n: _write_json(f"{tmp_dir}/shards.json",
                                                                    {"num_shards": n, "shards": infos}),
                                      num_shards_side))
  read_counts = read.read_stats | "SumReadStats" >> beam.CombineGlobally(_SumCounts())
  _ = ((encoded.counts | "SumCounts" >> beam.CombineGlobally(_SumCounts()))
       | "WriteCounts" >> beam.Map(lambda c, r: _write_json(f"{tmp_dir}/counts.json", {"encode": c, "read": r}),
                                   beam.pvalue.AsSingleton(read_counts)))


def make_pipeline(options) -> beam.Pipeline:
  """A pipeline for `options`; the DirectRunner runs as Beam's FnApiRunner (its batch engine, which honours
  direct_num_workers / direct_running_mode) rather than first trying Prism, which downloads a binary."""
  from apache_beam.options.pipeline_options import StandardOptions
  if options.view_as(StandardOptions).runner in (None, "DirectRunner"):
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    return beam.Pipeline(runner=FnApiRunner(), options=options)
  return beam.Pipeline(options=options)


def _remove_tree(path: str) -> None:
  if tf.io.gfile.exists(path):
    tf.io.gfile.rmtree(path)


def _pipeline_graph(pipeline: beam.Pipeline) -> list[str]:
  proto = pipeline.to_runner_api()
  return sorted(t.unique_name for t in proto.components.transforms.values() if t.unique_name)


def run(inputs: Sequence[str], file_format, config: PreprocessConfig, options, *,
        settings: Optional[dict] = None, dry_run: bool = False) -> dict:
  """Runs the pipeline with Beam `options` (a PipelineOptions) and publishes OUT; returns stats.json's content.

  `inputs`: input paths (already expanded) or TFDS names; `settings` adds to stats.json's `settings`.
  `dry_run`: builds the pipeline, logs its options and transforms, runs nothing, and returns them.
  """
  out = config.output.rstrip("/")
  tmp_dir = f"{out}/{TMP_DIR}"
  if not inputs:
    raise EmptyCorpusError("no input paths given")
  if dry_run:  # the graph does not depend on the runner: build it on the local one, so no cloud client is needed
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    pipeline = beam.Pipeline(runner=FnApiRunner(), options=options)
    build_pipeline(pipeline, inputs, file_format, config, tmp_dir)
    graph = _pipeline_graph(pipeline)
    shown = options.get_all_options(drop_default=True, retain_unknown_options=True)
    log.info("dry run: pipeline options %s", shown)
    log.info("dry run: %d transforms:\n  %s", len(graph), "\n  ".join(graph))
    return {"dry_run": True, "options": shown, "transforms": graph}

  tokenizer = load_tokenizer(config.tokenizer)  # fail fast on a bad path, and name the vocabulary
  stats_path = f"{out}/{records.STATS_FILE}"
  if tf.io.gfile.exists(stats_path):
    if not config.overwrite:
      raise FileExistsError(f"{stats_path} exists: {out} already holds a complete preprocessing output; choose "
                            "another output or set overwrite=True")
    tf.io.gfile.remove(stats_path)  # from here on the old output no longer reads as complete
  if config.preflight_documents:
    preflight(inputs, file_format, config, tokenizer)
  _remove_tree(tmp_dir)
  tf.io.gfile.makedirs(tmp_dir)

  started = time.time()
  pipeline = make_pipeline(options)
  build_pipeline(pipeline, inputs, file_format, config, tmp_dir)
  result = pipeline.run()
  state = result.wait_until_finish()
  if str(state) not in ("DONE", "PipelineState.DONE"):
    raise RuntimeError(f"preprocessing pipeline ended in state {state}; {out} is unchanged")
  seconds = time.time() - started

  with tf.io.gfile.GFile(f"{tmp_dir}/counts.json") as f:
    counts = json.load(f)
  read, encode = counts["read"], counts["encode"] or _zero_counts(HISTOGRAM_BINS)
  documents = encode["documents"]
  if documents == 0:
    _remove_tree(tmp_dir)
    raise EmptyCorpusError(f"no documents in {list(inputs)} ({read.get('empty_skipped', 0)} empty and "
                           f"{read.get('malformed_skipped', 0)} malformed records skipped); nothing written")
  share = encode["records"] / documents
  if share < config.min_pair_share:
    _remove_tree(tmp_dir)
    raise pair_share_error(encode["records"], documents, config)

  with tf.io.gfile.GFile(f"{tmp_dir}/shards.json") as f:
    shard_list = json.load(f)
  num_shards = shard_list["num_shards"]
  by_shard = {info["shard"]: info for info in shard_list["shards"]}
  for shard in range(num_shards):  # a shard no document hashed to is written empty, so every index exists
    if shard not in by_shard:
      name = shard_name(shard, num_shards)
      count, digest = write_array_record(f"{tmp_dir}/{name}", ())
      by_shard[shard] = {"shard": shard, "file": name, "records": count, "sha256": digest}
  shards = [by_shard[s] for s in range(num_shards)]
  fingerprint = hashlib.sha256("".join(f"{s['file']}:{s['records']}:{s['sha256']};" for s in shards)
                               .encode()).hexdigest()

  # Publish: stale shards of an earlier run go, the new ones are renamed in, stats.json comes last.
  names = {s["file"] for s in shards}
  for stale in tf.io.gfile.glob(f"{out}/records-*-of-*{records.SHARD_SUFFIX}"):
    if os.path.basename(stale) not in names:
      tf.io.gfile.remove(stale)
  for s in shards:
    tf.io.gfile.rename(f"{tmp_dir}/{s['file']}", f"{out}/{s['file']}", overwrite=True)
  edges = _histogram_edges(config.max_len)
  stats = {
      "documents": documents,
      "documents_with_pair": encode["records"],
      "documents_without_pair": encode["documents_without_pair"],
      "pair_share": share,
      "records": encode["records"],
      "sentences": encode["sentences"],
      "tokens": encode["tokens"],
      "queries": encode["queries"],
      "spans": encode["spans"],
      "span_length_histogram": {"lower_edges": edges, "counts": encode["span_histogram"],
                                "note": f"spans of the records under greedy packing at target max_len="
                                        f"{config.max_len}; the last bin is open"},
      "read": read,
      "settings": {"inputs": list(inputs), "tokenizer": config.tokenizer, "vocab_sha256": vocab_hash(tokenizer),
                   "splitter": SPLITTER, "max_len": config.max_len, "pair_kind": config.pair_kind,
                   "min_pair_share": config.min_pair_share, "array_record_options": ARRAY_RECORD_OPTIONS,
                   "record_format": records.RECORD_FORMAT,
                   **(settings or {})},
      "num_shards": num_shards,
      "shards": [{"file": s["file"], "records": s["records"]} for s in shards],
      "fingerprint": fingerprint,
      "seconds": seconds,
      "documents_per_second": documents / seconds if seconds > 0 else None,
  }
  _write_json(f"{tmp_dir}/{records.STATS_FILE}", stats)
  tf.io.gfile.rename(f"{tmp_dir}/{records.STATS_FILE}", stats_path, overwrite=True)
  _remove_tree(tmp_dir)
  log.info("preprocessed %d documents (%d give a pair, %.1f%%) into %d records in %d shards at %s: %.1f "
           "documents/s", documents, encode["records"], 100 * share, encode["records"], num_shards, out,
           stats["documents_per_second"] or 0.0)
  return stats


def pair_share_error(with_pair: int, documents: int, config: PreprocessConfig, preflight: bool = False
                     ) -> PairShareError:
  """The pair gate's error: the counts, the share, the threshold and the fix."""
  what = (f"give >= 2 spans at max_len={config.max_len}" if config.pair_kind == "spans"
          else "have >= 1 pseudo-query")
  fix = ("CoT-MAE pre-trains on MS MARCO *documents* (msmarco-docs.tsv, input_format='msmarco_docs_tsv'), not "
         "passages: use a corpus of long documents, or lower min_pair_share, or train on pseudo-query pairs "
         "(input_format='query_jsonl' / 'doctttttquery')" if config.pair_kind == "spans"
         else "generate pseudo-queries for every passage, or lower min_pair_share")
  where = (f"pre-flight (the first {documents} documents of the inputs, read before the pipeline; "
           "preprocess.preflight_documents): " if preflight else "")
  done = "the pipeline was not started" if preflight else "nothing written"
  return PairShareError(f"{where}only {with_pair} of {documents} documents ({with_pair / documents:.1%}) {what}, "
                        f"below min_pair_share={config.min_pair_share}; {done}. Fix: {fix}")


def preflight(inputs: Sequence[str], file_format, config: PreprocessConfig, tokenizer) -> dict:
  """The pair gate on the first `config.preflight_documents` documents (inputs in order, each from its start),
  with the pipeline's reader, splitter, tokenizer and rule (`encode_documents`), before any Beam work: a corpus
  that cannot pass stops in seconds instead of after the whole pass. Raises `PairShareError` (or
  `EmptyCorpusError` when the inputs hold no document at all); returns the sample's counts. The full gate still
  runs after the pass (the first documents need not be typical of the corpus)."""
  started, stats, docs = time.time(), readers.ReadStats(), []
  for path in inputs:
    for doc in file_format.read(path, stats):
      docs.append(doc)
      if len(docs) >= config.preflight_documents:
        break
    if len(docs) >= config.preflight_documents:
      break
  if not docs:
    raise EmptyCorpusError(f"no documents in {list(inputs)} ({stats.empty} empty and {stats.malformed} malformed "
                           "records skipped); nothing written")
  with_pair = 0
  for start in range(0, len(docs), config.batch_size):
    encoded = encode_documents(tokenizer, docs[start:start + config.batch_size], config.max_len, config.pair_kind)
    with_pair += sum(gives_pair for *_, gives_pair in encoded)
  log.info("pre-flight: %d of the first %d documents (%.1f%%) give a pair (%.1f s)", with_pair, len(docs),
           100 * with_pair / len(docs), time.time() - started)
  if with_pair / len(docs) < config.min_pair_share:
    raise pair_share_error(with_pair, len(docs), config, preflight=True)
  return {"documents": len(docs), "documents_with_pair": with_pair}


def read_stats(output: str) -> dict:
  """stats.json of a complete output; a clear error when the output is missing or incomplete."""
  path = f"{output.rstrip('/')}/{records.STATS_FILE}"
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{path} not found: {output} is not a complete preprocessing output")
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def iter_records(output: str) -> Iterator[bytes]:
  """Every record of a complete output, shard by shard (inspection and tests)."""
  from array_record.python.array_record_module import ArrayRecordReader
  stats = read_stats(output)
  for shard in stats["shards"]:
    reader = ArrayRecordReader(f"{output.rstrip('/')}/{shard['file']}")
    try:
      if reader.num_records():
        yield from reader.read_all()
    finally:
      reader.close()
