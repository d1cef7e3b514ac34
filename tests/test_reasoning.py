"""The reasoning corpus and its downstream tasks: answers recomputed here, held-out problems, the
registered tasks read through the registry, tokenization."""

import operator
import random
import re

import numpy as np
import pytest
import seqio

from pausejax import corpus
from pausejax import data as data_lib
from pausejax import downstream
from pausejax import pause
from pausejax import reasoning
from pausejax import specials
from pausejax.errors import UsageError

from conftest import tiny_config

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
NUM_DOCS = 1000  # Of each corpus split: about 7,000 problems each.

# ----------------------------------------------------------------------------------------------
# Answers recomputed from the prompt text alone.

_WORD_PROBLEMS = [
    (r"(\w+) has (\d+) (\w+) and buys (\d+) more\. How many \3 does \1 have\?",
     lambda m: int(m[2]) + int(m[4])),
    (r"(\w+) has (\d+) (\w+) and gives (\d+) to \w+\. How many \3 does \1 have\?",
     lambda m: int(m[2]) - int(m[4])),
    (r"(\w+) has (\d+) boxes with (\d+) (\w+) in each\. How many \4 does \1 have\?",
     lambda m: int(m[2]) * int(m[3])),
    (r"(\w+) has (\d+) (\w+), buys (\d+) more and gives (\d+) to \w+\. How many \3 does \1 have\?",
     lambda m: int(m[2]) + int(m[4]) - int(m[5])),
    (r"(\w+) has (\d+) boxes with (\d+) (\w+) in each and gives (\d+) away\. "
     r"How many \4 does \1 have\?", lambda m: int(m[2]) * int(m[3]) - int(m[5])),
    (r"(\w+) has (\d+) (\w+) and (\w+) has (\d+) more than \1\. "
     r"How many \3 do they have together\?", lambda m: 2 * int(m[2]) + int(m[5])),
]


def _items(text):
  return text.split(" ") if " " in text else list(text)


def _join(items, like):
  return (" " if " " in like else "").join(items)


def _chain_value(prompt):
  *bindings, query = prompt.split(";")
  env = {}
  for binding in bindings:  # "a=7", then "b=a+5", ...
    name, expr = binding.split("=")
    found = re.fullmatch(r"([a-z])([-+*])(\d+)", expr)
    env[name] = OPS[found[2]](env[found[1]], int(found[3])) if found else int(expr)
  return env[query.removesuffix("=?")]


def solve(prompt):
  """The answer to any prompt the generators write, computed here from the text alone."""
  if m := re.fullmatch(r"(\d+)([-+*])(\d+) =", prompt):
    return str(eval(f"{int(m[1])}{m[2]}{int(m[3])}"))
  if re.fullmatch(r"[a-z]=\d+(;[a-z]=[a-z][-+*]\d+)*;[a-z]=\?", prompt):
    return str(_chain_value(prompt))
  if m := re.fullmatch(r"sort (.+) =", prompt):
    return _join(sorted(_items(m[1])), m[1])
  if m := re.fullmatch(r"reverse (.+) =", prompt):
    return _join(list(reversed(_items(m[1]))), m[1])
  if m := re.fullmatch(r"max (\d+) =", prompt):
    return str(max(int(c) for c in m[1]))
  if m := re.fullmatch(r"count (\S+) in (.+) =", prompt):
    return str(_items(m[2]).count(m[1]))
  for pattern, answer in _WORD_PROBLEMS:
    if m := re.fullmatch(pattern, prompt):
      return str(answer(m))
  raise AssertionError(f"no solver for {prompt!r}")


def check_steps(p):
  """The worked steps are right and lead to the answer."""
  if m := re.fullmatch(r"(\d+)([-+*])(\d+) =", p.prompt):
    values = []
    for step in p.steps.split("; "):  # "4+8+1=13 carry 1", "13-8-1=4 borrow 1"
      expr, value = step.split(" ")[0].rsplit("=", 1)
      assert eval(expr) == int(value), p
      if " carry " in step:
        assert step.endswith(f" carry {int(value) // 10}") and int(value) >= 10, p
      values.append(int(value))
    assert len(values) == max(len(m[1]), len(m[3] if m[2] != "*" else "")), p
    if m[2] == "-":
      digits = "".join(str(v) for v in reversed(values))
    else:  # Schoolbook: the last column whole, the others' last digits.
      digits = str(values[-1]) + "".join(str(v % 10) for v in reversed(values[:-1]))
    assert int(digits) == int(p.answer), p
  elif m := re.fullmatch(r"(sort|reverse|max|count \S+ in) (.+) =", p.prompt):
    op, items, got = m[1].split(" "), _items(m[2]), p.steps.split(", ")
    for i, step in enumerate(got, 1):
      part = items[:i]
      if op[0] == "sort":  # Insertion sort: the first i items, sorted.
        want = _join(sorted(part), m[2])
      elif op[0] == "reverse":  # The reversed list, i items of it.
        want = _join(items[::-1][:i], m[2])
      elif op[0] == "max":  # Running maximum.
        want = max(part)
      else:  # Running count.
        want = str(part.count(op[1]))
      assert step == want, p
    assert len(got) == len(items) and got[-1] == p.answer, p
  else:  # Chains and word problems: "b=7+5=12; c=12*2=24", "3+4=7; 7-2=5".
    last = None
    for step in p.steps.split("; "):
      *_, expr, value = step.split("=")
      if re.fullmatch(r"[a-z]=\d+", step):  # A chain of one binding: the binding itself.
        assert p.prompt == f"{step};{expr}=?", p
      else:
        assert eval(expr) == int(value), p
      last = value
    assert last == p.answer, p


def split_line(line):
  """(prompt, answer) of a corpus line, plain or worked."""
  found = re.match(r"(.*?(?: =|\?)) (.*)", line)
  assert found, line
  return found[1], found[2].rsplit(" -> ", 1)[-1]


def _generators():
  for generator, difficulties, _ in reasoning.CORPUS_MIX:
    yield generator, difficulties
  for generator, train, validation in reasoning.DOWNSTREAM_TASKS.values():
    yield generator, sorted({*train, *validation})


# ----------------------------------------------------------------------------------------------
# Generators.

def test_known_problems():
  assert reasoning.addition_problem(347, 285) == (
      "347+285 =", "632", "7+5=12 carry 1; 4+8+1=13 carry 1; 3+2+1=6")
  assert reasoning.addition_problem(999, 1) == (
      "999+1 =", "1000", "9+1=10 carry 1; 9+0+1=10 carry 1; 9+0+1=10 carry 1")
  assert reasoning.subtraction_problem(632, 285) == (
      "632-285 =", "347", "12-5=7 borrow 1; 13-8-1=4 borrow 1; 6-2-1=3")
  assert reasoning.subtraction_problem(1000, 1).answer == "999"
  assert reasoning.multiplication_problem(347, 5) == (
      "347*5 =", "1735", "7*5=35 carry 3; 4*5+3=23 carry 2; 3*5+2=17 carry 1")
  chain = reasoning.chain_problem("abc", 7, [("+", 5), ("*", 2)])
  assert chain == ("a=7;b=a+5;c=b*2;c=?", "24", "b=7+5=12; c=12*2=24")
  assert chain.text() == "a=7;b=a+5;c=b*2;c=? 24"
  assert chain.text(worked=True) == "a=7;b=a+5;c=b*2;c=? b=7+5=12; c=12*2=24 -> 24"
  assert reasoning.problem_key("285+347 =") == reasoning.problem_key("347+285 =") == "285+347 ="
  assert reasoning.problem_key("347-285 =") == "347-285 ="
  with pytest.raises(ValueError, match="negative"):
    reasoning.subtraction_problem(1, 2)


def test_every_generator_gives_right_answers_and_steps():
  rng = random.Random(1)
  for generator, difficulties in _generators():
    for difficulty in difficulties:
      for _ in range(60):
        p = generator(rng, difficulty)
        assert p.answer == solve(p.prompt), p
        check_steps(p)


def test_difficulty_is_digits_depth_or_length():
  rng = random.Random(2)
  for d in (1, 3, 4):
    for make in (reasoning.add, reasoning.subtract):
      a, b = re.fullmatch(r"(\d+)[-+](\d+) =", make(rng, d).prompt).groups()
      assert max(len(a), len(b)) == d
    assert len(reasoning.multiply(rng, d).prompt.split("*")[0]) == d
  for _ in range(50):
    a, b = re.fullmatch(r"(\d+)\+(\d+) =", reasoning.add(rng, 4, min_digits=3).prompt).groups()
    assert min(len(a), len(b)) >= 3 and max(len(a), len(b)) == 4
  assert reasoning.chain(rng, 6).prompt.count(";") == 6  # 6 bindings, then the question.
  assert len(reasoning.sort_list(rng, 8).prompt.split(" ")[1]) == 8
  assert len(reasoning.reverse_list(rng, 5, words=True).prompt.split(" ")) == 2 + 5
  with pytest.raises(ValueError):
    reasoning.word_problem(rng, 3)


def test_generators_and_documents_are_deterministic():
  draws = [[g(random.Random(seed), max(d)) for g, d in _generators()] for seed in (5, 5, 6)]
  assert draws[0] == draws[1] != draws[2]
  # Document 0 is a pure function of (seed, split, index): a fresh process gives the same.
  assert reasoning.document(0) == (
      "count ape in fish owl = 0, 0 -> 0\n"
      "n=4;a=n+2;j=a-5;t=j+2;t=? a=4+2=6; j=6-5=1; t=1+2=3 -> 3\n"
      "max 955254 = 9, 9, 9, 9, 9, 9 -> 9\n"
      "reverse 6012 = 2106\n"
      "max 712 = 7, 7, 7 -> 7\n"
      "max 8233 = 8\n"
      "z=4;z=? 4\n"
      "303+6 = 309")
  assert reasoning.document(0, seed=1) != reasoning.document(0) != reasoning.document(1)
  assert reasoning.document(7, split="validation") == reasoning.document(7, split="validation")


# ----------------------------------------------------------------------------------------------
# The corpus, through its registered source.

@pytest.fixture(scope="module")
def corpus_lines():
  """{split: lines} of the first NUM_DOCS documents of each split of the registered task."""
  source = seqio.get_mixture_or_task("reasoning").source
  out = {}
  for split in ("train", "validation"):
    docs = source.get_dataset(split, shuffle=False).take(NUM_DOCS).as_numpy_iterator()
    out[split] = [line for d in docs for line in d["text"].decode("utf-8").split("\n")]
  return out


@pytest.fixture(scope="module")
def downstream_prompts():
  """{task: {split: [(prompt, answer)]}} of every reasoning downstream task's source."""
  out = {}
  for name in reasoning.DOWNSTREAM_TASKS:
    source = downstream.resolve(name).make_source(None)
    out[name] = {}
    for split in ("train", "validation"):  # In one batch: 20,000 examples.
      ds = source.get_dataset(split, shuffle=False).batch(50_000)
      batch = next(ds.as_numpy_iterator())
      out[name][split] = [(p.decode(), a.decode()) for p, a in zip(batch["inputs"],
                                                                   batch["targets"])]
  return out


def test_corpus_lines_are_right(corpus_lines):
  worked = 0
  for split, lines in corpus_lines.items():
    assert len(lines) > 6000
    for line in lines:
      prompt, answer = split_line(line)
      assert answer == solve(prompt), line
      worked += " -> " in line
  total = sum(map(len, corpus_lines.values()))
  assert 0.45 < worked / total < 0.55  # WORKED_RATE of them; a count over random draws.


def test_source_shards_and_validation_size():
  source = seqio.get_mixture_or_task("reasoning").source
  shard = source.get_dataset("train", shuffle=False, shard_info=seqio.ShardInfo(1, 3))
  assert [d["text"].decode() for d in shard.take(3).as_numpy_iterator()] == [
      reasoning.document(i) for i in (1, 4, 7)]
  assert source.num_input_examples("validation") == reasoning.VALIDATION_DOCUMENTS
  assert source.num_input_examples("train") is None  # Unbounded.


def _keys(prompts):
  return {reasoning.problem_key(p) for p in prompts}


def test_train_validation_and_held_out_problems_are_disjoint(corpus_lines, downstream_prompts):
  train = {split_line(line)[0] for line in corpus_lines["train"]}
  validation = {split_line(line)[0] for line in corpus_lines["validation"]}
  assert len(train) > 5000 and len(validation) > 5000
  assert not _keys(train) & _keys(validation)  # Small spaces ("max 37 =") would meet otherwise.
  assert {reasoning.split_of(p) for p in train} == {reasoning.TRAIN}
  assert {reasoning.split_of(p) for p in validation} == {reasoning.VALIDATION}
  for name, splits in downstream_prompts.items():
    held_out = {p for p, _ in splits["validation"]}
    assert len(held_out) == len(splits["validation"]) == 500, name
    assert len({p for p, _ in splits["train"]}) == 20_000, name
    assert {reasoning.split_of(p) for p in held_out} == {reasoning.HELD_OUT}, name
    assert not held_out & {p for p, _ in splits["train"]}, name
    assert not held_out & (train | validation), name
    # Not even the same sum with its operands swapped.
    swapped = {re.sub(r"(\d+)\+(\d+) =", r"\2+\1 =", p) for p in held_out}
    assert not swapped & (train | validation | {p for p, _ in splits["train"]}), name
  # The held-out sums do occur as problems: the check above is not vacuous.
  add = {p for p, _ in downstream_prompts["reason_add"]["validation"]}
  assert all(re.fullmatch(r"\d{3,4}\+\d{3,4} =", p) for p in add)
  assert any(re.fullmatch(r"\d{3,4}\+\d{3,4} =", p) for p in train)


def test_held_out_depths_and_lengths_are_beyond_the_corpus(corpus_lines, downstream_prompts):
  depths, lengths = set(), set()
  for line in corpus_lines["train"] + corpus_lines["validation"]:
    prompt, _ = split_line(line)
    if re.fullmatch(r"[a-z]=.*=\?", prompt):
      depths.add(prompt.count(";"))
    elif m := re.fullmatch(r"(?:sort|reverse|max|count \S+ in) (.+) =", prompt):
      lengths.add(len(_items(m[1])))
  assert depths == {1, 2, 3, 4} and lengths == {2, 3, 4, 5, 6}
  assert (reasoning.MAX_DEPTH, reasoning.MAX_LENGTH) == (4, 6)

  def depth(p):
    return p.count(";")

  def length(p):
    return len(p.split(" ")[1])

  for name, measure, train, validation in (
      ("reason_chain", depth, {2, 3, 4}, {2, 3, 4}),
      ("reason_chain_long", depth, {2, 3, 4}, {6}),
      ("reason_sort", length, {4, 5, 6}, {4, 5, 6}),
      ("reason_sort_long", length, {4, 5, 6}, {8})):
    splits = downstream_prompts[name]
    assert {measure(p) for p, _ in splits["train"]} == train, name
    assert {measure(p) for p, _ in splits["validation"]} == validation, name
    for p, a in splits["train"][:500] + splits["validation"]:
      assert a == solve(p), (name, p)
  assert max(depths) < 6 and max(lengths) < 8


def test_downstream_examples_fit_the_token_budget(downstream_prompts):
  """seq_len 64, targets_len 16, 10 pauses: prompts of <= 38 tokens, answers of <= 15 + EOS."""
  sp = specials.load_vocabulary(corpus.DEFAULT_VOCAB_PATH).base.tokenizer
  for name, splits in downstream_prompts.items():
    examples = splits["train"][:2000] + splits["validation"]
    assert max(map(len, sp.encode([p for p, _ in examples]))) <= 38, name
    assert max(map(len, sp.encode([a for _, a in examples]))) <= 15, name


def test_tokenizer_round_trips_every_format():
  vocab = specials.load_vocabulary(corpus.DEFAULT_VOCAB_PATH)
  rng = random.Random(3)
  texts = [g(rng, max(d)).text(worked) for g, d in _generators() for worked in (False, True)]
  texts += [reasoning.document(i) for i in range(20)]
  unk = vocab.base.tokenizer.unk_id()
  for text in texts:
    ids = vocab.encode(text)
    assert unk not in ids, text
    assert vocab.decode(ids) == text


# ----------------------------------------------------------------------------------------------
# The registered tasks, read as runs read them.

def test_reasoning_mix_pause_through_the_registry(tfds_dir):
  config = tiny_config(tfds_dir, task="reasoning_mix_pause")
  data = data_lib.prepare(config)
  assert data.train.describe() == ("reasoning_mix_pause = reasoning_pause 50% + shakespeare_pause "
                                   "50% (pause rate 0.1, set by the task)")
  assert [(p.name, p.weight, p.pause_rate, p.split) for p in data.eval.parts] == [
      ("reasoning_pause", 0.5, 0.1, "validation"), ("shakespeare_pause", 0.5, 0.1, "validation")]
  ds = data_lib.shard_dataset(data, config, 0, train=True, batch_size=8)
  checked, tasks_seen = 0, set()
  for batch in ds.take(4).as_numpy_iterator():
    for row, task in zip(batch["decoder_target_tokens"], batch[data_lib.TASK_INDEX]):
      tasks_seen.add(int(task))
      assert np.sum(row == data.pause_id) <= pause.num_pauses(0.1, config.seq_len)
      if data.train.parts[task].name != "reasoning_pause":
        continue
      text = data.vocabulary.render(row).replace("<pause>", "")
      # Lines end at a newline or at a document's EOS; those cut by the chunk's ends are skipped.
      for line in re.split(r"\n|</s>", text)[1:-1]:
        line = line.strip()  # A document's first token has a word boundary.
        prompt, answer = split_line(line)
        assert answer == solve(prompt), line
        checked += 1
  assert tasks_seen == {0, 1} and checked > 10


def test_reasoning_pause_is_reasoning_with_pauses():
  std = seqio.get_mixture_or_task("reasoning")
  paused = seqio.get_mixture_or_task("reasoning_pause")
  assert pause.rate_of(std) == 0.0 and pause.rate_of(paused) == 0.1
  pause_id = paused.output_features["targets"].vocabulary.pause_id
  read = {}
  for name, task in (("std", std), ("paused", paused)):
    ds = task.get_dataset({"targets": 64}, split="train", shuffle=False, seed=7, use_cached=False,
                          try_in_mem_cache=False)
    read[name] = [x["targets"] for x in ds.take(20).as_numpy_iterator()]
  for s, p in zip(read["std"], read["paused"]):
    real = p[p != pause_id]
    # num_pauses(0.1, 64) = 6 inserted, then trimmed back to 64: those past the end go.
    assert len(p) == 64 and 1 <= 64 - len(real) <= 6
    np.testing.assert_array_equal(real, s[:len(real)])


def test_reason_chain_long_fine_tunes_short_and_evaluates_long(tfds_dir):
  config = tiny_config(tfds_dir, task="reason_chain_long", targets_len=16,
                       **{"pause.num_finetune": 10})
  data = data_lib.prepare(config)
  for train, depths in ((True, {2, 3, 4}), (False, {6})):
    batch = next(data_lib.shard_dataset(data, config, 0, train=train,
                                        batch_size=8).as_numpy_iterator())
    for row, weights in zip(batch["decoder_target_tokens"], batch["decoder_loss_weights"]):
      text = data.vocabulary.render(row)
      found = re.fullmatch(r"(\S+)((?:<pause>){10}) (\d+)</s>", text)
      assert found, text  # The whole prompt, its 10 pauses, the answer: nothing cut.
      assert found[1].count(";") in depths and found[3] == solve(found[1])
      answer = data.vocabulary.encode(found[3]) + [data.vocabulary.eos_id]
      assert row[weights > 0].tolist() == answer  # Loss on the answer and EOS only.


def test_downstream_eval_view_and_metrics():
  assert downstream.resolve("reason_sort_long").metric_fns == ("exact_match",)
  task = seqio.get_mixture_or_task("reason_sort_long")
  ds = task.get_dataset({"inputs": 48, "targets": 16}, split="validation", shuffle=False)
  examples = list(ds.take(50).as_numpy_iterator())
  for ex in examples:
    prompt, target = ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()
    assert re.fullmatch(r"sort \d{8} =", prompt) and target == solve(prompt)
    assert [a.decode() for a in ex["answers"]] == [target]


def test_register_reasoning_mix_at_another_rate():
  try:
    mix = reasoning.register_reasoning_mix("test_reasoning_mix_20", 0.2)
    assert {t.name: mix.get_rate(t) for t in mix.tasks} == pytest.approx(
        {"shakespeare": 0.8, "reasoning": 0.2})
    paused = seqio.get_mixture_or_task("test_reasoning_mix_20_pause")
    assert {t.name: paused.get_rate(t) for t in paused.tasks} == pytest.approx(
        {"shakespeare_pause": 0.8, "reasoning_pause": 0.2})
  finally:
    for name in ("test_reasoning_mix_20", "test_reasoning_mix_20_pause"):
      seqio.MixtureRegistry.remove(name)
  with pytest.raises(UsageError, match="rate"):
    reasoning.register_reasoning_mix("bad", 1.0)
