"""Pseudo-queries for passages (docT5query) as an Apache Beam pipeline: passages in, jsonl with queries out.

Input: BEIR `corpus.jsonl` lines (`{"_id" | "id", "title"?, "text"}`) or an MS MARCO collection TSV
(`pid \\t passage`, no header). Output: jsonl shards, one record per passage,

    {"id": "...", "text": "passage", "predicted_queries": ["q1", ..., "qN"]}     (+ "title" when the input has one)

the layout of the published docTTTTTquery expansions, which offline preprocessing and `register_query_pair_tasks`
(`id_key="id", queries_key="predicted_queries"`) read.

Generation follows docT5query (Nogueira & Lin) and cotmae-qc's `qg/`: a seq2seq model (e.g. doc2query-t5) read
from a local Hugging Face directory with transformers, `generate(do_sample=True, top_k=25, top_p=0.95,
num_return_sequences=N)`; the input is `prefix + title + " " + text` truncated to `max_input_length` tokens
(cotmae-qc's own generator is trained with the prefix "text2query: "; docT5query's checkpoints take none).
Every sampled sequence is kept (N per passage, duplicates included: their frequency is part of the expansion).

Work units and determinism. The driver cuts every input file into shards of `passages_per_shard` consecutive
lines (one sequential read to find the byte offsets), and a shard is cut into batches of `batch_size` lines.
Each batch is generated with the torch RNG seeded from (seed, the ids of the batch's passages), so the output
depends only on the input, the seed and these two sizes: not on the runner, the worker count or the order in
which workers take shards. A shard is written to a temporary file and renamed, and a shard already in place is
not generated again, so re-running an interrupted job completes it and gives the same files. The settings of a
run are kept in OUTPUT/generation.json; a re-run with other settings stops with an error naming them.

Runners: DirectRunner with `direct_num_workers` processes here; on Dataflow pass the usual pipeline flags (see
`mote_jax/jobs/generate_queries.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from typing import Iterable, Iterator, Literal, Optional, Sequence

import apache_beam as beam
import tensorflow as tf

from mote_jax.data.readers import DataFormatError, JsonlFormat, expand_paths

log = logging.getLogger(__name__)

InputFormat = Literal["auto", "beir_jsonl", "msmarco_tsv"]
SETTINGS_FILE = "generation.json"
STATS_FILE = "stats.json"
SHARD_SUFFIX = ".jsonl"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """How queries are sampled. Defaults: docT5query's sampling (top-k 25, top-p 0.95) as in cotmae-qc."""

  model: str = ""  # a local HF seq2seq directory (config, weights, tokenizer)
  num_queries: int = 5  # N sampled queries per passage (cotmae-qc: 5; the MS MARCO docTTTTTquery release: 80)
  max_new_tokens: int = 64  # cotmae-qc's max_length
  top_k: int = 25
  top_p: float = 0.95
  prefix: str = ""  # prepended to every input ("text2query: " for cotmae-qc's generator)
  max_input_length: int = 512  # input tokens; longer passages are truncated
  batch_size: int = 16  # passages per generate() call; part of what fixes the output
  seed: int = 0
  device: str = "cpu"  # torch device of the model: "cpu", "cuda", "cuda:1", ...
  torch_threads: int = 0  # intra-op threads per worker; 0 leaves torch's default

  def __post_init__(self):
    if not self.model:
      raise ValueError("GenerationConfig.model: the local HF seq2seq model directory is required")
    for name in ("num_queries", "max_new_tokens", "top_k", "max_input_length", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"GenerationConfig.{name}={getattr(self, name)}: must be >= 1")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"GenerationConfig.top_p={self.top_p}: must be in (0, 1]")

  def generate_kwargs(self) -> dict:
    """The keyword arguments of `model.generate` (besides the encoded inputs)."""
    return dict(do_sample=True, top_k=self.top_k, top_p=self.top_p, num_return_sequences=self.num_queries,
                max_new_tokens=self.max_new_tokens)


@dataclasses.dataclass(frozen=True)
class Passage:
  passage_id: str
  title: str
  text: str


@dataclasses.dataclass(frozen=True)
class Shard:
  """`num_lines` lines of `path` starting at byte `offset` (line `first_line`, 1-based): one output file."""

  path: str
  file_format: str  # "beir_jsonl" | "msmarco_tsv"
  file_index: int
  shard_index: int
  offset: int
  first_line: int
  num_lines: int

  @property
  def output_name(self) -> str:
    return f"queries-{self.file_index:04d}-{self.shard_index:06d}{SHARD_SUFFIX}"


def file_format_of(path: str, input_format: InputFormat) -> str:
  if input_format != "auto":
    if input_format not in ("beir_jsonl", "msmarco_tsv"):
      raise ValueError(f"input_format={input_format!r}: expected 'auto', 'beir_jsonl' or 'msmarco_tsv'")
    return input_format
  name = path.lower()
  if name.endswith((".jsonl", ".json")):
    return "beir_jsonl"
  if name.endswith(".tsv"):
    return "msmarco_tsv"
  raise ValueError(f"{path}: cannot tell the format from the name; set input_format to 'beir_jsonl' (BEIR "
                   "corpus.jsonl) or 'msmarco_tsv' (pid<TAB>passage)")


_CORPUS_JSONL = JsonlFormat(text_key="text", title_key="title", id_key=("_id", "id"))


def parse_line(raw: bytes, file_format: str, where: str) -> Optional[Passage]:
  """The passage of one input line, None for a blank line; `DataFormatError` ('file:line: reason') otherwise."""
  if not raw.strip():
    return None
  if file_format == "msmarco_tsv":
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataFormatError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 2 or not fields[0].strip():
      raise DataFormatError(f"{where}: expected 'pid<TAB>passage', got {len(fields)} tab-separated field(s)")
    return Passage(fields[0].strip(), "", fields[1].strip())
  try:
    passage_id, title, text, _ = _CORPUS_JSONL.parse_line(raw)
  except ValueError as e:
    raise DataFormatError(f"{where}: {e}") from None
  if not passage_id:
    raise DataFormatError(f"{where}: missing field '_id' or 'id'")
  return Passage(passage_id, title.strip(), text.strip())


def plan_shards(patterns: Sequence[str] | str, passages_per_shard: int,
                input_format: InputFormat = "auto") -> list[Shard]:
  """Cuts every matching file into shards of `passages_per_shard` lines; errors on an empty corpus."""
  if passages_per_shard < 1:
    raise ValueError(f"passages_per_shard={passages_per_shard}: must be >= 1")
  shards, non_blank = [], 0
  for file_index, path in enumerate(expand_paths(patterns)):
    file_format = file_format_of(path, input_format)
    starts, offset, lines = [], 0, 0  # (byte offset, line number) of each shard's first line
    with tf.io.gfile.GFile(path, "rb") as f:
      for raw in f:
        if lines % passages_per_shard == 0:
          starts.append((offset, lines + 1))
        lines += 1
        non_blank += bool(raw.strip())
        offset += len(raw)
    for index, (start, first_line) in enumerate(starts):
      shards.append(Shard(path, file_format, file_index, index, start, first_line,
                          min(passages_per_shard, lines - first_line + 1)))
  if not non_blank:
    raise ValueError(f"empty corpus: no passage in {patterns!r}")
  return shards


def read_shard(shard: Shard) -> Iterator[Passage]:
  with tf.io.gfile.GFile(shard.path, "rb") as f:
    f.seek(shard.offset)
    for k in range(shard.num_lines):
      raw = f.readline()
      passage = parse_line(raw, shard.file_format, f"{shard.path}:{shard.first_line + k}")
      if passage is not None:
        yield passage


def batch_seed(seed: int, passage_ids: Sequence[str]) -> int:
  """The torch seed of a batch: a hash of the run's seed and the batch's passage ids (63 bits)."""
  digest = hashlib.sha256("\0".join([str(seed), *passage_ids]).encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def model_input(passage: Passage, prefix: str) -> str:
  return prefix + (f"{passage.title} {passage.text}" if passage.title else passage.text)


class QueryGenerator:
  """A seq2seq model and its tokenizer on `config.device`; `generate(passages)` -> N queries per passage."""

  def __init__(self, config: GenerationConfig):
    import torch
    import transformers
    if config.torch_threads:
      torch.set_num_threads(config.torch_threads)
    self.config = config
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(config.model)
    self.model = transformers.AutoModelForSeq2SeqLM.from_pretrained(config.model).to(config.device).eval()

  def generate(self, passages: Sequence[Passage]) -> list[list[str]]:
    """[len(passages)] lists of `num_queries` queries, sampled with the batch's seed."""
    import torch
    config = self.config
    inputs = self.tokenizer([model_input(p, config.prefix) for p in passages], max_length=config.max_input_length,
                            truncation=True, padding=True, return_tensors="pt").to(config.device)
    torch.manual_seed(batch_seed(config.seed, [p.passage_id for p in passages]))  # every device's generator
    with torch.inference_mode():
      output = self.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   **config.generate_kwargs())
    texts = [t.strip() for t in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
    n = config.num_queries
    return [texts[i * n:(i + 1) * n] for i in range(len(passages))]


def _record(passage: Passage, queries: list[str]) -> str:
  record = {"id": passage.passage_id, "text": passage.text, "predicted_queries": queries}
  if passage.title:
    record = {"id": passage.passage_id, "title": passage.title, "text": passage.text, "predicted_queries": queries}
  return json.dumps(record, ensure_ascii=False) + "\n"


def _write_atomically(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


class GenerateShard(beam.DoFn):
  """Generates one shard's file (skipped when already in place); yields its counts."""

  def __init__(self, config: GenerationConfig, output_dir: str):
    self.config = config
    self.output_dir = output_dir
    self.generator = None

  def setup(self):
    self.generator = QueryGenerator(self.config)

  def process(self, shard: Shard) -> Iterable[dict]:
    path = f"{self.output_dir.rstrip('/')}/{shard.output_name}"
    if tf.io.gfile.exists(path):  # written by an earlier, interrupted run with the same settings
      with tf.io.gfile.GFile(path, "r") as f:
        records = [json.loads(line) for line in f]
      yield {"shards_reused": 1, "passages": len(records),  # (its empty passages were counted when written)
             "queries": sum(len(r["predicted_queries"]) for r in records)}
      return
    read = list(read_shard(shard))
    passages = [p for p in read if p.text or p.title]  # nothing to generate from: counted, not written
    lines, queries = [], 0
    for start in range(0, len(passages), self.config.batch_size):
      batch = passages[start:start + self.config.batch_size]
      for passage, generated in zip(batch, self.generator.generate(batch)):
        lines.append(_record(passage, generated))
        queries += len(generated)
    _write_atomically(path, "".join(lines))
    yield {"shards_written": 1, "passages": len(passages), "queries": queries,
           "empty_skipped": len(read) - len(passages)}


def _sum_counts(counts: Iterable[dict]) -> dict:
  total = {"shards_written": 0, "shards_reused": 0, "passages": 0, "queries": 0, "empty_skipped": 0}
  for c in counts:
    for k, v in c.items():
      total[k] += v
  return total


def _check_settings(output_dir: str, settings: dict) -> None:
  """Writes OUTPUT/generation.json, or checks that an earlier run's equals `settings` (key by key)."""
  path = f"{output_dir.rstrip('/')}/{SETTINGS_FILE}"
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, "r") as f:
      previous = json.load(f)
    differ = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
    if differ:
      details = "; ".join(f"{k}: {previous.get(k)!r} then, {settings.get(k)!r} now" for k in differ)
      raise ValueError(f"{path}: {output_dir} holds shards generated with other settings ({details}); use a new "
                       "output directory or delete this one")
    return
  _write_atomically(path, json.dumps(settings, indent=1, sort_keys=True))


def run_pipeline(inputs: Sequence[str] | str, output_dir: str, config: GenerationConfig, *,
                 input_format: InputFormat = "auto", passages_per_shard: int = 10_000,
                 pipeline_args: Sequence[str] = ()) -> dict:
  """Generates queries for every passage of `inputs` (glob patterns) into `output_dir`; returns the counts.

  `pipeline_args` are Beam pipeline flags (`--runner`, `--direct_num_workers`, Dataflow's `--project` ...).
  """
  from apache_beam.options.pipeline_options import PipelineOptions
  shards = plan_shards(inputs, passages_per_shard, input_format)
  tf.io.gfile.makedirs(output_dir)
  settings = {**dataclasses.asdict(config), "passages_per_shard": passages_per_shard,
              "inputs": [s.path for s in shards if s.shard_index == 0]}
  for key in ("device", "torch_threads"):  # where and how fast, not what: a re-run may change them
    settings.pop(key)
  _check_settings(output_dir, settings)
  log.info("generating %d queries per passage for %d shards of %s into %s", config.num_queries, len(shards),
           inputs, output_dir)
  stats_path = f"{output_dir.rstrip('/')}/{STATS_FILE}"

  def finish(counts: dict) -> None:
    _write_atomically(stats_path, json.dumps(counts, indent=1, sort_keys=True))

  with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as pipeline:
    _ = (pipeline
         | "Shards" >> beam.Create(shards)
         | "Spread" >> beam.Reshuffle()
         | "Generate" >> beam.ParDo(GenerateShard(config, output_dir))
         | "Count" >> beam.CombineGlobally(_sum_counts)
         | "Stats" >> beam.Map(finish))
  with tf.io.gfile.GFile(stats_path, "r") as f:
    result = json.load(f)
  log.info("query generation done: %s", result)
  return result
