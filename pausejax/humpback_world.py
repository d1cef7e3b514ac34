"""A small world whose instructions can be checked, for demonstrating Humpback without web data.

There is no instruction data or web text here, so the demonstration builds both from the
embedded Shakespeare corpus (its speeches: a speaker's name, then lines), with three templated
instructions whose correct output is known:

  next line   "Give the line that follows: <line>"   -> the next line of the same speech
  speaker     "Who speaks the line: <line>"          -> the speaker's name
  sort        "Sort the words: <words>"              -> the words in alphabetical order
  count       "Count the words: <words>"             -> "<n> words"

Backtranslating the first two needs the plays by heart (any line of that speaker, the line
before); sorting and counting need only the segment's own words (any order of them; any n
words): a small model can learn the last two backwards and hardly the first two, so the
candidates are a mix of right and wrong pairs for curation to tell apart.

`correct(instruction, output)` is the oracle: it parses any instruction with these templates and
checks the output against the corpus. The unlabelled pool mixes true outputs of such
instructions (instances kept apart from the seed and held-out sets) with distractors (a line's
words shuffled: no instruction of the world has them as its answer), so the precision and
recall of self-curation can be measured against the truth.

The seed set also holds rating examples: the curation prompt over a seed pair, answered
"Score: 5", or over a pair whose output is wrong, answered "Score: 1" or "Score: 2". A model of
a few million parameters cannot follow an unseen rubric; this teaches M0 the world's rubric from
seed data alone, as the paper's larger models bring it from pretraining.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import re

import numpy as np

from pausejax import corpus
from pausejax import humpback_data as hd

NEXT, SPEAKER, SORT, COUNT = "next_line", "speaker", "sort", "count"
KINDS = (NEXT, SPEAKER, SORT, COUNT)
_TEMPLATES = {
    NEXT: "Give the line that follows: {x}",
    SPEAKER: "Who speaks the line: {x}",
    SORT: "Sort the words: {x}",
    COUNT: "Count the words: {x}",
}
_PARSE = {k: re.compile("^" + re.escape(t).replace(re.escape("{x}"), "(.+)") + "$")
          for k, t in _TEMPLATES.items()}
_SPEAKER_LINE = re.compile(r"^([A-Z][A-Z '\-]{1,30})\.$")


@dataclasses.dataclass(frozen=True)
class Sizes:
  num_seed: int = 300          # Seed (instruction, output) pairs ...
  num_ratings: int = 300       # ... plus this many rating examples.
  num_pool: int = 1500         # Unlabelled segments ...
  distractor_fraction: float = 0.4   # ... this fraction of them distractors.
  num_eval: int = 300          # Held-out (instruction, output) pairs.
  seed: int = 0


class World:
  """The speeches of the embedded corpus's training documents, indexed for the oracle."""

  def __init__(self):
    path = os.path.join(corpus.CORPUS_DIR, "train.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
      texts = [json.loads(line)["text"] for line in f]
    self.next_of = collections.defaultdict(set)
    self.speakers_of = collections.defaultdict(set)
    count = collections.Counter()
    self.lines: list[tuple[str, str, str | None]] = []  # (speaker, line, next line or None)
    for text in texts:
      for block in re.split(r"\n\s*\n", text):
        rows = [r.strip() for r in block.strip().splitlines()]
        if len(rows) < 2 or not _SPEAKER_LINE.match(rows[0]):
          continue
        speaker, lines = rows[0][:-1].strip(), [r for r in rows[1:] if r]
        for i, line in enumerate(lines):
          following = lines[i + 1] if i + 1 < len(lines) else None
          count[line] += 1
          self.speakers_of[line].add(speaker)
          if following:
            self.next_of[line].add(following)
          self.lines.append((speaker, line, following))
    # Instances use lines that occur once and are of a readable length: one right answer.
    self.usable = [(s, line, n) for s, line, n in self.lines
                   if count[line] == 1 and 20 <= len(line) <= 70 and not line.startswith("[")]

  def instance(self, kind: str, speaker: str, line: str, following: str | None):
    if kind == NEXT:
      return {"instruction": _TEMPLATES[NEXT].format(x=line), "output": following, "kind": kind}
    if kind == SPEAKER:
      return {"instruction": _TEMPLATES[SPEAKER].format(x=line), "output": speaker, "kind": kind}
    words = _words(line)
    output = " ".join(sorted(words)) if kind == SORT else f"{len(words)} words"
    return {"instruction": _TEMPLATES[kind].format(x=" ".join(words)), "output": output,
            "kind": kind}

  def correct(self, instruction: str, output: str) -> bool:
    """Whether `output` is a right answer to `instruction` in this world."""
    instruction, output = instruction.strip(), output.strip()
    for kind, pattern in _PARSE.items():
      match = pattern.match(instruction)
      if not match:
        continue
      x = match.group(1).strip()
      if kind == NEXT:
        return output in self.next_of.get(x, ())
      if kind == SPEAKER:
        return output in self.speakers_of.get(x, ())
      words = x.split()
      if kind == COUNT:
        return output == f"{len(words)} words"
      return len(words) >= 2 and sorted(words) == output.split()
    return False


def _words(line: str) -> list[str]:
  return [w for w in re.sub(r"[^a-z' ]", " ", line.lower()).split() if w.strip("'")][:6]


def _distractor(world: World, rng: np.random.Generator, line: str) -> str | None:
  words = _words(line)
  if len(words) < 3:
    return None
  for _ in range(5):
    shuffled = [words[i] for i in rng.permutation(len(words))]
    text = " ".join(shuffled)
    if shuffled != sorted(words) and text not in world.speakers_of:
      return text
  return None


def build(outdir: str, sizes: Sizes, template: str) -> dict[str, str]:
  """Writes seed.jsonl, pool.jsonl (`{"text"}`), pool_truth.jsonl and eval.jsonl; returns
  their paths. Deterministic in `sizes.seed`."""
  world = World()
  rng = np.random.default_rng(sizes.seed)
  order = rng.permutation(len(world.usable))
  num_true = sizes.num_pool - int(round(sizes.distractor_fraction * sizes.num_pool))
  num_distract = sizes.num_pool - num_true
  needed = sizes.num_seed + sizes.num_eval + num_true + num_distract
  if needed > len(order):
    raise ValueError(f"the world has {len(order)} usable lines; {needed} were asked for")
  instances, distractors = [], []
  for index in order:
    speaker, line, following = world.usable[index]
    if len(instances) < sizes.num_seed + sizes.num_eval + num_true:
      kinds = [k for k in KINDS if k != NEXT or following]
      kind = kinds[rng.integers(len(kinds))]
      if kind in (SORT, COUNT) and len(_words(line)) < 3:
        continue
      instances.append(world.instance(kind, speaker, line, following))
    elif len(distractors) < num_distract:
      text = _distractor(world, rng, line)
      if text:
        distractors.append(text)
    else:
      break
  seed = instances[:sizes.num_seed]
  held_out = instances[sizes.num_seed:sizes.num_seed + sizes.num_eval]
  pool_true = instances[sizes.num_seed + sizes.num_eval:]
  ratings = _rating_examples(seed, distractors, sizes.num_ratings, template, rng)
  pool = [{"text": p["output"], "source": "task", "instruction": p["instruction"]}
          for p in pool_true] + [{"text": d, "source": "distractor", "instruction": ""}
                                 for d in distractors]
  pool = [pool[i] for i in rng.permutation(len(pool))]
  os.makedirs(outdir, exist_ok=True)
  paths = {name: os.path.join(outdir, f"{name}.jsonl")
           for name in ("seed", "pool", "pool_truth", "eval")}
  hd.write_jsonl(paths["seed"], [_pair(p) for p in seed] + ratings)
  hd.write_jsonl(paths["pool"], [{"text": p["text"]} for p in pool])
  hd.write_jsonl(paths["pool_truth"], pool)
  hd.write_jsonl(paths["eval"], [_pair(p) | {"kind": p["kind"]} for p in held_out])
  return paths


def _pair(p: dict) -> dict[str, str]:
  return {"instruction": p["instruction"], "output": p["output"]}


def _rating_examples(seed, distractors, count, template, rng) -> list[dict[str, str]]:
  """Half good pairs rated 5; half with a wrong output (another instance's of the same kind: 2,
  a distractor: 1)."""
  out = []
  by_kind = collections.defaultdict(list)
  for p in seed:
    by_kind[p["kind"]].append(p)
  for i in range(count):
    p = seed[rng.integers(len(seed))]
    if i % 2 == 0:
      output, score = p["output"], 5
    elif i % 4 == 1 and distractors:
      output, score = distractors[rng.integers(len(distractors))], 1
    else:
      others = [q for q in by_kind[p["kind"]] if q["output"] != p["output"]]
      if not others:
        continue
      output, score = others[rng.integers(len(others))]["output"], 2
    out.append({"instruction": hd.curation_prompt(p["instruction"], output, template),
                "output": f"Score: {score}"})
  return out


# The short rubric of the demonstration: the paper's structure (scale, pair, "Score: <rating>")
# in a length that fits a 256-token context with the pair.
DEMO_TEMPLATE = ("Rate the answer from 1 (wrong) to 5 (right).\n"
                 "Instruction: {instruction}\nAnswer: {output}")
