"""Shared fixtures. Tests run on CPU only; multi-device tests start their own subprocesses."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _compilation_cache() -> None:
  """JAX's persistent compilation cache: one folder per pytest run, shared by its xdist workers
  and the commands they start (they inherit the variable).

  The tests build the same tiny programs again and again (each run, CLI and experiment cell
  traces its own step); compiling them dominates the suite's time on CPU. A cached executable
  is the one XLA would compile again, so results do not change; an entry read while another
  process is still writing it fails to load, which JAX reports as a warning and recompiles.
  Removed when the process that made it exits.
  """
  import atexit
  import shutil
  import tempfile
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # Set by the caller, or inherited from a parent.
    return
  path = tempfile.mkdtemp(prefix="pausejax-tests-jax-cache-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # Tiny programs too.


_compilation_cache()

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """The embedded corpus prepared once per test session."""
  from pausejax import corpus
  path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
  corpus.ensure_prepared(corpus.EMBEDDED_TFDS_NAME, path)
  return path


def tiny_config(tfds_dir: str, **overrides):
  """configs/tiny.py shrunk to seconds: 2 layers, d_model 64, seq_len 64."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.tfds_data_dir = tfds_dir
  c.seq_len = 64
  c.global_batch_size = 8
  c.num_train_steps = 12
  c.log_every_steps = 2
  c.eval_every_steps = 6
  c.num_eval_steps = 2
  c.checkpoint_every_steps = 6
  c.async_checkpointing = False
  c.optimizer.warmup_steps = 3
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 2
  c.model.head_dim = 32
  c.model.mlp_dim = 128
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def cli_overrides(config_overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in config_overrides.items()]


TINY_CLI = {
    "seq_len": 64, "global_batch_size": 8, "num_train_steps": 12, "log_every_steps": 2,
    "eval_every_steps": 6, "num_eval_steps": 2, "checkpoint_every_steps": 6,
    "optimizer.warmup_steps": 3, "model.num_layers": 2, "model.d_model": 64,
    "model.num_heads": 2, "model.head_dim": 32, "model.mlp_dim": 128,
}
