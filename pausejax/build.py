"""One road from a config to a runnable model, shared by every command.

    run = build.build(config, vocab_rows, pause_id)            # train, bench, aot, tests
    run = build.build(config, vocab_rows, pause_id, training=False)   # generate, evaluate

mesh -> logical axis rules -> model config -> abstract model -> parameter shardings -> optimizer
-> train state (an init function, its shapes and its shardings). `train`, `generate`,
`evaluate`, `bench` and `aot` all build here, so a benchmark or an AOT compile measures exactly
the step that training runs, and a reader restores exactly the arrays that training saved.

Everything is checked against the mesh before any array exists: the batch (training) and every
parameter dimension that a mesh axis splits (`sharding.check_shardable`). No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
import ml_collections

from pausejax import model as model_lib
from pausejax import sequencematch
from pausejax import sharding
from pausejax import step as step_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Run:
  """A config's mesh, model, optimizer and train state, as shapes and shardings only."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  rules: dict[str, Any]
  batch_sharding: NamedSharding
  model_cfg: model_lib.ModelConfig  # Constrains activations to the mesh (training).
  graphdef: Any
  abstract_params: Any              # nnx.State of the parameters' shapes.
  param_specs: PyTree               # Logical PartitionSpecs, one per parameter.
  param_shardings: PyTree
  tx: Any                           # optax.GradientTransformation.
  schedule: Callable[[Any], Any]
  init_state: Callable[[], PyTree]  # () -> {"step", "params", "opt_state"}.
  abstract_state: PyTree            # ShapeDtypeStructs with their shardings.
  state_shardings: PyTree
  pause_id: int

  @property
  def replicated(self) -> NamedSharding:
    return self.state_shardings["step"]

  @property
  def abstract_params_tree(self) -> PyTree:
    """The parameters as a pure dict of sharded ShapeDtypeStructs (restore targets)."""
    return self.abstract_state["params"]

  @property
  def decode_model_cfg(self) -> model_lib.ModelConfig:
    """The model without activation constraints: decoding batches need not divide the mesh."""
    return dataclasses.replace(self.model_cfg, mesh=None, logical_axis_rules=None)

  def init(self) -> PyTree:
    """A freshly initialised train state, created directly in its shardings."""
    return jax.jit(self.init_state, out_shardings=self.state_shardings)()

  def train_step(self, *, skip_nonfinite: bool = False, eos_id: int = 1):
    """The jitted train step: (state, batch) -> (state, metrics); the state is donated.
    With `sequencematch.weight` > 0 it is SequenceMatch's (`sequencematch.py`)."""
    sm = sequencematch.Settings.from_config(self.config)
    if sm is not None:
      fn = sequencematch.make_train_step(self.graphdef, self.abstract_params, self.tx,
                                         self.schedule, self.pause_id, eos_id, sm,
                                         skip_nonfinite=skip_nonfinite)
    else:
      fn = step_lib.make_train_step(self.graphdef, self.abstract_params, self.tx, self.schedule,
                                    self.pause_id, self.config.get("microbatches", 1),
                                    skip_nonfinite=skip_nonfinite)
    return jax.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)

  def eval_step(self):
    """The jitted eval step: (params, batch) -> summed loss terms."""
    return jax.jit(step_lib.make_eval_step(self.graphdef, self.abstract_params),
                   in_shardings=(self.param_shardings, self.batch_sharding),
                   out_shardings=self.replicated)


def build(config: ml_collections.ConfigDict, vocab_rows: int, pause_id: int, *,
          devices: Sequence[Any] | None = None, training: bool = True) -> Run:
  """Builds `config`'s run over `devices` (default: every device of every process).

  `vocab_rows` is the embedding's row count (`specials.padded_vocab_size`). With `training`
  the global batch must split evenly over the mesh's batch axes; readers (generate, evaluate)
  skip that check. Raises UsageError, with one line naming the setting, before anything is
  allocated.
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_dict(config.logical_axis_rules)
  if training:
    sharding.check_batch_divisible(config.global_batch_size, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  # With the mesh and rules the model constrains its activations (split by batch, not by fsdp).
  model_cfg = model_lib.ModelConfig.from_config(config.model, vocab_rows, mesh=mesh,
                                                rules=config.logical_axis_rules)
  graphdef, abstract_params = step_lib.abstract_model(model_cfg)
  param_specs = step_lib.param_logical_specs(abstract_params)
  sharding.check_shardable(abstract_params, param_specs, mesh, rules)
  param_shardings = sharding.named_shardings(param_specs, mesh, rules)
  tx, schedule = step_lib.make_optimizer(config.optimizer, max(config.num_train_steps, 1),
                                         param_specs)
  sm = sequencematch.Settings.from_config(config) if training else None
  replay = None if sm is None else {
      k: (sm.buffer_size, config.seq_len) for k in sequencematch.REPLAY_KEYS}
  init_state, abstract_state, state_shardings = step_lib.make_state(
      model_cfg, tx, config.seed, param_shardings, mesh, replay)
  return Run(config=config, mesh=mesh, rules=rules, batch_sharding=batch_sharding,
             model_cfg=model_cfg, graphdef=graphdef, abstract_params=abstract_params,
             param_specs=param_specs, param_shardings=param_shardings, tx=tx,
             schedule=schedule, init_state=init_state, abstract_state=abstract_state,
             state_shardings=state_shardings, pause_id=pause_id)


def restore_model(config: ml_collections.ConfigDict, workdir: str, vocab_rows: int,
                  pause_id: int):
  """(model, step): the Decoder holding the parameters of the latest checkpoint of the run in
  `workdir`, for decoding and scoring. Reads parameters only (not the optimizer state), in the
  config's shardings; writes nothing, so a training run may still be writing there."""
  from pausejax import checkpoint  # Here: bench and aot need no Orbax.
  from pausejax import decode
  run = build(config, vocab_rows, pause_id, training=False)
  params, step = checkpoint.load_params_and_step(
      checkpoint.run_checkpoint_dir(workdir), run.abstract_params_tree, setting="--workdir")
  return decode.model_from_params(run.decode_model_cfg, params), step
