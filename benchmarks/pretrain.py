"""Section 1: the CoT-MoTE pre-training step, JAX (the real `Trainer` step) vs an independent PyTorch CoT-MAE.

Per shape (MiniLM-L6, bert-base; fp32; 8 pairs of 128-token SciFact spans; dropout on, as in training):
  jax/masked        the production configuration: MLM logits at masked positions only (48 / 72, the gin's)
  jax-xla/masked    jax/masked with the plain-XLA kernel set (`kernels.XLA`) instead of this platform's default
  jax/full          MLM logits at every position
  torch/eager/full  HF BertForMaskedLM + 2 BertLayers + AdamW: logits at every position (the official code)
  torch/eager/masked, torch/compile/{full,masked}   the same, at masked positions only / under torch.compile
All contenders start from the same weights (checked: their deterministic losses agree) and are timed
round-robin in one process, so background load affects them alike. MFU = model FLOPs (`model_flops_per_step`)
per second over the machine's GEMM peak measured at the start of the section. The same n x n fp32 matmul is
also timed inside the rounds, between the contenders (`peak_n`), and MFU is reported against the best of those
too: a peak measured under the same load as the steps, where the section-start peak can be taken on a quieter
(or busier) machine than the steps that follow it.
"""

from __future__ import annotations

import gc
import time

import numpy as np

from benchmarks import gemm
from benchmarks.common import load1, ratio_of_medians, section_main, time_interleaved


def _contenders(shape_name: str, compile_torch: bool) -> list[str]:
  names = ["jax/masked", "jax-xla/masked", "jax/full", "torch/eager/full", "torch/eager/masked"]
  if compile_torch:
    names += ["torch/compile/masked"] if shape_name == "bert-base" else ["torch/compile/full",
                                                                         "torch/compile/masked"]
  return names


PEAK_IN_ROUNDS = "gemm/jax/float32"  # the matmul timed between the contenders
PEAK_CALLS = 3  # matmuls per timed call: ~0.1 s at n = 2048, so the timer's resolution does not matter


def _matmul_fn(n: int):
  """A blocking fn doing PEAK_CALLS jitted n x n fp32 matmuls with JAX (as `gemm.measure` does), and its FLOPs."""
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()

  def fn():
    for _ in range(PEAK_CALLS):
      out = dot(a, b)
    out.block_until_ready()
  return fn, PEAK_CALLS * 2.0 * n ** 3


def bench_shape(shape_name: str, *, batch_size: int, length: int, warmup: int, repeats: int, peak_gflops: float,
                compile_torch: bool = True, contenders: list[str] | None = None, peak_n: int = 2048,
                log=print) -> dict:
  import torch

  from benchmarks import data, jax_step, torch_cotmae
  from mote_jax import kernels
  from mote_jax.objectives import ObjectiveConfig

  shape = jax_step.build_shape(shape_name)
  decoder = jax_step.decoder_params(shape)
  batch = data.pair_batch(batch_size, length)
  p_enc, p_dec = jax_step.max_predictions(length)
  objectives = {"masked": ObjectiveConfig(encoder_max_predictions=p_enc, decoder_max_predictions=p_dec),
                "full": ObjectiveConfig()}
  names = contenders or _contenders(shape_name, compile_torch)

  fns, info = {}, {}
  torch_layers = torch_cotmae.decoder_layers_from_jax(shape.bert_config, decoder)
  torch_modules = {"full": torch_cotmae.CotMae(shape.torch_model, torch_layers, None),
                   "masked": torch_cotmae.CotMae(shape.torch_model, torch_layers, (p_enc, p_dec))}
  # Parity first (dropout off), before any step changes the weights.
  tensors = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
  parity = {}
  with torch.no_grad():
    for kind, module in torch_modules.items():
      module.eval()
      parity[f"torch/{kind}"] = float(module(**tensors))
      module.train()

  for name in names:
    parts = name.split("/")
    kind = parts[-1]
    if parts[0] in ("jax", "jax-xla"):
      step = jax_step.JaxStep(shape, decoder, objective=objectives[kind], batch_size=batch_size, length=length,
                              kernels=kernels.XLA if parts[0] == "jax-xla" else None)
      parity[name] = step.eval_loss(batch)
      info[name] = {"flops_per_step": step.flops, "kernels": vars(step.kernels)}
    else:
      step = torch_cotmae.TorchStep(torch_modules[kind], compile=parts[1] == "compile")
      info[name] = {"flops_per_step": jax_step.flops_per_step(
          step_config(shape), objectives[kind], batch_size, length)}
    fns[name] = (lambda s: lambda: s(batch))(step)
    start = time.perf_counter()
    fns[name]()  # first call: compile (jax, torch.compile) + one step
    info[name]["first_step_s"] = round(time.perf_counter() - start, 2)
    log(f"[bench] {shape_name} {name}: first step {info[name]['first_step_s']}s")

  fns[PEAK_IN_ROUNDS], peak_flops = _matmul_fn(peak_n)
  timings = time_interleaved(fns, warmup=warmup, repeats=repeats, log=log)
  peak_in_rounds = peak_flops / timings[PEAK_IN_ROUNDS]["min_s"] / 1e9
  rows = {}
  for name in names:
    t = timings[name]
    flops = info[name]["flops_per_step"]
    rows[name] = dict(t, **info[name], pairs_per_s=batch_size / t["median_s"],
                      seq_per_s=2 * batch_size / t["median_s"],
                      model_gflops_per_s=flops / t["median_s"] / 1e9,
                      mfu=flops / t["median_s"] / 1e9 / peak_gflops,
                      mfu_vs_peak_in_rounds=flops / t["median_s"] / 1e9 / peak_in_rounds)
  ratios = {}
  for jax_name in [n for n in names if n.startswith("jax")]:
    for torch_name in [n for n in names if n.startswith("torch/")]:
      ratios[f"{jax_name} vs {torch_name}"] = ratio_of_medians(rows[jax_name], rows[torch_name])
  if "jax/masked" in rows and "jax-xla/masked" in rows:  # this platform's kernel set against plain XLA
    ratios["jax/masked vs jax-xla/masked"] = ratio_of_medians(rows["jax/masked"], rows["jax-xla/masked"])
  reference = parity.get("torch/full")
  parity_diff = {k: abs(v - reference) for k, v in parity.items()} if reference is not None else {}
  del fns
  gc.collect()
  return {"batch_size": batch_size, "length": length, "max_predictions": [p_enc, p_dec], "rows": rows,
          "peak_in_rounds": {"n": peak_n, "gflops": peak_in_rounds,
                             "median_gflops": peak_flops / timings[PEAK_IN_ROUNDS]["median_s"] / 1e9,
                             "runs": timings[PEAK_IN_ROUNDS]["runs"]},
          "ratios": ratios, "eval_losses": parity, "loss_abs_diff_vs_torch_full": parity_diff,
          "params_m": round(sum(p.numel() for p in shape.torch_model.parameters()) / 1e6, 1),
          "repeats": repeats, "warmup": warmup}


def step_config(shape):
  """The MoteConfig `from_hf` reads for a shape (FLOP counting for the torch contenders)."""
  from mote_jax.hf_interop import config_from_hf
  return config_from_hf(shape.directory, "siamese")


def run(quick: bool = False, shapes=None, compile_torch: bool = True) -> dict:
  import torch
  torch.manual_seed(0)
  peak = gemm.measure(sizes=(512,) if quick else (2048, 4096), repeats=2 if quick else 5)
  result = {"gemm": peak, "load1_before": load1(), "shapes": {}}
  if quick:
    shapes = shapes or ["tiny"]
    settings = {"tiny": dict(batch_size=2, length=32, warmup=1, repeats=2)}
  else:
    shapes = shapes or ["minilm", "bert-base"]
    settings = {"minilm": dict(batch_size=8, length=128, warmup=2, repeats=7),
                "bert-base": dict(batch_size=8, length=128, warmup=1, repeats=5),
                "tiny": dict(batch_size=8, length=128, warmup=2, repeats=7)}
  for name in shapes:
    result["shapes"][name] = bench_shape(name, peak_gflops=peak["peak_fp32_gflops"], compile_torch=compile_torch,
                                         peak_n=512 if quick else 2048, **settings[name])
    gc.collect()
  result["load1_after"] = load1()
  return result


if __name__ == "__main__":
  section_main("pretrain", run)
