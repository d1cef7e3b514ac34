"""Any registered seqio Task or Mixture as `task`: users' own tasks, mixtures, the pause-rate rule."""

import json
import os
import re
import sys
import textwrap

import numpy as np
import pytest
import seqio

from pausejax import data as data_lib
from pausejax import pause
from pausejax import registry

from conftest import tiny_config

# A task module as a user writes it: plain seqio, its own preprocessor, a plain SentencePiece
# vocabulary (pausejax adds the specials). Imported through `task_modules`, never by pausejax.
USER_MODULE = '''
import seqio
import tensorflow as tf
from pausejax import corpus

def note_lines(ds):
  """One example per document: its text, prefixed (the user's own preprocessing)."""
  return ds.map(lambda ex: {"targets": tf.strings.join(["note: ", ex["text"]])})

seqio.TaskRegistry.add(
    "user_notes",
    source=seqio.TfdsDataSource("pausejax_shakespeare:1.0.0"),
    preprocessors=[note_lines, seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
    output_features={"targets": seqio.Feature(seqio.SentencePieceVocabulary(
        corpus.DEFAULT_VOCAB_PATH))})
'''


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
  path = tmp_path_factory.mktemp("user")
  (path / "user_notes_tasks.py").write_text(USER_MODULE)
  sys.path.insert(0, str(path))
  yield "user_notes_tasks"
  sys.path.remove(str(path))


def _rows(config, num_batches, shard=0):
  data = data_lib.prepare(config)
  ds = data_lib.shard_dataset(data, config, shard, train=True, batch_size=8)
  return data, [{k: v.numpy() for k, v in b.items()} for b in ds.take(num_batches)]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return {(l["step"], k): v for l in lines for k, v in l.items()
          if k in ("train_loss", "eval_loss") or k.startswith("examples/")}


def _train_then_resume(config, tmp_path):
  """Losses of an uninterrupted run, and of the same run stopped half-way and resumed."""
  from pausejax import train
  steps = config.num_train_steps
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  half = config.copy_and_resolve_references()
  half.num_train_steps = steps // 2
  train.train_and_evaluate(half, str(tmp_path / "resumed"))
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  resumed = _losses(tmp_path / "resumed")
  del resumed[(steps // 2, "eval_loss")]  # The first part's final eval.
  return _losses(tmp_path / "whole"), resumed


def _short_run(tfds_dir, **overrides):
  return tiny_config(tfds_dir, num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=4,
                     log_every_steps=1, num_eval_steps=1, **overrides)


def test_users_seqio_task_trains_and_resumes_exactly_with_pauses(tfds_dir, tmp_path, user_module):
  config = _short_run(tfds_dir, task="user_notes", task_modules=user_module,
                      **{"pause.rate": 0.25})
  data, batches = _rows(config, 2)
  assert data.train.describe() == "user_notes (pause rate 0.25, set by pause.rate)"
  vocab = data.vocabulary
  assert vocab.pause_id == vocab.base_vocab_size  # The plain vocabulary got the specials.
  source = seqio.TfdsDataSource("pausejax_shakespeare:1.0.0", tfds_data_dir=tfds_dir)
  docs = {vocab.base.decode(vocab.encode("note: " + ex["text"].decode())[:8])
          for ex in source.get_dataset("train", shuffle=False).as_numpy_iterator()}
  for batch in batches:
    for targets, weights in zip(batch["decoder_target_tokens"], batch["decoder_loss_weights"]):
      n = int(np.sum(targets != 0))  # Unpacked documents, trimmed to seq_len, then padded.
      pauses = int(np.sum(targets == vocab.pause_id))
      # The user's preprocessor ran (real tokens are a prefixed document's first tokens), and
      # pausejax inserted about rate x n pauses (at most round(0.25 n), fewer after the trim).
      real = targets[(targets != vocab.pause_id) & (targets != 0)]
      assert vocab.base.decode(real[:8].tolist()) in docs
      assert 0 <= pauses <= pause.num_pauses(0.25, n)
      np.testing.assert_array_equal(weights, (targets != 0) & (targets != vocab.pause_id))
  assert sum(int(np.sum(b["decoder_target_tokens"] == vocab.pause_id)) for b in batches) > 0

  whole, resumed = _train_then_resume(config, tmp_path)
  assert whole == resumed and len(whole) == 5  # 4 train losses and the eval loss, bitwise.


def test_users_finetuning_task_gets_the_pauses_after_its_prompt(tfds_dir):
  from pausejax import corpus
  from pausejax import downstream
  seqio.TaskRegistry.remove("user_sums")
  vocab = seqio.SentencePieceVocabulary(corpus.DEFAULT_VOCAB_PATH)
  seqio.TaskRegistry.add(
      "user_sums", source=downstream.addition_source(num_train=64, num_validation=8),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"inputs": seqio.Feature(vocab, add_eos=False),
                       "targets": seqio.Feature(vocab)})
  config = tiny_config(tfds_dir, task="user_sums", **{"pause.num_finetune": 3})
  data, batches = _rows(config, 2)
  assert data.train.kind == registry.FINETUNING
  for batch in batches:
    for targets, weights in zip(batch["decoder_target_tokens"], batch["decoder_loss_weights"]):
      answer = int(np.argmax(weights))  # First position with loss: the answer's first token.
      assert list(targets[answer - 3:answer]) == [data.pause_id] * 3
      a, b = map(int, vocab.decode(targets[:answer - 3].tolist()).rstrip("=").split("+"))
      assert vocab.decode(targets[answer:][weights[answer:] > 0].tolist()) == str(a + b)


def test_rate_from_config_is_the_same_stream_as_the_pause_task(tfds_dir):
  """`shakespeare` with pause.rate 0.1 and `shakespeare_pause` (the task's rate): one stream."""
  data, by_config = _rows(tiny_config(tfds_dir, task="shakespeare", **{"pause.rate": 0.1}), 3)
  _, by_task = _rows(tiny_config(tfds_dir, task="shakespeare_pause"), 3)
  _, none = _rows(tiny_config(tfds_dir, task="shakespeare"), 3)
  for a, b, c in zip(by_config, by_task, none):
    np.testing.assert_array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
    assert np.all(np.sum(a["decoder_target_tokens"] == data.pause_id, axis=1) > 0)
    assert not np.any(c["decoder_target_tokens"] == data.pause_id)  # No rate, no pause.


@pytest.fixture(scope="module")
def mixture():
  seqio.MixtureRegistry.remove("test_mix_3_1")
  seqio.MixtureRegistry.add("test_mix_3_1", [("shakespeare_pause", 3.0), ("addition_lm_pause", 1.0)])
  return "test_mix_3_1"


def test_mixture_gives_the_configured_proportions(tfds_dir, mixture):
  config = tiny_config(tfds_dir, task=mixture)
  data = data_lib.prepare(config)
  assert [(p.name, p.weight) for p in data.train.parts] == [("addition_lm_pause", 1.0),
                                                           ("shakespeare_pause", 3.0)]
  plan = data_lib.ShardPlan(1, (0,), 8)
  it = data_lib.train_iterator(data, config, plan)
  counts = np.zeros(2, np.int64)
  for _ in range(60):  # 480 rows.
    batch = next(it)
    rows = it.take_task_rows()
    counts += rows
    # The count is right row by row: addition rows are sums like "12+34=46", Shakespeare's not.
    texts = [data.vocabulary.render(t).replace("<pause>", "")
             for t in batch["decoder_target_tokens"]]
    assert sum(bool(re.search(r"\d+\+\d+=\d+", t)) for t in texts) == rows[0]
  # Expected 25 % addition; sd of the fraction over 480 rows is 2 %: allow 4 sd.
  assert abs(counts[0] / counts.sum() - 0.25) < 0.08, counts
  assert counts.sum() == 480


def test_mixture_resumes_exactly(tfds_dir, tmp_path, mixture):
  whole, resumed = _train_then_resume(_short_run(tfds_dir, task=mixture), tmp_path)
  assert whole == resumed
  # Per-task example counts are logged, 8 rows a step.
  for step in range(1, 5):
    assert whole[(step, "examples/addition_lm_pause")] + \
        whole[(step, "examples/shakespeare_pause")] == 8


def test_unknown_task_lists_registered_tasks_and_mixtures(tfds_dir):
  from pausejax.errors import UsageError
  with pytest.raises(UsageError) as e:
    data_lib.prepare(tiny_config(tfds_dir, task="no_such_task"))
  message = str(e.value)
  assert message.startswith("task='no_such_task' is invalid: a registered seqio Task (")
  for name in ("shakespeare_pause", "addition", "c4_pause", "shakespeare_addition_pause"):
    assert re.search(rf"\b{name}\b", message), name
  assert "--config.task_modules" in message


def test_a_vocabulary_pausejax_cannot_extend_is_one_error(tfds_dir):
  from pausejax.errors import UsageError
  seqio.TaskRegistry.remove("bytes_task")
  seqio.TaskRegistry.add(
      "bytes_task", source=seqio.TfdsDataSource("pausejax_shakespeare:1.0.0"),
      preprocessors=[seqio.preprocessors.tokenize],
      output_features={"targets": seqio.Feature(seqio.ByteVocabulary())})
  with pytest.raises(UsageError, match=r"^task bytes_task, feature 'targets' uses ByteVocabulary;"
                                       r" pausejax needs a seqio.SentencePieceVocabulary"):
    data_lib.prepare(tiny_config(tfds_dir, task="bytes_task"))


def test_vocab_path_contradicting_the_task_is_refused(tfds_dir, tmp_path):
  from pausejax.errors import UsageError
  other = tmp_path / "other.model"
  other.write_bytes(b"not used")
  with pytest.raises(UsageError, match=r"^vocab_path='.*other.model' is invalid: unset, or "):
    data_lib.prepare(tiny_config(tfds_dir, vocab_path=str(other)))


def test_missing_task_module_is_one_error(tfds_dir):
  from pausejax.errors import UsageError
  with pytest.raises(UsageError, match=r"^task_modules='no_such_module_xyz' is invalid"):
    registry.resolve(tiny_config(tfds_dir, task_modules="no_such_module_xyz"))



@pytest.mark.parametrize("content, message", [
    ('{"text": "fine"}\n' * 50 + '{"text": oops}\n',
     r"the training data cannot be read: .*lines.jsonl:51 is not JSON \("),
    ("", r"data shard 0 of 1 has no training examples"),
])
def test_unreadable_training_data_stops_the_run_with_one_line(tfds_dir, tmp_path, content,
                                                              message):
  from pausejax import tasks
  from pausejax import train
  from pausejax.errors import RunError
  path = tmp_path / "lines.jsonl"
  path.write_text(content)
  tasks.register_pretraining_task("test_lines", files={"train": str(path),
                                                      "validation": str(path)})
  with pytest.raises(RunError, match=f"^{message}") as e:
    train.train_and_evaluate(tiny_config(tfds_dir, task="test_lines"), str(tmp_path / "w"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w" / "checkpoints" / "0")

@pytest.mark.slow
def test_readme_own_corpus_examples_run_as_written(tfds_dir, tmp_path):
  """The README's my_tasks.py and its three commands, each shrunk by the tiny overrides."""
  import subprocess
  from conftest import REPO, TINY_CLI, cli_overrides
  readme = open(os.path.join(REPO, "README.md")).read()
  section = readme[readme.index("### Your own corpus"):readme.index("## Fine-tuning with pauses")]
  module = re.search(r"```python\n(# my_tasks.py\n.*?)```", section, re.S).group(1)
  (tmp_path / "my_tasks.py").write_text(module)
  commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
  env = {**os.environ, "PYTHONPATH": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  for i, command in enumerate(line for line in commands.splitlines() if line.strip()):
    argv = command.split()
    assert argv[:3] == ["python", "-m", "pausejax.train"], command
    argv = [sys.executable, *argv[1:]]
    argv = [f"--workdir={tmp_path / f'run{i}'}" if a.startswith("--workdir=") else a
            for a in argv]
    argv += cli_overrides({**TINY_CLI, "num_train_steps": 2, "eval_every_steps": 2,
                           "checkpoint_every_steps": 2, "num_eval_steps": 1})
    argv += [f"--config.tfds_data_dir={tfds_dir}"]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (command, proc.stderr[-3000:])
    task = re.search(r"--config\.task=(\S+)", command).group(1)
    assert f"| task {task}" in proc.stdout and "pause rate 0.1" in proc.stdout, proc.stdout
