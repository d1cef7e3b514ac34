"""Meshes and logical-axis rules; the same training losses on any mesh of 8 simulated devices."""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from pausejax import config as config_lib
from pausejax import sharding
from pausejax.errors import UsageError

from conftest import REPO, tiny_config

RULES = sharding.rules_dict(config_lib.DEFAULT_LOGICAL_AXIS_RULES)


def _mesh_config(data, fsdp, tensor):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def test_mesh_shape_fills_minus_one_and_checks_the_product():
  assert sharding.mesh_shape(_mesh_config(-1, 2, 2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(_mesh_config(1, -1, 2), 8) == (1, 4, 2)
  with pytest.raises(UsageError, match="must equal the 8 available devices"):
    sharding.mesh_shape(_mesh_config(2, 2, 1), 8)
  with pytest.raises(UsageError, match="divide"):
    sharding.mesh_shape(_mesh_config(-1, 3, 1), 8)


def test_logical_to_mesh_follows_the_rules():
  assert sharding.logical_to_mesh(("vocab", "embed"), RULES) == P("tensor", "fsdp")
  assert sharding.logical_to_mesh(("embed", "heads", "kv"), RULES) == P("fsdp", "tensor", None)
  assert sharding.logical_to_mesh(("norm",), RULES) == P(None)
  assert sharding.logical_to_mesh(("batch", "length"), RULES) == P(("data", "fsdp"), None)
  # A mesh axis is used at most once per array.
  assert sharding.logical_to_mesh(("mlp", "heads"), RULES) == P("tensor", None)


def test_unknown_logical_axis_and_unknown_mesh_axis_are_usage_errors():
  with pytest.raises(UsageError, match="no rule for logical axis 'experts'"):
    sharding.logical_to_mesh(("experts", "embed"), RULES)
  with pytest.raises(UsageError, match="mesh axes are data, fsdp, tensor"):
    sharding.rules_dict((("embed", "model"),))


_EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    from pausejax import train
    tfds_dir, out_dir, meshes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    for data, fsdp, tensor in meshes:
      c = tiny_config(tfds_dir, **{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
      train.train_and_evaluate(c, f"{out_dir}/{data}x{fsdp}x{tensor}")
    """)


def _losses(path):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f]
  return {(l["step"], k): l[k] for l in lines for k in ("train_loss", "eval_loss") if k in l}


@pytest.mark.slow
def test_same_losses_on_any_mesh(tfds_dir, tmp_path):
  """(8,1,1), (2,2,2) and (1,4,2) on 8 CPU devices train like 1 device (relative 1e-3)."""
  from pausejax import train
  train.train_and_evaluate(tiny_config(tfds_dir), str(tmp_path / "single"))
  reference = _losses(tmp_path / "single")
  meshes = [[8, 1, 1], [2, 2, 2], [1, 4, 2]]
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
