"""Sink pretraining, data side (pausejax.sinks): what every sequence starts with, and its loss."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio

from pausejax import data as data_lib
from pausejax import registry
from pausejax import sinks
from pausejax import tasks
from pausejax.errors import UsageError

from conftest import REPO
from conftest import tiny_config

L = 64


def _rows(config, num_batches=2):
  data = data_lib.prepare(config)
  ds = data_lib.shard_dataset(data, config, 0, train=True, batch_size=8)
  return data, [{k: v.numpy() for k, v in b.items()} for b in ds.take(num_batches)]


def test_sink_task_starts_every_chunk_with_sink_and_never_predicts_it(tfds_dir):
  """shakespeare_sink = <sink> + the first L - 1 tokens of each shakespeare chunk, fed as is."""
  data, sink_rows = _rows(tiny_config(tfds_dir, task="shakespeare_sink"))
  _, bos_rows = _rows(tiny_config(tfds_dir, task="shakespeare"))
  sink_id = data.vocabulary.sink_id
  assert data.train.start == sinks.SINK and data.train.start_ids == [sink_id]
  for s, b in zip(sink_rows, bos_rows):
    inputs, targets, weights = (s["decoder_input_tokens"], s["decoder_target_tokens"],
                                s["decoder_loss_weights"])
    assert inputs.shape == (8, L)
    assert np.all(inputs[:, 0] == sink_id) and np.sum(inputs == sink_id) == 8
    assert not np.any(targets == sink_id) and not np.any(weights[targets == sink_id])
    # The real tokens are the BOS run's chunk, one shorter; position i predicts token i + 1.
    np.testing.assert_array_equal(inputs[:, 1:], b["decoder_target_tokens"][:, :L - 1])
    np.testing.assert_array_equal(targets[:, :L - 1], inputs[:, 1:])
    assert np.all(weights[:, :L - 1] == 1) and np.all(weights[:, L - 1] == 0)
    assert np.all(b["decoder_input_tokens"][:, 0] == sinks.BOS_ID)  # The default: BOS.


def test_start_token_sink_from_config_is_the_sink_task(tfds_dir):
  _, by_config = _rows(tiny_config(tfds_dir, task="shakespeare", start_token="sink"))
  _, by_task = _rows(tiny_config(tfds_dir, task="shakespeare_sink"))
  for a, b in zip(by_config, by_task):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_start_token_none_feeds_the_chunk_as_it_is(tfds_dir):
  data, rows = _rows(tiny_config(tfds_dir, task="shakespeare", start_token="none"))
  _, bos_rows = _rows(tiny_config(tfds_dir, task="shakespeare"))
  assert data.train.start_ids == []
  for r, b in zip(rows, bos_rows):
    np.testing.assert_array_equal(r["decoder_input_tokens"], b["decoder_target_tokens"])
    assert len(set(r["decoder_input_tokens"][:, 0].tolist())) > 1  # No constant first token.
    assert np.all(r["decoder_loss_weights"][:, L - 1] == 0)


def test_pauses_go_after_the_sink(tfds_dir):
  data, rows = _rows(tiny_config(tfds_dir, task="shakespeare_sink", **{"pause.rate": 0.1}))
  count = 0
  for r in rows:
    inputs = r["decoder_input_tokens"]
    assert np.all(inputs[:, 0] == data.vocabulary.sink_id)
    count += int(np.sum(inputs == data.pause_id))
    assert not np.any(r["decoder_loss_weights"][r["decoder_target_tokens"] == data.pause_id])
  assert count > 0
  assert "start token sink" in data.train.describe()


def test_packed_sink_rows_start_each_segment_with_sink(tfds_dir):
  """A user's task of short examples, packed: every segment starts with <sink>."""
  from pausejax import corpus
  from pausejax import downstream
  seqio.TaskRegistry.remove("short_lines")
  vocab = seqio.SentencePieceVocabulary(corpus.DEFAULT_VOCAB_PATH)
  seqio.TaskRegistry.add(
      "short_lines", source=downstream.addition_source(num_train=64, num_validation=8),
      preprocessors=[lambda ds: ds.map(lambda ex: {"targets": ex["inputs"]}),
                     seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"targets": seqio.Feature(vocab)})
  data, rows = _rows(tiny_config(tfds_dir, task="short_lines", start_token="sink", pack=True), 1)
  row = rows[0]
  seg, pos = row["decoder_segment_ids"][0], row["decoder_positions"][0]
  inputs, targets = row["decoder_input_tokens"][0], row["decoder_target_tokens"][0]
  weights = row["decoder_loss_weights"][0]
  starts = np.flatnonzero((pos == 0) & (seg > 0))
  assert len(starts) > 2 and np.all(inputs[starts] == data.vocabulary.sink_id)
  ends = starts[1:] - 1  # The last token of a segment predicts nothing of the next one.
  assert np.all(weights[ends] == 0) and np.all(targets[ends] == 0)
  assert not np.any(targets == data.vocabulary.sink_id)


def test_finetuning_a_sink_model_starts_with_sink(tfds_dir):
  data, rows = _rows(tiny_config(tfds_dir, task="addition", start_token="sink",
                                 **{"pause.num_finetune": 2}), 1)
  assert data.train.start == sinks.SINK
  assert np.all(rows[0]["decoder_input_tokens"][:, 0] == data.vocabulary.sink_id)


def test_register_pretraining_task_with_sink(tmp_path):
  (tmp_path / "train.txt").write_text("one two three four five six seven\n\neight nine ten\n")
  (tmp_path / "val.txt").write_text("eleven twelve\n")
  task = tasks.register_pretraining_task(
      "my_sink_corpus", files={"train": str(tmp_path / "train.txt"),
                               "validation": str(tmp_path / "val.txt")}, sink=True)
  assert sinks.has_sink(task)
  chunk = next(task.get_dataset({"targets": 8}, split="train", shuffle=False,
                                use_cached=False).as_numpy_iterator())["targets"]
  assert chunk[0] == task.output_features["targets"].vocabulary.sink_id and len(chunk) == 8


@pytest.mark.parametrize("overrides, setting", [
    (dict(task="shakespeare_sink", start_token="bos"), "start_token"),
    (dict(task="addition", start_token="none"), "start_token"),
    (dict(task="shakespeare_sink", eval_task="shakespeare", start_token="sink"), None),
])
def test_start_token_set_twice_or_impossible_is_one_error(tfds_dir, overrides, setting):
  config = tiny_config(tfds_dir, **overrides)
  if setting is None:  # The eval task gets the sink the training task carries: no error.
    assert data_lib.prepare(config).eval.start == sinks.SINK
    return
  with pytest.raises(UsageError, match=setting):
    data_lib.prepare(config)


def test_eval_task_that_carries_a_sink_the_run_lacks_is_refused(tfds_dir):
  with pytest.raises(UsageError, match="start_token"):
    data_lib.prepare(tiny_config(tfds_dir, task="shakespeare", eval_task="shakespeare_sink"))


def test_start_token_of_a_run_is_read_without_data(tfds_dir):
  assert registry.start_token(tiny_config(tfds_dir, task="shakespeare_sink")) == sinks.SINK
  assert registry.start_token(tiny_config(tfds_dir, task="shakespeare")) == sinks.BOS
  assert registry.start_token(tiny_config(tfds_dir, task="addition", start_token="sink")) == "sink"


def _cli(module, args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True)


@pytest.mark.slow
def test_cli_bad_start_token_exits_2_with_one_line(tfds_dir, tmp_path):
  r = _cli("pausejax.train", ["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                              f"--config.tfds_data_dir={tfds_dir}",
                              "--config.task=shakespeare_sink", "--config.start_token=none"])
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "start_token=none" in errors[0] and "shakespeare_sink" in errors[0]
  assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "w" / "checkpoints")
  from pausejax import config as config_lib
  with pytest.raises(UsageError, match="'bos', 'sink' or 'none'"):
    config_lib.validate(tiny_config(tfds_dir, start_token="first"))


def test_init_from_a_run_with_another_start_is_refused(tfds_dir, tmp_path):
  """Same shapes, other computation: fine-tuning a sink model without its sink is an error."""
  source = tmp_path / "pretrained"
  source.mkdir()
  saved = tiny_config(tfds_dir, task="shakespeare_sink")
  (source / "config.json").write_text(saved.to_json_best_effort())
  from pausejax import train
  config = tiny_config(tfds_dir, task="addition", init_from=str(source))
  with pytest.raises(UsageError, match="start_token.*'sink'"):
    train.train_and_evaluate(config, str(tmp_path / "ft"))
  assert not os.path.exists(tmp_path / "ft" / "checkpoints")


@pytest.mark.slow
def test_inspect_data_shows_the_sink(tfds_dir):
  r = _cli("pausejax.inspect_data", ["--config=configs/tiny.py", "--num_examples=1",
                                     f"--config.tfds_data_dir={tfds_dir}",
                                     "--config.task=shakespeare_sink"])
  assert r.returncode == 0, r.stderr[-2000:]
  assert "starts with <sink>" in r.stdout
  body = r.stdout.split("=" * 100)[2].strip()
  assert body.startswith("<sink>")
  # The JSON view: the model features as they are fed, <sink> (the id after <pause>) first.
  r = _cli("pausejax.inspect_data", ["--config=configs/tiny.py", "--num_examples=1", "--json",
                                     f"--config.tfds_data_dir={tfds_dir}",
                                     "--config.task=shakespeare_sink"])
  row = json.loads(r.stdout.splitlines()[0])
  assert row["decoder_input_tokens"][0] == row["pause_id"] + 1
