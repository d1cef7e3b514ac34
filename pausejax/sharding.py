"""Device mesh and logical-axis rules.

Parameters name their dimensions logically (`embed`, `mlp`, `heads`, `kv`, `vocab`, `norm`; the
batch is `batch`). The config's `logical_axis_rules` map each logical name to a mesh axis (or to
None = replicated); this module turns those names into `NamedSharding`s over a mesh with axes
`dcn_data`, `data`, `fsdp` and `tensor`. Changing how a model is laid out over a pod is a config
edit.

`dcn_data` is the data-parallel axis that crosses the slow data-centre network (DCN): between
the slices of a multi-slice TPU job, or between GPU hosts. The other three axes stay inside a
slice (TPU ICI) or a host (NVLink). Only gradients cross DCN, once per step, which is why only
the batch is split over it by default (batch -> dcn_data, data, fsdp).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from absl import logging
from flax import nnx
import jax
from jax.experimental import mesh_utils
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from pausejax import config as config_lib
from pausejax.errors import UsageError

MESH_AXES = ("dcn_data", "data", "fsdp", "tensor")
ICI_AXES = MESH_AXES[1:]  # Inside one slice / host; one of them may be -1.


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """(dcn_data, data, fsdp, tensor) sizes; a -1 takes the remaining devices.

  They must multiply to num_devices. `dcn_data` may be absent (older configs): then it is 1.
  """
  dcn = mesh_config.get("dcn_data", 1)
  sizes = [dcn] + [mesh_config[a] for a in ICI_AXES]
  shown = dict(zip(MESH_AXES, sizes))
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise UsageError.setting("mesh", shown,
                               f"the fixed axes ({known}) must divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UsageError.setting(
        "mesh", shown, "mesh.dcn_data * mesh.data * mesh.fsdp * mesh.tensor must equal the "
        f"{num_devices} available devices")
  return tuple(sizes)


def num_slices(devices: Sequence[Any]) -> int:
  """How many TPU slices (joined by DCN) `devices` span; 1 off TPU multi-slice."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as a (dcn_data, data, fsdp, tensor) array, topology-aware.

  Multi-slice TPU: `create_hybrid_device_mesh` puts whole slices along `dcn_data` (which must
  then equal the number of slices) and lays each slice out along its ICI torus. One slice:
  `create_device_mesh` (torus-aware on TPU; on CPU and GPU the devices in order, which is
  process-major, so `dcn_data` splits the hosts into groups).
  """
  dcn, *ici = shape
  slices = num_slices(devices)
  if slices > 1:
    if dcn != slices:
      raise UsageError.setting(
          "mesh.dcn_data", dcn, f"must equal the {slices} TPU slices these devices span: "
          f"dcn_data is the axis over the data-centre network (--config.mesh.dcn_data={slices})")
    return mesh_utils.create_hybrid_device_mesh(
        [1, *ici], [dcn, 1, 1, 1], devices, allow_split_physical_axes=True)
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError) as e:
    # E.g. a subset of a TPU slice that is not a sub-torus: correct, just not topology-aware.
    logging.warning("mesh %s: no topology-aware layout (%s); using device order", shape, e)
    return np.asarray(devices).reshape(shape)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The config's mesh over `devices` (default: all devices of all processes)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axes: XLA's sharding propagation places activations; we annotate state and batch only.
  return Mesh(device_grid(shape, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def known_logical_axes() -> tuple[str, ...]:
  """The logical axis names the model and batch use (those of the default rules)."""
  return tuple(name for name, _ in config_lib.DEFAULT_LOGICAL_AXIS_RULES)


def rules_dict(rules: Iterable[Sequence[Any]]) -> dict[str, Any]:
  """`logical_axis_rules` as {logical name: mesh axis | tuple of mesh axes | None}.

  Raises UsageError for a mesh axis that does not exist, a logical name that nothing uses (a
  typo would otherwise leave its real axis without a rule), or a name given twice.
  """
  known = known_logical_axes()
  out = {}
  for name, target in rules:
    if name not in known:
      raise UsageError.setting("logical_axis_rules", (name, target),
                               f"unknown logical axis {name!r}; the logical axes are "
                               f"{', '.join(known)}")
    if name in out:
      raise UsageError.setting("logical_axis_rules", (name, target),
                               f"logical axis {name!r} has more than one rule")
    targets = target if isinstance(target, (tuple, list)) else (target,)
    for t in targets:
      if t is not None and t not in MESH_AXES:
        raise UsageError.setting("logical_axis_rules", (name, target),
                                 f"mesh axes are {', '.join(MESH_AXES)} (or None)")
    out[name] = tuple(target) if isinstance(target, (tuple, list)) else target
  return out


def logical_to_mesh(spec: Sequence[Any], rules: dict[str, Any]) -> P:
  """PartitionSpec of logical names -> PartitionSpec of mesh axes (each mesh axis used once)."""
  used, out = set(), []
  for name in spec:
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise UsageError.setting("logical_axis_rules", name,
                               f"no rule for logical axis {name!r}; rules cover {sorted(rules)}")
    target = rules[name]
    axes = target if isinstance(target, tuple) else (target,)
    axes = tuple(a for a in axes if a is not None and a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def named_shardings(logical_specs: Any, mesh: Mesh, rules: dict[str, Any]) -> Any:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh(s, rules)), logical_specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules: dict[str, Any]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh(("batch", "length"), rules))


def check_batch_divisible(global_batch_size: int, mesh: Mesh, rules: dict[str, Any]) -> None:
  spec = logical_to_mesh(("batch",), rules)[0]
  axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
  shards = math.prod(mesh.shape[a] for a in axes)
  if global_batch_size % shards:
    raise UsageError.setting(
        "global_batch_size", global_batch_size,
        f"must be divisible by the {shards} batch shards of the mesh "
        f"({' x '.join(f'{a}={mesh.shape[a]}' for a in axes)})")


# The model setting behind each logical parameter axis, for error messages.
_AXIS_SETTINGS = {
    "heads": "model.num_heads",
    "mlp": "model.mlp_dim",
    "embed": "model.d_model",
    "norm": "model.d_model",
    "kv": "model.head_dim",
    "layers": "model.num_layers",
    "vocab": "the padded vocabulary size",
}


def check_shardable(abstract_params: Any, param_specs: Any, mesh: Mesh | AbstractMesh,
                    rules: dict[str, Any]) -> None:
  """UsageError unless every parameter dimension divides evenly over the mesh axes it maps to.

  `abstract_params` holds the parameters' shapes (`step.abstract_model`'s nnx.State, or any
  pytree of arrays / ShapeDtypeStructs) and `param_specs` their logical PartitionSpecs
  (`step.param_logical_specs`). Without this check an indivisible axis (mesh.tensor=2 with
  model.num_heads=3) fails deep inside jit.
  """
  if isinstance(abstract_params, nnx.State):
    abstract_params = nnx.to_pure_dict(abstract_params)
  flat_specs, treedef = jax.tree_util.tree_flatten_with_path(
      param_specs, is_leaf=lambda x: isinstance(x, P))
  shapes = treedef.flatten_up_to(abstract_params)
  mesh_sizes = dict(mesh.shape)
  num_devices = math.prod(mesh_sizes.values())
  for (path, spec), array in zip(flat_specs, shapes):
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    for logical, axes, size in zip(spec, logical_to_mesh(spec, rules), array.shape):
      axes = axes if isinstance(axes, tuple) else (axes,) if axes else ()
      shards = math.prod(mesh_sizes[a] for a in axes)
      if size % shards == 0:
        continue
      setting = " * ".join(f"mesh.{a}" for a in axes)
      shown = " x ".join(f"mesh.{a}={mesh_sizes[a]}" for a in axes)
      model_setting = _AXIS_SETTINGS.get(logical, f"the size of logical axis {logical!r}")
      divisors = [d for d in range(1, min(size, num_devices) + 1) if size % d == 0]
      what = (f"{model_setting}={size}" if model_setting.startswith("model.")
              else f"{model_setting} {size}")
      raise UsageError(
          f"{shown} does not divide {what} (dimension {logical!r} of parameter {name}, shape "
          f"{tuple(array.shape)}): use {setting} in {{{', '.join(map(str, divisors))}}}, or "
          f"{model_setting} a multiple of {shards}")
