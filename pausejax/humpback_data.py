"""Humpback's data side (Li et al. 2023, instruction backtranslation): pairs, segments, prompts.

Everything here is text in, text out; the model side is `pausejax.humpback`.

  pairs      seed and candidate (instruction, output) pairs: JSON lines
             `{"instruction": "...", "output": "..."}` (`read_pairs`, `write_jsonl`)
  segments   unlabelled text: JSON lines `{"text": "..."}`, or plain text with one segment per
             blank-line-separated paragraph (`read_segments`), filtered as in the paper
             (`SegmentFilter`: length bounds in characters, exact and near-duplicate removal,
             repetitive segments)
  prompts    what each model reads: the forward model `forward_prompt` (instruction -> output,
             optionally after a tag), the backward model `backward_prompt` (output ->
             instruction), and the 5-point curation prompt ending in "Score: <rating>"
             (`curation_prompt`; `parse_score` applies the paper's pattern)
  tasks      `register_pairs_task` makes a JSON-lines pairs file a seqio Task with "inputs" and
             "targets" (forward or backward view, with its tag); `register_mixture` mixes tasks
             in proportion to their sizes (seed + curated data). pausejax's fine-tuning adds the
             run's M_ft pauses, as for any task.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from pausejax import fs
from pausejax import readers
from pausejax import specials
from pausejax.errors import UsageError

# The paper's tags: seed pairs in the style of an assistant, augmented ones from the web.
SEED_TAG = "Answer in the style of an AI Assistant."
WEB_TAG = "Answer with knowledge from web search."
# The paper's pattern for the rating at the end of the scorer's answer.
SCORE_PATTERN = re.compile(r"[Ss]core:\s*(\d+)$")
RATINGS = (1, 2, 3, 4, 5)

# The 5-point rubric in the structure of the paper's self-curation prompt (its Table 19, in our
# words): the scale, then the pair, then "Score: <rating>" on the last line.
PAPER_TEMPLATE = (
    "Below is an instruction from a user and a candidate answer. Evaluate whether or not the "
    "answer is a good example of how an AI Assistant should respond to the user's instruction. "
    "Please assign a score using the following 5-point scale:\n"
    "1: the answer is incomplete, vague, off-topic or not what the user asked for.\n"
    "2: the answer addresses most of the asks but does not directly answer the instruction.\n"
    "3: the answer is helpful and addresses the basic asks, but is not written by an AI "
    "Assistant (it reads like a blog post or a web page).\n"
    "4: the answer is written from an AI Assistant's perspective, clear, complete and helpful, "
    "with minor room for improvement.\n"
    "5: a perfect answer from an AI Assistant: focused, expert, well written, nothing "
    "irrelevant.\n"
    "Please first give a brief reasoning for your rating, then write \"Score: <rating>\" in the "
    "last line.\n\n"
    "Instruction: {instruction}\n\nAnswer: {output}")


def forward_prompt(instruction: str, tag: str = "") -> str:
  """What the forward model reads before its answer (the tag, if any, on a line of its own)."""
  return f"{tag}\n{instruction}\nAnswer:" if tag else f"{instruction}\nAnswer:"


def backward_prompt(output: str) -> str:
  """What the backward model M_yx reads before the instruction it predicts."""
  return f"{output}\nInstruction:"


def curation_prompt(instruction: str, output: str, template: str = PAPER_TEMPLATE) -> str:
  return template.format(instruction=instruction, output=output)


def parse_score(text: str) -> int | None:
  """The rating at the end of a scorer's answer, or None: unparseable or outside 1..5."""
  match = SCORE_PATTERN.search(text.strip())
  if match is None:
    return None
  rating = int(match.group(1))
  return rating if rating in RATINGS else None


def check_template(template: str, setting: str = "curate.template") -> None:
  try:
    template.format(instruction="", output="")
  except (KeyError, IndexError, ValueError) as e:
    raise UsageError.setting(setting, template[:40] + "...", "a text whose only fields are "
                             f"{{instruction}} and {{output}} ({type(e).__name__}: {e})") from None
  if "{instruction}" not in template or "{output}" not in template:
    raise UsageError.setting(setting, template[:40] + "...",
                             "a text with both {instruction} and {output} in it")


# ----------------------------------------------------------------------------------------------
# Files.

def read_pairs(path: str) -> list[dict[str, str]]:
  """(instruction, output) pairs of a JSON-lines file; one UsageError naming file:line if bad."""
  pairs = []
  for where, obj in readers.jsonl_records(path):
    if not isinstance(obj, dict) or not all(
        isinstance(obj.get(k), str) and obj[k].strip() for k in ("instruction", "output")):
      raise UsageError(f"{where} needs non-empty string fields \"instruction\" and \"output\"")
    pairs.append({"instruction": obj["instruction"].strip(), "output": obj["output"].strip()})
  if not pairs:
    raise UsageError(f"no (instruction, output) pairs in {path}")
  return pairs


def read_segments(path: str) -> list[str]:
  """Unlabelled segments: `{"text"}` JSON lines (.jsonl, .json, .gz of those) or plain text,
  one segment per paragraph."""
  name = path[:-3] if path.endswith(".gz") else path
  if name.endswith((".jsonl", ".json")):
    texts = []
    for where, obj in readers.jsonl_records(path):
      if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise UsageError(f"{where} needs a string field \"text\"")
      texts.append(obj["text"].strip())
  else:
    texts = [p.strip() for f in readers.paths(path)
             for p in re.split(r"\n\s*\n", readers.read_text(f))]
  texts = [t for t in texts if t]
  if not texts:
    raise UsageError(f"no text segments in {path}")
  return texts


def write_jsonl(path: str, records: Iterable[Any]) -> int:
  """Writes JSON lines whole or not at all (a temporary file renamed); returns the count."""
  lines = [json.dumps(r, ensure_ascii=False) for r in records]
  fs.makedirs(os.path.dirname(path) or ".")
  fs.write_text(path, "".join(line + "\n" for line in lines))
  return len(lines)


def read_jsonl(path: str) -> list[Any]:
  return [obj for _, obj in readers.jsonl_records(path)]


# ----------------------------------------------------------------------------------------------
# Segment filters (the paper's: 600-3,000 characters, deduplicated, no repetitive text).

@dataclasses.dataclass(frozen=True)
class SegmentFilter:
  min_chars: int = 600
  max_chars: int = 3000
  dedup: bool = True                    # Exact duplicates after normalising case and spaces.
  near_dup_jaccard: float = 0.8         # Word-5-gram Jaccard at or above this: near-duplicate
                                        # (1 = off).
  max_repeated_fraction: float = 0.3    # Segments whose lines repeat more than this: dropped.

  def validate(self, prefix: str = "filters.") -> None:
    if not isinstance(self.min_chars, int) or self.min_chars < 1:
      raise UsageError.setting(prefix + "min_chars", self.min_chars, "an integer >= 1")
    if not isinstance(self.max_chars, int) or self.max_chars < self.min_chars:
      raise UsageError.setting(prefix + "max_chars", self.max_chars,
                               f"an integer >= min_chars ({self.min_chars})")
    if not 0 < self.near_dup_jaccard <= 1:
      raise UsageError.setting(prefix + "near_dup_jaccard", self.near_dup_jaccard,
                               "a number in (0, 1] (1 = exact duplicates only)")
    if not 0 <= self.max_repeated_fraction <= 1:
      raise UsageError.setting(prefix + "max_repeated_fraction", self.max_repeated_fraction,
                               "a number in [0, 1] (1 = off)")

  def apply(self, texts: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """(kept segments in order, how many each filter dropped)."""
    counts = {"segments": len(texts), "too_short": 0, "too_long": 0, "repetitive": 0,
              "duplicate": 0, "near_duplicate": 0}
    kept, seen, near = [], set(), _NearDuplicates(self.near_dup_jaccard)
    for text in texts:
      if len(text) < self.min_chars:
        counts["too_short"] += 1
      elif len(text) > self.max_chars:
        counts["too_long"] += 1
      elif repeated_fraction(text) > self.max_repeated_fraction:
        counts["repetitive"] += 1
      elif self.dedup and _normalise(text) in seen:
        counts["duplicate"] += 1
      elif self.near_dup_jaccard < 1 and near.seen(text):
        counts["near_duplicate"] += 1
      else:
        seen.add(_normalise(text))
        near.add(text)
        kept.append(text)
    counts["kept"] = len(kept)
    return kept, counts


def _normalise(text: str) -> str:
  return " ".join(text.lower().split())


def repeated_fraction(text: str) -> float:
  """The fraction of a segment's lines (or sentences, for one-line text) that repeat an earlier
  one: navigation bars, boilerplate and loops score high."""
  units = [u for u in (_normalise(x) for x in text.splitlines()) if u]
  if len(units) < 2:
    units = [u for u in (_normalise(x) for x in re.split(r"(?<=[.!?])\s+", text)) if u]
  if len(units) < 2:
    return 0.0
  return 1 - len(set(units)) / len(units)


class _NearDuplicates:
  """MinHash over word 5-grams with LSH banding; candidates are confirmed by exact Jaccard."""
  NUM_HASHES, BANDS = 32, 8

  def __init__(self, threshold: float):
    self.threshold = threshold
    self._buckets: dict[tuple, list[int]] = {}
    self._shingles: list[frozenset[int]] = []
    self._salts = np.arange(1, self.NUM_HASHES + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)

  @staticmethod
  def _shingle_set(text: str) -> frozenset[int]:
    words = _normalise(text).split()
    grams = [" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))]
    return frozenset(int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
                     for g in grams)

  def _bands(self, shingles: frozenset[int]) -> list[tuple]:
    values = np.fromiter(shingles, dtype=np.uint64)
    with np.errstate(over="ignore"):
      signature = (values[None, :] * self._salts[:, None] >> np.uint64(7)).min(axis=1)
    rows = self.NUM_HASHES // self.BANDS
    return [(b, *signature[b * rows:(b + 1) * rows].tolist()) for b in range(self.BANDS)]

  def seen(self, text: str) -> bool:
    shingles = self._shingle_set(text)
    for band in self._bands(shingles):
      for index in self._buckets.get(band, ()):
        other = self._shingles[index]
        if len(shingles & other) / len(shingles | other) >= self.threshold:
          return True
    return False

  def add(self, text: str) -> None:
    shingles = self._shingle_set(text)
    self._shingles.append(shingles)
    for band in self._bands(shingles):
      self._buckets.setdefault(band, []).append(len(self._shingles) - 1)


# ----------------------------------------------------------------------------------------------
# SeqIO tasks.

FORWARD, BACKWARD = "forward", "backward"


def _pairs_columns(path: str, view: str, tag: str) -> dict[str, list[str]]:
  pairs = read_pairs(path)
  if view == FORWARD:
    return {"inputs": [forward_prompt(p["instruction"], tag) for p in pairs],
            "targets": [p["output"] for p in pairs]}
  return {"inputs": [backward_prompt(p["output"]) for p in pairs],
          "targets": [p["instruction"] for p in pairs]}


def _source(files: dict[str, str], view: str, tag: str) -> seqio.DataSource:
  @functools.lru_cache(maxsize=None)
  def columns(split):
    return _pairs_columns(files[split], view, tag)

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # seqio shuffles examples after preprocessing.
    return tf.data.Dataset.from_tensor_slices(columns(split))

  return seqio.FunctionDataSource(dataset_fn, splits=list(files))


def register_pairs_task(name: str, files: dict[str, str], *, vocab_path: str,
                        view: str = FORWARD, tag: str = "") -> seqio.Task:
  """A pairs file (per split) as a seqio Task with "inputs" and "targets" (EOS on targets).

  view "forward": inputs = `forward_prompt(instruction, tag)`, targets = output; "backward":
  inputs = `backward_prompt(output)`, targets = instruction (the loss is on the targets only,
  as for every fine-tuning task). Registering a name again replaces it.
  """
  if view not in (FORWARD, BACKWARD):
    raise ValueError(f"view must be {FORWARD!r} or {BACKWARD!r}, got {view!r}")
  vocabulary = specials.load_vocabulary(vocab_path)
  task = seqio.Task(
      name, source=_source(dict(files), view, tag),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={
          "inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
          "targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
      },
      shuffle_buffer_size=10_000)
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add_provider(name, task)


def register_mixture(name: str, tasks: dict[str, int]) -> seqio.Mixture:
  """Task name -> number of examples; each is sampled in proportion to its size (one pass over
  seed + curated data, shuffled together). Empty tasks are left out."""
  rates = [(t, float(n)) for t, n in tasks.items() if n > 0]
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, rates)


def split_validation(pairs: list[dict], count: int, seed: int) -> tuple[list[dict], list[dict]]:
  """(train, validation): `count` pairs held out at random (for eval loss), the rest in order."""
  if count <= 0 or count >= len(pairs):
    raise UsageError.setting("seed_validation", count,
                             f"an integer in [1, {len(pairs) - 1}] (there are {len(pairs)} "
                             "seed pairs)")
  held = set(np.random.default_rng(seed).choice(len(pairs), count, replace=False).tolist())
  return ([p for i, p in enumerate(pairs) if i not in held],
          [p for i, p in enumerate(pairs) if i in held])


# ----------------------------------------------------------------------------------------------
# A pipeline directory's tasks (`pausejax.humpback` writes both files).

RUN_SETTINGS_FILE = "tasks.json"
TASKS_FILE = "tasks.py"
TASKS_MODULE_TEXT = (
    '"""Registers the seqio tasks of the Humpback run in this directory (pausejax.humpback)."""\n'
    "import os\n\nfrom pausejax import humpback_data\n\n"
    "humpback_data.register_run(os.path.dirname(os.path.abspath(__file__)))\n")


def register_run(workdir: str) -> list[str]:
  """Registers what the stages in `workdir` have written so far; returns the task names.

  humpback_seed       forward seed pairs (train; validation: the held-out seed pairs)
  humpback_backward   the same pairs, output -> instruction
  humpback_candidates every augmented pair, before curation (tagged as web data)
  humpback_curatedK   the pairs curation round K kept (tagged as web data)
  humpback_mixK       seed + curatedK, a Mixture in proportion to their sizes
  """
  settings = json.loads(fs.read_text(os.path.join(workdir, RUN_SETTINGS_FILE)))
  vocab, data = settings["vocab_path"], os.path.join(workdir, "data")
  files = {"train": os.path.join(data, "seed_train.jsonl"),
           "validation": os.path.join(data, "seed_validation.jsonl")}
  if not os.path.exists(files["train"]):
    return []
  register_pairs_task("humpback_seed", files, vocab_path=vocab, tag=settings["seed_tag"])
  register_pairs_task("humpback_backward", files, vocab_path=vocab, view=BACKWARD)
  names = ["humpback_seed", "humpback_backward"]
  candidates = os.path.join(workdir, "augment", "candidates.jsonl")
  if os.path.exists(candidates) and read_jsonl(candidates):
    register_pairs_task("humpback_candidates", {"train": candidates}, vocab_path=vocab,
                        tag=settings["web_tag"])
    names.append("humpback_candidates")
  num_seed = len(read_jsonl(files["train"]))
  k = 1
  while os.path.exists(path := os.path.join(workdir, f"curate{k}", "curated.jsonl")):
    num = len(read_jsonl(path))
    if num:
      register_pairs_task(f"humpback_curated{k}", {"train": path}, vocab_path=vocab,
                          tag=settings["web_tag"])
    register_mixture(f"humpback_mix{k}", {"humpback_seed": num_seed,
                                          f"humpback_curated{k}": num})
    names += [f"humpback_curated{k}"] * bool(num) + [f"humpback_mix{k}"]
    k += 1
  return names
