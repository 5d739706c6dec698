"""Job: import an HF BERT checkpoint as a MoTE encoder on a device mesh, check it, export HF towers."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import gin
import jax
import numpy as np

from mote_jax import hf_interop
from mote_jax.model import EXPERTS, MoteEncoder, init_params
from mote_jax.partitioning import MeshConfig, Partitioner

log = logging.getLogger(__name__)


def _read_texts(corpus: str, limit: int) -> list[str]:
  texts = []
  with open(corpus, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if len(texts) >= limit:
        break
      try:
        doc = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{corpus}:{line_no}: malformed JSON ({e.msg})") from e
      texts.append((doc.get("title", "") + " " + doc["text"]).strip())
  return texts


@gin.configurable
def import_hf(model_dir: str, checkpoint: str = gin.REQUIRED, tower_mode: str = "mote",
              mesh: MeshConfig = MeshConfig(), overrides: dict | None = None, check_corpus: str | None = None,
              num_check_texts: int = 64, max_length: int = 256, batch_size: int = 32):
  """Loads `checkpoint` in `tower_mode`, places it on the mesh, encodes a sample, writes MODEL_DIR/hf.

  After import every expert computes the checkpoint's function, so the check asserts that the query and
  passage embeddings of the sample agree; it logs the throughput of the sharded encoder.
  """
  path = hf_interop.resolve_checkpoint(checkpoint)
  config, host_params = hf_interop.from_hf(path, tower_mode=tower_mode, **(overrides or {}))
  partitioner = Partitioner.create(mesh)
  shardings = partitioner.param_shardings(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
  params = partitioner.shard(host_params, shardings)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  log.info("imported %s as %s: %s params on mesh %s", path, tower_mode, f"{num_params:,}",
           dict(partitioner.mesh.shape))

  if check_corpus:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    texts = _read_texts(check_corpus, num_check_texts)
    embed = {expert: partitioner.jit(lambda p, b, expert=expert: MoteEncoder(config).apply(
        {"params": p}, b["input_ids"], b["attention_mask"], expert=expert, method=MoteEncoder.embed))
        for expert in EXPERTS}
    outputs = {expert: [] for expert in EXPERTS}
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), batch_size):
      chunk = texts[i:i + batch_size]
      chunk = chunk + [""] * (batch_size - len(chunk))  # fixed shapes: one compilation
      batch = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
      batch = partitioner.global_batch({k: batch[k] for k in ("input_ids", "attention_mask")})
      for expert in EXPERTS:
        outputs[expert].append(np.asarray(jax.device_get(embed[expert](params, batch))))
      tokens += int(np.asarray(batch["attention_mask"]).sum())
    elapsed = time.perf_counter() - start
    query, passage = (np.concatenate(outputs[e])[:len(texts)] for e in EXPERTS)
    cosine = (query * passage).sum(-1) / np.linalg.norm(query, axis=-1) / np.linalg.norm(passage, axis=-1)
    log.info("encoded %d texts x %d experts in %.1fs (%.0f texts/s incl. compilation); min cosine between "
             "experts %.6f", len(texts), len(EXPERTS), elapsed, 2 * len(texts) / elapsed, cosine.min())
    if cosine.min() < 0.9999:
      raise RuntimeError(f"experts disagree right after import (min cosine {cosine.min():.6f})")

  # The source's serving settings (max_seq_length, lower-casing, pooling) carry over; `max_length` is the check's.
  out = hf_interop.to_hf(config, params, Path(model_dir) / "hf", tokenizer=path, overwrite=True)
  log.info("wrote %s", out)
  return out
