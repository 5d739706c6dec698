"""The training loop: one jitted, sharded, donated step; metrics; checkpoints; resume; SIGTERM; NaN guard.

The trainer is generic over the objective: it takes `loss_fn(params, batch, rng, deterministic) -> (loss,
metrics)` and a deterministic batch stream `train_batches(start_step) -> iterator of host numpy dicts`, so a
resumed run continues the exact stream from the restored step.

Multi-process runs: every decision that leads to a collective (a step, an evaluation, a checkpoint save, stopping)
is taken identically by every process. Values the loop branches on are replicated outputs of the step, and a
SIGTERM, which may reach one process only or reach processes at different steps, is turned into a step at which
every process stops (see `_StopRequest`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

import mote_jax.host_malloc as host_malloc
from mote_jax.kernels import KernelConfig, resolve
from mote_jax.partitioning import Partitioner
from mote_jax.training.checkpointing import Checkpointer
from mote_jax.training.metrics import MetricsWriter
from mote_jax.training.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from mote_jax.training.routing import Routing

log = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]
LossFn = Callable[[Any, Batch, jax.Array, bool], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  num_steps: int = 1000
  grad_accumulation_steps: int = 1  # micro-batches per step, accumulated inside the jitted step
  log_every: int = 10
  eval_every: int = 100  # 0: never
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  max_consecutive_nonfinite: int = 10
  # Peak FLOP/s of one device for model FLOPs utilisation: None looks it up from the device kind and compute
  # dtype (training/flops.py; the job resolves it), 0 = not reported.
  peak_flops_per_device: float | None = None
  seed: int = 0
  progress_bar: bool = True


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # batches consumed, skipped ones included: the position in the data stream
  params: Any
  opt_state: Any
  nonfinite: jax.Array  # steps skipped for a non-finite loss or gradient, in total
  consecutive_nonfinite: jax.Array


class NonFiniteLossError(RuntimeError):
  """Too many consecutive non-finite steps; the last good checkpoint is intact."""


class TrainingInterrupted(RuntimeError):
  """A signal (SIGTERM: preemption, `kill`) stopped training after a checkpoint of the current step.

  In a multi-process run every process raises it at the same step, including processes that got no signal."""

  def __init__(self, signal_name: str, step: int):
    super().__init__(f"{signal_name}: stopped after saving a checkpoint of step {step}")
    self.signal_name = signal_name
    self.step = step


class Trainer:
  """Builds the jitted step for a loss and runs the loop; stateless apart from its configuration."""

  def __init__(self, config: TrainerConfig, optimizer_config: OptimizerConfig, partitioner: Partitioner,
               loss_fn: LossFn, model_dir: str | os.PathLike, param_shardings: Any, *,
               routing: Routing | None = None, kernels: KernelConfig | None = None,
               flops_per_step: float | None = None, eval_loss_fn: LossFn | None = None,
               loss_and_grads_fn: Callable | None = None):
    """`routing` (`training.routing.Routing`; default none) restricts the optimizer and the step's gradient
    handling to what the step's texts reach. `kernels.grad_clip` picks the gradient clip (default: the mesh
    platform's kernel set). `eval_loss_fn` (default `loss_fn`) scores held-out batches, which may hold other
    fields or streams. `loss_and_grads_fn(params, batch, rng, deterministic) -> ((loss, metrics), grads)`
    replaces autodiff of `loss_fn` where the objective computes its own gradients (GradCache).
    Most callers build a Trainer with `training.builder.build_trainer`."""
    self.config = config
    self.partitioner = partitioner
    self.loss_fn = loss_fn
    self.eval_loss_fn = eval_loss_fn or loss_fn
    self.loss_and_grads_fn = loss_and_grads_fn or jax.value_and_grad(loss_fn, has_aux=True)
    self.model_dir = epath.Path(model_dir)  # keeps gs:// and other URIs (pathlib would collapse "//")
    self.param_shardings = param_shardings
    self.flops_per_step = flops_per_step
    self.routing = routing or Routing()
    self.kernels = resolve(kernels, partitioner.mesh.devices.flat[0].platform)
    # The decay mask needs paths only, so the shardings tree stands in for the params.
    self.optimizer = self.routing.wrap(make_optimizer(optimizer_config, param_shardings, self.kernels.grad_clip))
    self.schedule = learning_rate_schedule(optimizer_config)
    self._replicated = NamedSharding(partitioner.mesh, PartitionSpec())
    self._step_fn = None
    self._eval_fn = None

  # --- state ------------------------------------------------------------------------------------------------
  def state_shardings(self, abstract_state: TrainState) -> TrainState:
    opt_shardings = optax.tree_utils.tree_map_params(
        self.optimizer, lambda _, s: s, abstract_state.opt_state, self.param_shardings,
        transform_non_params=lambda _: self._replicated)
    r = self._replicated
    return TrainState(step=r, params=self.param_shardings, opt_state=opt_shardings, nonfinite=r,
                      consecutive_nonfinite=r)

  def _new_state(self, params) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=self.optimizer.init(params), nonfinite=zero,
                      consecutive_nonfinite=zero)

  def init_state(self, params) -> TrainState:
    """A fresh state around (sharded) `params`; the optimizer state is created with matching shardings."""
    abstract = jax.eval_shape(self._new_state, params)
    return jax.jit(self._new_state, out_shardings=self.state_shardings(abstract))(params)

  def restore_or_init(self, checkpointer: Checkpointer, init_params: Callable[[], Any],
                      abstract_params: Any) -> TrainState:
    """The latest checkpoint if there is one (resume), else a fresh state from `init_params()`.

    `abstract_params` (ShapeDtypeStructs) shapes the restore target, so a resume never runs `init_params`.
    """
    if checkpointer.latest_step is None:
      return self.init_state(init_params())
    abstract = jax.eval_shape(self._new_state, abstract_params)
    shardings = self.state_shardings(abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state = checkpointer.restore(abstract)
    log.info("resumed from %s/%d", checkpointer.directory, int(state.step))
    return state

  # --- steps ------------------------------------------------------------------------------------------------
  def _loss_and_grads(self, params, batch, rng):
    grad_fn = lambda p, b, r: self.loss_and_grads_fn(p, b, r, False)  # noqa: E731
    k = self.config.grad_accumulation_steps
    if k == 1:
      return grad_fn(params, batch, rng)
    # Strided micro-batches (row i goes to micro-batch i % k) keep every device's rows on that device.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

    def body(carry, inputs):
      index, mb = inputs
      (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    first = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (first[0][0], first[0][1], first[1]))
    (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    return (loss / k, jax.tree.map(lambda m: m / k, metrics)), jax.tree.map(lambda g: g / k, grads)

  def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), state.step)
    (loss, metrics), grads = self._loss_and_grads(state.params, batch, rng)
    # Only the routed parts of the gradient (all of it without static routing) are normed and enter the
    # conditional; they are padded back inside it, where XLA sees that the routing slices them again, so whole
    # expert-stack gradients (zeros around the routed expert) are never materialised. Outside the routed parts
    # the gradient is zero, so their norm is the norm.
    routing = self.routing
    shapes = jax.tree.map(jnp.shape, grads)
    routed_grads = routing.take(grads)
    grad_norm = optax.global_norm(routed_grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(parts):
      # A clip that takes `global_norm=` reuses the norm above (others ignore it and compute their own).
      updates, opt_state = self.optimizer.update(routing.pad(parts, shapes), state.opt_state, state.params,
                                                 global_norm=grad_norm)
      return routing.apply_updates(state.params, updates), opt_state

    # A non-finite step is skipped: params and optimizer state stay, the data stream moves on. A conditional
    # rather than a select per parameter: the update runs only when applied, with no extra pass over the state.
    params, opt_state = jax.lax.cond(finite, apply, lambda _: (state.params, state.opt_state),
                                     routed_grads)
    skipped = (~finite).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state,
        nonfinite=state.nonfinite + skipped, consecutive_nonfinite=(state.consecutive_nonfinite + 1) * skipped)
    applied_updates = state.step - state.nonfinite  # the optimizer's own count: skipped steps do not count
    # consecutive_nonfinite rides along for `train`'s divergence check (the state itself is donated).
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                   learning_rate=self.schedule(applied_updates), consecutive_nonfinite=new_state.consecutive_nonfinite)
    return new_state, metrics

  def _eval_step(self, params, batch):
    loss, metrics = self.eval_loss_fn(params, batch, None, True)
    return dict(metrics, loss=loss)

  def compile_step(self, state: TrainState):
    if self._step_fn is None:
      shardings = self.state_shardings(state)
      self._step_fn = self.partitioner.jit(self._train_step, in_shardings=(shardings, None),
                                           out_shardings=(shardings, self._replicated), donate_argnums=(0,))
      self._eval_fn = self.partitioner.jit(self._eval_step, in_shardings=(self.param_shardings, None),
                                           out_shardings=self._replicated)
    return self._step_fn

  def evaluate(self, params, batches: Iterable[Batch]) -> dict[str, float]:
    """Mean of each metric over `batches` (dropout off)."""
    totals, n = {}, 0
    for batch in batches:
      metrics = jax.device_get(self._eval_fn(params, self.partitioner.global_batch(batch)))
      for k, v in metrics.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      n += 1
    return {f"eval/{k}": v / max(n, 1) for k, v in totals.items()}

  # --- loop -------------------------------------------------------------------------------------------------
  def train(self, state: TrainState, train_batches: Callable[[int], Iterator[Batch]],
            checkpointer: Checkpointer, eval_batches: Callable[[], Iterable[Batch]] | None = None,
            evaluate_fn: Callable[[int, Any], Mapping[str, float]] | None = None) -> TrainState:
    """Runs steps until `num_steps`. `evaluate_fn(step, params) -> metrics` (e.g. a retrieval evaluation on a dev
    split) is called, on every process, at step 0 of a fresh run and with `eval_batches` every `eval_every` steps
    and at the last step; its metrics are written like the others."""
    cfg = self.config
    start = int(jax.device_get(state.step))
    step_fn = self.compile_step(state)
    writer = MetricsWriter(self.model_dir, cfg.num_steps, start, progress=cfg.progress_bar)
    batches = train_batches(start)
    window = dict(start=time.perf_counter(), steps=0, tokens=0)
    with _StopRequest(start) as stop:
      try:
        if start == 0 and cfg.eval_every:
          self._write_row(writer, 0, {}, state.params, eval_batches, evaluate_fn)
        # A step's non-finite counter is read after the next step is dispatched, so the host never waits for
        # the device in between and prepares the next batch while a step runs. Before anything that exposes the
        # state (a log line, an evaluation, a checkpoint, a stop) the current step's counter is read at once, so
        # no checkpoint follows the step that ends a run of non-finite steps.
        pending = None  # (step, its consecutive non-finite counter), not yet read
        for step in range(start, cfg.num_steps):
          host_batch = next(batches)
          window["tokens"] += _count_tokens(host_batch)
          state, metrics = step_fn(state, self.partitioner.global_batch(host_batch))
          if step == start:
            # The first call compiled the step; the compiler's freed memory (a gigabyte or more for a BERT-sized
            # step on XLA:CPU) would otherwise stay resident under host_malloc's no-trim settings.
            host_malloc.release_free_memory()
          window["steps"] += 1
          done = step + 1
          if pending is not None:
            self._stop_if_diverged(*pending, checkpointer)
          pending = (done, metrics.pop("consecutive_nonfinite"))
          log_now = done % cfg.log_every == 0 or done == cfg.num_steps
          evaluating = (eval_batches is not None or evaluate_fn is not None) and cfg.eval_every and (
              done % cfg.eval_every == 0 or done == cfg.num_steps)
          stopping = stop.agreed(done)  # the same answer on every process, so the forced save below is collective
          if log_now or evaluating or stopping or checkpointer.due(done):
            self._stop_if_diverged(*pending, checkpointer)
            pending = None
          row = {}
          if log_now:
            row = self._throughput(jax.device_get(metrics), window, state)
            window = dict(start=time.perf_counter(), steps=0, tokens=0)
          if evaluating:
            self._write_row(writer, done, row, state.params, eval_batches, evaluate_fn)
          elif row:
            writer.write(done, row)
          checkpointer.maybe_save(done, state, force=done == cfg.num_steps or stopping)
          writer.advance(done)
          if stopping:
            checkpointer.wait()
            raise TrainingInterrupted(stop.reason, done)
      finally:
        close = getattr(batches, "close", None)
        if close is not None:
          close()
        checkpointer.wait()
        writer.close()
    return state

  def _write_row(self, writer: MetricsWriter, step: int, row: dict, params, eval_batches, evaluate_fn) -> None:
    """One metrics row for `step`: the training metrics `row` (if logged at this step), the held-out losses and
    the `evaluate_fn` metrics."""
    row = dict(row)
    if eval_batches is not None:
      row.update(self.evaluate(params, eval_batches()))
    if evaluate_fn is not None:
      row.update(evaluate_fn(step, params))
    if row:
      writer.write(step, row)

  def _stop_if_diverged(self, step: int, consecutive_nonfinite: jax.Array, checkpointer: Checkpointer) -> None:
    """Raises NonFiniteLossError when `step` ended a run of `max_consecutive_nonfinite` non-finite steps."""
    limit = self.config.max_consecutive_nonfinite
    if int(jax.device_get(consecutive_nonfinite)) >= limit:
      checkpointer.wait()
      raise NonFiniteLossError(
          f"{limit} consecutive non-finite steps (last at step {step}); the last good checkpoint is step "
          f"{checkpointer.latest_step} in {checkpointer.directory}")

  def _throughput(self, metrics: dict, window: dict, state: TrainState) -> dict[str, float]:
    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    out = {k: float(v) for k, v in metrics.items()}
    out["steps_per_sec"] = window["steps"] / elapsed
    out["tokens_per_sec"] = window["tokens"] / elapsed
    out["nonfinite_steps"] = float(jax.device_get(state.nonfinite))
    if self.flops_per_step and self.config.peak_flops_per_device:
      peak = self.config.peak_flops_per_device * jax.device_count()
      out["mfu"] = self.flops_per_step * out["steps_per_sec"] / peak
    return out


def _count_tokens(batch) -> int:
  """Non-padding tokens of a (nested) host batch: the sum of every `*attention_mask` field."""
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  return int(sum(np.asarray(v).sum() for path, v in leaves
                 if str(getattr(path[-1], "key", "")).endswith("attention_mask")))


class _StopRequest:
  """Whether to stop (save a checkpoint, then raise TrainingInterrupted) after a step: the same answer on every
  process at the same step.

  A SIGTERM may reach one process only (a `kill`, one preempted host) or reach processes at different steps, while
  the checkpoint save that follows it is a collective: processes that disagreed on the step would hang. So:

  - one process: a Python SIGTERM handler sets a flag, read after every step;
  - several processes with JAX's preemption service (the default after `jax.distributed.initialize`): the
    service's own SIGTERM handler notifies the coordinator, which tells every process, and
    `multihost_utils.reached_preemption_sync_point(step)`, asked after every step (a local check), turns True at
    the same step everywhere. No Python handler is installed, since it would replace the service's one. The
    service holds SIGTERM from `jax.distributed.initialize` on: a notice that came while data or the model were
    being prepared stops a fresh run after its first step (a resumed run only sees notices from its first step
    on, since the service counts steps from 0);
  - several processes without the service (`jax_enable_preemption_service=False`): the Python flag, all-gathered
    after every step (one tiny collective per step), and any process's flag stops them all.
  """

  def __init__(self, start_step: int):
    self._flag: str | None = None
    self._previous = None
    self._installed = False
    self.mode = "local"
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        # Telling the service where this process stands is also the probe of whether it runs at all.
        multihost_utils.reached_preemption_sync_point(start_step)
        self.mode = "preemption_service"
      except RuntimeError:
        self.mode = "allgather"

  @property
  def reason(self) -> str:
    return self._flag or "SIGTERM (preemption notice, possibly on another process)"

  def __enter__(self) -> "_StopRequest":
    if self.mode == "preemption_service":
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
      self._installed = True
    except ValueError:  # not the main thread: leave signals alone
      pass
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
      self._installed = False

  def _handler(self, signum, _frame) -> None:
    self._flag = signal.Signals(signum).name

  def agreed(self, step: int) -> bool:
    """Whether every process stops after `step` (a collective in the multi-process modes: every process asks,
    once per step, with the same `step`)."""
    if self.mode == "local":
      return self._flag is not None
    from jax.experimental import multihost_utils
    if self.mode == "preemption_service":
      return bool(multihost_utils.reached_preemption_sync_point(step))
    flags = multihost_utils.process_allgather(np.array([self._flag is not None], np.int32))
    return bool(np.asarray(flags).any())
