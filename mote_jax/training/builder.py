"""One way to assemble a `Trainer`: shared by the pre-training job, the fine-tuning job and the benchmarks.

    trainer = build_trainer(trainer_config, optimizer_config, partitioner, loss_fn, model_dir, boxed_params,
                            routes=[config.route("passage"), ...])

`boxed_params` is the abstract, logically partitioned parameter tree (`jax.eval_shape(model.init, rng)`): it
gives the shardings and the MoTE routing (`training/routing.py`). `routes` are the (tower, expert index) pairs
of the text types the loss sends through the model; given, the optimizer works on the routed slices only
(static routing); None freezes experts whose gradient comes out all zero (dynamic routing); `routing=` passes a
`Routing` of one's own (e.g. `Routing()` for none). `kernels` (a `KernelConfig`, default: the platform's set)
picks the gradient clip; the model's kernels are `MoteConfig.kernels`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from mote_jax.kernels import KernelConfig
from mote_jax.partitioning import Partitioner
from mote_jax.training.optimizer import OptimizerConfig
from mote_jax.training.routing import Routing
from mote_jax.training.trainer import LossFn, Trainer, TrainerConfig


def build_trainer(config: TrainerConfig, optimizer: OptimizerConfig, partitioner: Partitioner, loss_fn: LossFn,
                  model_dir: str | os.PathLike, boxed_params: Any, *,
                  routes: Iterable[tuple[str, int]] | None = None, routing: Routing | None = None,
                  kernels: KernelConfig | None = None, flops_per_step: float | None = None,
                  eval_loss_fn: LossFn | None = None, loss_and_grads_fn: Callable | None = None) -> Trainer:
  """A `Trainer` for `loss_fn` over the parameters described by `boxed_params` (see the module docstring)."""
  if routing is not None and routes is not None:
    raise ValueError("build_trainer: give routes or routing, not both")
  if routing is None:
    routing = Routing.static(boxed_params, routes) if routes is not None else Routing.dynamic(boxed_params)
  return Trainer(config, optimizer, partitioner, loss_fn, model_dir, partitioner.param_shardings(boxed_params),
                 routing=routing, kernels=kernels, flops_per_step=flops_per_step, eval_loss_fn=eval_loss_fn,
                 loss_and_grads_fn=loss_and_grads_fn)
