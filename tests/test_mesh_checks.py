"""sharding.check_shardable: a mesh axis that does not divide the parameter dimension it shards is
one UsageError line, not an IndivisibleError from inside jit. Real meshes of 8 CPU devices."""

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO

# Each case: config overrides (on tests/conftest.py's tiny_config) and optional logical axis
# rules replacing the defaults' rule for the same names. Prints one JSON line per case: the
# UsageError message, or "ok" once parameters really were created with those shardings.
_CASES = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import jax
    from flax import nnx
    from conftest import tiny_config
    from pausejax import model as model_lib, sharding, step as step_lib
    from pausejax.errors import UsageError
    for overrides, rules in json.loads(sys.argv[1]):
      c = tiny_config("unused", **overrides)
      replaced = dict(c.logical_axis_rules)
      replaced.update({name: tuple(t) if isinstance(t, list) else t for name, t in rules})
      mesh = sharding.make_mesh(c.mesh)
      rules = sharding.rules_dict(tuple(replaced.items()))
      cfg = model_lib.ModelConfig.from_config(c.model, 256)
      _, abstract_params = step_lib.abstract_model(cfg)
      specs = step_lib.param_logical_specs(abstract_params)
      try:
        sharding.check_shardable(abstract_params, specs, mesh, rules)
      except UsageError as e:
        print(json.dumps(str(e)))
        continue
      init = lambda: nnx.to_pure_dict(nnx.state(model_lib.Decoder(cfg, rngs=nnx.Rngs(0))))
      jax.jit(init, out_shardings=sharding.named_shardings(specs, mesh, rules))()
      print(json.dumps("ok"))
    """)


def _mesh(data, fsdp, tensor):
  return {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor}


CASES = [
    # tensor=2 over 3 heads.
    ({**_mesh(4, 1, 2), "model.num_heads": 3, "model.head_dim": 8}, []),
    # fsdp=4 over d_model=18.
    ({**_mesh(2, 4, 1), "model.d_model": 18}, []),
    # A stacked layers axis sharded over data: 3 layers on data=2.
    ({**_mesh(2, 2, 2), "model.num_layers": 3, "model.scan_layers": True}, [("layers", "data")]),
    # One dimension over two mesh axes: their product must divide it.
    ({**_mesh(2, 2, 2), "model.d_model": 18}, [("embed", ["fsdp", "tensor"])]),
    # Valid: everything divides (d_model 64, 2 heads of 32, mlp 128, vocab 256).
    (_mesh(2, 2, 2), []),
    ({**_mesh(1, 1, 8), "model.num_heads": 8, "model.head_dim": 8}, []),
]

EXPECTED = [
    "mesh.tensor=2 does not divide model.num_heads=3 (dimension 'heads' of parameter "
    "blocks/0/attn/key, shape (64, 3, 8)): use mesh.tensor in {1, 3}, or model.num_heads a "
    "multiple of 2",
    "mesh.fsdp=4 does not divide model.d_model=18 (dimension 'embed' of parameter "
    "blocks/0/attn/key, shape (18, 2, 32)): use mesh.fsdp in {1, 2, 3, 6}, or model.d_model a "
    "multiple of 4",
    "mesh.data=2 does not divide model.num_layers=3 (dimension 'layers' of parameter "
    "blocks/attn/key, shape (3, 64, 2, 32)): use mesh.data in {1, 3}, or model.num_layers a "
    "multiple of 2",
    "mesh.fsdp=2 x mesh.tensor=2 does not divide model.d_model=18 (dimension 'embed' of "
    "parameter blocks/0/attn/key, shape (18, 2, 32)): use mesh.fsdp * mesh.tensor in "
    "{1, 2, 3, 6}, or model.d_model a multiple of 4",
    "ok",
    "ok",
]


def test_indivisible_meshes_are_one_line_usage_errors_and_valid_ones_pass():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", _CASES, json.dumps(CASES)], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  results = [json.loads(line) for line in r.stdout.strip().splitlines()[-len(CASES):]]
  assert results == EXPECTED
