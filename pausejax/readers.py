"""Reading users' files: JSON lines and plain text, local or gs://, optionally gzipped.

One reader for every file-backed task (pretraining corpora in `tasks.py`, downstream sets in
`downstream.py`), so a bad file reads the same way everywhere: one line naming the file, and for
JSON lines the line number.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from typing import Any, Iterator

import tensorflow as tf

from pausejax.errors import UsageError


def paths(pattern: str) -> list[str]:
  """The files matching `pattern`, sorted; UsageError when there are none."""
  found = sorted(tf.io.gfile.glob(pattern))
  if not found:
    raise UsageError(f"no files match {pattern!r}")
  return found


def read_text(path: str) -> str:
  """A whole file's UTF-8 text, gunzipped when its name ends in .gz."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
    if path.endswith(".gz"):
      data = gzip.decompress(data)
    return data.decode("utf-8")
  except (OSError, EOFError, zlib.error) as e:  # A truncated or corrupt gzip, a vanished file.
    raise UsageError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
  except tf.errors.OpError as e:
    raise UsageError(f"{path} cannot be read ({e.message})") from None
  except UnicodeDecodeError as e:
    raise UsageError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def is_jsonl(path: str) -> bool:
  return ".jsonl" in path or ".json" in path


def jsonl_records(pattern: str) -> Iterator[tuple[str, Any]]:
  """("path:line", object) for each non-blank line of the JSON-lines files matching `pattern`."""
  for path in paths(pattern):
    yield from _records(path)


def _records(path: str) -> Iterator[tuple[str, Any]]:
  for line_no, line in enumerate(read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    where = f"{path}:{line_no}"
    try:
      yield where, json.loads(line)
    except json.JSONDecodeError as e:
      raise UsageError(f"{where} is not JSON ({e.msg})") from None


def documents(pattern: str, text_key: str) -> list[str]:
  """Documents from .jsonl (the `text_key` field of each line) and .txt files (split at blank
  lines), optionally .gz, in file order."""
  docs = []
  for path in paths(pattern):
    if is_jsonl(path):
      for where, obj in _records(path):
        if not isinstance(obj, dict) or text_key not in obj:
          got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
          raise UsageError(f"{where} has no {text_key!r} field (got {got})")
        docs.append(str(obj[text_key]))
    else:
      docs.extend(d.strip() for d in re.split(r"\n\s*\n", read_text(path)) if d.strip())
  return docs
