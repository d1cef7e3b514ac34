"""Reading users' files: JSON lines and plain text, local or gs://, optionally gzipped.

Pretraining corpora (`tasks.register_pretraining_task`) are streamed: `file_source` is a seqio
source that reads them line by line inside `tf.data`, sharded by file. Downstream sets
(`downstream.py`, small) are read whole with `jsonl_records`. Either way a bad file reads the
same: one line naming the file, and for JSON lines the line number (`error_line` recovers it
from the `tf.data` error of a stream).

A stream's .gz file is checked at both ends: its first bytes must be gzip's (tf.data would say
only "incorrect header check", naming no file), and when the stream reaches its end the file is
decompressed once more to its end-of-stream marker, because tf.data reads a file cut short as a
shorter file, without a word. That costs a second read of every .gz file per pass.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import zlib
from typing import Any, Iterator, Mapping

import seqio
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


# ---------------------------------------------------------------------------------------------
# Streaming: the same formats as a seqio source that reads files one line at a time.

def _compression(path: tf.Tensor) -> tf.Tensor:
  return tf.where(tf.strings.regex_full_match(path, r".*\.gz"), "GZIP", "")


_GZIP_MAGIC = b"\x1f\x8b"


def gzip_problem(path: str) -> str | None:
  """What is wrong with the gzip file `path` (read to its end), or None if it is whole."""
  try:
    with tf.io.gfile.GFile(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as f:
      while f.read(1 << 20):
        pass
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError.
    return f"is cut short or damaged ({e}); a .gz file must be whole (check it with gzip -t)"
  except tf.errors.OpError as e:
    return f"cannot be read ({e.message.split('; ')[-1]})"
  return None


def _check_gzip(path: bytes, at_end: bool) -> bytes:
  """b"" if the .gz file `path` looks right at this end of its stream; else a ValueError."""
  name = path.decode("utf-8", "replace")
  if not name.endswith(".gz"):
    return b""
  if at_end:
    problem = gzip_problem(name)
  else:
    try:
      with tf.io.gfile.GFile(name, "rb") as f:
        head = f.read(len(_GZIP_MAGIC))
    except tf.errors.OpError as e:  # Gone or unreadable: tf.data would name it the same way.
      raise ValueError(f"{name}: {e.message.split('; ')[-1]}") from None
    problem = None if head in (_GZIP_MAGIC, b"") else (
        f"is not gzip data (it starts with {head!r}); a .gz name needs gzip content")
  if problem:
    raise ValueError(f"{name} {problem}")
  return b""


def _gzip_check(path: tf.Tensor, at_end: bool) -> tf.data.Dataset:
  """One empty line that checks the file at this end of its stream (see the module docstring).

  A pure function of the path (stateful=False): the iterator position stays checkpointable.
  """
  return tf.data.Dataset.from_tensors(path).map(lambda p: tf.ensure_shape(tf.numpy_function(
      functools.partial(_check_gzip, at_end=at_end), [p], tf.string, stateful=False), []))


def _lines(path: tf.Tensor) -> tf.data.Dataset:
  return tf.data.TextLineDataset(path, compression_type=_compression(path))


def _jsonl_text(text_key: str):
  """(path, index, line) -> the line's `text_key` field, UTF-8; a bad line raises naming it."""
  def parse(path: bytes, index: int, line: bytes) -> bytes:
    name = path.decode("utf-8", "replace")
    where = f"{name}:{index + 1}"
    try:
      obj = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8.
      # The last line of a .gz file cut short is half a line: say what is really wrong.
      problem = gzip_problem(name) if name.endswith(".gz") else None
      if problem:
        raise ValueError(f"{name} {problem}") from None
      raise ValueError(f"{where} is not JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(obj, dict) or text_key not in obj:
      got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise ValueError(f"{where} has no {text_key!r} field (got {got})")
    return str(obj[text_key]).encode("utf-8")
  return parse


def _read_jsonl(path: tf.Tensor, text_key: str) -> tf.data.Dataset:
  parse = _jsonl_text(text_key)
  checks = [_gzip_check(path, at_end).map(lambda x: (tf.constant(-1, tf.int64), x))
            for at_end in (False, True)]
  lines = checks[0].concatenate(_lines(path).enumerate()).concatenate(checks[1])
  lines = lines.filter(lambda i, line: tf.strings.length(tf.strings.strip(line)) > 0)
  # A pure function of its inputs (stateful=False), so the iterator position stays
  # checkpointable for an exact resume.
  return lines.map(lambda i, line: {text_key: tf.ensure_shape(tf.numpy_function(
      parse, [path, i, line], tf.string, stateful=False), [])})


def _read_text(path: tf.Tensor, text_key: str) -> tf.data.Dataset:
  """Documents of a text file: runs of lines between blank lines, stripped."""
  # The checks are empty lines: the last one ends the last document.
  lines = _gzip_check(path, False).concatenate(_lines(path)).concatenate(_gzip_check(path, True))

  def step(doc, line):
    blank = tf.strings.length(tf.strings.strip(line)) == 0
    joined = tf.where(tf.strings.length(doc) == 0, line, tf.strings.join([doc, line], "\n"))
    return tf.where(blank, "", joined), (tf.strings.strip(doc), blank)

  docs = lines.scan(tf.constant(""), step)
  docs = docs.filter(lambda doc, ended: ended & (tf.strings.length(doc) > 0))
  return docs.map(lambda doc, ended: {text_key: doc})


def file_source(files: Mapping[str, str], text_key: str = "text") -> seqio.DataSource:
  """A seqio source over text or JSON-lines files (split -> glob; local or gs://; .gz or not).

  Files are read line by line as a stream, never whole. With at least as many files as data
  shards each shard reads its own files (seqio's file sharding); with fewer, every shard reads
  them all and keeps its share of the examples. A JSON-lines pattern (`.jsonl`/`.json` in it)
  gives each line's `text_key` field; any other gives documents separated by blank lines.
  """
  def reader(jsonl: bool):
    return functools.partial(_read_jsonl if jsonl else _read_text, text_key=text_key)

  return FileSplits({split: seqio.FileDataSource(reader(is_jsonl(pattern)), {split: pattern})
                        for split, pattern in files.items()}, files)


class FileSplits(seqio.DataSource):
  """One seqio source per split (each split may be text or JSON lines)."""

  def __init__(self, sources: Mapping[str, seqio.FileDataSource], patterns: Mapping[str, str]):
    self._sources = dict(sources)
    self.patterns = dict(patterns)  # split -> glob, for a check that the files exist.
    super().__init__(splits=list(sources), caching_permitted=True)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> list[str]:
    return list(self._sources[split].list_shards(split))

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, **kwargs) -> tf.data.Dataset:
    del kwargs
    return self._sources[split].get_dataset(split=split, shuffle=shuffle, seed=seed,
                                            shard_info=shard_info)



def error_line(e: tf.errors.OpError) -> str:
  """The one line that says why a `tf.data` pipeline failed (e.g. a file's bad JSON line)."""
  found = re.search(r"(?:ValueError|UsageError): (.+)", e.message)
  if found:
    return found.group(1).strip()
  line = e.message.strip().splitlines()[0] if e.message.strip() else type(e).__name__
  line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line)
  line = re.sub(r"\s*\[Op:[^\]]*\].*$", "", line)
  return re.sub(r"^(\S+); ", r"\1: ", line)  # "<file>; No such file or directory".
