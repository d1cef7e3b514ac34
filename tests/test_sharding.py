"""Meshes and logical-axis rules; the same training losses on any mesh of 8 simulated devices."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from pausejax import config as config_lib
from pausejax import sharding
from pausejax.errors import UsageError

from conftest import REPO, TINY_CLI, cli_overrides, tiny_config

RULES = sharding.rules_dict(config_lib.DEFAULT_LOGICAL_AXIS_RULES)


def _mesh_config(data, fsdp, tensor, dcn_data=None):
  c = {"data": data, "fsdp": fsdp, "tensor": tensor}
  if dcn_data is not None:
    c["dcn_data"] = dcn_data
  return ml_collections.ConfigDict(c)


def test_mesh_shape_fills_minus_one_and_checks_the_product():
  assert sharding.mesh_shape(_mesh_config(-1, 2, 2), 8) == (1, 2, 2, 2)  # No dcn_data: 1.
  assert sharding.mesh_shape(_mesh_config(1, -1, 2), 8) == (1, 1, 4, 2)
  assert sharding.mesh_shape(_mesh_config(-1, 1, 1, dcn_data=2), 8) == (2, 4, 1, 1)
  with pytest.raises(UsageError, match="must equal the 8 available devices"):
    sharding.mesh_shape(_mesh_config(2, 2, 1), 8)
  with pytest.raises(UsageError, match="must equal the 8 available devices"):
    sharding.mesh_shape(_mesh_config(2, 2, 1, dcn_data=4), 8)
  with pytest.raises(UsageError, match="divide"):
    sharding.mesh_shape(_mesh_config(-1, 3, 1), 8)


def test_logical_to_mesh_follows_the_rules():
  assert sharding.logical_to_mesh(("vocab", "embed"), RULES) == P("tensor", "fsdp")
  assert sharding.logical_to_mesh(("embed", "heads", "kv"), RULES) == P("fsdp", "tensor", None)
  assert sharding.logical_to_mesh(("norm",), RULES) == P(None)
  assert sharding.logical_to_mesh(("batch", "length"), RULES) == P(
      ("dcn_data", "data", "fsdp"), None)
  # A mesh axis is used at most once per array.
  assert sharding.logical_to_mesh(("mlp", "heads"), RULES) == P("tensor", None)


def test_unknown_logical_axis_and_unknown_mesh_axis_are_usage_errors():
  with pytest.raises(UsageError, match="no rule for logical axis 'experts'"):
    sharding.logical_to_mesh(("experts", "embed"), RULES)
  with pytest.raises(UsageError, match="mesh axes are dcn_data, data, fsdp, tensor"):
    sharding.rules_dict((("embed", "model"),))
  # A misspelt logical name would leave the real one without a rule: named at once.
  with pytest.raises(UsageError, match="unknown logical axis 'embedd'; the logical axes are "
                     "batch, embed"):
    sharding.rules_dict((("embedd", "fsdp"),))
  with pytest.raises(UsageError, match="'embed' has more than one rule"):
    sharding.rules_dict((("embed", "fsdp"), ("embed", None)))


def test_batch_must_divide_over_dcn_data_data_and_fsdp():
  mesh = jax.sharding.AbstractMesh((2, 2, 3, 2), sharding.MESH_AXES)
  sharding.check_batch_divisible(24, mesh, RULES)
  with pytest.raises(UsageError) as e:
    sharding.check_batch_divisible(18, mesh, RULES)
  assert str(e.value) == ("global_batch_size=18 is invalid: must be divisible by the 12 batch "
                          "shards of the mesh (dcn_data=2 x data=2 x fsdp=3)")


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
  """A stand-in device (fake): what mesh_utils reads of a device of a multi-slice job."""
  id: int
  slice_index: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "fake"


def test_slices_go_along_dcn_data():
  # 2 slices of 4 devices, listed interleaved: the grid must still keep each slice together.
  devices = [_FakeDevice(i, slice_index=i % 2, process_index=i % 2) for i in range(8)]
  grid = sharding.device_grid((2, 2, 2, 1), devices)
  assert grid.shape == (2, 2, 2, 1)
  for s in (0, 1):
    assert {d.slice_index for d in grid[s].ravel()} == {s}
  assert sorted(d.id for d in grid.ravel()) == list(range(8))
  with pytest.raises(UsageError) as e:
    sharding.device_grid((1, 4, 2, 1), devices)
  assert str(e.value).startswith("mesh.dcn_data=1 is invalid: must equal the 2 TPU slices")
  assert "--config.mesh.dcn_data=2" in str(e.value)


def test_one_slice_keeps_process_major_order_on_cpu():
  # dcn_data splits the hosts into groups: host p's devices are block p.
  devices = [_FakeDevice(i, slice_index=0, process_index=i // 2) for i in range(8)]
  grid = sharding.device_grid((4, 2, 1, 1), devices)
  assert [[d.process_index for d in row.ravel()] for row in grid] == [[0, 0], [1, 1], [2, 2],
                                                                        [3, 3]]


@pytest.mark.parametrize("key,value,words", [
    ("mesh.dcn_data", 0, ["mesh.dcn_data=0 is invalid", "positive integer"]),
    ("mesh.dcn_data", -1, ["mesh.dcn_data=-1 is invalid"]),
    ("data_shards", -2, ["data_shards=-2 is invalid", "non-negative"]),
    ("data_shards", 3, ["data_shards=3 is invalid", "divisor of global_batch_size=8"]),
])
def test_bad_mesh_and_shard_settings(key, value, words):
  c = tiny_config("unused", **{key: value})
  with pytest.raises(UsageError) as e:
    config_lib.validate(c)
  for w in words:
    assert w in str(e.value)


def _expect_train_error(config, workdir, *words):
  from pausejax import train
  with pytest.raises(UsageError) as e:
    train.train_and_evaluate(config, str(workdir))
  assert "\n" not in str(e.value)
  for w in words:
    assert w in str(e.value), (w, str(e.value))
  assert not os.path.exists(workdir)  # Nothing written.


def test_train_refuses_a_mesh_that_is_not_the_device_count(tfds_dir, tmp_path):
  # This pytest process has 1 CPU device.
  _expect_train_error(tiny_config(tfds_dir, **{"mesh.data": 2}), tmp_path / "w",
                      "mesh", "must equal the 1 available devices")


def test_train_refuses_rules_for_unknown_logical_axes(tfds_dir, tmp_path):
  rules = tuple(config_lib.DEFAULT_LOGICAL_AXIS_RULES) + (("expert", "tensor"),)
  _expect_train_error(tiny_config(tfds_dir, logical_axis_rules=rules), tmp_path / "w",
                      "logical_axis_rules", "unknown logical axis 'expert'")


def _cli(args, devices):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  r = subprocess.run([sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py", *args],
                     cwd=REPO, capture_output=True, text=True, env=env)
  return r, [l for l in r.stderr.splitlines() if l.startswith("error:")]


def test_cli_batch_not_divisible_over_dcn_data_exits_2(tfds_dir, tmp_path):
  r, errors = _cli([f"--workdir={tmp_path / 'w'}", f"--config.tfds_data_dir={tfds_dir}",
                    *cli_overrides(TINY_CLI), "--config.global_batch_size=6",
                    "--config.mesh.dcn_data=2", "--config.mesh.data=2"], devices=4)
  assert r.returncode == 2, r.stderr[-2000:]
  assert errors == ["error: global_batch_size=6 is invalid: must be divisible by the 4 batch "
                    "shards of the mesh (dcn_data=2 x data=2 x fsdp=1)"]
  assert not os.path.exists(tmp_path / "w")


def test_cli_mesh_product_not_the_device_count_exits_2(tfds_dir, tmp_path):
  r, errors = _cli([f"--workdir={tmp_path / 'w'}", f"--config.tfds_data_dir={tfds_dir}",
                    "--config.mesh.dcn_data=2", "--config.mesh.data=3"], devices=4)
  assert r.returncode == 2, r.stderr[-2000:]
  assert errors == ["error: mesh={'dcn_data': 2, 'data': 3, 'fsdp': 1, 'tensor': 1} is invalid: "
                    "mesh.dcn_data * mesh.data * mesh.fsdp * mesh.tensor must equal the 4 "
                    "available devices"]
  assert not os.path.exists(tmp_path / "w")


_EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    from pausejax import train
    tfds_dir, out_dir, meshes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    for dcn, data, fsdp, tensor in meshes:
      c = tiny_config(tfds_dir, **{"mesh.dcn_data": dcn, "mesh.data": data, "mesh.fsdp": fsdp,
                                   "mesh.tensor": tensor})
      train.train_and_evaluate(c, f"{out_dir}/{dcn}x{data}x{fsdp}x{tensor}")
    """)


def _losses(path):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f]
  return {(l["step"], k): l[k] for l in lines for k in ("train_loss", "eval_loss") if k in l}


@pytest.mark.slow
def test_same_losses_on_any_mesh(tfds_dir, tmp_path):
  """(8,1,1), (2,2,2), (1,4,2) and dcn_data=2 x (2,2,1) on 8 CPU devices train like 1 device."""
  from pausejax import train
  train.train_and_evaluate(tiny_config(tfds_dir), str(tmp_path / "single"))
  reference = _losses(tmp_path / "single")
  meshes = [[1, 8, 1, 1], [1, 2, 2, 2], [1, 1, 4, 2], [2, 2, 2, 1]]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, tfds_dir, str(tmp_path),
                      json.dumps(meshes)], cwd=REPO, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  for mesh in meshes:
    losses = _losses(tmp_path / "x".join(map(str, mesh)))
    assert losses.keys() == reference.keys()
    for key, value in reference.items():
      assert losses[key] == pytest.approx(value, rel=1e-3), (mesh, key)


_SHARDINGS = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    import jax
    from flax import nnx
    from conftest import tiny_config
    from pausejax import config as config_lib, model as model_lib, sharding, step as step_lib
    c = tiny_config("unused", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    mesh = sharding.make_mesh(c.mesh)
    rules = sharding.rules_dict(c.logical_axis_rules)
    cfg = model_lib.ModelConfig.from_config(c.model, 8064)
    _, abstract = step_lib.abstract_model(cfg)
    shardings = sharding.named_shardings(step_lib.param_logical_specs(abstract), mesh, rules)
    init = lambda: nnx.to_pure_dict(nnx.state(model_lib.Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    params = jax.jit(init, out_shardings=shardings)()
    print(params["embed"].sharding.spec)
    print(params["blocks"][0]["attn"]["query"].sharding.spec)
    print(params["blocks"][0]["mlp"]["down"].sharding.spec)
    print(params["final_norm"]["scale"].sharding.spec)
    print(params["embed"].addressable_shards[0].data.shape)
    """)


def test_parameter_shardings_are_what_the_rules_say():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", _SHARDINGS], cwd=REPO, env=env, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()[-5:]
  assert lines == [
      str(P("tensor", "fsdp")),           # embed: (vocab, embed)
      str(P("fsdp", "tensor", None)),     # query: (embed, heads, kv)
      str(P("tensor", "fsdp")),           # down: (mlp, embed)
      str(P(None)),                       # norm scale: replicated
      "(4032, 32)",                                # 8064/2 vocab rows x 64/2 embed per device
  ]
