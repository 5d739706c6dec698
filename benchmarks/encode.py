"""Section 3: passage encoding, the JAX `Embedder` / `encode_texts` vs sentence-transformers `encode`.

all-MiniLM-L6-v2 (imported with `from_hf` as a MoTE encoder, passage expert; mean pooling + L2 normalisation
from its sentence-transformers files), SciFact passages, max_length 256 (the model's `max_seq_length`).
Both sides include tokenisation and sort texts by length. Embeddings must agree: cosine >= 0.9999 per passage.
Contenders are timed round-robin in one process.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import load1, section_main, time_interleaved


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  return (a * b).sum(1)


def padded_tokens(lengths: np.ndarray, batch_size: int, max_length: int, length_step: int) -> int:
  """Token positions (rows x padded length) that `encode_texts` computes: length-sorted consecutive batches,
  each padded to the bucket of its longest text (for the padding-waste figure)."""
  buckets = np.append(np.arange(length_step, max_length, length_step), max_length)
  ordered = np.sort(lengths)[::-1]
  return sum(batch_size * int(buckets[np.searchsorted(buckets, ordered[start])])
             for start in range(0, len(ordered), batch_size))


def run(quick: bool = False, num_passages: int | None = None, variants: bool = True) -> dict:
  import jax
  import torch
  from sentence_transformers import SentenceTransformer

  from benchmarks import data
  from mote_jax.hf_interop import from_hf
  from mote_jax.partitioning import MeshConfig, Partitioner
  from mote_jax.retrieval.encode import EncodeOptions, Embedder, encode_texts

  n = num_passages or (16 if quick else 256)
  warmup, repeats = (1, 2) if quick else (1, 5)
  texts = data.scifact_passages(n)
  tok = data.tokenizer()
  lengths = [len(t) for t in tok(texts, truncation=True, max_length=256)["input_ids"]]
  path = data.minilm_path()
  partitioner = Partitioner.create(MeshConfig(), devices=jax.devices()[:1])
  config, params = from_hf(path, tower_mode="mote")
  options = EncodeOptions(batch_size=64, max_length=256, progress=False)
  embedders = {"jax/fp32": Embedder(config, params, partitioner)}
  if variants and not quick:
    embedders["jax/bf16"] = Embedder(config.replace(dtype="bfloat16"), params, partitioner)
  st = SentenceTransformer(path, device="cpu")
  st.max_seq_length = 256
  outputs = {}

  def jax_fn(name, batch_size):
    opts = EncodeOptions(batch_size=batch_size, max_length=256, progress=False)
    def fn():
      outputs[name] = encode_texts(embedders[name.split("@")[0]], tok, texts, "passage", opts)
    return fn

  def st_fn(name, batch_size):
    def fn():
      with torch.inference_mode():
        outputs[name] = st.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    return fn

  fns = {"jax/fp32": jax_fn("jax/fp32", options.batch_size), "st/bs32": st_fn("st/bs32", 32)}
  if variants and not quick:
    fns["st/bs64"] = st_fn("st/bs64", 64)
    fns["jax/bf16"] = jax_fn("jax/bf16", options.batch_size)
    # The fused attention of the accelerators' kernel sets, through XLA here.
    name = "jax/fp32 dot_product attention"
    dpa = config.kernel_set.replace(attention="dot_product")
    embedders[name] = Embedder(config.replace(kernels=dpa), params, partitioner)
    fns[name] = jax_fn(name, options.batch_size)
  timings = time_interleaved(fns, warmup=warmup, repeats=repeats)
  reference = outputs["st/bs32"]
  rows = {}
  for name, t in timings.items():
    cos = _cosines(outputs[name], reference)
    rows[name] = dict(t, passages_per_s=n / t["median_s"], min_cosine_vs_st=float(cos.min()),
                      max_abs_diff_vs_st=float(np.abs(outputs[name] - reference).max()))
  lengths = np.array(lengths)
  padding = {"real_tokens": int(lengths.sum()),
             "encode_texts_tokens": padded_tokens(lengths, options.batch_size, 256, options.length_step),
             "st_bs32_tokens": int(sum(len(c) * c.max() for c in np.array_split(np.sort(lengths)[::-1],
                                                                                 -(-n // 32))))}
  return {"passages": n, "max_length": 256, "mean_tokens": float(np.mean(lengths)), "padding": padding,
          "truncated_fraction": float(np.mean(np.array(lengths) >= 256)), "jax_batch_size": options.batch_size,
          "pooling": config.pooling, "normalize": config.normalize, "rows": rows,
          "jax_over_st": rows["st/bs32"]["median_s"] / rows["jax/fp32"]["median_s"],
          "jax_over_best_st": min(r["median_s"] for k, r in rows.items() if k.startswith("st/"))
          / rows["jax/fp32"]["median_s"],
          "load1_before": timings["jax/fp32"]["load1_during"][0], "load1_after": load1(),
          "warmup": warmup, "repeats": repeats}


if __name__ == "__main__":
  section_main("encode", run)
