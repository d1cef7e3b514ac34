"""Device mesh and logical-axis rules.

Parameters name their dimensions logically (`embed`, `mlp`, `heads`, `kv`, `vocab`, `norm`; the
batch is `batch`). The config's `logical_axis_rules` map each logical name to a mesh axis (or to
None = replicated); this module turns those names into `NamedSharding`s over a mesh with axes
`data`, `fsdp` and `tensor`. Changing how a model is laid out over a pod is a config edit.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from pausejax.errors import UsageError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, tensor) sizes; a -1 takes the remaining devices. Must multiply to num_devices."""
  sizes = [mesh_config[a] for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise UsageError.setting("mesh", dict(zip(MESH_AXES, sizes)),
                               f"the fixed axes ({known}) must divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UsageError.setting(
        "mesh", dict(zip(MESH_AXES, sizes)),
        f"mesh.data * mesh.fsdp * mesh.tensor must equal the {num_devices} available devices")
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  if len(devices) == len(jax.devices()):
    # jax.make_mesh orders devices by the physical topology (ICI rings on TPU).
    # Auto axes: XLA's sharding propagation places activations; we annotate state and batch only.
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def rules_dict(rules: Iterable[Sequence[Any]]) -> dict[str, Any]:
  out = {}
  for name, target in rules:
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
