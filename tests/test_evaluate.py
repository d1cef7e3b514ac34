"""Tests for pausejax.downstream (task registration), pausejax.downstream_eval (SeqIO evaluation)
and the pausejax.evaluate command."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
import pytest

from conftest import REPO, TINY_CLI, cli_overrides, tiny_config
from pausejax import corpus
from pausejax import decode
from pausejax import downstream
from pausejax import downstream_eval
from pausejax import eval_metrics
from pausejax import model as model_lib
from pausejax import specials
from pausejax.errors import UsageError

FIXTURES = os.path.join(REPO, "tests", "fixtures")


def _fixture_task(kind: str, **kwargs) -> downstream.DownstreamRecipe:
  path = os.path.join(FIXTURES, f"{kind}.jsonl")
  return downstream.register_downstream_task(
      f"fixture_{kind}", kind=kind, files={"train": path, "validation": path}, **kwargs)


@pytest.fixture(scope="module")
def vocab():
  return specials.load_vocabulary(corpus.DEFAULT_VOCAB_PATH)


@pytest.fixture(scope="module")
def model(vocab):
  cfg = model_lib.ModelConfig(vocab_size=specials.padded_vocab_size(vocab.vocab_size),
                              num_layers=1, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
                              tied_embeddings=True)
  return model_lib.Decoder(cfg, rngs=nnx.Rngs(0))


def _rows(recipe, vocab, mode):
  task = recipe.build(vocab, mode=mode)
  ds = task.get_dataset(None, split=recipe.split(mode), shuffle=False)
  return list(ds.as_numpy_iterator())


_REF_LEN = 48
_forward = nnx.jit(lambda m, tokens_BxL: m(tokens_BxL))
_forward_prefix = nnx.jit(lambda m, tokens_BxL, prefix_BxL: m(tokens_BxL, prefix_BxL=prefix_BxL))


def _log_likelihoods(model, tokens, start, prefix_lm=False):
  """Reference: log p(tokens[start:] | tokens[:start]) and greedy flags, one full forward pass.

  Right-padded to one length (so it compiles once): causal, so padding changes nothing before it.
  With `prefix_lm`, tokens[:start] (BOS, prompt, pauses) attend to each other both ways.
  """
  padded = np.zeros((1, _REF_LEN), np.int32)
  padded[0, :len(tokens)] = tokens
  if prefix_lm:
    logits = _forward_prefix(model, padded, (np.arange(_REF_LEN) < start)[None].astype(np.int32))
  else:
    logits = _forward(model, padded)
  logits = np.asarray(logits)[0, :len(tokens)].astype(np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = [logp[p - 1, tokens[p]] for p in range(start, len(tokens))]
  greedy = all(int(np.argmax(logits[p - 1])) == tokens[p] for p in range(start, len(tokens)))
  return float(np.sum(picked)), greedy


# ----------------------------------------------------------------------------------------------
# Downstream tasks from the JSONL fixtures.

def test_generative_task_keeps_every_answer_for_eval_only(vocab):
  recipe = _fixture_task("generative")
  train, evaluation = _rows(recipe, vocab, "train"), _rows(recipe, vocab, "eval")
  assert [r["targets_pretokenized"] for r in train] == [
      b"Paris", b"William Shakespeare", b"8"]
  assert "answers" not in train[0]
  assert evaluation[0]["answers"].tolist() == [b"Paris", b"Paris, France"]
  for row in train + evaluation:  # Tokenized with the vocabulary; EOS on targets only.
    assert row["targets"].tolist() == vocab.encode(
        row["targets_pretokenized"].decode()) + [vocab.eos_id]
    assert row["inputs"].tolist() == vocab.encode(row["inputs_pretokenized"].decode())
  task = recipe.build(vocab, mode="eval")
  assert task.predict_metric_fns == [eval_metrics.exact_match, eval_metrics.f1]
  assert not task.score_metric_fns


def test_multiple_choice_expands_options_for_eval_only(vocab):
  recipe = _fixture_task("multiple_choice")
  train = _rows(recipe, vocab, "train")
  assert [r["targets_pretokenized"] for r in train] == [b"blue", b"on the stove", b"Juliet"]
  evaluation = _rows(recipe, vocab, "eval")
  assert len(evaluation) == 3 + 2 + 4
  assert [r["idx"].tolist() for r in evaluation[:4]] == [[0, 0], [0, 1], [0, 2], [1, 0]]
  assert [bool(r["is_correct"]) for r in evaluation] == [
      True, False, False, False, True, True, False, False, False]
  # Options are scored as they are: no EOS after them.
  assert evaluation[2]["targets"].tolist() == vocab.encode("made of cheese")
  task = recipe.build(vocab, mode="eval")
  assert task.score_metric_fns == [eval_metrics.mc_accuracy, eval_metrics.mc_accuracy_norm]


def test_last_word_splits_off_the_last_word(vocab):
  recipe = _fixture_task("last_word")
  rows = _rows(recipe, vocab, "eval")
  assert rows[0]["inputs_pretokenized"] == b"To be, or not to be, that is the"
  assert rows[0]["targets_pretokenized"] == b"question"
  assert rows[1]["targets"].tolist() == vocab.encode("York")  # No EOS when scored.
  assert _rows(recipe, vocab, "train")[1]["targets"].tolist()[-1] == vocab.eos_id


@pytest.mark.parametrize("line, message", [
    ({"inputs": "x", "options": ["a", "b"], "label": 2}, "label"),
    ({"inputs": "x", "options": ["a"], "label": 0}, "at least 2"),
    ({"inputs": "x", "choices": ["a", "b"], "label": 0}, "needs fields"),
])
def test_bad_jsonl_lines_are_usage_errors(tmp_path, vocab, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"inputs": "ok", "options": ["a", "b"], "label": 0}) + "\n"
                  + json.dumps(line) + "\n")
  recipe = downstream.register_downstream_task(
      "bad_mc", kind="multiple_choice", files={"train": str(path), "validation": str(path)})
  with pytest.raises(UsageError, match=f"bad.jsonl:2.*{message}"):
    _rows(recipe, vocab, "train")


def test_registration_checks_kind_and_metrics():
  path = os.path.join(FIXTURES, "generative.jsonl")
  files = {"train": path, "validation": path}
  with pytest.raises(UsageError, match="kind='ranking' is invalid"):
    downstream.register_downstream_task("x", kind="ranking", files=files)
  with pytest.raises(UsageError, match="metrics='mc_accuracy' is invalid"):
    downstream.register_downstream_task("x", kind="generative", files=files,
                                        metric_fns=["mc_accuracy"])
  with pytest.raises(UsageError, match="eval_task='nope' is invalid: unknown downstream task"):
    downstream.resolve("nope")


def test_addition_is_deterministic_correct_and_disjoint(vocab):
  recipe = downstream.resolve("addition")
  first = _rows(recipe, vocab, "eval")
  assert [r["inputs_pretokenized"] for r in first] == [
      r["inputs_pretokenized"] for r in _rows(recipe, vocab, "eval")]
  assert len(first) == 500
  for r in first:
    a, b = r["inputs_pretokenized"].decode().rstrip("=").split("+")
    assert r["targets_pretokenized"].decode() == str(int(a) + int(b))
    assert max(len(a), len(b)) <= 3
  source = recipe.make_source(None)  # Untokenized, in one batch: 20k examples.
  batch = next(source.get_dataset("train", shuffle=False).batch(50_000).as_numpy_iterator())
  train = set(batch["inputs"].tolist())
  assert len(train) == len(batch["inputs"]) == 20_000
  assert not train & {r["inputs_pretokenized"] for r in first}


def test_tfds_tasks_are_registered_and_unprepared_ones_stop_early(tmp_path, vocab):
  names = downstream.downstream_task_names()
  for name in ("squad_v1", "gsm8k", "piqa", "hellaswag", "lambada", "addition"):
    assert name in names
  settings = downstream_eval.Settings(tfds_data_dir=str(tmp_path))
  with pytest.raises(UsageError, match=r"squad/v1.1:3.0.0 is not prepared there.*tfds build"):
    downstream_eval.TaskEvaluation(downstream.resolve("squad_v1"), vocab, settings)
  assert not os.listdir(tmp_path)  # Nothing written.


# ----------------------------------------------------------------------------------------------
# Evaluation of a small random model: the results must match direct computation.

@pytest.mark.parametrize("position", ["append", "prepend"])
def test_multiple_choice_scores_match_a_full_forward_pass(model, vocab, position):
  recipe = _fixture_task("multiple_choice")
  m = 3
  evaluation = downstream_eval.TaskEvaluation(
      recipe, vocab, downstream_eval.Settings(num_pauses=m, pause_position=position,
                                              max_len=32, batch_size=4))
  result = evaluation.run(model)
  evaluation.close()
  pauses = [vocab.pause_id] * m
  rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "multiple_choice.jsonl"))]
  hits, hits_norm = [], []
  for row in rows:
    prompt = vocab.encode(row["inputs"])
    prompt = [0] + (prompt + pauses if position == "append" else pauses + prompt)
    scores = []
    for option in row["options"]:
      answer = vocab.encode(option)
      ll, _ = _log_likelihoods(model, prompt + answer, len(prompt))
      scores.append((ll, ll / len(answer)))
    hits.append(int(np.argmax([s for s, _ in scores])) == row["label"])
    hits_norm.append(int(np.argmax([s for _, s in scores])) == row["label"])
  assert result["metrics"] == {"mc_accuracy": pytest.approx(100 * np.mean(hits)),
                               "mc_accuracy_norm": pytest.approx(100 * np.mean(hits_norm))}
  assert result["num_examples"] == 3 and result["num_pauses"] == m


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_score_rows_match_reference(model, vocab, prefix_lm):
  """The jitted scorer against the numpy reference, row by row (stronger than accuracies)."""
  recipe = _fixture_task("last_word")
  evaluation = downstream_eval.TaskEvaluation(
      recipe, vocab, downstream_eval.Settings(num_pauses=2, max_len=40, prefix_lm=prefix_lm))
  model_ds = evaluation._evaluator.cached_model_datasets[evaluation._name]
  rows = dict(evaluation._score_fn(model, model_ds))
  evaluation.close()
  for example in evaluation.examples:
    prompt = [0] + example.inputs + [vocab.pause_id] * 2
    ll, greedy = _log_likelihoods(model, prompt + example.targets, len(prompt), prefix_lm)
    got = rows[example.index]
    assert got[0] == pytest.approx(ll, rel=1e-4, abs=1e-4)
    assert got[1] == len(example.targets) and got[2] == float(greedy)


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_generative_predictions_are_pause_aware_decodes(model, vocab, prefix_lm):
  recipe = _fixture_task("generative")
  result = downstream_eval.evaluate(model, "fixture_generative", vocab, num_pauses=4,
                                    max_len=48, max_new_tokens=5, batch_size=2,
                                    prefix_lm=prefix_lm)
  rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "generative.jsonl"))]
  prompts = [[0] + vocab.encode(r["inputs"]) for r in rows]
  gen = decode.generate(model, prompts, max_new_tokens=5, num_pauses=4,
                        pause_id=vocab.pause_id, eos_id=vocab.eos_id, max_len=48,
                        vocab_size=vocab.vocab_size, prefix_lm=prefix_lm)
  predictions = [vocab.decode(t) for t in gen.tokens]
  targets = [r["targets"] for r in rows]
  assert [s["prediction"] for s in result["samples"]] == predictions
  assert result["metrics"] == {
      "exact_match": pytest.approx(eval_metrics.exact_match(targets, predictions)["exact_match"]),
      "f1": pytest.approx(eval_metrics.f1(targets, predictions)["f1"])}
  assert "<pause>" not in "".join(predictions)
  assert recipe.kind == result["kind"] == "generative"


def test_metrics_can_be_chosen(model, vocab):
  _fixture_task("generative")
  result = downstream_eval.evaluate(model, "fixture_generative", vocab,
                                    metrics=("gsm8k_accuracy",), max_len=48, max_new_tokens=2)
  assert list(result["metrics"]) == ["gsm8k_accuracy"]


# ----------------------------------------------------------------------------------------------
# Known answers: predictors and scorers that are right (100 %) or wrong (0 %) on every example.

def _addition_answer(vocab, prompt, *, off_by: int = 0) -> list[int]:
  """The sum asked by a BOS + "a+b=" (+ pauses, either side) prompt, tokenized; plus `off_by`."""
  text = vocab.decode([t for t in prompt[1:] if t != vocab.pause_id])
  a, b = text.rstrip("=").split("+")
  return vocab.encode(str(int(a) + int(b) + off_by))


def _fake_generate(vocab, calls, off_by):
  """decode.generate replaced by an arithmetic oracle (off_by=0) or a wrong one."""

  def generate(model, prompts, *, num_pauses, **kwargs):
    calls.append({"num_pauses": num_pauses, "prompts": [list(p) for p in prompts], **kwargs})
    answers = [_addition_answer(vocab, p, off_by=off_by) for p in prompts]
    return decode.Generation(tokens=answers, raw_tokens=[a + [vocab.eos_id] for a in answers],
                             stopped_at_eos=[True] * len(answers),
                             inputs=[list(p) + [vocab.pause_id] * num_pauses for p in prompts])

  return generate


@pytest.mark.parametrize("position, off_by, expected", [
    ("append", 0, 100.0), ("prepend", 0, 100.0), ("append", 1, 0.0)])
def test_generative_metrics_of_a_perfect_and_a_wrong_predictor(model, vocab, monkeypatch,
                                                               position, off_by, expected):
  """Every answer right: exactly 100; every answer off by one: exactly 0 (one-word answers)."""
  calls = []
  monkeypatch.setattr(decode, "generate", _fake_generate(vocab, calls, off_by))
  result = downstream_eval.evaluate(model, "addition", vocab, num_pauses=3,
                                    pause_position=position, max_examples=10, batch_size=4,
                                    max_len=32)
  assert result["metrics"] == {"exact_match": expected}
  assert result["num_examples"] == 10
  # The prompts were BOS + the 10 first held-out questions, in batches of 4, with the pauses
  # where fine-tuning put them (decode.generate appends them itself).
  rows = _rows(downstream.resolve("addition"), vocab, "eval")[:10]
  pauses = [vocab.pause_id] * 3
  want = [[0] + ([] if position == "append" else pauses) + r["inputs"].tolist() for r in rows]
  assert [c["num_pauses"] for c in calls] == [3 if position == "append" else 0] * 3
  got = [p for c in calls for p in c["prompts"]]
  assert got[:10] == want and got[10:] == [want[8]] * 2  # The last batch is padded with its first.
  for sample in result["samples"]:
    a, b = sample["inputs"].rstrip("=").split("+")
    assert sample["prediction"] == str(int(a) + int(b) + off_by)
    assert (sample["prediction"] == sample["targets"]) == (off_by == 0)


def _fake_score(vocab, correct, right):
  """downstream_eval._score replaced: log-likelihood 0 for the `correct` continuation of a prompt
  and -1 per token for the others (`right`=False swaps the two); greedy flag 1 exactly when
  right."""

  def score(graphdef, state, tokens_BxS, start_B, count_B, vocab_size, *, prefix_lm):
    del graphdef, state, vocab_size, prefix_lm
    rows = []
    for tokens, start, count in zip(np.asarray(tokens_BxS), np.asarray(start_B),
                                    np.asarray(count_B)):
      prompt = vocab.decode([t for t in tokens[1:start].tolist() if t != vocab.pause_id])
      is_correct = vocab.decode(tokens[start:start + count].tolist()) == correct.get(prompt)
      good = is_correct == right
      rows.append([0.0 if good else -1.0 * count, count, float(good)])
    return np.asarray(rows, np.float32)

  return score


@pytest.mark.parametrize("right, expected", [(True, 100.0), (False, 0.0)])
def test_multiple_choice_metrics_of_a_perfect_and_a_wrong_scorer(model, vocab, monkeypatch,
                                                                 right, expected):
  """The labelled option scored best on every example: exactly 100; scored worst: exactly 0."""
  lines = [json.loads(line) for line in open(os.path.join(FIXTURES, "multiple_choice.jsonl"))]
  correct = {row["inputs"]: row["options"][row["label"]] for row in lines}
  monkeypatch.setattr(downstream_eval, "_score", _fake_score(vocab, correct, right))
  evaluation = downstream_eval.TaskEvaluation(
      _fixture_task("multiple_choice"), vocab,
      downstream_eval.Settings(num_pauses=2, max_len=32, batch_size=4))
  result = evaluation.run(model)
  evaluation.close()
  assert result["metrics"] == {"mc_accuracy": expected, "mc_accuracy_norm": expected}
  assert result["num_examples"] == 3


@pytest.mark.parametrize("right, expected", [(True, 100.0), (False, 0.0)])
def test_last_word_metric_of_a_perfect_and_a_wrong_scorer(model, vocab, monkeypatch, right,
                                                          expected):
  lines = [json.loads(line)["text"] for line in open(os.path.join(FIXTURES, "last_word.jsonl"))]
  correct = {text.rsplit(" ", 1)[0]: text.rsplit(" ", 1)[1] for text in lines}
  monkeypatch.setattr(downstream_eval, "_score", _fake_score(vocab, correct, right))
  _fixture_task("last_word")
  result = downstream_eval.evaluate(model, "fixture_last_word", vocab, num_pauses=1, max_len=40)
  assert result["metrics"] == {"last_word_accuracy": expected}


@pytest.mark.parametrize("settings, message", [
    (dict(num_pauses=-1), "num_pauses=-1 is invalid"),
    (dict(metrics=("bleu",)), "metrics='bleu' is invalid"),
    (dict(max_len=12, max_new_tokens=4), "max_len=12 is too small for example 0"),
    (dict(pause_position="middle"), "pause.position='middle' is invalid"),
])
def test_bad_settings_are_usage_errors(vocab, settings, message):
  _fixture_task("generative")
  with pytest.raises(UsageError, match=message):
    downstream_eval.TaskEvaluation(downstream.resolve("fixture_generative"), vocab,
                                   downstream_eval.Settings(**settings))


# ----------------------------------------------------------------------------------------------
# Progress: examples done / total, rate and ETA.

def test_progress_is_reported_after_every_batch(model, vocab, monkeypatch):
  monkeypatch.setattr(decode, "generate", _fake_generate(vocab, [], 0))
  evaluation = downstream_eval.TaskEvaluation(
      downstream.resolve("addition"), vocab,
      downstream_eval.Settings(max_examples=10, batch_size=4, max_len=32))
  calls = []
  evaluation.run(model, progress=lambda done, total: calls.append((done, total)))
  evaluation.run(model)  # No callback: nothing is called.
  evaluation.close()
  assert calls == [(4, 10), (8, 10), (10, 10)] and evaluation.unit == "examples"


class _FakeClock:
  def __init__(self, times):
    self._times = iter(times)

  def __call__(self):
    return next(self._times)


def test_progress_rate_and_eta_leave_out_the_first_compiling_batch():
  from pausejax import metrics
  progress = metrics.Progress(500, clock=_FakeClock([30.0, 32.0, 34.0]))
  assert progress.line(16, "addition", "examples") == "addition 16/500 examples | ETA --"
  assert progress.line(48, "addition", "examples") == (
      "addition 48/500 examples | 16 examples/s | ETA 28s")
  assert progress.update(500) == (121.0, "0s")  # (500 - 16) / (34 - 30) s.


class _Stream(io.StringIO):
  def __init__(self, tty):
    super().__init__()
    self._tty = tty

  def isatty(self):
    return self._tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_line_is_rewritten_on_a_terminal(tty):
  from pausejax import evaluate
  stream = _Stream(tty)
  line = evaluate._ProgressLine("addition", "examples", stream)
  for done in (4, 8, 10):
    line(done, 10)
  text = stream.getvalue()
  assert text.endswith("\n") and "addition 10/10 examples | " in text
  if tty:  # One line, rewritten in place, ended once.
    assert text.count("\r") == 3 and text.count("\n") == 1
  else:  # The first update and the last; the others within 10 s of the first are left out.
    assert text.count("\n") == 2 and "\r" not in text and "addition 8/10" not in text


def test_evaluate_command_keeps_the_library_names():
  from pausejax import evaluate
  for name in ("Settings", "TaskEvaluation", "evaluate", "POSITIONS"):
    assert getattr(evaluate, name) is getattr(downstream_eval, name)


# ----------------------------------------------------------------------------------------------
# The command line, on a checkpoint of a randomly initialised model.

def _save_random_checkpoint(workdir, step=7):
  from pausejax import checkpoint, sharding
  from pausejax import step as step_lib
  config = tiny_config(str(workdir / "unused_tfds"))
  vocabulary = specials.load_vocabulary(corpus.DEFAULT_VOCAB_PATH)
  model_cfg = model_lib.ModelConfig.from_config(
      config.model, specials.padded_vocab_size(vocabulary.vocab_size))
  mesh = sharding.make_mesh(config.mesh)
  specs = step_lib.param_logical_specs(step_lib.abstract_model(model_cfg)[1])
  tx, _ = step_lib.make_optimizer(config.optimizer, config.num_train_steps, specs)
  init, _, shardings = step_lib.make_state(
      model_cfg, tx, config.seed,
      sharding.named_shardings(specs, mesh, sharding.rules_dict(config.logical_axis_rules)), mesh)
  state = jax.jit(init, out_shardings=shardings)()
  with checkpoint.Checkpointer(workdir / "checkpoints", keep=1, save_every_steps=1,
                               async_save=False) as ckpt:
    ckpt.save(step, state, force=True)


def _evaluate_cli(workdir, *extra):
  cmd = [sys.executable, "-m", "pausejax.evaluate", "--config=configs/tiny.py",
         f"--workdir={workdir}", *cli_overrides(TINY_CLI), *extra]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def random_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("random_run")
  _save_random_checkpoint(workdir)
  # A save killed half-way: a read-only reader must leave it alone.
  os.makedirs(workdir / "checkpoints" / "9.orbax-checkpoint-tmp-123")
  return workdir


@pytest.mark.slow
def test_cli_writes_results_and_leaves_checkpoints_alone(random_workdir):
  before = sorted(os.listdir(random_workdir / "checkpoints"))
  proc = _evaluate_cli(random_workdir, "--eval_task=addition", "--num_pauses=3",
                       "--max_examples=6", "--batch_size=4", "--json")
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  with open(random_workdir / "eval_addition.json") as f:
    written = json.load(f)
  assert printed == written
  assert written["task"] == "addition" and written["step"] == 7
  assert written["num_examples"] == 6 and written["num_pauses"] == 3
  assert set(written["metrics"]) == {"exact_match"}
  assert len(written["samples"]) == 5
  assert sorted(os.listdir(random_workdir / "checkpoints")) == before
  # Every number and prediction is what the library gives for the same checkpoint and settings.
  from pausejax import build
  config = tiny_config(str(random_workdir / "unused_tfds"))
  vocabulary = specials.load_vocabulary(corpus.DEFAULT_VOCAB_PATH)
  model, step = build.restore_model(config, str(random_workdir),
                                    specials.padded_vocab_size(vocabulary.vocab_size),
                                    vocabulary.pause_id)
  expected = downstream_eval.evaluate(model, "addition", vocabulary, num_pauses=3,
                                      max_examples=6, batch_size=4, max_len=config.seq_len)
  assert step == 7 and written == {**expected, "step": 7}


# The library raises UsageError for each of these (tests above); here the CLI turns them into
# exit code 2. One case runs by default, the rest with the slow tests (each starts a process).
@pytest.mark.parametrize("extra, message", [
    (["--eval_task=no_such_task"], "--eval_task='no_such_task' is invalid: unknown downstream"),
    pytest.param(["--eval_task=addition", "--metrics=bleu"], "--metrics='bleu' is invalid",
                 marks=pytest.mark.slow),
    pytest.param(["--eval_task=addition", "--num_pauses=-2"], "num_pauses=-2 is invalid",
                 marks=pytest.mark.slow),
    pytest.param(["--eval_task=addition", "--max_len=8"], "max_len=8 is too small for example 0",
                 marks=pytest.mark.slow),
])
def test_cli_bad_input_exits_2(random_workdir, extra, message):
  proc = _evaluate_cli(random_workdir, *extra)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, proc.stderr[-3000:]


def test_cli_without_checkpoint_exits_2(tmp_path):
  proc = _evaluate_cli(tmp_path, "--eval_task=addition")
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --workdir=") and "no complete checkpoint" in last
  assert os.listdir(tmp_path) == []  # Nothing created.
