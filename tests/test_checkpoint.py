"""Tests for pausejax.checkpoint: round trips, policies, iterator position, crash safety."""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from pausejax import checkpoint
from pausejax.errors import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class _TinyModel(nnx.Module):

  def __init__(self, d_model: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(32, d_model, rngs=rngs)
    self.mlp = nnx.Linear(d_model, 2 * d_model, rngs=rngs)
    self.norm = nnx.RMSNorm(2 * d_model, rngs=rngs)


@functools.partial(jax.jit, static_argnames="d_model")  # One compile, not many eager ops.
def _train_state(step=1, d_model: int = 8) -> dict:
  """Params as a pure dict plus clip+adamw state after two updates; values depend on `step`."""
  params = nnx.state(_TinyModel(d_model, nnx.Rngs(0)), nnx.Param).to_pure_dict()
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
  opt_state = tx.init(params)
  for i in range(2):
    grads = jax.tree.map(lambda p: jnp.sin(p + step + i) + 0.1, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": opt_state}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _assert_bitwise_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert (x.shape, x.dtype) == (y.shape, y.dtype)
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _step_dirs(directory: pathlib.Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir())


def test_round_trip_of_params_and_optimizer_state_is_exact(tmp_path):
  state = _train_state(3)
  with checkpoint.Checkpointer(tmp_path / "ckpt", keep=3, save_every_steps=1) as ckpt:
    assert ckpt.save(3, state)
  with checkpoint.Checkpointer(tmp_path / "ckpt", keep=3, save_every_steps=1) as ckpt:
    assert ckpt.latest_step() == 3
    restored = ckpt.restore(3, _abstract(state))
  _assert_bitwise_equal(restored, state)
  # Namedtuples of the optimizer state come back as such, arrays on the requested sharding.
  assert type(restored["opt_state"][1][0]) is type(state["opt_state"][1][0])
  leaf = restored["params"]["mlp"]["kernel"]
  assert isinstance(leaf, jax.Array) and leaf.sharding == state["params"]["mlp"]["kernel"].sharding
  # The state must not be trivially equal to a fresh one (the test would prove nothing).
  assert not np.array_equal(restored["opt_state"][1][0].mu["embed"]["embedding"], 0)


@pytest.mark.parametrize("async_save", [True, False])
def test_keeps_only_the_newest_checkpoints(tmp_path, async_save):
  with checkpoint.Checkpointer(tmp_path, keep=2, save_every_steps=1,
                               async_save=async_save) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, _train_state(step))
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [4, 5]
    assert _step_dirs(tmp_path) == ["4", "5"]
    restored = ckpt.restore(None, _abstract(_train_state(4)))
  assert int(restored["step"]) == 5
  _assert_bitwise_equal(restored, _train_state(5))


def test_saves_every_n_steps_unless_forced(tmp_path):
  state = _train_state(1)
  with checkpoint.Checkpointer(tmp_path, keep=10, save_every_steps=3) as ckpt:
    saved = [ckpt.save(step, state) for step in range(1, 8)]
    assert saved == [False, False, True, False, False, True, False]
    assert ckpt.save(7, state, force=True)
    assert not ckpt.save(7, state, force=True)  # Already there: nothing to do, no error.
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 6, 7]


def test_bad_settings_are_usage_errors(tmp_path):
  with pytest.raises(UsageError, match="keep_checkpoints"):
    checkpoint.Checkpointer(tmp_path, keep=0, save_every_steps=1)
  with pytest.raises(UsageError, match="checkpoint_every_steps"):
    checkpoint.Checkpointer(tmp_path, keep=1, save_every_steps=0)


def _pipeline():
  import tensorflow as tf

  ds = tf.data.Dataset.range(100_000)
  ds = ds.shuffle(512, seed=7)
  ds = ds.map(lambda x: tf.stack([x, (x * x) % 101]), num_parallel_calls=4, deterministic=True)
  return ds.batch(8, drop_remainder=True).repeat().prefetch(4)


def test_data_iterator_resumes_on_exactly_the_next_batch(tmp_path):
  state = _train_state(1)
  it = iter(_pipeline())
  for _ in range(5):
    next(it)
  with checkpoint.Checkpointer(tmp_path, keep=2, save_every_steps=5) as ckpt:
    assert ckpt.save(5, state, it)  # Async: the loop goes on drawing batches right away.
    expected = [next(it).numpy() for _ in range(6)]
  assert (tmp_path / "5" / "data" / "process_0.index").exists()

  fresh = iter(_pipeline())
  assert not np.array_equal(next(fresh).numpy(), expected[0])  # Restoring must matter.
  resumed = iter(_pipeline())
  with checkpoint.Checkpointer(tmp_path, keep=2, save_every_steps=5) as ckpt:
    restored = ckpt.restore(5, _abstract(state), resumed)
  _assert_bitwise_equal(restored, state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed).numpy(), want)


def test_restoring_an_iterator_into_a_different_pipeline_is_a_usage_error(tmp_path):
  import tensorflow as tf

  state = _train_state(1)
  with checkpoint.Checkpointer(tmp_path, keep=1, save_every_steps=1) as ckpt:
    ckpt.save(1, state, iter(_pipeline()))
    ckpt.wait_until_finished()
    unshuffled = tf.data.Dataset.range(100).batch(8).repeat().prefetch(4)
    with pytest.raises(UsageError, match="does not fit this input pipeline") as e:
      ckpt.restore(1, _abstract(state), iter(unshuffled))
  assert "\n" not in str(e.value)


def test_restoring_an_iterator_from_a_checkpoint_without_one_is_a_usage_error(tmp_path):
  state = _train_state(1)
  with checkpoint.Checkpointer(tmp_path, keep=1, save_every_steps=1) as ckpt:
    ckpt.save(1, state)
    ckpt.wait_until_finished()
    with pytest.raises(UsageError, match="no data iterator position"):
      ckpt.restore(1, _abstract(state), iter(_pipeline()))


def _sharded(shards, num_shards):
  """A data.ShardedIterator over `shards` of a shuffled stream split into `num_shards`."""
  import tensorflow as tf
  from pausejax import data

  def shard(s):
    ds = tf.data.Dataset.range(10_000).shard(num_shards, s).shuffle(256, seed=5)
    return ds.map(lambda x: {"x": x, "y": x * x}).batch(4, drop_remainder=True).repeat()

  return data.ShardedIterator({s: iter(shard(s)) for s in shards}, num_shards)


def test_each_shard_position_is_restored_by_whichever_process_reads_it(tmp_path):
  state = _train_state(2)
  it = _sharded([0, 1, 2, 3], 4)  # One process reading all 4 shards...
  for _ in range(3):
    next(it)
  with checkpoint.Checkpointer(tmp_path, keep=1, save_every_steps=1) as ckpt:
    ckpt.save(3, state, it)
  expected = [next(it) for _ in range(4)]
  assert sorted(p.name for p in (tmp_path / "3" / "data").glob("*.index")) == [
      f"shard_{s:05d}_of_00004.index" for s in range(4)]

  # ... resumed as the second of 2 processes, which reads shards 2 and 3 (rows 8..15).
  resumed = _sharded([2, 3], 4)
  with checkpoint.Checkpointer(tmp_path, keep=1, save_every_steps=1) as ckpt:
    _assert_bitwise_equal(ckpt.restore(3, _abstract(state), resumed), state)
    assert ckpt.data_position_restored
  assert not np.array_equal(next(_sharded([2, 3], 4))["x"], expected[0]["x"][8:])
  for want in expected:
    got = next(resumed)
    for key in ("x", "y"):
      np.testing.assert_array_equal(got[key], want[key][8:])


def test_another_shard_count_restores_the_state_and_restarts_the_data(tmp_path, capsys):
  state = _train_state(2)
  it = _sharded([0, 1], 2)
  next(it)
  with checkpoint.Checkpointer(tmp_path, keep=1, save_every_steps=1) as ckpt:
    ckpt.save(1, state, it)
    ckpt.wait_until_finished()
    for other in (_sharded([0, 1, 2], 3), iter(_pipeline())):  # 3 shards; a plain iterator.
      _assert_bitwise_equal(ckpt.restore(1, _abstract(state), other), state)
      assert not ckpt.data_position_restored
      warning = capsys.readouterr().err
      assert "data position not restored" in warning and "2 data shard(s)" in warning
      assert "\n" not in warning.strip()
    # Left at the start: the same first batch as a fresh iterator.
    fresh, restarted = _sharded([0, 1, 2], 3), _sharded([0, 1, 2], 3)
    ckpt.restore(1, _abstract(state), restarted)
    np.testing.assert_array_equal(next(restarted)["x"], next(fresh)["x"])


def test_a_plain_iterator_saved_on_other_processes_restarts_with_a_warning(tmp_path, capsys):
  state = _train_state(1)
  with checkpoint.Checkpointer(tmp_path, keep=1, save_every_steps=1) as ckpt:
    ckpt.save(1, state, iter(_pipeline()))
    ckpt.wait_until_finished()
  # What a second process would have written next to process_0 (a copy, as a stand-in).
  data_dir = tmp_path / "1" / "data"
  for f in list(data_dir.glob("process_0.*")):
    (data_dir / f.name.replace("process_0", "process_1")).write_bytes(f.read_bytes())
  with checkpoint.Checkpointer(tmp_path, keep=1, save_every_steps=1) as ckpt:
    _assert_bitwise_equal(ckpt.restore(1, _abstract(state), iter(_pipeline())), state)
    assert not ckpt.data_position_restored
  assert "2 process(es) (one position each)" in capsys.readouterr().err


def test_check_compatible_names_the_first_mismatching_parameter(tmp_path):
  with checkpoint.Checkpointer(tmp_path, keep=1, save_every_steps=1) as ckpt:
    ckpt.check_compatible(_abstract(_train_state(1, d_model=8)))  # No checkpoint yet: fine.
    ckpt.save(1, _train_state(1, d_model=8))
    ckpt.wait_until_finished()
    ckpt.check_compatible(_abstract(_train_state(1, d_model=8)))

    with pytest.raises(UsageError) as e:
      ckpt.check_compatible(_abstract(_train_state(1, d_model=16)))
    message = str(e.value)
    assert "\n" not in message
    # Parameters are reported before the optimizer moments that mirror them.
    assert "params.embed.embedding has shape (32, 8) float32 in the checkpoint" in message
    assert "(32, 16) float32 in the config" in message
    assert "--workdir" in message and "model." in message

    # The same check guards restore, before any array is read.
    with pytest.raises(UsageError, match="params.embed.embedding"):
      ckpt.restore(1, _abstract(_train_state(1, d_model=16)))

    bigger = _train_state(1, d_model=8)
    bigger["params"]["head"] = {"kernel": jnp.zeros((8, 32))}
    with pytest.raises(UsageError, match="params.head.kernel is in the config but not in"):
      ckpt.check_compatible(_abstract(bigger))


def test_has_checkpoint_counts_only_complete_steps_and_creates_nothing(tmp_path):
  missing = tmp_path / "nothing_here"
  assert not checkpoint.has_checkpoint(missing)
  assert not missing.exists()
  (tmp_path / "run" / f"3{TMP_SUFFIX}" / "state").mkdir(parents=True)  # A killed first save.
  assert not checkpoint.has_checkpoint(tmp_path / "run")
  with checkpoint.Checkpointer(tmp_path / "run", keep=1, save_every_steps=1) as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(1, _train_state(1))
  assert checkpoint.has_checkpoint(tmp_path / "run")


def test_leftovers_of_an_unfinished_save_are_ignored_and_removed(tmp_path):
  state = _train_state(2)
  with checkpoint.Checkpointer(tmp_path, keep=3, save_every_steps=1) as ckpt:
    ckpt.save(2, state)
  # What a save killed half-way through step 4 leaves behind, plus an unrelated directory.
  partial = tmp_path / f"4{TMP_SUFFIX}" / f"state{TMP_SUFFIX}"
  partial.mkdir(parents=True)
  (partial / "garbage").write_bytes(b"\0" * 100)
  (tmp_path / "notes").mkdir()

  with checkpoint.Checkpointer(tmp_path, keep=3, save_every_steps=1) as ckpt:
    assert _step_dirs(tmp_path) == ["2", "notes"]
    assert ckpt.latest_step() == 2
    _assert_bitwise_equal(ckpt.restore(None, _abstract(state)), state)
    assert ckpt.save(4, _train_state(4))
  with checkpoint.Checkpointer(tmp_path, keep=3, save_every_steps=1) as ckpt:
    _assert_bitwise_equal(ckpt.restore(None, _abstract(_train_state(4))), _train_state(4))


def _run_python(code: str, *args: str, devices: int = 1, **popen_kwargs):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          cwd=REPO, **popen_kwargs)


_SAVE_FOREVER = """
  import sys
  import jax.numpy as jnp
  from pausejax import checkpoint

  def big_state(step):  # 32 MB; every value is a function of the step.
    base = jnp.arange(4 * 2**20, dtype=jnp.float32)
    return {"step": jnp.array(step, jnp.int32),
            "params": {"a": base + step, "b": (2 * base - step).reshape(2048, 2048)}}

  ckpt = checkpoint.Checkpointer(sys.argv[1], keep=2, save_every_steps=1)
  step = int(sys.argv[2])
  while True:
    ckpt.save(step, big_state(step))
    step += 1
"""


def _big_state(step):
  base = jnp.arange(4 * 2**20, dtype=jnp.float32)
  return {"step": jnp.array(step, jnp.int32),
          "params": {"a": base + step, "b": (2 * base - step).reshape(2048, 2048)}}


def _wait_for(condition, what: str, timeout_s: float = 120.0):
  deadline = time.monotonic() + timeout_s
  while not condition():
    if time.monotonic() > deadline:
      raise TimeoutError(f"timed out waiting for {what}")
    time.sleep(0.002)


def _tmp_dirs(directory: pathlib.Path) -> list[str]:
  return [p.name for p in directory.iterdir() if TMP_SUFFIX in p.name]


def _latest_on_disk(directory: pathlib.Path) -> int:
  return max(ocp.utils.checkpoint_steps(directory), default=0)  # Reads only; cleans nothing.


@pytest.mark.slow
def test_kill_9_during_save_leaves_the_latest_complete_step_restorable(tmp_path):
  directory = tmp_path / "ckpt"
  next_step, killed_mid_save = 1, []
  # Kill when a new save's temporary directory shows up and at later moments of that save,
  # and once right after a commit, when the oldest step is being deleted (keep=2).
  moments = [("save started", 0.0), ("save started", 0.03), ("save started", 0.1),
             ("save started", 0.25), ("step committed", 0.0)]
  for trigger, delay_s in moments:
    first = next_step
    proc = _run_python(_SAVE_FOREVER, str(directory), str(first),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      _wait_for(lambda: _latest_on_disk(directory) >= first, "the first committed checkpoint")
      if trigger == "save started":
        _wait_for(lambda: _tmp_dirs(directory), "the next save to start")
      else:
        _wait_for(lambda: _latest_on_disk(directory) >= first + 2, "two more commits")
      time.sleep(delay_s)
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    killed_mid_save.append(bool(_tmp_dirs(directory)))

    with checkpoint.Checkpointer(directory, keep=2, save_every_steps=1) as ckpt:
      assert not _tmp_dirs(directory)  # Cleaned on start.
      latest = ckpt.latest_step()
      assert latest is not None and latest >= first
      restored = ckpt.restore(latest, _abstract(_big_state(0)))
    _assert_bitwise_equal(restored, _big_state(latest))
    next_step = latest + 1
  # Kills really landed inside saves (they left temporary directories behind).
  assert sum(killed_mid_save) >= 3, killed_mid_save


_RESHARD = """
  import sys
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from pausejax import checkpoint

  devices = jax.devices()
  assert len(devices) == 4, devices
  mesh4 = Mesh(np.array(devices).reshape(2, 2), ("data", "model"))
  w = jnp.arange(8 * 12, dtype=jnp.float32).reshape(8, 12)
  b = jnp.arange(16, dtype=jnp.float32) * 0.5
  state = {"step": jnp.array(7, jnp.int32),
           "params": {"w": jax.device_put(w, NamedSharding(mesh4, P("data", "model"))),
                      "b": jax.device_put(b, NamedSharding(mesh4, P(("data", "model"))))}}
  assert len(state["params"]["w"].addressable_shards) == 4
  with checkpoint.Checkpointer(sys.argv[1], keep=1, save_every_steps=1) as ckpt:
    ckpt.save(7, state)

  mesh2 = Mesh(np.array(devices[:2]), ("x",))
  everywhere = NamedSharding(Mesh(np.array(devices), ("x",)), P())
  target = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=everywhere),
            "params": {
                "w": jax.ShapeDtypeStruct((8, 12), jnp.float32,
                                          sharding=NamedSharding(mesh2, P(None, "x"))),
                "b": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=everywhere)}}
  with checkpoint.Checkpointer(sys.argv[1], keep=1, save_every_steps=1) as ckpt:
    restored = ckpt.restore(7, target)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert got.sharding == want.sharding, (got.sharding, want.sharding)
  assert {s.device for s in restored["params"]["w"].addressable_shards} == set(devices[:2])
  assert restored["params"]["w"].addressable_shards[0].data.shape == (8, 6)
  np.testing.assert_array_equal(restored["params"]["w"], w)
  np.testing.assert_array_equal(restored["params"]["b"], b)
  assert int(restored["step"]) == 7
  print("RESHARD_OK")
"""


def test_restore_onto_a_different_mesh(tmp_path):
  proc = _run_python(_RESHARD, str(tmp_path / "ckpt"), devices=4,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "RESHARD_OK" in out, out[-3000:]


# ---------------------------------------------------------------------------------------------
# The real training run: a checkpoint of one mesh resumed on another, and on fewer devices.

_TRAIN = {"num_train_steps": 4, "log_every_steps": 1, "eval_every_steps": 4, "num_eval_steps": 1,
          "checkpoint_every_steps": 2}

_ACROSS_MESHES = """
  import json, shutil, sys
  sys.path.insert(0, "tests")
  import jax
  import numpy as np
  from conftest import tiny_config
  from pausejax import build, checkpoint, data as data_lib, specials, train

  tfds_dir, out, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

  def config(mesh):
    return tiny_config(tfds_dir, **settings, **{f"mesh.{k}": v for k, v in mesh.items()})

  def abstract_state(c):  # As train.train_and_evaluate builds it.
    vocab = data_lib.prepare(c).vocabulary
    return build.build(c, specials.padded_vocab_size(vocab.vocab_size),
                       vocab.pause_id).abstract_state

  def resume_from_step_2(source, target, c):
    shutil.copytree(source, target)
    shutil.rmtree(f"{target}/checkpoints/4")
    train.train_and_evaluate(c, target)

  on_222 = {"dcn_data": 1, "data": 2, "fsdp": 2, "tensor": 2}
  on_811 = {"dcn_data": 1, "data": 8, "fsdp": 1, "tensor": 1}
  if jax.device_count() == 8:
    train.train_and_evaluate(config(on_222), f"{out}/222")
    # The step-2 state read onto (8,1,1) and onto (2,2,2): the same numbers.
    with checkpoint.Checkpointer(f"{out}/222/checkpoints", keep=3, save_every_steps=2) as ckpt:
      a = ckpt.restore(2, abstract_state(config(on_811)))
      b = ckpt.restore(2, abstract_state(config(on_222)))
    assert a["params"]["embed"].sharding.mesh.shape["data"] == 8
    # (8,1,1) replicates the embedding; (2,2,2) splits it over fsdp and tensor.
    shard_shape = lambda x: x.addressable_shards[0].data.shape
    assert shard_shape(a["params"]["embed"]) == a["params"]["embed"].shape
    assert shard_shape(b["params"]["embed"]) != b["params"]["embed"].shape
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    resume_from_step_2(f"{out}/222", f"{out}/811", config(on_811))
  else:  # 4 devices, the default mesh (data=-1).
    resume_from_step_2(f"{out}/222", f"{out}/4dev", config({}))
  print("ACROSS_MESHES_OK")
"""


def _train_losses(workdir: pathlib.Path) -> dict:
  import json
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {(l["step"], k): l[k] for l in lines for k in ("train_loss", "eval_loss") if k in l}


@pytest.mark.slow
def test_training_resumes_on_another_mesh_and_on_fewer_devices(tfds_dir, tmp_path):
  """Saved on mesh (2,2,2) of 8 devices; resumed on (8,1,1) and on 4 devices: same losses."""
  import json
  for devices in (8, 4):
    proc = _run_python(_ACROSS_MESHES, tfds_dir, str(tmp_path), json.dumps(_TRAIN),
                       devices=devices, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0 and "ACROSS_MESHES_OK" in out, out[-4000:]
  reference = _train_losses(tmp_path / "222")
  for resumed in ("811", "4dev"):
    losses = _train_losses(tmp_path / resumed)
    assert losses.keys() == reference.keys()
    for key in [k for k in reference if k[0] > 2]:  # Computed after the restore.
      assert losses[key] == pytest.approx(reference[key], rel=1e-3), (resumed, key)
