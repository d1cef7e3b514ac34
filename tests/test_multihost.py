"""Several hosts on one machine: `launch/local.py` runs N processes joined by jax.distributed.

The end-to-end tests run the real `python -m pausejax.train` as 2 hosts x 2 CPU devices (what a
2-host pod runs) and compare it with 1 host x 4 devices: the same losses, each host reading its
own shard of the data (seen through the run's `debug_input_digests` record), and a checkpoint
written by 2 hosts resumed by 1.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, TINY_CLI, cli_overrides

# Small enough for minutes on 2 shared cores: 4 steps, a checkpoint every 2, one eval batch.
RUN = {**TINY_CLI, "num_train_steps": 4, "log_every_steps": 1, "eval_every_steps": 4,
       "num_eval_steps": 1, "checkpoint_every_steps": 2, "async_checkpointing": False,
       "debug_input_digests": True}


def _env(devices: int) -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
          "PYTHONPATH": REPO, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _train_argv(workdir, tfds_dir, **overrides) -> list[str]:
  return [sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.tfds_data_dir={tfds_dir}",
          *cli_overrides({**RUN, **overrides})]


def _on_hosts(num_processes: int, devices_per_process: int, argv: list[str]):
  """Runs argv as `num_processes` hosts through launch/local.py."""
  return subprocess.run(
      [sys.executable, "launch/local.py", f"--num_processes={num_processes}",
       f"--devices_per_process={devices_per_process}", "--", *argv],
      cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=1200)


def _on_one_host(devices: int, argv: list[str]):
  return subprocess.run(argv, cwd=REPO, env=_env(devices), capture_output=True, text=True,
                        timeout=1200)


def _losses(workdir) -> dict[tuple[int, str], float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f]
  return {(l["step"], k): l[k] for l in lines for k in ("train_loss", "eval_loss") if k in l}


def _assert_same_losses(got, want, steps=None):
  keys = {k for k in want if steps is None or k[0] in steps}
  assert keys and keys <= got.keys(), (sorted(got), sorted(keys))
  for key in sorted(keys):
    assert got[key] == pytest.approx(want[key], rel=1e-3), key


def _fed(workdir) -> dict[int, dict[int, list[list[str]]]]:
  """{process: {shard: [digests of the examples of each draw]}} from debug_input_digests."""
  out = {}
  for path in sorted(pathlib.Path(workdir, "input_digests").glob("process_*.jsonl")):
    for line in path.read_text().splitlines():
      record = json.loads(line)
      for shard, digests in record["shards"].items():
        out.setdefault(record["process"], {}).setdefault(int(shard), []).append(digests)
  return out


@pytest.fixture(scope="module")
def two_hosts(tfds_dir, tmp_path_factory):
  """The tiny config trained as 2 hosts x 2 devices (default data_shards: one per host)."""
  workdir = tmp_path_factory.mktemp("two_hosts") / "run"
  r = _on_hosts(2, 2, _train_argv(workdir, tfds_dir))
  assert r.returncode == 0, r.stderr[-4000:]
  return workdir


@pytest.mark.slow
def test_two_hosts_train_like_one_host_and_read_disjoint_shards(two_hosts, tfds_dir, tmp_path):
  one = tmp_path / "one_host"
  # One host reading the same 2 shards that the 2 hosts read one each.
  r = _on_one_host(4, _train_argv(one, tfds_dir, data_shards=2))
  assert r.returncode == 0, r.stderr[-4000:]
  _assert_same_losses(_losses(two_hosts), _losses(one))

  fed_two, fed_one = _fed(two_hosts), _fed(one)
  # Host i fed shard i only, 4 of the 8 rows of each of the 4 batches.
  assert {p: sorted(shards) for p, shards in fed_two.items()} == {0: [0], 1: [1]}
  for p in (0, 1):
    assert [len(d) for d in fed_two[p][p]] == [4] * 4
  examples = [{x for draw in fed_two[p][p] for x in draw} for p in (0, 1)]
  assert len(examples[0]) == 16 and len(examples[1]) == 16
  assert not examples[0] & examples[1]  # Disjoint data.
  # The single host fed exactly those examples, shard by shard and in the same order.
  assert fed_one == {0: {0: fed_two[0][0], 1: fed_two[1][1]}}


@pytest.mark.slow
def test_two_hosts_log_the_mixture_counts_of_the_whole_batch(tfds_dir, tmp_path):
  """Each host counts its own rows of each task; the logged counts are the global batch's."""
  mix = {"task": "shakespeare_addition_pause", "debug_input_digests": False}
  two, one = tmp_path / "two", tmp_path / "one"
  r = _on_hosts(2, 2, _train_argv(two, tfds_dir, **mix))
  assert r.returncode == 0, r.stderr[-4000:]
  r = _on_one_host(4, _train_argv(one, tfds_dir, data_shards=2, **mix))
  assert r.returncode == 0, r.stderr[-4000:]

  def counts(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [{k: v for k, v in json.loads(l).items() if k.startswith("examples/")} for l in f
              if "train_loss" in l]
  got = counts(two)
  assert got == counts(one) and len(got) == 4
  assert all(sum(c.values()) == 8 for c in got)  # Every row of each global batch, once.


def _resume_from_step_2(two_hosts, tmp_path) -> pathlib.Path:
  """A copy of the 2-host run as if it had stopped after its step-2 checkpoint."""
  workdir = tmp_path / "resumed"
  shutil.copytree(two_hosts, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  shutil.rmtree(workdir / "input_digests")
  return workdir


@pytest.mark.slow
def test_one_host_resumes_a_two_host_run_at_its_data_position(two_hosts, tfds_dir, tmp_path):
  workdir = _resume_from_step_2(two_hosts, tmp_path)
  r = _on_one_host(4, _train_argv(workdir, tfds_dir, data_shards=2))
  assert r.returncode == 0, r.stderr[-4000:]
  assert "Resumed from step 2" in r.stdout
  assert "data position not restored" not in r.stderr
  # Steps 3 and 4 and the final eval: exactly what the 2 hosts computed without stopping.
  _assert_same_losses(_losses(workdir), _losses(two_hosts), steps={3, 4})
  fed_two = _fed(two_hosts)
  assert _fed(workdir) == {0: {0: fed_two[0][0][2:], 1: fed_two[1][1][2:]}}


@pytest.mark.slow
def test_one_host_with_other_shards_restarts_the_data_with_a_warning(two_hosts, tfds_dir,
                                                                     tmp_path):
  workdir = _resume_from_step_2(two_hosts, tmp_path)
  r = _on_one_host(2, _train_argv(workdir, tfds_dir))  # data_shards=0: now 1 shard.
  assert r.returncode == 0, r.stderr[-4000:]
  assert "Resumed from step 2" in r.stdout
  (warning,) = [l for l in r.stderr.splitlines() if "data position not restored" in l]
  assert "2 data shard(s)" in warning and "1 data shard(s)" in warning
  assert "seen again" in warning and "data_shards" in warning
  losses = _losses(workdir)
  assert {s for s, _ in losses} == {1, 2, 3, 4}  # Trained on to the end.
  # Steps 3 and 4 came from the one shard (all 8 rows), not from the saved 2-shard positions.
  assert {p: {s: [len(d) for d in draws] for s, draws in shards.items()}
          for p, shards in _fed(workdir).items()} == {0: {0: [8, 8]}}


# ---------------------------------------------------------------------------------------------
# Stopping together and evaluating together.


def _children(pid: int) -> dict[int, int]:
  """{PAUSEJAX_PROCESS_ID: pid} of the processes that launch/local.py (pid) started."""
  out = {}
  for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                              text=True).stdout.split():
    environ = pathlib.Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
    for entry in environ:
      if entry.startswith(b"PAUSEJAX_PROCESS_ID="):
        out[int(entry.split(b"=")[1])] = int(child)
  return out


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_one_step_and_resumes_exactly(tfds_dir, tmp_path):
  """Preemption notice on host 1 only: both hosts stop at the same step and write one
  checkpoint together; the same command then finishes with the uninterrupted run's losses."""
  run = {"num_train_steps": 40, "checkpoint_every_steps": 100, "eval_every_steps": 40,
         "debug_input_digests": False}
  workdir = tmp_path / "stopped"
  argv = _train_argv(workdir, tfds_dir, **run)
  launcher = subprocess.Popen(
      [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=2", "--",
       *argv], cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 600
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
    time.sleep(0.2)
  os.kill(_children(launcher.pid)[1], signal.SIGTERM)
  out, err = launcher.communicate(timeout=600)
  assert launcher.returncode == 75, err[-4000:]  # Both stopped early (EXIT_STOPPED_EARLY).
  assert "stopping the others" not in err  # A stop before the last step is not a failure.
  stops = sorted(l for l in out.splitlines() if "Stopped at step" in l)
  assert len(stops) == 2 and stops[0].startswith("[p0]") and stops[1].startswith("[p1]"), out
  step = int(stops[0].split("Stopped at step ")[1].split()[0])
  assert stops[1] == stops[0].replace("[p0]", "[p1]") and 3 <= step < 40
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(step)]

  r = _on_hosts(2, 2, argv)
  assert r.returncode == 0, r.stderr[-4000:]
  assert f"Resumed from step {step}" in r.stdout
  reference = tmp_path / "reference"
  r = _on_hosts(2, 2, _train_argv(reference, tfds_dir, **run))
  assert r.returncode == 0, r.stderr[-4000:]
  assert _losses(workdir) == _losses(reference)


@pytest.mark.slow
def test_hosts_with_uneven_eval_shards_score_the_whole_split(tfds_dir, tmp_path):
  """num_eval_steps=0 on 2 hosts whose eval shards differ in length: every host runs the same
  number of eval steps (the shorter one feeds zero-weight rows), no deadlock, and the loss over
  the whole split equals one host's reading both shards."""
  from conftest import tiny_config
  from pausejax import data as data_lib
  config = tiny_config(tfds_dir, data_shards=2, num_eval_steps=0)
  data = data_lib.prepare(config)
  batches = [sum(1 for _ in data_lib.shard_dataset(data, config, s, train=False, batch_size=16))
             for s in (0, 1)]
  assert batches[0] != batches[1], batches  # The case under test: uneven shards.
  run = {"num_train_steps": 2, "eval_every_steps": 2, "num_eval_steps": 0,
         "debug_input_digests": False, "data_shards": 2, "global_batch_size": 32}
  two, one = tmp_path / "two", tmp_path / "one"
  r = _on_hosts(2, 2, _train_argv(two, tfds_dir, **run))
  assert r.returncode == 0, r.stderr[-4000:]
  r = _on_one_host(4, _train_argv(one, tfds_dir, **run))
  assert r.returncode == 0, r.stderr[-4000:]
  (two_eval,), (one_eval,) = ([l["eval_loss"] for l in _read(w) if "eval_loss" in l]
                              for w in (two, one))
  assert two_eval == pytest.approx(one_eval, rel=1e-5)


def _read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


# ---------------------------------------------------------------------------------------------
# Checkpoints alone (no training): written by 2 processes, read by 1.

_COMMON = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P
from pausejax import distributed
distributed.initialize()
import tensorflow as tf
from pausejax import checkpoint, data, sharding

def mesh(data_size, fsdp):
  return sharding.make_mesh(ml_collections.ConfigDict(
      {"dcn_data": 1, "data": data_size, "fsdp": fsdp, "tensor": 1}))

def state_on(m):
  shard = {"w": NamedSharding(m, P("data", "fsdp")), "b": NamedSharding(m, P(("data", "fsdp"))),
           "step": NamedSharding(m, P())}
  make = lambda: {"step": jnp.asarray(3, jnp.int32),
                  "params": {"w": jnp.arange(96, dtype=jnp.float32).reshape(8, 12) * 0.5,
                             "b": jnp.sin(jnp.arange(16, dtype=jnp.float32))}}
  out = {"step": shard["step"], "params": {"w": shard["w"], "b": shard["b"]}}
  return jax.jit(make, out_shardings=out)()

def pipeline(shard, num_shards):  # Batches of 2 from this shard of 0..999, shuffled.
  ds = tf.data.Dataset.range(1000).shard(num_shards, shard).shuffle(64, seed=3)
  return ds.map(lambda x: {"x": x}).batch(2).repeat()

def iterator(shards, num_shards):
  return data.ShardedIterator({s: iter(pipeline(s, num_shards)) for s in shards}, num_shards)
"""

_SAVE_ON_TWO = _COMMON + """
directory, p = sys.argv[1], jax.process_index()
state = state_on(mesh(2, 2))  # 4 devices, 2 per process: each process holds half of w and b.
assert len(state["params"]["w"].addressable_shards) == 2
it = iterator([p], 2)  # Process p reads shard p of 2.
for _ in range(3):
  next(it)
with checkpoint.Checkpointer(directory, keep=1, save_every_steps=1) as ckpt:
  ckpt.save(3, state, it)
with open(f"{directory}.next_{p}.json", "w") as f:
  json.dump([next(it)["x"].tolist() for _ in range(3)], f)
"""

_RESTORE_ON_ONE = _COMMON + """
directory = sys.argv[1]
assert jax.process_count() == 1 and jax.device_count() == 2
want = state_on(mesh(2, 1))  # Another mesh over fewer devices.
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        want)
with checkpoint.Checkpointer(directory, keep=1, save_every_steps=1) as ckpt:
  it = iterator([0, 1], 2)  # The same 2 shards, now both read here.
  got = ckpt.restore(3, abstract, it)
  assert ckpt.data_position_restored
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.sharding == b.sharding and np.asarray(a).tobytes() == np.asarray(b).tobytes()
  expected = [json.load(open(f"{directory}.next_{p}.json")) for p in (0, 1)]
  for i in range(3):
    assert next(it)["x"].tolist() == expected[0][i] + expected[1][i], i

  it = iterator([0], 1)  # One shard: positions of 2 cannot carry over.
  got = ckpt.restore(3, abstract, it)
  assert not ckpt.data_position_restored
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert next(it)["x"].tolist() == next(iterator([0], 1))["x"].tolist()  # From the start.
print("RESTORED_ON_ONE")
"""


@pytest.mark.slow
def test_checkpoint_of_two_processes_restores_on_one(tmp_path):
  """2 hosts save sharded arrays and their data shards' positions; 1 host restores them all."""
  directory = str(tmp_path / "ckpt")
  r = _on_hosts(2, 2, [sys.executable, "-c", textwrap.dedent(_SAVE_ON_TWO), directory])
  assert r.returncode == 0, r.stderr[-4000:]
  assert sorted(p.name for p in (tmp_path / "ckpt" / "3" / "data").glob("*.index")) == [
      "shard_00000_of_00002.index", "shard_00001_of_00002.index"]
  r = _on_one_host(2, [sys.executable, "-c", textwrap.dedent(_RESTORE_ON_ONE), directory])
  assert r.returncode == 0 and "RESTORED_ON_ONE" in r.stdout, r.stderr[-4000:]
  assert "data position not restored" in r.stderr  # The second restore said why.
