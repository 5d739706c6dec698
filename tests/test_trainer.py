"""Trainer mechanics on a small regression problem: schedule, decay mask, expert freezing, accumulation,
non-finite steps, checkpoints and resume."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mote_jax.model import MoteConfig
from mote_jax.objectives import ObjectiveConfig, PretrainModel
from mote_jax.partitioning import MeshConfig, Partitioner
from mote_jax.training.checkpointing import Checkpointer
from mote_jax.kernels import KernelConfig
from mote_jax.kernels.clip import scalar_clip_by_global_norm
from mote_jax.training.optimizer import OptimizerConfig, decay_mask, learning_rate_schedule, make_optimizer
from mote_jax.training.routing import (Routed, Routing, apply_routed_updates, routed_slices,
                                       take_routed)
from mote_jax.training.trainer import NonFiniteLossError, Trainer, TrainerConfig


class Regressor(nn.Module):
  """y = LayerNorm(x) @ W_e + b_e with an expert axis, like the MoTE FFN."""

  @nn.compact
  def __call__(self, x, expert: int):
    w = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.5), ("expert", "embed", "mlp")),
                   (2, 8, 4))
    b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("expert", "mlp")), (2, 4))
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (8,))
    return (x * scale) @ w[expert] + b[expert]


def _init(rng):
  return Regressor().init(rng, jnp.ones((1, 8)), 1)["params"]


def _loss(params, batch, rng, deterministic, expert=1):
  pred = Regressor().apply({"params": params}, batch["x"], expert)
  loss = jnp.mean((pred - batch["y"]) ** 2) * batch["scale"].mean()
  return loss, {"mse": loss}


def _batches(start, seed=0, batch_size=16):
  step = start
  while True:
    rng = np.random.default_rng([seed, step])
    x = rng.standard_normal((batch_size, 8)).astype(np.float32)
    scale = np.full((batch_size,), np.nan if step in _batches.poison else 1.0, np.float32)
    yield {"x": x, "y": x[:, :4] * 2.0, "scale": scale, "attention_mask": np.ones((batch_size, 3), np.int32)}
    step += 1


_batches.poison = set()


def _trainer(tmp_path, num_steps=6, partitioner=None, routed=False, grad_clip="scalar", **overrides):
  """A Trainer for `Regressor` on expert 1; `routed`: with the static routing the jobs pass (`routed_slices`),
  else with the dynamic freeze of all-zero experts."""
  partitioner = partitioner or Partitioner.create(MeshConfig(data=8))
  params, shardings = partitioner.init(_init, jax.random.PRNGKey(0))
  boxed = jax.eval_shape(_init, jax.random.PRNGKey(0))
  config = TrainerConfig(**{**dict(num_steps=num_steps, log_every=1, eval_every=0, checkpoint_every=2,
                                   async_checkpointing=False, progress_bar=False), **overrides})
  trainer = Trainer(config, OptimizerConfig(learning_rate=0.05, warmup_steps=2, total_steps=num_steps),
                    partitioner, _loss, tmp_path, shardings,
                    routing=Routing(slices=routed_slices({"tower": boxed}, [("tower", 1)])["tower"]) if routed
                    else Routing.dynamic(boxed), kernels=KernelConfig(grad_clip=grad_clip))
  return trainer, params


def test_schedule_is_linear_warmup_then_linear_decay():
  schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110))
  assert [float(schedule(s)) for s in (0, 5, 10, 60, 110)] == pytest.approx([0, 5e-4, 1e-3, 5e-4, 0], abs=1e-9)


def test_decay_mask_spares_biases_and_layer_norms():
  params = {"dense": {"kernel": 1, "bias": 1}, "layer_norm": {"scale": 1, "bias": 1},
            "ffn": {"intermediate_kernel": 1, "intermediate_bias": 1, "layer_norm_scale": 1, "layer_norm_bias": 1}}
  assert decay_mask(params) == {
      "dense": {"kernel": True, "bias": False}, "layer_norm": {"scale": False, "bias": False},
      "ffn": {"intermediate_kernel": True, "intermediate_bias": False, "layer_norm_scale": False,
              "layer_norm_bias": False}}


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and left alone
def test_clip_by_global_norm_is_torchs_clip_grad_norm(max_norm):
  rng = np.random.default_rng(0)
  grads = {"a": rng.normal(size=(7, 5)).astype(np.float32), "b": rng.normal(size=(11,)).astype(np.float32)}
  tensors = {k: torch.nn.Parameter(torch.zeros(v.shape)) for k, v in grads.items()}
  for k, t in tensors.items():
    t.grad = torch.tensor(grads[k])
  norm = float(torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm))
  clip = scalar_clip_by_global_norm(max_norm)
  clipped, _ = jax.jit(clip.update)(jax.tree.map(jnp.asarray, grads), clip.init(grads))
  for k, t in tensors.items():
    np.testing.assert_allclose(clipped[k], t.grad.numpy(), rtol=1e-6, atol=0)
  if max_norm > norm:
    jax.tree.map(np.testing.assert_array_equal, clipped, grads)
  # A norm the caller passes is used instead of the one computed here (the train step passes the norm it has).
  given, _ = clip.update(grads, clip.init(grads), global_norm=jnp.float32(4 * max_norm))
  np.testing.assert_allclose(given["a"], grads["a"] * max_norm / (4 * max_norm + 1e-6), rtol=1e-6)


@pytest.mark.parametrize("grad_clip", ["optax", "scalar"])
@pytest.mark.parametrize("routing", ["static", "dynamic"])
def test_adamw_matches_torch_and_leaves_unrouted_expert_alone(routing, grad_clip):
  """Three AdamW steps (with clipping) on expert 1 only: expert 1 and the shared scale follow
  torch.optim.AdamW, expert 0 does not move at all (torch skips a parameter whose .grad is None: no weight
  decay either). `static`: `skip_unrouted` with the routing known up front; `dynamic`: `freeze_unrouted_experts`."""
  boxed = _init(jax.random.PRNGKey(0))
  params = nn.unbox(boxed)
  config = OptimizerConfig(learning_rate=0.01, warmup_steps=0, total_steps=1000, end_learning_rate=0.01,
                           weight_decay=0.1, max_grad_norm=0.5)
  if routing == "static":
    slices = routed_slices({"tower": boxed}, [("tower", 1)])["tower"]
    assert slices == {"kernel": Routed(0, 1, 2), "bias": Routed(0, 1, 2), "scale": Routed()}
    tx = Routing(slices=slices).wrap(make_optimizer(config, params, grad_clip))
  else:
    tx = Routing.dynamic(boxed).wrap(make_optimizer(config, params, grad_clip))
  state = tx.init(params)
  torch_params = {k: torch.nn.Parameter(torch.tensor(np.asarray(v[1] if k != "scale" else v)))
                  for k, v in params.items()}
  torch_opt = torch.optim.AdamW([{"params": [torch_params["kernel"]], "weight_decay": 0.1},
                                 {"params": [torch_params["bias"], torch_params["scale"]], "weight_decay": 0.0}],
                                lr=0.01, eps=1e-8)
  batch = next(_batches(0))
  for _ in range(3):
    grads = jax.grad(lambda p: _loss(p, batch, None, True)[0])(params)
    # The static path is given the norm, as the train step gives it; the dynamic path computes it.
    extra = {"global_norm": optax.global_norm(grads)} if routing == "static" else {}
    updates, state = tx.update(grads, state, params, **extra)
    new = optax.apply_updates(params, updates)
    if routing == "static":  # what the Trainer applies: the routed slices only, the same values
      jax.tree.map(np.testing.assert_array_equal, apply_routed_updates(params, updates, slices), new)
      assert np.asarray(take_routed(slices, grads)["kernel"]).shape == (1, 8, 4)
    for name in ("kernel", "bias"):
      np.testing.assert_array_equal(new[name][0], params[name][0])
    for name, w in torch_params.items():
      w.grad = torch.tensor(np.asarray(grads[name][1] if name != "scale" else grads[name]))
    torch.nn.utils.clip_grad_norm_(list(torch_params.values()), 0.5)
    torch_opt.step()
    for name, w in torch_params.items():
      np.testing.assert_allclose(new[name][1] if name != "scale" else new[name], w.detach().numpy(), atol=1e-6)
    params = new
  # The optimizer state keeps full parameter shapes (checkpoints do not depend on the routing), and the
  # unrouted expert's moments stay zero.
  mu = optax.tree_utils.tree_get(state, "mu")
  assert mu["kernel"].shape == (2, 8, 4) and not np.asarray(mu["kernel"][0]).any() and np.asarray(mu["kernel"][1]).any()


def test_routed_slices_follow_the_tower_mode():
  """Passage-only pre-training: in `mote` the query expert's FFN slices are skipped and everything shared is
  routed; in `separated` the whole query tower is skipped; in `siamese` everything is routed."""
  small = MoteConfig(vocab_size=128, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                     max_position_embeddings=16)
  for mode in ("mote", "separated", "siamese"):
    config = small.replace(tower_mode=mode)
    boxed = jax.eval_shape(PretrainModel(config, ObjectiveConfig(decoder_layers=1)).init, jax.random.PRNGKey(0))
    slices = routed_slices(boxed, [config.route("passage")])
    flat = {jax.tree_util.keystr(path): sl for path, sl in jax.tree_util.tree_flatten_with_path(
        slices, is_leaf=lambda x: isinstance(x, Routed))[0]}
    expert_leaves = [k for k in flat if "ffn" in k and "encoder" in k]
    decoder_leaves = [k for k in flat if k.startswith("['decoder']")]
    assert expert_leaves and decoder_leaves and all(flat[k] == Routed() for k in decoder_leaves)
    if mode == "mote":
      assert {flat[k] for k in expert_leaves} == {Routed(0, 1, 2)}
      assert all(sl == Routed() for k, sl in flat.items() if k not in expert_leaves)
    elif mode == "separated":
      assert all(sl == Routed(0, 0, 0) for k, sl in flat.items() if "query_tower" in k)
      assert all(sl == Routed() for k, sl in flat.items() if "query_tower" not in k)
    else:
      assert set(flat.values()) == {Routed()}


def test_static_routing_steps_equal_the_dynamic_freeze(tmp_path):
  """The Trainer's static-routing path (routed gradient slices into the update conditional, updates written on
  the routed slices) gives the parameters and gradient norms of the dynamic path (whole gradients, experts with
  all-zero gradients frozen), skips a non-finite step the same way and leaves the unrouted expert untouched."""
  _batches.poison = {2}
  try:
    runs = {}
    for name in ("dynamic", "static"):
      trainer, params = _trainer(tmp_path / name, num_steps=4, routed=name == "static")
      state = trainer.train(trainer.init_state(params), _batches, Checkpointer(tmp_path / name / "ckpt",
                                                                              save_every=2))
      records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
      # The poisoned step logs a non-finite norm (written as a string); the others are compared.
      runs[name] = (jax.device_get(state), [r["grad_norm"] for r in records if r["step"] != 3])
  finally:
    _batches.poison = set()
  (dynamic, dynamic_norms), (static, static_norms) = runs["dynamic"], runs["static"]
  assert int(static.nonfinite) == int(dynamic.nonfinite) == 1
  assert len(static_norms) == 3
  np.testing.assert_allclose(static_norms, dynamic_norms, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), static.params, dynamic.params)
  initial = jax.device_get(nn.unbox(_init(jax.random.PRNGKey(0))))
  np.testing.assert_array_equal(static.params["kernel"][0], initial["kernel"][0])
  assert not np.allclose(static.params["kernel"][1], initial["kernel"][1])


def test_gradient_accumulation_equals_full_batch(tmp_path):
  full, params = _trainer(tmp_path / "a")
  accumulated, _ = _trainer(tmp_path / "b", grad_accumulation_steps=4)
  batch = next(_batches(0))
  (loss_full, _), grads_full = full._loss_and_grads(params, batch, jax.random.PRNGKey(0))
  (loss_acc, _), grads_acc = accumulated._loss_and_grads(params, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(loss_acc, loss_full, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), grads_acc, grads_full)


def test_resume_continues_exactly(tmp_path):
  trainer, params = _trainer(tmp_path / "straight")
  straight = trainer.train(trainer.init_state(params), _batches, Checkpointer(tmp_path / "straight" / "ckpt",
                                                                               save_every=2))
  # A crash while fetching the batch of step 5 (after step 4's checkpoint); then a new trainer resumes.
  def crashing(start):
    for step, batch in enumerate(_batches(start), start):
      if step == 4:
        raise KeyboardInterrupt("crash")
      yield batch

  trainer, params = _trainer(tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):
    trainer.train(trainer.init_state(params), crashing, Checkpointer(tmp_path / "resumed" / "ckpt", save_every=2))
  trainer, params = _trainer(tmp_path / "resumed")
  checkpointer = Checkpointer(tmp_path / "resumed" / "ckpt", save_every=2)
  abstract = jax.eval_shape(lambda: nn.unbox(_init(jax.random.PRNGKey(0))))
  state = trainer.restore_or_init(checkpointer, lambda: params, abstract)
  assert int(state.step) == 4
  resumed = trainer.train(state, _batches, checkpointer)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(straight.params))
  assert checkpointer.all_steps() == [2, 4, 6]
  records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert {"loss", "mse", "learning_rate", "grad_norm", "steps_per_sec", "tokens_per_sec"} <= records[-1].keys()
  assert list((tmp_path / "resumed" / "tensorboard").iterdir())


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
  _batches.poison = {2}
  try:
    trainer, params = _trainer(tmp_path / "one", num_steps=4)
    state = trainer.init_state(params)
    state = trainer.train(state, _batches, Checkpointer(tmp_path / "one" / "ckpt", save_every=2))
    assert int(state.nonfinite) == 1 and int(state.step) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))

    _batches.poison = {3, 4, 5}
    trainer, params = _trainer(tmp_path / "many", num_steps=8, max_consecutive_nonfinite=3)
    checkpointer = Checkpointer(tmp_path / "many" / "ckpt", save_every=2)
    # Batches 3, 4, 5 are poisoned: steps 4, 5, 6 are skipped, and the run stops after step 6. The checkpoint
    # of step 4 holds the (finite) params of step 3, since skipped steps leave the state as it was.
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive non-finite steps \(last at step 6\).*step 4"):
      trainer.train(trainer.init_state(params), _batches, checkpointer)
    assert checkpointer.latest_step == 4
    abstract = jax.eval_shape(lambda: nn.unbox(_init(jax.random.PRNGKey(0))))
    restored = trainer.restore_or_init(checkpointer, lambda: params, abstract)
    assert int(restored.step) == 4 and int(restored.nonfinite) == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored.params)))

    # Between log and checkpoint steps the counter is read one step late (the host does not wait for the
    # device): the run still stops, naming step 6, before anything of a later step is logged or saved.
    trainer, params = _trainer(tmp_path / "deferred", num_steps=20, max_consecutive_nonfinite=3, log_every=50)
    checkpointer = Checkpointer(tmp_path / "deferred" / "ckpt", save_every=50)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive non-finite steps \(last at step 6\)"):
      trainer.train(trainer.init_state(params), _batches, checkpointer)
    assert checkpointer.latest_step is None
  finally:
    _batches.poison = set()


def test_build_trainer_picks_the_routing_and_the_platform_kernels(tmp_path):
  """`build_trainer` (the jobs' and benchmarks' one assembly): routes give static routing (the optimizer sees the
  routed slices only), none give the dynamic freeze; the gradient clip follows the kernel set, which defaults to
  the mesh platform's."""
  from mote_jax.training.builder import build_trainer
  partitioner = Partitioner.create(MeshConfig(data=8))
  boxed = {"tower": jax.eval_shape(_init, jax.random.PRNGKey(0))}
  args = (TrainerConfig(progress_bar=False), OptimizerConfig(), partitioner, _loss, tmp_path, boxed)
  static = build_trainer(*args, routes=[("tower", 1)])
  assert static.routing.slices["tower"]["kernel"] == Routed(0, 1, 2) and static.routing.axes is None
  dynamic = build_trainer(*args)
  assert dynamic.routing.slices is None and dynamic.routing.axes["tower"] == {"kernel": 0, "bias": 0, "scale": None}
  assert static.kernels == KernelConfig.for_platform("cpu")
  assert build_trainer(*args, kernels=KernelConfig(grad_clip="scalar")).kernels.grad_clip == "scalar"
  with pytest.raises(ValueError, match="routes or routing"):
    build_trainer(*args, routes=[("tower", 1)], routing=Routing())


def test_the_heap_is_released_once_the_step_has_compiled(tmp_path, monkeypatch):
  """After the first step (whose call compiled it) the trainer hands the heap's free pages back, once per run:
  the compiler's freed memory would otherwise stay resident under host_malloc's settings."""
  from mote_jax import host_malloc
  calls = []
  real = host_malloc.release_free_memory
  trainer, params = _trainer(tmp_path, num_steps=3)
  step_fn = trainer.compile_step(trainer.init_state(params))

  def counting():
    calls.append(step_fn._cache_size())  # the step is compiled by the time of the call
    return real()

  monkeypatch.setattr(host_malloc, "release_free_memory", counting)
  trainer.train(trainer.init_state(params), _batches, Checkpointer(tmp_path / "ckpt", save_every=100))
  assert calls == [1]
