"""The run's saved config: written at the first start, guarding resumes, read back by readers."""

import json
import os
import shutil

import pytest

from conftest import tiny_config


def _train(config, workdir):
  from pausejax import train
  return train.train_and_evaluate(config, str(workdir))


def _snapshot(workdir):
  """{relative path: bytes} of every file under workdir."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


@pytest.fixture(scope="module")
def finished(tfds_dir, tmp_path_factory):
  """A finished 4-step run with M_ft settings that generate/evaluate must pick up."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  config = tiny_config(tfds_dir, num_train_steps=4, eval_every_steps=0, checkpoint_every_steps=2,
                       **{"pause.num_finetune": 3, "pause.position": "prepend", "seed": 7})
  _train(config, workdir)
  return config, workdir


def _copy(finished, tmp_path):
  config, workdir = finished
  target = tmp_path / "run"
  shutil.copytree(workdir, target)
  return config.copy_and_resolve_references(), target


def test_first_start_saves_the_resolved_config(finished):
  from pausejax import config as config_lib
  config, workdir = finished
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["seed"] == 7 and saved["model"]["d_model"] == 64
  # pause.rate stays unset: the task (shakespeare_pause) sets the rate.
  assert saved["pause"] == {"rate": None, "num_finetune": 3, "position": "prepend"}
  assert saved["data_shards"] == 1  # Resolved: data_shards=0 is one shard per process.
  resolved = config.copy_and_resolve_references()
  resolved.data_shards = 1
  assert config_lib.flatten(config_lib.from_saved(config_lib.flatten(saved))) == \
      config_lib.flatten(resolved)
  # Resuming with the shards it resolved to, or again with 0 ("one per process"), is the run.
  for shards in (0, 1):
    resolved.data_shards = shards
    config_lib.check_same_run(config_lib.flatten(saved), resolved, str(workdir))
  # And in TensorBoard's HParams tab.
  events = b"".join(p.read_bytes() for p in workdir.glob("events.out.tfevents*"))
  assert b"hparams" in events and b"model.d_model" in events and b"pause.num_finetune" in events


def test_resume_refuses_a_changed_setting_and_writes_nothing(finished, tmp_path):
  from pausejax.errors import UsageError
  config, workdir = _copy(finished, tmp_path)
  before = _snapshot(workdir)
  config.model.d_model = 128
  config.num_train_steps = 6
  with pytest.raises(UsageError) as e:
    _train(config, workdir)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("--config.model.d_model=128 differs from the run in")
  assert "which has 64" in message and "fresh --workdir" in message
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("key, value", [("seed", 8), ("pause.rate", 0.0), ("task", "shakespeare"),
                                        ("global_batch_size", 4), ("data_shards", 2)])
def test_every_setting_that_alters_the_run_is_refused(finished, tmp_path, key, value):
  from pausejax import config as config_lib
  from pausejax.errors import UsageError
  config, workdir = finished
  changed = config.copy_and_resolve_references()
  node = changed
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  saved = config_lib.load_saved(str(workdir))
  with pytest.raises(UsageError, match=rf"^--config\.{key}="):
    config_lib.check_same_run(saved, changed, str(workdir))


def test_resume_allows_more_steps_and_other_cadence(finished, tmp_path, capsys):
  config, workdir = _copy(finished, tmp_path)
  config.num_train_steps = 6
  config.log_every_steps = 1
  config.checkpoint_every_steps = 3
  info = _train(config, workdir)
  assert info["steps"] == 6 and info["steps_this_run"] == 2
  out = capsys.readouterr().out
  assert "Resumed from step 4 with changed settings:" in out
  assert "num_train_steps: 4 -> 6" in out
  assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == 6


def test_rerunning_a_finished_run_prints_its_summary_and_changes_nothing(finished, tmp_path,
                                                                          capsys):
  config, workdir = _copy(finished, tmp_path)
  summary = (workdir / "summary.txt").read_text()
  assert "run summary" in summary and "model params" in summary
  before = _snapshot(workdir)
  capsys.readouterr()
  info = _train(config, workdir)
  assert info["steps_this_run"] == 0
  assert summary in capsys.readouterr().out
  assert _snapshot(workdir) == before


def test_readers_take_the_runs_settings_from_config_json(finished):
  from pausejax import config as config_lib
  from pausejax import evaluate
  config, workdir = finished
  read = config_lib.for_reading(str(workdir), None)
  settings = evaluate.Settings.from_config(read)
  assert (settings.num_pauses, settings.pause_position) == (3, "prepend")
  assert read.seed == 7 and read.model.d_model == 64
  # Flags still override it.
  assert evaluate.Settings.from_config(read, num_pauses=0).num_pauses == 0


def test_readers_refuse_a_config_that_disagrees_with_the_run(finished, tfds_dir):
  """The config file again without the training overrides: M_ft would silently be 0."""
  from pausejax import config as config_lib
  from pausejax.errors import UsageError
  _, workdir = finished
  forgotten = tiny_config(tfds_dir, num_train_steps=4, **{"seed": 7, "pause.position": "prepend"})
  with pytest.raises(UsageError, match=r"^--config\.pause\.num_finetune=0 differs .* has 3 "
                     r".*leave out --config"):
    config_lib.for_reading(str(workdir), forgotten)


def test_readers_need_config_for_runs_without_config_json(tmp_path):
  from pausejax import config as config_lib
  from pausejax.errors import UsageError
  with pytest.raises(UsageError, match=r"^--config=None is invalid: .* has no config.json"):
    config_lib.for_reading(str(tmp_path), None)


def test_restore_model_reads_parameters_only(finished, tmp_path):
  """generate/evaluate restore the parameters without the optimizer state: a checkpoint whose
  optimizer state is of another optimizer (here: none at all) still loads."""
  import jax
  import numpy as np
  from flax import nnx
  from pausejax import build, checkpoint, specials
  from pausejax import config as config_lib
  from pausejax import data as data_lib
  config, workdir = finished
  config = config_lib.from_saved(config_lib.load_saved(str(workdir)))
  vocab = specials.load_vocabulary(data_lib.vocab_path(config))
  rows = specials.padded_vocab_size(vocab.vocab_size)
  run = build.build(config, rows, vocab.pause_id, training=False)
  params = checkpoint.load_params(str(workdir), run.abstract_params_tree)
  # A run directory whose one checkpoint holds {step, params} and no optimizer state.
  other = tmp_path / "params_only"
  with checkpoint.Checkpointer(str(other / "checkpoints"), keep=1, save_every_steps=1,
                               async_save=False) as ckpt:
    ckpt.save(4, {"step": np.int32(4), "params": params}, force=True)
  model, step = build.restore_model(config, str(other), rows, vocab.pause_id)
  assert step == 4
  got = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  for a, b in zip(got, jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
