"""Job: offline preprocessing of a pre-training corpus into sharded document records (an Apache Beam pipeline).

  python -m mote_jax.launch --gin_file=runs/preprocess_msmarco_docs.gin \\
      --gin.INPUT='/data/msmarco-docs.tsv' --gin.OUTPUT=/data/msmarco_docs_records

See mote_jax/data/preprocess.py for the pipeline, the output layout and the pair gate, and the README's
"Pre-training data" section for the Dataflow flags. Beam runs with the DirectRunner and `direct_num_workers`
local processes by default; `runner='DataflowRunner'` with `pipeline_args` (project, region, temp_location,
setup_file or requirements_file) runs it on Dataflow; `dry_run=True` builds the pipeline and logs its options and
transforms without running it.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import gin

from mote_jax.data import preprocess as pp
from mote_jax.data import readers

log = logging.getLogger(__name__)

INPUT_FORMATS = ("msmarco_docs_tsv", "beir_jsonl", "text_blocks", "text_lines", "tfds", "query_jsonl",
                 "doctttttquery")


def make_format(input_format: str, *, skip_malformed: bool = False, expansions: Sequence[str] | str = (),
                tfds_split: str = "train", tfds_text_key: str = "text", tfds_title_key: Optional[str] = None,
                tfds_id_key: Optional[str] = None, tfds_data_dir: Optional[str] = None):
  """(reader, pair kind) of an input format name (one of INPUT_FORMATS)."""
  if input_format == "msmarco_docs_tsv":
    return readers.MsMarcoDocsFormat(skip_malformed=skip_malformed), "spans"
  if input_format == "beir_jsonl":
    return readers.JsonlFormat(text_key="text", title_key="title", id_key="_id",
                               skip_malformed=skip_malformed), "spans"
  if input_format in ("text_blocks", "text_lines"):
    return readers.TextFormat(mode=input_format.split("_")[1]), "spans"
  if input_format == "tfds":
    return readers.TfdsFormat(split=tfds_split, text_key=tfds_text_key, title_key=tfds_title_key,
                              id_key=tfds_id_key, data_dir=tfds_data_dir), "spans"
  if input_format == "query_jsonl":
    return readers.JsonlFormat(text_key=("text", "contents"), title_key="title", id_key=("id", "_id"),
                               queries_key="predicted_queries", require_queries=False,
                               skip_malformed=skip_malformed), "queries"
  if input_format == "doctttttquery":
    paths = readers.expand_paths(expansions) if expansions else ()
    if not paths:
      raise ValueError("preprocess.expansions: input_format='doctttttquery' needs the expansion files, e.g. "
                       "'/data/predicted_queries_topk_sample0[0-7][0-9].txt'")
    return readers.DocTTTTTqueryFormat(expansions=paths, skip_malformed=skip_malformed), "queries"
  raise ValueError(f"preprocess.input_format={input_format!r}: expected one of {INPUT_FORMATS}")


def beam_options(runner: str, direct_num_workers: int, direct_running_mode: str, pipeline_args: Sequence[str]):
  from apache_beam.options.pipeline_options import PipelineOptions
  args = [f"--runner={runner}", *pipeline_args]
  if runner == "DirectRunner":
    args += [f"--direct_num_workers={direct_num_workers}", f"--direct_running_mode={direct_running_mode}"]
  return PipelineOptions(args)


@gin.configurable
def preprocess(model_dir: str, input: str | Sequence[str] = gin.REQUIRED,  # noqa: A002 - the gin name users see
               output: str = gin.REQUIRED, input_format: str = gin.REQUIRED, tokenizer: str = gin.REQUIRED,
               max_len: int = 128, min_pair_share: float = 0.5, num_shards: int = 0,
               records_per_shard: int = 50_000, batch_size: int = 256, preflight_documents: int = 2000,
               skip_malformed: bool = False,
               expansions: Sequence[str] | str = (), tfds_split: str = "train", tfds_text_key: str = "text",
               tfds_title_key: Optional[str] = None, tfds_id_key: Optional[str] = None,
               tfds_data_dir: Optional[str] = None, runner: str = "DirectRunner", direct_num_workers: int = 2,
               direct_running_mode: str = "multi_processing", pipeline_args: Sequence[str] = (),
               dry_run: bool = False, overwrite: bool = False) -> dict:
  """Preprocesses `input` (glob patterns, comma-separated or a list; TFDS names for 'tfds') into `output`.

  Returns stats.json's content (or, with dry_run, the options and transforms). `model_dir` receives the gin
  configs (runs/preprocess_*.gin set it to the output directory). `preflight_documents`: the pair gate first
  runs on that many documents from the start of the inputs, before the pipeline (0: only after the pass).
  """
  del model_dir
  patterns = [p.strip() for p in input.split(",")] if isinstance(input, str) else list(input)
  file_format, pair_kind = make_format(
      input_format, skip_malformed=skip_malformed, expansions=expansions, tfds_split=tfds_split,
      tfds_text_key=tfds_text_key, tfds_title_key=tfds_title_key, tfds_id_key=tfds_id_key,
      tfds_data_dir=tfds_data_dir)
  inputs = patterns if input_format == "tfds" else list(readers.expand_paths(patterns))
  config = pp.PreprocessConfig(output=output, tokenizer=str(tokenizer), max_len=max_len, pair_kind=pair_kind,
                               min_pair_share=min_pair_share, num_shards=num_shards,
                               records_per_shard=records_per_shard, batch_size=batch_size,
                               preflight_documents=preflight_documents, overwrite=overwrite)
  options = beam_options(runner, direct_num_workers, direct_running_mode, pipeline_args)
  settings = {"input_format": input_format}
  if input_format == "doctttttquery":
    settings["expansions"] = list(file_format.expansions)
  return pp.run(inputs, file_format, config, options, settings=settings, dry_run=dry_run)
