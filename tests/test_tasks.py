"""pausejax's SeqIO tasks: registered tasks, the pause stream vs the standard stream, own files."""

import json

import numpy as np
import pytest
import seqio

from pausejax import pause
from pausejax import specials
from pausejax import tasks
from pausejax.errors import UsageError

from conftest import tiny_config

L = 64


def _chunks(task, n, tfds_dir=None, split="train", trim=True):
  ds = task.get_dataset({"targets": L}, split=split, shuffle=False, seed=7, use_cached=False,
                        try_in_mem_cache=False, trim_output_features=trim)
  return [x["targets"] for x in ds.take(n).as_numpy_iterator()]


def _vocab():
  from pausejax import corpus
  return specials.load_vocabulary(corpus.DEFAULT_VOCAB_PATH)


def _task(name, tfds_dir):
  """The registered task, reading its TFDS data from `tfds_dir` (as `tfds_data_dir` does)."""
  task = seqio.get_mixture_or_task(name)
  task.source.tfds_dataset.override_data_dir(tfds_dir)
  return task


def test_registered_tasks():
  names = set(seqio.TaskRegistry.names())
  assert {"shakespeare", "shakespeare_pause", "c4", "c4_pause", "addition_lm",
          "addition_lm_pause"} <= names
  assert pause.rate_of(seqio.get_mixture_or_task("shakespeare_pause")) == pytest.approx(0.1)
  assert pause.rate_of(seqio.get_mixture_or_task("c4")) == 0.0
  c4 = seqio.get_mixture_or_task("c4_pause")
  assert c4.source.tfds_dataset.name == "c4/en:3.1.0"
  assert specials.model_file(c4.output_features["targets"].vocabulary) == tasks.C4_VOCAB_PATH
  mix = seqio.get_mixture_or_task("shakespeare_addition_pause")
  assert {t.name: mix.get_rate(t) for t in mix.tasks} == {"shakespeare_pause": 9.0,
                                                         "addition_lm_pause": 1.0}


def test_pause_stream_is_standard_stream_with_pauses(tfds_dir, monkeypatch):
  """Chunk i of the pause task = chunk i of the standard task with pauses inserted and trimmed."""
  vocab = _vocab()
  std = _chunks(_task("shakespeare", tfds_dir), 20)
  paused = _chunks(_task("shakespeare_pause", tfds_dir), 20)
  assert all(len(c) == L for c in std + paused)
  for s, p in zip(std, paused):
    real = p[p != vocab.pause_id]
    assert len(real) < L  # Some pauses survived the trim.
    np.testing.assert_array_equal(real, s[:len(real)])  # Real tokens: a prefix, in order.

  # The same stream and seeds with the trim switched off shows the chunks before the trim.
  count = pause.num_pauses(0.1, L)
  assert count == 6  # round(0.1 * 64).
  untrimmed_insert = pause.insert_pauses
  monkeypatch.setattr(pause, "insert_pauses",
                      lambda *args, **kwargs: untrimmed_insert(*args, **{**kwargs, "trim": False}))
  untrimmed = _chunks(_task("shakespeare_pause", tfds_dir), 20, trim=False)
  assert len(untrimmed) == 20
  for s, p, u in zip(std, paused, untrimmed):
    assert len(u) == L + count
    assert np.sum(u == vocab.pause_id) == count  # Exactly `count` pauses inserted per chunk...
    np.testing.assert_array_equal(u[u != vocab.pause_id], s)  # ...among all L real tokens...
    np.testing.assert_array_equal(p, u[:L])  # ...then cut back to L,
    # so a chunk keeps exactly the pauses that did not land in the cut-off tail.
    assert np.sum(p == vocab.pause_id) == count - np.sum(u[L:] == vocab.pause_id)

  # Chunks are the concatenated stream: the documents in order, each ending in EOS, run across
  # chunk boundaries, and the 20 chunks are exactly the stream's first 20 * L tokens.
  source = seqio.TfdsDataSource("pausejax_shakespeare:1.0.0", tfds_data_dir=tfds_dir)
  stream = []
  for example in source.get_dataset("train", shuffle=False).as_numpy_iterator():
    stream += vocab.encode(example["text"].decode("utf-8")) + [vocab.eos_id]
    if len(stream) >= 20 * L:
      break
  np.testing.assert_array_equal(np.concatenate(std), stream[:20 * L])
  assert stream[:20 * L].count(vocab.eos_id) >= 1  # At least one document ends inside them.


def test_registered_task_decodes_with_visible_pauses(tfds_dir):
  vocab = _vocab()
  chunk = _chunks(_task("shakespeare_pause", tfds_dir), 1)[0]
  text = vocab.render(chunk)
  assert "<pause>" in text
  assert text.count("<pause>") == int(np.sum(chunk == vocab.pause_id))
  # Removing the markers leaves ordinary Shakespeare text.
  assert text.replace("<pause>", "").strip()


def test_register_task_from_own_text_and_jsonl_files(tmp_path):
  train = tmp_path / "train.txt"
  train.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog."
                               for i in range(40)))
  valid = tmp_path / "valid.jsonl"
  valid.write_text("\n".join(json.dumps({"body": f"Held-out line {i} of text."}) for i in range(30)))
  valid_txt = tmp_path / "valid.txt"
  valid_txt.write_text("Held-out document.")
  task = tasks.register_pretraining_task(
      "test_own_text_pause", files={"train": str(train), "validation": str(valid_txt)},
      pause_rate=0.25)
  assert seqio.get_mixture_or_task("test_own_text_pause") is task
  vocab = task.output_features["targets"].vocabulary
  chunks = _chunks(task, 3)
  assert all(len(c) == L and np.sum(c == vocab.pause_id) > 0 for c in chunks)
  assert "quick brown fox" in vocab.render(chunks[0]).replace("<pause>", "")

  jtask = tasks.register_pretraining_task(
      "test_own_jsonl", files={"train": str(valid), "validation": str(valid)}, text_key="body")
  text = jtask.output_features["targets"].vocabulary.render(_chunks(jtask, 1)[0])
  assert "Held-out line 0" in text and "<pause>" not in text


def test_register_task_rejects_bad_arguments(tmp_path):
  with pytest.raises(UsageError, match="pause_rate"):
    tasks.register_pretraining_task("bad", tfds_name="c4/en:3.1.0", pause_rate=1.5)
  with pytest.raises(ValueError, match="exactly one"):
    tasks.register_pretraining_task("bad", tfds_name="c4/en:3.1.0", files={"train": "x"})


def test_c4_task_end_to_end_on_fake_c4(tmp_path):
  """The real `c4/en:3.1.0` code path on a tiny dataset in C4's TFDS format (a stand-in for C4)."""
  from fake_c4 import write_fake_c4
  from pausejax import data as data_lib
  from pausejax import train

  texts = [f"Document {i}. " + "Pause tokens give a model more columns to think with. " * 20
           for i in range(24)]
  write_fake_c4(str(tmp_path / "tfds"), texts[:20], texts[20:])
  # c4_pause itself reads T5's vocabulary from GCS: the same task with the embedded one.
  tasks.register_pretraining_task("c4_pause_embedded_vocab", tfds_name="c4/en:3.1.0",
                                  pause_rate=tasks.PAUSE_RATE)
  config = tiny_config(str(tmp_path / "tfds"), task="c4_pause_embedded_vocab", num_train_steps=3,
                       eval_every_steps=0, log_every_steps=1, num_eval_steps=1,
                       global_batch_size=2)
  data = data_lib.prepare(config)
  batch = next(iter(data_lib.shard_dataset(data, config, 0, train=True,
                                           batch_size=config.global_batch_size)))
  targets = batch["decoder_target_tokens"].numpy()
  assert targets.shape == (2, L) and np.any(targets == data.pause_id)
  assert "Pause tokens give a model" in data.vocabulary.render(targets[0]).replace("<pause>", "")
  info = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert info["steps"] == 3 and info["final_eval"]["eval_loss"] > 0
