"""A generated pretraining corpus where answers need more computation than the text before them.

Every document is 4-10 problems, one per line, each written plainly or with its worked steps
(half of them, `WORKED_RATE`). Each generator is a pure function `(rng, difficulty) -> Problem`
(prompt, answer, worked steps), so the same code writes pretraining text and downstream tasks:

  add, subtract       "347+285 = 632"
                      "347+285 = 7+5=12 carry 1; 4+8+1=13 carry 1; 3+2+1=6 -> 632"
                      "632-285 = 12-5=7 borrow 1; 13-8-1=4 borrow 1; 6-2-1=3 -> 347"
  multiply            "347*5 = 7*5=35 carry 3; 4*5+3=23 carry 2; 3*5+2=17 carry 1 -> 1735"
  chain               "a=7;b=a+5;c=b*2;c=? 24"      depth = number of bindings
                      "a=7;b=a+5;c=b*2;c=? b=7+5=12; c=12*2=24 -> 24"
  sort, reverse, max, count   lists of digits, written together: "sort 52913 = 12359",
                      "sort 52913 = 5, 25, 259, 1259, 12359 -> 12359", "count 3 in 53133 = 3";
                      or of words: "reverse cat fox owl = owl fox cat"
  word_problem        "Ann has 3 apples and buys 4 more. How many apples does Ann have? 7"

A plain line is `prompt + " " + answer`, a worked one `prompt + " " + steps + " -> " + answer`:
the answer always follows a space, so it has the tokens a downstream target gets (SentencePiece
starts a separately tokenized answer with a word boundary). Digit lists have no separators, so
the answer to sorting 8 digits is 9 tokens and fits `targets_len` 16 with its EOS. The embedded
SentencePiece model has byte fallback: "=", "+" and ">" are byte pieces, nothing maps to unk.

Held-out problems. A hash of a problem's key (its prompt; a sum's unordered operands) puts it in
one of 16 buckets, fixed for every seed: bucket 0 only in downstream validation splits, bucket 1
only in the `reasoning` validation split, the rest in `reasoning` train and downstream train.
The corpus never holds chains deeper than `MAX_DEPTH` or lists longer than `MAX_LENGTH`.

Registered on import (tasks.py imports this module):

  reasoning              pretraining ("targets" only): unbounded train split (document i is a
                         pure function of the seed and i), 1,000 validation documents
  reasoning_pause        the same with PausePT insertion at rate 0.1
  reasoning_mix          Mixture: shakespeare 50% + reasoning 50% (`register_reasoning_mix`)
  reasoning_mix_pause    the same mixture of the tasks' `_pause` variants
  reason_add             downstream, generative, exact_match: "3471+285 =" -> "3756", 3-4 digits
  reason_chain           chains of depth 2-4 (train and validation)
  reason_chain_long      train: depth 2-4; validation: depth 6, beyond the corpus
  reason_sort            sort 4-6 digits (train and validation)
  reason_sort_long       train: 4-6 digits; validation: 8, beyond the corpus
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from typing import Callable, NamedTuple, Sequence

import seqio
import tensorflow as tf

from pausejax import corpus
from pausejax import downstream
from pausejax import specials
from pausejax import tasks
from pausejax.errors import UsageError

WORKED_RATE = 0.5       # Share of corpus problems written with their worked steps.
REASONING_RATE = 0.5    # reasoning_mix: the share of reasoning in the mixture.
LINES_PER_DOCUMENT = (4, 10)
VALIDATION_DOCUMENTS = 1000  # Finite: evaluation may read a whole validation split.
# The largest problems the corpus holds; downstream "_long" tasks validate beyond them.
MAX_DIGITS, MAX_DEPTH, MAX_LENGTH = 4, 4, 6
MAX_VALUE = 99          # Chain values stay in [0, 99].
# Documents are independent draws: a small buffer only separates neighbouring chunks, and
# keeps the data iterator's checkpoint small.
SHUFFLE_BUFFER = 1000

TRAIN, VALIDATION, HELD_OUT = "train", "validation", "heldout"
_BUCKETS = 16

_WORDS = ("cat", "dog", "fox", "rat", "cow", "ape", "bear", "wolf", "lion", "deer", "horse",
          "sheep", "mouse", "fish", "bird", "crow", "dove", "hare", "lamb", "mole", "swan", "owl")
_NAMES = ("Ann", "Ben", "Hal", "Ned", "Tom", "Kate", "John", "Anne", "Jack", "Nell", "Eve")
_ITEMS = ("apples", "plums", "coins", "books", "rings", "cups", "hats", "keys", "roses")


class Problem(NamedTuple):
  prompt: str   # A downstream task's input; ends with "=" or "?".
  answer: str
  steps: str    # The worked steps between prompt and answer.

  def text(self, worked: bool = False) -> str:
    if worked:
      return f"{self.prompt} {self.steps} -> {self.answer}"
    return f"{self.prompt} {self.answer}"


Generator = Callable[[random.Random, int], Problem]

_SUM = re.compile(r"(\d+)\+(\d+) =")


def problem_key(prompt: str) -> str:
  """What makes two problems the same: the prompt, with a sum's operands in order."""
  found = _SUM.fullmatch(prompt)
  if found:
    a, b = sorted(map(int, found.groups()))
    return f"{a}+{b} ="
  return prompt


def split_of(prompt: str) -> str:
  """TRAIN, VALIDATION (the corpus' own) or HELD_OUT (downstream validation): a hash, no seed."""
  bucket = zlib.crc32(problem_key(prompt).encode("utf-8")) % _BUCKETS
  return HELD_OUT if bucket == 0 else VALIDATION if bucket == 1 else TRAIN


# ----------------------------------------------------------------------------------------------
# Arithmetic, column by column.

def _digits(n: int, width: int) -> list[int]:
  """Least significant first, padded with zeros to `width`."""
  return [int(c) for c in reversed(str(n).zfill(width))]


def _number(rng: random.Random, digits: int) -> int:
  return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _operands(rng: random.Random, digits: int, min_digits: int) -> tuple[int, int]:
  """One operand of `digits` digits, the other of min_digits..digits, in random order."""
  if not 1 <= min_digits <= digits:
    raise ValueError(f"need 1 <= min_digits <= digits, got {min_digits}, {digits}")
  a, b = _number(rng, digits), _number(rng, rng.randint(min_digits, digits))
  return (a, b) if rng.random() < 0.5 else (b, a)


def addition_problem(a: int, b: int) -> Problem:
  steps, carry = [], 0
  width = max(len(str(a)), len(str(b)))
  for x, y in zip(_digits(a, width), _digits(b, width)):
    total = x + y + carry
    step = f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}"
    carry = total // 10
    steps.append(step + (f" carry {carry}" if carry else ""))
  return Problem(f"{a}+{b} =", str(a + b), "; ".join(steps))


def subtraction_problem(a: int, b: int) -> Problem:
  if a < b:
    raise ValueError(f"answers are never negative: {a}-{b}")
  steps, borrow = [], 0
  width = len(str(a))
  for x, y in zip(_digits(a, width), _digits(b, width)):
    top = x if x - y - borrow >= 0 else x + 10
    step = f"{top}-{y}" + (f"-{borrow}" if borrow else "") + f"={top - y - borrow}"
    borrow = int(top > x)
    steps.append(step + (" borrow 1" if borrow else ""))
  return Problem(f"{a}-{b} =", str(a - b), "; ".join(steps))


def multiplication_problem(a: int, m: int) -> Problem:
  """`a` times the one digit `m`."""
  steps, carry = [], 0
  for x in _digits(a, len(str(a))):
    total = x * m + carry
    step = f"{x}*{m}" + (f"+{carry}" if carry else "") + f"={total}"
    carry = total // 10
    steps.append(step + (f" carry {carry}" if carry else ""))
  return Problem(f"{a}*{m} =", str(a * m), "; ".join(steps))


def add(rng: random.Random, difficulty: int, *, min_digits: int = 1) -> Problem:
  """Operands of up to `difficulty` digits (at least `min_digits`)."""
  return addition_problem(*_operands(rng, difficulty, min_digits))


def subtract(rng: random.Random, difficulty: int, *, min_digits: int = 1) -> Problem:
  a, b = _operands(rng, difficulty, min_digits)
  return subtraction_problem(max(a, b), min(a, b))


def multiply(rng: random.Random, difficulty: int) -> Problem:
  """A number of `difficulty` digits times one digit (2-9)."""
  return multiplication_problem(_number(rng, difficulty), rng.randint(2, 9))


# ----------------------------------------------------------------------------------------------
# Chains of variable bindings.

def chain_problem(names: Sequence[str], start: int, ops: Sequence[tuple[str, int]]) -> Problem:
  """names[0]=start, then names[i+1]=names[i] <op> k for each (op, k); asks for the last."""
  if len(ops) != len(names) - 1:
    raise ValueError(f"{len(names)} names need {len(names) - 1} operations, got {len(ops)}")
  value = start
  bindings, steps = [f"{names[0]}={start}"], []
  for prev, name, (op, k) in zip(names, names[1:], ops):
    new = value + k if op == "+" else value - k if op == "-" else value * k
    bindings.append(f"{name}={prev}{op}{k}")
    steps.append(f"{name}={value}{op}{k}={new}")
    value = new
  prompt = ";".join(bindings) + f";{names[-1]}=?"  # No spaces: depth 6 fits 38 tokens.
  return Problem(prompt, str(value), "; ".join(steps) or bindings[0])


def chain(rng: random.Random, difficulty: int) -> Problem:
  """`difficulty` bindings of distinct one-letter names, values in [0, MAX_VALUE]."""
  if not 1 <= difficulty <= 26:
    raise ValueError(f"a chain has 1 to 26 bindings, got {difficulty}")
  names = rng.sample("abcdefghijklmnopqrstuvwxyz", difficulty)
  value = start = rng.randint(1, 9)
  ops = []
  for _ in range(difficulty - 1):
    options = {"+": [k for k in range(1, 10) if value + k <= MAX_VALUE],
               "-": [k for k in range(1, 10) if value - k >= 0],
               "*": [k for k in range(2, 10) if value * k <= MAX_VALUE]}
    op = rng.choice([o for o, ks in options.items() if ks])
    k = rng.choice(options[op])
    value = value + k if op == "+" else value - k if op == "-" else value * k
    ops.append((op, k))
  return chain_problem(names, start, ops)


# ----------------------------------------------------------------------------------------------
# Lists: digits written together ("52913"), or words separated by spaces.

def _items(rng: random.Random, length: int, words: bool) -> list[str]:
  if length < 1:
    raise ValueError(f"a list has at least one item, got {length}")
  return [rng.choice(_WORDS) if words else str(rng.randint(0, 9)) for _ in range(length)]


def _show(items: Sequence[str], words: bool) -> str:
  return " ".join(items) if words else "".join(items)


def sort_list(rng: random.Random, difficulty: int, *, words: bool = False) -> Problem:
  """Steps: insertion sort, one item at a time."""
  items = _items(rng, difficulty, words)
  steps = [_show(sorted(items[:i]), words) for i in range(1, len(items) + 1)]
  return Problem(f"sort {_show(items, words)} =", steps[-1], ", ".join(steps))


def reverse_list(rng: random.Random, difficulty: int, *, words: bool = False) -> Problem:
  items = _items(rng, difficulty, words)
  back = items[::-1]
  steps = [_show(back[:i], words) for i in range(1, len(items) + 1)]
  return Problem(f"reverse {_show(items, words)} =", steps[-1], ", ".join(steps))


def max_list(rng: random.Random, difficulty: int) -> Problem:
  """Steps: the running maximum."""
  items = _items(rng, difficulty, False)
  steps = [max(items[:i]) for i in range(1, len(items) + 1)]
  return Problem(f"max {_show(items, False)} =", steps[-1], ", ".join(steps))


def count_item(rng: random.Random, difficulty: int, *, words: bool = False) -> Problem:
  """How often an item occurs (usually one of the list's; sometimes absent). Steps: the
  running count."""
  items = _items(rng, difficulty, words)
  target = rng.choice(items) if rng.random() < 0.8 else _items(rng, 1, words)[0]
  steps = [str(items[:i].count(target)) for i in range(1, len(items) + 1)]
  return Problem(f"count {target} in {_show(items, words)} =", steps[-1], ", ".join(steps))


# ----------------------------------------------------------------------------------------------
# Word problems from templates: difficulty 1 or 2 operations.

def word_problem(rng: random.Random, difficulty: int) -> Problem:
  if difficulty not in (1, 2):
    raise ValueError(f"word problems take 1 or 2 operations, got {difficulty}")
  who, other = rng.sample(_NAMES, 2)
  what = rng.choice(_ITEMS)
  ask = f"How many {what} does {who} have?"
  template = rng.randrange(3)
  if difficulty == 1 and template == 0:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    text, answer, steps = f"{who} has {a} {what} and buys {b} more.", a + b, f"{a}+{b}={a + b}"
  elif difficulty == 1 and template == 1:
    a = rng.randint(2, 20)
    b = rng.randint(1, a)
    text, answer = f"{who} has {a} {what} and gives {b} to {other}.", a - b
    steps = f"{a}-{b}={a - b}"
  elif difficulty == 1:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    text, answer = f"{who} has {a} boxes with {b} {what} in each.", a * b
    steps = f"{a}*{b}={a * b}"
  elif template == 0:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    c = rng.randint(1, a + b)
    text = f"{who} has {a} {what}, buys {b} more and gives {c} to {other}."
    answer, steps = a + b - c, f"{a}+{b}={a + b}; {a + b}-{c}={a + b - c}"
  elif template == 1:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a * b)
    text = f"{who} has {a} boxes with {b} {what} in each and gives {c} away."
    answer, steps = a * b - c, f"{a}*{b}={a * b}; {a * b}-{c}={a * b - c}"
  else:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    text = f"{who} has {a} {what} and {other} has {b} more than {who}."
    ask = f"How many {what} do they have together?"
    answer, steps = a + (a + b), f"{a}+{b}={a + b}; {a}+{a + b}={a + a + b}"
  return Problem(f"{text} {ask}", str(answer), steps)


# ----------------------------------------------------------------------------------------------
# The corpus.

# (generator, difficulties, weight): what a corpus line is drawn from.
CORPUS_MIX: tuple[tuple[Generator, Sequence[int], float], ...] = (
    (add, range(1, MAX_DIGITS + 1), 2.0),
    (subtract, range(1, MAX_DIGITS + 1), 1.0),
    (multiply, range(1, MAX_DIGITS + 1), 1.0),
    (chain, range(1, MAX_DEPTH + 1), 2.0),
    (sort_list, range(2, MAX_LENGTH + 1), 1.0),
    (functools.partial(sort_list, words=True), range(2, MAX_LENGTH + 1), 0.5),
    (reverse_list, range(2, MAX_LENGTH + 1), 1.0),
    (functools.partial(reverse_list, words=True), range(2, MAX_LENGTH + 1), 0.5),
    (max_list, range(2, MAX_LENGTH + 1), 1.0),
    (count_item, range(2, MAX_LENGTH + 1), 1.0),
    (functools.partial(count_item, words=True), range(2, MAX_LENGTH + 1), 0.5),
    (word_problem, (1, 2), 2.0),
)


def corpus_problem(rng: random.Random, split: str) -> Problem:
  """One problem of the corpus' `split` (TRAIN or VALIDATION): others are drawn again."""
  weights = [w for _, _, w in CORPUS_MIX]
  while True:
    generator, difficulties, _ = rng.choices(CORPUS_MIX, weights)[0]
    problem = generator(rng, rng.choice(difficulties))
    if split_of(problem.prompt) == split:
      return problem


def document(index: int, *, split: str = TRAIN, seed: int = 0,
             worked_rate: float = WORKED_RATE) -> str:
  """Document `index` of `split`: the same for the same arguments, in any process."""
  if split not in (TRAIN, VALIDATION):
    raise ValueError(f"split must be {TRAIN!r} or {VALIDATION!r}, got {split!r}")
  rng = random.Random(f"reasoning/{seed}/{split}/{index}")  # Seeded by SHA-512 of the string.
  lines = []
  for _ in range(rng.randint(*LINES_PER_DOCUMENT)):
    problem = corpus_problem(rng, split)
    lines.append(problem.text(worked=rng.random() < worked_rate))
  return "\n".join(lines)


class ReasoningSource(seqio.DataSource):
  """`{"text": document}` examples: train unbounded, validation `num_validation` documents.

  Shard s of K reads documents s, s + K, s + 2K, ...; each is a pure function of its index
  (`tf.numpy_function`, stateful=False), so the position is part of the tf.data iterator state
  and a resumed run sees the same documents.
  """

  def __init__(self, *, seed: int = 0, worked_rate: float = WORKED_RATE,
               num_validation: int = VALIDATION_DOCUMENTS):
    self._make = functools.partial(document, seed=seed, worked_rate=worked_rate)
    self._num_validation = num_validation
    super().__init__(splits=(TRAIN, VALIDATION))

  def num_input_examples(self, split: str) -> int | None:
    return self._num_validation if split == VALIDATION else None  # Train is unbounded.

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> list[str]:
    return [split]

  def get_dataset(self, split: str = TRAIN, shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, **kwargs) -> tf.data.Dataset:
    del shuffle, seed, kwargs  # Fixed by the data seed; seqio shuffles the chunks after.
    index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    if split == TRAIN:
      ids = tf.data.Dataset.counter(index, count)
    else:
      ids = tf.data.Dataset.range(index, self._num_validation, count)

    def text(i):
      return self._make(int(i), split=split).encode("utf-8")

    return ids.map(lambda i: {"text": tf.ensure_shape(
        tf.numpy_function(text, [i], tf.string, stateful=False), [])},
        num_parallel_calls=tf.data.AUTOTUNE)


def register_reasoning_task(name: str = "reasoning", *, seed: int = 0,
                            worked_rate: float = WORKED_RATE) -> seqio.Task:
  """Registers the corpus as a pretraining task, preprocessed like `shakespeare`; returns it."""
  task = seqio.Task(
      name=name,
      source=ReasoningSource(seed=seed, worked_rate=worked_rate),
      preprocessors=tasks.pretraining_steps("text"),
      output_features={"targets": seqio.Feature(
          specials.SpecialsVocabulary(seqio.SentencePieceVocabulary(corpus.DEFAULT_VOCAB_PATH)),
          add_eos=True, dtype=tf.int32)},
      shuffle_buffer_size=SHUFFLE_BUFFER)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add_provider(name, task)
  return task


def register_reasoning_mix(name: str = "reasoning_mix", rate: float = REASONING_RATE, *,
                           reasoning: str = "reasoning", other: str = "shakespeare",
                           pauses: bool = True) -> seqio.Mixture:
  """Registers Mixture `name`: task `reasoning` at `rate`, `other` at 1 - rate; returns it.

  With `pauses`, also `<name>_pause` of the tasks' `_pause` variants (made with
  `tasks.with_pauses` where they do not exist yet).
  """
  if not 0.0 < rate < 1.0:
    raise UsageError.setting("rate", rate, "a fraction in (0, 1)")
  for suffix in ("", "_pause") if pauses else ("",):
    parts = []
    for task, weight in ((other, 1.0 - rate), (reasoning, rate)):
      if suffix and f"{task}{suffix}" not in seqio.TaskRegistry.names():
        tasks.with_pauses(task)
      parts.append((f"{task}{suffix}", weight))
    seqio.MixtureRegistry.remove(f"{name}{suffix}")
    seqio.MixtureRegistry.add(f"{name}{suffix}", parts)
  return seqio.get_mixture_or_task(name)


# ----------------------------------------------------------------------------------------------
# Downstream tasks from the same generators.

def problems(generator: Generator, difficulties: Sequence[int], num: int, *, split: str,
             seed: str) -> list[Problem]:
  """`num` distinct problems whose `split_of` is `split`, difficulties drawn uniformly."""
  rng = random.Random(seed)
  seen, out = set(), []
  for _ in range(200 * num + 1000):  # Held-out problems are 1 in 16 draws.
    problem = generator(rng, rng.choice(difficulties))
    if problem.prompt not in seen and split_of(problem.prompt) == split:
      seen.add(problem.prompt)
      out.append(problem)
      if len(out) == num:
        return out
  raise ValueError(f"could not draw {num} distinct problems of difficulty {difficulties}")


def problem_source(generator: Generator, *, train: Sequence[int], validation: Sequence[int],
                   num_train: int = 20_000, num_validation: int = 500,
                   seed: int = 0) -> seqio.DataSource:
  """(prompt, answer) examples; validation problems are held out of train and the corpus."""
  cache: dict[str, list[Problem]] = {}
  data_seed = seed

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # The data is fixed by data_seed; seqio shuffles after.
    if split not in cache:
      if split == "train":
        cache[split] = problems(generator, train, num_train, split=TRAIN,
                                seed=f"{data_seed}/train")
      else:
        cache[split] = problems(generator, validation, num_validation, split=HELD_OUT,
                                seed=f"{data_seed}/validation")
    return tf.data.Dataset.from_tensor_slices({"inputs": [p.prompt for p in cache[split]],
                                               "targets": [p.answer for p in cache[split]]})

  return seqio.FunctionDataSource(
      dataset_fn, splits=["train", "validation"],
      num_input_examples={"train": num_train, "validation": num_validation})


# name: (generator, train difficulties, validation difficulties).
DOWNSTREAM_TASKS: dict[str, tuple[Generator, tuple[int, ...], tuple[int, ...]]] = {
    "reason_add": (functools.partial(add, min_digits=3), (3, 4), (3, 4)),
    "reason_chain": (chain, (2, 3, 4), (2, 3, 4)),
    "reason_chain_long": (chain, (2, 3, 4), (6,)),
    "reason_sort": (sort_list, (4, 5, 6), (4, 5, 6)),
    "reason_sort_long": (sort_list, (4, 5, 6), (8,)),
}


def register_problem_task(name: str, generator: Generator, *, train: Sequence[int],
                          validation: Sequence[int], **source_kwargs
                          ) -> downstream.DownstreamRecipe:
  """Registers a generative downstream task (exact_match) on `generator`'s problems."""
  return downstream.register_downstream_task(
      name, kind="generative", metric_fns=("exact_match",),
      source=problem_source(generator, train=train, validation=validation, **source_kwargs))


def _register_defaults() -> None:
  register_reasoning_task()
  tasks.with_pauses("reasoning")
  register_reasoning_mix()
  for name, (generator, train, validation) in DOWNSTREAM_TASKS.items():
    register_problem_task(name, generator, train=train, validation=validation)


_register_defaults()
