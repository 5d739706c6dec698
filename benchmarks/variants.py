"""Section "variants": optimisation experiments on the JAX MiniLM-L6 pre-training step (B=8, L=128), in process.

Every variant is the real `Trainer` step with one change, timed round-robin against the production baseline
(mote, fp32, MLM logits at masked positions 48/72, dropout 0.1 on hidden states and attention probabilities).
The first thirteen undo an optimisation that production adopted after this section measured it:

  argmax-accuracy        the MLM accuracy metric as `argmax == label` (production: `target logit >= max logit`,
                         sharing logsumexp's max; a variadic (value, index) reduce over 30,522 words is slow
                         on XLA:CPU)
  bias-grad-by-reduce    bias gradients (the MLM head's, the dense layers', the position embeddings') as XLA's
                         reductions over the leading axes (production: `layers.add_bias`, a GEMV ones @ dy)
  dropout-32bit          `nn.Dropout`, one threefry evaluation per element (production: `layers.Dropout`, a
                         keyed integer hash of each element's position, `layers.hashed_bits`)
  dropout-threefry16     16 threefry bits per element, two elements per word (what `layers.Dropout` drew before
                         the hash)
  optax-clip             `optax.clip_by_global_norm`, which selects between the gradient and a clipped copy and
                         computes the norm again inside the update (production: `optimizer.clip_by_global_norm`,
                         torch's scalar coefficient, given the step's norm)
  no-region-analysis     the step compiled with XLA:CPU's default copy insertion (production:
                         `trainer.step_compiler_options`, region analysis on)
  separate-mlm-heads     the encoder's and the decoder's MLM losses through two MLM-head calls (production: one
                         call over both sets of masked positions, `PretrainModel._joint_mlm_parts`)
  sequence-major-attention  attention in the [B, L, N, D] layout (production: head-major [B, N, L, D])
  select-skip            the non-finite step skip as a select per parameter and moment (production: lax.cond)
  dynamic-expert-freeze  AdamW over every parameter, then experts whose gradient is all zero frozen
                         (`freeze_unrouted_experts`; production: `skip_unrouted`, AdamW on the routed slices only)
  whole-stack-updates    whole expert-stack gradients (zeros around the routed expert) into the update, their norm,
                         and `optax.apply_updates` adding the zero-padded update to the whole stack (production:
                         `take_routed` / `pad_routed` / `apply_routed_updates`: only the routed slices are
                         normed, passed to the update and written, in place)
  autodiff-weight-grads  the dense layers' products (`layers.linear`) as one `tensordot` differentiated by JAX, as
                         before (production: a custom VJP whose kernel gradient x^T dy is one GEMM in the
                         kernel's own orientation)
  autodiff-vocab-projection  the tied MLM decoder's product (`layers.tied_logits`) as `jnp.dot(x, E.T)`
                         differentiated by JAX (production: a custom VJP whose embedding gradient reads the
                         [N, V] cotangent as it is)
  no-attention-dropout   attention_dropout=0 (the reference for the attention-kernel variant)
  dot-product-attention  `jax.nn.dot_product_attention` instead of the einsum/softmax/einsum attention
                         (attention dropout 0: the fused call has no dropout)
  no-dropout             hidden_dropout=attention_dropout=0: what the dropout masks still cost
  bf16                   compute dtype bfloat16 (params and optimizer fp32, logits/softmax/LayerNorm fp32)
  remat                  rematerialise each layer in the backward pass
  scan                   `nn.scan` over layers instead of a Python loop
and the training-loop overlap experiment: K steps that each wait for the step's result (what `Trainer.train`
did when it read the non-finite counter right after every step) vs K steps dispatched back to back with the
next host batch prepared while the previous step runs (what it does now between log and checkpoint steps).
"""

from __future__ import annotations

import gc
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import load1, patched, section_main, summary, time_interleaved

ALL = ("argmax-accuracy", "bias-grad-by-reduce", "dropout-32bit", "dropout-threefry16", "optax-clip",
       "no-region-analysis", "separate-mlm-heads", "sequence-major-attention", "select-skip",
       "dynamic-expert-freeze", "whole-stack-updates", "autodiff-weight-grads", "autodiff-vocab-projection",
       "no-attention-dropout", "dot-product-attention", "no-dropout", "bf16", "remat", "scan")


def _sequence_major_attention(core):
  """A `SelfAttention` with the same parameters in the [B, L, N, D] layout whose attention core is
  `core(q, k, v, mask_bias, cfg, deterministic, module) -> context` ([B, L, N, D] each)."""
  from mote_jax.model import layers

  class SequenceMajorSelfAttention(layers.SelfAttention):
    @nn.compact
    def __call__(self, x, mask_bias, deterministic: bool):
      cfg = self.config
      init = nn.initializers.normal(cfg.initializer_range)
      n, d, dt = cfg.num_heads, cfg.head_dim, cfg.compute_dtype
      param = lambda name, init_fn, names, shape: self.param(  # noqa: E731
          name, nn.with_logical_partitioning(init_fn, names), shape, cfg.storage_dtype).astype(dt)

      def project(name):
        kernel = param(f"{name}_kernel", init, ("embed", "heads", "kv"), (cfg.hidden_size, n, d))
        bias = param(f"{name}_bias", nn.initializers.zeros, ("heads", "kv"), (n, d))
        return jnp.einsum("blh,hnd->blnd", x, kernel) + bias

      context = core(project("query"), project("key"), project("value"), mask_bias, cfg, deterministic)
      out_kernel = param("output_kernel", init, ("heads", "kv", "embed"), (n, d, cfg.hidden_size))
      out_bias = param("output_bias", nn.initializers.zeros, ("embed",), (cfg.hidden_size,))
      out = jnp.einsum("blnd,ndh->blh", context, out_kernel) + out_bias
      out = layers.Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
      return layers.LayerNorm(cfg, name="output_layer_norm")(out + x)

  return SequenceMajorSelfAttention


def _einsum_core(q, k, v, mask_bias, cfg, deterministic):
  from mote_jax.model import layers
  dt = cfg.compute_dtype
  q = q * jnp.asarray(cfg.head_dim ** -0.5, dt)
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) + mask_bias
  probs = jax.nn.softmax(logits, axis=-1).astype(dt)
  probs = layers.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
  return jnp.einsum("bnqk,bknd->bqnd", probs, v)


def _dot_product_attention_core(q, k, v, mask_bias, cfg, deterministic):
  del deterministic  # the fused call has no dropout
  return jax.nn.dot_product_attention(q, k, v, bias=mask_bias.astype(cfg.compute_dtype), scale=cfg.head_dim ** -0.5)


def sequence_major_attention_class():
  """`SelfAttention` as it was before the head-major layout: q, k, v, context as [B, L, N, D]."""
  return _sequence_major_attention(_einsum_core)


def _dpa_attention_class():
  """A sequence-major `SelfAttention` whose core is `jax.nn.dot_product_attention`."""
  return _sequence_major_attention(_dot_product_attention_core)


def _train_step_with_select(self, state, batch):
  """`Trainer._train_step` as it was: the update always runs, then a select per array keeps the old state."""
  import optax
  from mote_jax.training.trainer import TrainState
  rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), state.step)
  (loss, metrics), grads = self._loss_and_grads(state.params, batch, rng)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  skipped = (~finite).astype(jnp.int32)
  new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state), nonfinite=state.nonfinite + skipped,
                         consecutive_nonfinite=(state.consecutive_nonfinite + 1) * skipped)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                 learning_rate=self.schedule(state.step - state.nonfinite))
  return new_state, metrics


def _token_cross_entropy_terms_by_argmax(logits, labels):
  """`losses.token_cross_entropy_terms` as it was: accuracy from a separate argmax over the vocabulary."""
  from mote_jax.objectives.losses import IGNORE_INDEX
  logits = logits.astype(jnp.float32)
  valid = labels != IGNORE_INDEX
  safe_labels = jnp.where(valid, labels, 0)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, log_z - target, 0.0)
  correct = jnp.where(valid, jnp.argmax(logits, axis=-1) == labels, False)
  return {"sum": nll, "correct": correct.astype(jnp.float32), "count": valid.astype(jnp.float32)}


def _add_bias_plain(x, bias):
  return x + bias


def _linear_by_autodiff(x, kernel):
  """`layers.linear` as before its custom VJP: one `tensordot`, differentiated by JAX."""
  return jnp.tensordot(x, kernel, axes=1)


def _tied_logits_by_autodiff(x, word_embeddings):
  """`layers.tied_logits` as before its custom VJP: `jnp.dot(x, E.T)`, differentiated by JAX."""
  return jnp.dot(x, word_embeddings.T, preferred_element_type=jnp.float32)


def _whole_stack_apply(params, updates, slices):
  import optax
  del slices
  return optax.apply_updates(params, updates)


def _whole_stack_take(slices, tree):
  del slices
  return tree


def _whole_stack_pad(slices, parts, like):
  del slices, like
  return parts


class _Threefry16Dropout(nn.Module):
  """Inverted dropout with 16 threefry bits per element, two elements per 32-bit word (`layers.Dropout` until
  it hashed positions instead)."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    *lead, n = x.shape
    words = jax.random.bits(self.make_rng("dropout"), (*lead, (n + 1) // 2), jnp.uint32)
    bits = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(*lead, -1)[..., :n]
    keep = bits >= jnp.uint32(round(self.rate * 65536))
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x)).astype(x.dtype)


def _patches(name: str) -> dict:
  import optax

  from mote_jax.model import layers
  from mote_jax.objectives import losses
  from mote_jax.training import optimizer, trainer
  from mote_jax.objectives.pretrain import PretrainModel
  return {"argmax-accuracy": {(losses, "token_cross_entropy_terms"): _token_cross_entropy_terms_by_argmax},
          "separate-mlm-heads": {(PretrainModel, "joint_mlm_head"): lambda self, anchor_type, context_type: False},
          "sequence-major-attention": {(layers, "SelfAttention"): sequence_major_attention_class()},
          "select-skip": {(trainer.Trainer, "_train_step"): _train_step_with_select},
          "bias-grad-by-reduce": {(layers, "add_bias"): _add_bias_plain},
          "dropout-32bit": {(layers, "Dropout"): nn.Dropout},
          "dropout-threefry16": {(layers, "Dropout"): _Threefry16Dropout},
          "optax-clip": {(optimizer, "clip_by_global_norm"): optax.clip_by_global_norm},
          "no-region-analysis": {(trainer, "step_compiler_options"): lambda mesh: {}},
          "dot-product-attention": {(layers, "SelfAttention"): _dpa_attention_class()},
          "autodiff-weight-grads": {(layers, "linear"): _linear_by_autodiff},
          "autodiff-vocab-projection": {(layers, "tied_logits"): _tied_logits_by_autodiff},
          "whole-stack-updates": {(trainer, "apply_routed_updates"): _whole_stack_apply,
                                  (trainer, "take_routed"): _whole_stack_take,
                                  (trainer, "pad_routed"): _whole_stack_pad}}.get(name, {})


def run(quick: bool = False, variants=None, shape: str | None = None, loop: bool = True) -> dict:
  from benchmarks import data, jax_step

  shape = shape or ("tiny" if quick else "minilm")
  batch_size, length = (2, 32) if quick else (8, 128)
  warmup, repeats = (1, 2) if quick else (1, 5)
  variants = list(variants or ALL)
  built = jax_step.build_shape(shape)
  decoder = jax_step.decoder_params(built)
  batch = data.pair_batch(batch_size, length)
  objective = jax_step.production_objective(length)
  overrides = {"no-attention-dropout": {"attention_dropout": 0.0}, "dot-product-attention": {"attention_dropout": 0.0},
               "no-dropout": {"attention_dropout": 0.0, "hidden_dropout": 0.0}, "bf16": {"dtype": "bfloat16"},
               "remat": {"remat": True}, "scan": {"scan_layers": True}}
  result = {"shape": shape, "batch_size": batch_size, "length": length, "load1_before": load1(), "rows": {}}
  fns, info = {}, {}
  for name in ["baseline"] + variants:
    with patched(_patches(name)):  # the step is built and traced with the variant's code
      step = jax_step.JaxStep(built, decoder, objective=objective, batch_size=batch_size, length=length,
                              model_overrides=overrides.get(name),
                              static_routing=name != "dynamic-expert-freeze")
      loss = step(batch)
    info[name] = {"compile_s": round(step.compile_s, 2), "first_loss": loss}
    fns[name] = (lambda s: lambda: s(batch))(step)
    print(f"[bench] variant {name}: compile {step.compile_s:.1f}s, loss {loss:.4f}", flush=True)
  timings = time_interleaved(fns, warmup=warmup, repeats=repeats)
  base = timings["baseline"]["median_s"]
  for name, t in timings.items():
    result["rows"][name] = dict(t, **info[name], speedup_vs_baseline=base / t["median_s"])
  if "dot-product-attention" in timings and "no-attention-dropout" in timings:
    result["dpa_vs_einsum_same_dropout"] = (timings["no-attention-dropout"]["median_s"]
                                            / timings["dot-product-attention"]["median_s"])
  del fns
  gc.collect()
  if not loop:
    result["load1_after"] = load1()
    return result

  # Training-loop overlap: per-step sync (Trainer.train) vs back-to-back dispatch.
  step = jax_step.JaxStep(built, decoder, objective=objective, batch_size=batch_size, length=length)
  step(batch)
  host_batches = [data.pair_batch(batch_size, length, seed=s) for s in range(2)]
  prep = []
  for s in range(5):
    start = time.perf_counter()
    data.pair_batch(batch_size, length, seed=100 + s)
    prep.append(time.perf_counter() - start)
  k = 3 if quick else 5

  def synced():
    for i in range(k):
      float(step.dispatch(host_batches[i % 2])["finite"])

  def pipelined():
    metrics = [step.dispatch(host_batches[i % 2]) for i in range(k)]
    jax.block_until_ready(metrics)
    [float(m["finite"]) for m in metrics]

  loop = time_interleaved({"sync_every_step": synced, "dispatch_ahead": pipelined}, warmup=1,
                          repeats=2 if quick else 3)
  result["loop"] = {name: dict(t, per_step_s=t["median_s"] / k) for name, t in loop.items()}
  result["loop"]["steps_per_call"] = k
  result["host_batch_prep"] = summary(prep)  # numpy masking of a fresh batch (the benchmark's own pipeline)
  start = time.perf_counter()
  for _ in range(20):
    jax.block_until_ready(step.global_batch(host_batches[0]))
  result["global_batch_s"] = (time.perf_counter() - start) / 20
  result["load1_after"] = load1()
  return result


if __name__ == "__main__":
  section_main("variants", run)
