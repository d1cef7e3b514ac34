"""Humpback's data side and the pipeline's pieces, on tiny data (no model is trained here)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from pausejax import humpback_data as hd
from pausejax import humpback_world as world_lib
from pausejax.errors import UsageError


# ------------------------------------------------------------------------------------------------
# Score parsing: the paper's pattern, ratings 1..5.

@pytest.mark.parametrize("text,score", [
    ("Score: 5", 5),
    ("The answer is right.\nScore: 4", 4),
    ("score:3  \n", 3),            # Trailing space and newline are stripped first.
    ("Score:  1", 1),
    ("Score: 5 because it is right", None),  # Not at the end.
    ("Score: five", None),
    ("Rating: 5", None),
    ("", None),
    ("Score: 0", None),            # Out of range.
    ("Score: 6", None),
    ("Score: 45", None),
])
def test_parse_score(text, score):
  assert hd.parse_score(text) == score


def test_prompts_and_template_check():
  assert hd.forward_prompt("Do x", "TAG") == "TAG\nDo x\nAnswer:"
  assert hd.forward_prompt("Do x") == "Do x\nAnswer:"
  assert hd.backward_prompt("out") == "out\nInstruction:"
  prompt = hd.curation_prompt("Do x", "out")
  assert "Instruction: Do x" in prompt and prompt.endswith("Answer: out")
  hd.check_template("{instruction} -> {output}")
  with pytest.raises(UsageError, match="curate.template"):
    hd.check_template("only {instruction}")
  with pytest.raises(UsageError, match="curate.template"):
    hd.check_template("{instruction} {output} {other}")


# ------------------------------------------------------------------------------------------------
# Segment filters.

def _prose(n_words, seed):
  rng = np.random.default_rng(seed)
  return " ".join(f"w{rng.integers(10_000)}" for _ in range(n_words))


def test_segment_filter_counts_each_reason():
  base = _prose(60, 0)
  near = base.rsplit(" ", 1)[0] + " changed"  # One word of 60 differs: Jaccard ~0.93.
  texts = [
      base,                                # kept
      "short",                             # too short
      _prose(400, 1),                      # too long
      base.upper().replace(" ", "  "),     # exact duplicate after normalising
      near,                                # near duplicate
      # Repetitive:
      "\n".join(["Home | About | Contact"] * 8 + ["something else here, long enough"]),
      _prose(60, 2),                       # kept
  ]
  f = hd.SegmentFilter(min_chars=20, max_chars=700, near_dup_jaccard=0.8,
                       max_repeated_fraction=0.3)
  kept, counts = f.apply(texts)
  assert kept == [texts[0], texts[6]]
  assert counts == {"segments": 7, "too_short": 1, "too_long": 1, "repetitive": 1,
                    "duplicate": 1, "near_duplicate": 1, "kept": 2}
  # Near-duplicate removal off (1.0): the changed copy stays.
  kept, counts = hd.SegmentFilter(min_chars=20, max_chars=700, near_dup_jaccard=1.0).apply(texts)
  assert near in kept and counts["near_duplicate"] == 0


def test_repeated_fraction():
  assert hd.repeated_fraction("a\nb\nc") == 0
  assert hd.repeated_fraction("a\na\na\nb") == pytest.approx(0.5)
  assert hd.repeated_fraction("One. One. Two.") == pytest.approx(1 / 3)


@pytest.mark.parametrize("kwargs,setting", [
    ({"min_chars": 0}, "filters.min_chars"),
    ({"min_chars": 10, "max_chars": 5}, "filters.max_chars"),
    ({"near_dup_jaccard": 0}, "filters.near_dup_jaccard"),
    ({"max_repeated_fraction": 1.5}, "filters.max_repeated_fraction"),
])
def test_segment_filter_settings_refused(kwargs, setting):
  with pytest.raises(UsageError, match=setting):
    hd.SegmentFilter(**kwargs).validate()


# ------------------------------------------------------------------------------------------------
# Files.

def test_read_pairs_names_file_and_line(tmp_path):
  path = tmp_path / "seed.jsonl"
  path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n')
  with pytest.raises(UsageError, match=f"{path}:3 needs non-empty string fields"):
    hd.read_pairs(str(path))
  path.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
  with pytest.raises(UsageError, match=f"{path}:2 is not JSON"):
    hd.read_pairs(str(path))
  path.write_text('{"instruction": " a ", "output": "b"}\n')
  assert hd.read_pairs(str(path)) == [{"instruction": "a", "output": "b"}]


def test_read_segments_plain_and_jsonl(tmp_path):
  plain = tmp_path / "web.txt"
  plain.write_text("First para\nstill first.\n\n\nSecond.\n  \nThird.\n")
  assert hd.read_segments(str(plain)) == ["First para\nstill first.", "Second.", "Third."]
  lines = tmp_path / "web.jsonl"
  lines.write_text('{"text": " one "}\n{"text": "two"}\n')
  assert hd.read_segments(str(lines)) == ["one", "two"]
  lines.write_text('{"text": "one"}\n{"body": "two"}\n')
  with pytest.raises(UsageError, match=f"{lines}:2 needs a string field"):
    hd.read_segments(str(lines))
  with pytest.raises(UsageError, match="no files match"):
    hd.read_segments(str(tmp_path / "missing.txt"))


def test_split_validation():
  pairs = [{"instruction": str(i), "output": str(i)} for i in range(10)]
  train, val = hd.split_validation(pairs, 3, seed=0)
  assert len(val) == 3 and len(train) == 7
  assert sorted(p["instruction"] for p in train + val) == sorted(str(i) for i in range(10))
  assert hd.split_validation(pairs, 3, seed=0) == (train, val)  # Deterministic.
  with pytest.raises(UsageError, match="seed_validation"):
    hd.split_validation(pairs, 10, seed=0)


# ------------------------------------------------------------------------------------------------
# Tasks: the backward view's loss is on the instruction only; tags reach the model's input.

def _first_examples(tfds_dir, task, n=2):
  from conftest import tiny_config
  from pausejax import data as data_lib
  config = tiny_config(tfds_dir, task=task, seq_len=64, targets_len=24)
  data = data_lib.prepare(config)
  ds = data_lib.shard_dataset(data, config, 0, train=False, batch_size=1)
  return data, [{k: v.numpy()[0] for k, v in b.items()} for b in ds.take(n)]


def _split(example):
  """(prompt ids, ids with loss) of a PrefixLM fine-tuning example."""
  tokens, weights = example["decoder_target_tokens"], example["decoder_loss_weights"]
  return tokens[weights == 0], tokens[weights > 0]


def test_backward_loss_on_instruction_and_tags_in_inputs(tmp_path, tfds_dir):
  from pausejax import corpus
  pairs = [{"instruction": "Sort the words: b a", "output": "a b"}] * 3
  train, val = str(tmp_path / "t.jsonl"), str(tmp_path / "v.jsonl")
  hd.write_jsonl(train, pairs)
  hd.write_jsonl(val, pairs)
  files = {"train": train, "validation": val}
  vocab = corpus.DEFAULT_VOCAB_PATH
  hd.register_pairs_task("t_backward", files, vocab_path=vocab, view=hd.BACKWARD)
  hd.register_pairs_task("t_forward", files, vocab_path=vocab, tag=hd.SEED_TAG)
  hd.register_pairs_task("t_web", files, vocab_path=vocab, tag=hd.WEB_TAG)

  data, (ex, _) = _first_examples(tfds_dir, "t_backward")
  v = data.vocabulary
  prompt, loss = _split(ex)
  assert v.decode([t for t in loss if t != v.eos_id]) == "Sort the words: b a"
  assert v.decode([t for t in prompt if t > 0]) == v.decode(v.encode("a b\nInstruction:"))
  assert loss[-1] == v.eos_id

  for task, tag in (("t_forward", hd.SEED_TAG), ("t_web", hd.WEB_TAG)):
    data, (ex, _) = _first_examples(tfds_dir, task)
    prompt, loss = _split(ex)
    text = v.decode([t for t in prompt if t > 0])
    assert text.startswith(tag.rstrip(".")) and "Sort the words: b a" in text
    assert v.decode([t for t in loss if t != v.eos_id]) == "a b"


def test_mixture_sizes():
  hd.register_mixture("t_mix", {"t_forward": 30, "t_web": 10, "t_backward": 0})
  import seqio
  mix = seqio.get_mixture_or_task("t_mix")
  assert sorted(t.name for t in mix.tasks) == ["t_forward", "t_web"]


# ------------------------------------------------------------------------------------------------
# The embedded world: its oracle and its files.

@pytest.fixture(scope="module")
def world():
  return world_lib.World()


def test_world_oracle_known_answers(world):
  assert world.correct("Sort the words: b c a", "a b c")
  assert not world.correct("Sort the words: b c a", "a c b")
  assert not world.correct("Sort the words: a", "a")  # One word: nothing to sort.
  assert not world.correct("Tell me a story", "a b c")
  assert world.correct("Count the words: to be or not", "4 words")
  assert not world.correct("Count the words: to be or not", "5 words")
  speaker, line, following = next(x for x in world.usable if x[2])
  assert world.correct(f"Who speaks the line: {line}", speaker)
  assert not world.correct(f"Who speaks the line: {line}", speaker + "X")
  assert world.correct(f"Give the line that follows: {line}", following)
  assert not world.correct(f"Give the line that follows: {line}", line)


def test_world_files(tmp_path, world):
  sizes = world_lib.Sizes(num_seed=30, num_ratings=10, num_pool=40, num_eval=20, seed=3)
  paths = world_lib.build(str(tmp_path / "a"), sizes, world_lib.DEMO_TEMPLATE)
  again = world_lib.build(str(tmp_path / "b"), sizes, world_lib.DEMO_TEMPLATE)
  for name in paths:  # Deterministic in the seed.
    assert open(paths[name]).read() == open(again[name]).read()
  seed = hd.read_pairs(paths["seed"])
  assert len(seed) == 40
  ratings = [p for p in seed if p["output"].startswith("Score:")]
  assert len(ratings) == 10 and {p["output"] for p in ratings} <= {"Score: 5", "Score: 2",
                                                                    "Score: 1"}
  assert all(world.correct(p["instruction"], p["output"]) for p in seed if p not in ratings)
  truth = hd.read_jsonl(paths["pool_truth"])
  assert len(truth) == 40 and sum(t["source"] == "distractor" for t in truth) == 16
  for t in truth:  # True answers are right for their instruction; distractors for none.
    assert world.correct(t["instruction"], t["text"]) == (t["source"] == "task")
  held_out = hd.read_jsonl(paths["eval"])
  assert all(world.correct(p["instruction"], p["output"]) for p in held_out)
  seen = {p["instruction"] for p in seed} | {t["instruction"] for t in truth}
  assert not seen & {p["instruction"] for p in held_out}


def test_curation_quality_known_answer():
  from pausejax import humpback
  good = {"instruction": "Sort the words: b a", "output": "a b"}
  bad = {"instruction": "Sort the words: b a", "output": "b a"}
  rows = [good | {"score": 5}, good | {"score": 3}, good | {"score": None},
          bad | {"score": 4}, bad | {"score": 1}]
  q = humpback.curation_quality(rows, threshold=4)
  assert q == {"correct_candidates": 3, "kept": 2, "precision": 0.5, "recall": 1 / 3}


# ------------------------------------------------------------------------------------------------
# Resumable batches: a run stopped part-way neither repeats nor loses a row.

def test_batches_resume_without_duplicates(tmp_path):
  from pausejax import humpback
  items = list(range(23))
  calls = []

  def fn(index, batch):
    calls.append(index)
    if stop_at is not None and index == stop_at:
      raise KeyboardInterrupt  # Killed while making this batch.
    return [{"item": i, "batch": index} for i in batch]

  stop_at = 3
  with pytest.raises(KeyboardInterrupt):
    humpback._in_batches(str(tmp_path / "run"), items, 5, fn, "t", "items")
  assert sorted(os.listdir(tmp_path / "run" / "parts")) == [f"{b:05d}.jsonl" for b in range(3)]
  stop_at, calls[:] = None, []
  rows = humpback._in_batches(str(tmp_path / "run"), items, 5, fn, "t", "items")
  assert calls == [3, 4]  # Only the missing batches are made.
  assert [r["item"] for r in rows] == items


# ------------------------------------------------------------------------------------------------
# The command: bad settings are refused with one line, exit 2, nothing written.

def _humpback(workdir, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "pausejax.humpback", f"--workdir={workdir}",
                         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("key,value,message", [
    ("curate.threshold", 7, "curate.threshold=7 is invalid: a rating in 1..5"),
    ("curate.method", "vote", "curate.method='vote' is invalid"),
    ("augment.top_p", 0.0, "augment.top_p=0.0 is invalid"),
    ("finetune.targets_len", 200, "finetune.targets_len=200 is invalid"),
    ("iterations", 0, "iterations=0 is invalid"),
    ("seed_file", "x.jsonl", "text_file='' is invalid: set both"),
    ("base", "/nonexistent/run", "base='/nonexistent/run' is invalid"),
    ("filters.max_chars", 2, "filters.max_chars=2 is invalid"),
])
def test_bad_settings_refused(key, value, message):
  from pausejax import humpback
  c = humpback.defaults()
  humpback._set(c, key, value)
  with pytest.raises(UsageError) as e:
    humpback.validate(humpback.resolve(c, quick=False))
  assert message in str(e.value)


@pytest.mark.parametrize("args,message", [
    (["--config.curate.threshold=7"], "curate.threshold=7 is invalid: a rating in 1..5"),
    (["--config.seed_file=SEED", "--config.text_file=TEXT"], "SEED:2 is not JSON"),
])
def test_bad_input_exit_2_nothing_written(tmp_path, args, message):
  seed = tmp_path / "seed.jsonl"
  seed.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
  text = tmp_path / "web.txt"
  text.write_text("some text\n")
  args = [a.replace("SEED", str(seed)).replace("TEXT", str(text)) for a in args]
  message = message.replace("SEED", str(seed))
  workdir = tmp_path / "run"
  result = _humpback(workdir, *args)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [ln for ln in result.stderr.splitlines() if message in ln]
  assert len(lines) == 1, result.stderr[-2000:]
  assert not workdir.exists()


def test_changed_settings_refused_on_rerun(tmp_path):
  from pausejax import humpback
  c = humpback.resolve(humpback.defaults(), quick=True)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / humpback.SETTINGS_FILE).write_text(c.to_json_best_effort())
  humpback._check_same(c, str(workdir))  # The same settings: fine.
  changed = humpback.resolve(humpback.defaults(), quick=True)
  changed.curate.threshold = 5
  with pytest.raises(UsageError, match=r"changed: curate.threshold"):
    humpback._check_same(changed, str(workdir))


def test_resolve_world_and_quick_defaults_yield_to_overrides():
  from pausejax import humpback
  c = humpback.defaults()
  c.finetune.steps = 7
  r = humpback.resolve(c, quick=True)
  assert r.finetune.steps == 7            # Set by the user: kept.
  assert r.finetune.batch_size == 4       # Quick.
  assert r.filters.min_chars == 3         # The embedded world's short segments.
  assert r.curate.template == world_lib.DEMO_TEMPLATE
  c.seed_file, c.text_file = "s.jsonl", "t.txt"
  r = humpback.resolve(c, quick=False)
  assert r.filters.min_chars == 600 and r.curate.template == hd.PAPER_TEMPLATE
