"""Downstream evaluation during training (`eval_tasks`): on the live parameters, at the right
steps, with exactly the numbers `pausejax.evaluate` gives for the run's checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_CLI, cli_overrides, tiny_config

# A tiny fine-tuning run on addition, scored on 8 held-out sums at steps 3 and 6. The learning
# rate is small so that the model stays near its random start and answers with many tokens
# (a model trained further answers EOS at once: "" == "" would be a weak comparison).
FINETUNE = {"task": "addition", "targets_len": 8, "num_train_steps": 6, "log_every_steps": 3,
            "eval_every_steps": 0, "checkpoint_every_steps": 6, "eval_tasks": "addition",
            "downstream_eval_every_steps": 3, "downstream_eval_max_examples": 8,
            "pause.num_finetune": 2, "optimizer.learning_rate": 1e-4}
METRIC = "downstream/addition/exact_match"


def _read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _texts(workdir):
  """{(step, tag): text} of the text summaries in the run's TensorBoard events."""
  import tensorflow as tf
  out = {}
  for path in sorted(workdir.glob("events.out.tfevents*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "text":
          out[(event.step, value.tag)] = value.tensor.string_val[0].decode()
  return out


@pytest.fixture(scope="module")
def finetuned(tfds_dir, tmp_path_factory):
  from pausejax import train
  workdir = tmp_path_factory.mktemp("downstream") / "run"
  info = train.train_and_evaluate(tiny_config(tfds_dir, **FINETUNE), str(workdir))
  return workdir, info


def test_rows_and_samples_at_the_right_steps(finetuned):
  workdir, info = finetuned
  rows = [r for r in _read(workdir) if any(k.startswith("downstream/") for k in r)]
  assert [r["step"] for r in rows] == [3, 6]
  assert all(set(r) == {"step", METRIC} for r in rows)
  assert all(0 <= r[METRIC] <= 100 for r in rows)
  assert info[METRIC] == rows[-1][METRIC]  # In the summary too.
  assert METRIC in (workdir / "summary.txt").read_text()
  assert not (workdir / "profile").exists()  # No trace unless profile.num_steps is set.
  assert info["time_split"]["downstream_eval"] > 0 and info["time_split"]["trace"] == 0
  texts = _texts(workdir)
  assert sorted(texts) == [(3, "downstream/addition/samples"), (6, "downstream/addition/samples")]
  table = texts[(6, "downstream/addition/samples")].splitlines()
  assert table[0] == "| input | target | prediction |" and len(table) == 2 + 5
  for line in table[2:]:  # Five held-out sums with their true answers.
    question, target = line.split(" | ")[:2]
    a, b = question.strip("| ").rstrip("=").split("+")
    assert target == str(int(a) + int(b))


def test_numbers_equal_the_evaluate_command_on_the_final_checkpoint(finetuned):
  """The step-6 number and predictions are what `pausejax.evaluate` gives for the checkpoint of
  step 6 with the same examples: the live parameters, the run's M_inf and position. The command
  shows its progress (forced: stderr is not a terminal here)."""
  from pausejax import downstream_eval
  workdir, _ = finetuned
  proc = subprocess.run(
      [sys.executable, "-m", "pausejax.evaluate", f"--workdir={workdir}", "--max_examples=8",
       "--batch_size=8", "--json", "--progress"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["task"] == "addition" and result["step"] == 6
  assert result["num_examples"] == 8 and result["num_pauses"] == 2  # M_inf = pause.num_finetune.
  logged = [r for r in _read(workdir) if r["step"] == 6 and METRIC in r][0]
  assert logged[METRIC] == result["metrics"]["exact_match"]
  assert all(s["prediction"] for s in result["samples"])  # Answers to compare, not "".
  assert _texts(workdir)[(6, "downstream/addition/samples")] == \
      downstream_eval.samples_markdown(result["samples"])
  progress = [line for line in proc.stderr.splitlines() if line.startswith("addition ")]
  assert progress and progress[-1].startswith("addition 8/8 examples | "), proc.stderr[-3000:]
  assert "ETA" in progress[-1]


def test_unknown_task_exits_2_and_writes_nothing(tfds_dir, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
       f"--config.tfds_data_dir={tfds_dir}", *cli_overrides(TINY_CLI),
       "--config.eval_tasks=addition,no_such_task"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: eval_tasks='no_such_task' is invalid: unknown downstream task; "
                         "registered: "), last
  assert "addition" in last and "squad_v1" in last
  assert not workdir.exists()


def test_bad_settings_and_several_processes_are_refused(tfds_dir, tmp_path, monkeypatch):
  import jax
  from pausejax import corpus, downstream_eval, specials, train
  from pausejax.errors import UsageError
  for key, message in [
      ("downstream_eval_every_steps", "downstream_eval_every_steps=-1 is invalid: a non-negative "
                                      "integer \\(0: at the last step only\\)"),
      ("downstream_eval_max_examples", "downstream_eval_max_examples=-1 is invalid")]:
    with pytest.raises(UsageError, match=message):
      train.train_and_evaluate(tiny_config(tfds_dir, **{key: -1}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  vocabulary = specials.load_vocabulary(corpus.DEFAULT_VOCAB_PATH)
  assert downstream_eval.for_training(tiny_config(tfds_dir), vocabulary) is None
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(UsageError, match="eval_tasks='addition' is invalid: '' on more than one "
                                       "process"):
    downstream_eval.for_training(tiny_config(tfds_dir, eval_tasks="addition"), vocabulary)


def test_eval_tasks_and_profile_may_change_on_resume(tfds_dir):
  from pausejax import config as config_lib
  saved = config_lib.flatten(tiny_config(tfds_dir))
  now = tiny_config(tfds_dir, eval_tasks="addition", downstream_eval_every_steps=5,
                    downstream_eval_max_examples=7,
                    **{"profile.start_step": 4, "profile.num_steps": 2})
  changed = config_lib.check_same_run(saved, now, "w")
  assert len(changed) == 5 and "eval_tasks: '' -> 'addition'" in changed
