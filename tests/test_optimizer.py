"""Weight decay in pausejax.step.make_optimizer: on the kernels only, whatever the layer layout."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import optax
import pytest

from pausejax import config as config_lib
from pausejax import model as model_lib
from pausejax import sharding
from pausejax import step as step_lib

LAYERS = 2
MODEL = dict(vocab_size=128, num_layers=LAYERS, d_model=16, num_heads=2, head_dim=8, mlp_dim=32,
             tied_embeddings=False)
LR, WD = 0.1, 0.5
# Every parameter of MODEL, by its path in the unrolled layout.
KERNELS = {f"blocks/{i}/{name}" for i in range(LAYERS)
           for name in ("attn/query", "attn/key", "attn/value", "attn/out",
                        "mlp/gate", "mlp/up", "mlp/down")}
NOT_DECAYED = ({"embed", "unembed", "final_norm/scale"}
               | {f"blocks/{i}/{norm}/scale" for i in range(LAYERS)
                  for norm in ("attn_norm", "mlp_norm")})


def _optimizer_config() -> ml_collections.ConfigDict:
  # Constant learning rate LR from the first step on: no warmup, no decay.
  oc = config_lib.defaults().optimizer
  oc.learning_rate, oc.warmup_steps, oc.end_lr_ratio, oc.weight_decay = LR, 0, 1.0, WD
  return oc


def _train_state(scan_layers: bool):
  """(tx, schedule, initial train state) built as train.py builds them, on one device."""
  cfg = model_lib.ModelConfig(**MODEL, scan_layers=scan_layers)
  _, abstract_params = step_lib.abstract_model(cfg)
  specs = step_lib.param_logical_specs(abstract_params)
  tx, schedule = step_lib.make_optimizer(_optimizer_config(), 10, specs)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), sharding.MESH_AXES)
  rules = sharding.rules_dict(config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  init_state, _, _ = step_lib.make_state(cfg, tx, 0, sharding.named_shardings(specs, mesh, rules),
                                         mesh)
  return tx, schedule, init_state()


def _one_step(tx, state, grads):
  updates, _ = tx.update(grads, state["opt_state"], state["params"])
  return optax.apply_updates(state["params"], updates)


def _by_name(params, scan_layers: bool) -> dict[str, np.ndarray]:
  """{"blocks/0/attn/query": array, ...}: the unrolled layout's names, either layout's params."""
  if scan_layers:
    params = model_lib.unstack_layers(params)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in flat}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_applies_to_the_kernels_only(scan_layers):
  """With zero gradients AdamW's update is the decay alone: p <- p - lr * wd * p exactly where
  the mask is True, nothing elsewhere."""
  tx, schedule, state = _train_state(scan_layers)
  assert float(schedule(0)) == pytest.approx(LR)
  new = _by_name(_one_step(tx, state, jax.tree.map(np.zeros_like, state["params"])), scan_layers)
  old = _by_name(state["params"], scan_layers)
  assert set(old) == KERNELS | NOT_DECAYED
  decayed = {name for name in old if not np.array_equal(new[name], old[name])}
  assert decayed == KERNELS
  for name in KERNELS:
    np.testing.assert_allclose(new[name], old[name] * (1 - LR * WD), rtol=1e-6, err_msg=name)


def test_scanned_and_unrolled_layers_get_the_same_update():
  tx, _, unrolled = _train_state(scan_layers=False)
  scanned_tx, _, scanned = _train_state(scan_layers=True)
  # The same seed gives the same weights; the scanned ones are the unrolled ones stacked.
  jax.tree.map(np.testing.assert_array_equal, model_lib.unstack_layers(scanned["params"]),
               unrolled["params"])
  leaves, treedef = jax.tree.flatten(unrolled["params"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  want = _by_name(_one_step(tx, unrolled, grads), scan_layers=False)
  got = _by_name(_one_step(scanned_tx, scanned, model_lib.stack_layers(grads)), scan_layers=True)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
