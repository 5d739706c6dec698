"""Job: docT5query pseudo-queries for a passage corpus, as a Beam pipeline (t5x_configs/runs/generate_queries.gin).

    python -m mote_jax.launch --gin_file=runs/generate_queries.gin --gin.INPUT=corpus.jsonl \\
      --gin.OUTPUT=/data/corpus_queries --gin.QG_MODEL=/models/doc2query-t5-base-msmarco

Writes OUTPUT/queries-FFFF-SSSSSS.jsonl (`{"id", "text", "predicted_queries"}` per passage), OUTPUT/stats.json
and OUTPUT/generation.json; see `mote_jax/data/query_generation.py`.

Runners. Here: DirectRunner with `num_workers` processes (each loads the model once). On Dataflow, pass Beam's
flags through `pipeline_options`, e.g.

    --gin.generate_queries.pipeline_options="['--runner=DataflowRunner', '--project=P', '--region=us-central1',
      '--temp_location=gs://B/tmp', '--machine_type=g2-standard-8', '--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver',
      '--sdk_container_image=IMAGE_WITH_MOTE_JAX_AND_TORCH', '--experiments=use_runner_v2']"
    --gin.GenerationConfig.device=cuda --gin.OUTPUT=gs://B/queries --gin.INPUT=gs://B/collection.tsv

with the model directory baked into the container (QG_MODEL is read with `from_pretrained`, a local path).
"""

from __future__ import annotations

from typing import Sequence

import gin

from mote_jax.data import query_generation
from mote_jax.data.query_generation import GenerationConfig

gin.external_configurable(GenerationConfig, module="mote_jax")


@gin.configurable
def generate_queries(model_dir: str, *, inputs: Sequence[str] | str = gin.REQUIRED,
                     generation: GenerationConfig = gin.REQUIRED, input_format: str = "auto",
                     passages_per_shard: int = 10_000, num_workers: int = 2,
                     running_mode: str = "multi_processing", pipeline_options: Sequence[str] = ()) -> dict:
  """Generates `generation.num_queries` queries per passage of `inputs` into `model_dir` (the OUTPUT directory).

  Args:
    model_dir: the output directory (local or gs://); `run.model_dir` binds it to OUTPUT.
    inputs: glob pattern(s) of BEIR corpus.jsonl or MS MARCO collection TSV files.
    generation: the model and sampling settings.
    input_format: 'auto' (by file extension), 'beir_jsonl' or 'msmarco_tsv'.
    passages_per_shard: input lines per output file (the unit of work and of resumption).
    num_workers, running_mode: DirectRunner's `direct_num_workers` and `direct_running_mode`; ignored when
      `pipeline_options` names another runner.
    pipeline_options: further Beam pipeline flags (Dataflow's, see the module docstring).
  """
  args = list(pipeline_options)
  if not any(a.startswith("--runner") for a in args) or "--runner=DirectRunner" in args:
    args += [f"--direct_num_workers={num_workers}", f"--direct_running_mode={running_mode}"]
  return query_generation.run_pipeline(inputs, model_dir, generation, input_format=input_format,
                                       passages_per_shard=passages_per_shard, pipeline_args=args)
