"""The one place that knows about devices: the mesh, the logical-axis rules, sharded params and global batches.

Modules name their parameter axes ('vocab', 'embed', 'heads', 'kv', 'mlp', 'expert', 'layers') and their
activation axes ('activation_batch', ...). `Partitioner` maps those names onto a mesh of ('data', 'fsdp',
'model') by `rules`; mesh axes of size 1 are dropped, and a rule that names a dropped axis, or a dimension the
axis does not divide, falls back to replication for that dimension.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "model")

# (logical axis, mesh axes). Batch is split over data and fsdp; fsdp also shards the 'embed' side of every
# weight (ZeRO-3 style); model shards heads, FFN width and vocabulary (Megatron style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "model"),
    ("activation_heads", "model"),
    ("activation_vocab", "model"),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("expert", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; one axis may be -1 to take the devices the others leave."""

  data: int = -1
  fsdp: int = 1
  model: int = 1

  def axis_sizes(self, num_devices: int) -> dict[str, int]:
    sizes = {name: getattr(self, name) for name in MESH_AXES}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
      raise ValueError(f"MeshConfig: only one axis may be -1, got {sizes}")
    for name, size in sizes.items():
      if size == 0 or size < -1:
        raise ValueError(f"MeshConfig.{name}={size}: expected a positive size or -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
      if num_devices % fixed:
        raise ValueError(f"MeshConfig {sizes}: {num_devices} devices are not divisible by {fixed}")
      sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
      raise ValueError(f"MeshConfig {sizes} needs {math.prod(sizes.values())} devices, found {num_devices}")
    return sizes


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with the size-1 axes of `config` dropped."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = config.axis_sizes(len(devices))
  kept = {name: size for name, size in sizes.items() if size > 1} or {"data": 1}
  shape = tuple(kept.values())
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, tuple(kept), axis_types=(AxisType.Auto,) * len(kept))


def rules_for_mesh(rules: Sequence[tuple[str, Any]], mesh: Mesh) -> tuple[tuple[str, Any], ...]:
  """Drops from each rule the mesh axes that `mesh` does not have (size-1 axes were dropped)."""
  out = []
  for logical, physical in rules:
    axes = (physical,) if isinstance(physical, str) else tuple(physical or ())
    axes = tuple(axis for axis in axes if axis in mesh.axis_names)
    out.append((logical, axes[0] if len(axes) == 1 else (axes or None)))
  return tuple(out)


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Replicates every dimension of `spec` that its mesh axes do not divide evenly."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = math.prod(mesh.shape[name] for name in names)
    fitted.append(axes if dim % ways == 0 else None)
  return PartitionSpec(*fitted)


def missing_annotations(boxed_params) -> list[str]:
  """Paths of parameters that carry no logical-axis names (or names of the wrong rank)."""
  missing = []
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, leaf in leaves:
    ok = isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.names) == np.ndim(leaf.value)
    if not ok:
      missing.append(jax.tree_util.keystr(path))
  return missing


@dataclasses.dataclass(frozen=True)
class Partitioner:
  """A mesh plus logical-axis rules: shardings for params and batches, and a jit that honours both."""

  mesh: Mesh
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  @classmethod
  def create(cls, mesh_config: MeshConfig = MeshConfig(), rules=DEFAULT_RULES, devices=None) -> "Partitioner":
    mesh = make_mesh(mesh_config, devices)
    return cls(mesh, rules_for_mesh(rules, mesh))

  # --- parameters -------------------------------------------------------------------------------------------
  def logical_to_sharding(self, logical_spec: PartitionSpec, shape: Sequence[int]) -> NamedSharding:
    mesh_spec = nn.logical_to_mesh_axes(logical_spec, self.rules)
    return NamedSharding(self.mesh, _fit(mesh_spec, shape, self.mesh))

  def param_shardings(self, boxed_params) -> Any:
    """Tree of NamedSharding (matching the unboxed tree) for boxed params, concrete or abstract."""
    missing = missing_annotations(boxed_params)
    if missing:
      raise ValueError(f"parameters without logical-axis names: {missing}")
    return jax.tree.map(
        lambda box: self.logical_to_sharding(PartitionSpec(*box.names), box.value.shape),
        boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

  def init(self, init_fn: Callable[[jax.Array], Any], rng: jax.Array):
    """Runs `init_fn(rng) -> boxed params` under jit with sharded outputs: params are born sharded.

    Returns (params, shardings), both unboxed trees.
    """
    abstract = jax.eval_shape(init_fn, rng)
    shardings = self.param_shardings(abstract)
    # Traced without the activation rules: flax's DenseGeneral reshapes its boxed kernel during init, and a
    # rules context would constrain the flat intermediate with the 3-d names. out_shardings places the result.
    params = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return params, shardings

  def shard(self, host_tree, shardings) -> Any:
    """Places a tree of host (numpy) arrays, identical on every process, onto the mesh."""
    def put(x, sharding):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, host_tree, shardings)

  # --- batches ----------------------------------------------------------------------------------------------
  def batch_sharding(self, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over the 'activation_batch' mesh axes, the rest replicated."""
    axes = nn.logical_to_mesh_axes(PartitionSpec("activation_batch"), self.rules)
    return NamedSharding(self.mesh, PartitionSpec(axes[0], *([None] * (ndim - 1))))

  @property
  def data_parallel_size(self) -> int:
    spec = self.batch_sharding(1).spec[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(self.mesh.shape[name] for name in names)

  def global_batch(self, local_batch: Any) -> Any:
    """This process's rows of a batch (a pytree of [rows, ...] arrays) -> global jax.Arrays.

    The global array holds the rows of all processes in process order; every process passes the same number.
    """
    def to_global(path, value):
      value = np.asarray(value)
      rows = value.shape[0] * jax.process_count()
      if rows % self.data_parallel_size:
        raise ValueError(f"batch field {jax.tree_util.keystr(path)}: global batch {rows} is not divisible by the "
                         f"data-parallel size {self.data_parallel_size}")
      return jax.make_array_from_process_local_data(self.batch_sharding(value.ndim), value,
                                                    (rows,) + value.shape[1:])
    return jax.tree_util.tree_map_with_path(to_global, local_batch)

  # --- tracing ----------------------------------------------------------------------------------------------
  @contextlib.contextmanager
  def activation_rules(self):
    """Mesh and rules in scope, so `nn.with_logical_constraint` inside modules resolves while tracing."""
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(self.rules):
      yield

  def jit(self, fn: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fn)` whose tracing sees this mesh and these rules."""
    def traced(*args, **kwargs):
      with self.activation_rules():
        return fn(*args, **kwargs)
    return jax.jit(traced, **jit_kwargs)
