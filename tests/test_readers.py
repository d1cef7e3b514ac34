"""Users' files: streamed documents and JSON lines, plain or gzipped; bad files named."""

import gzip
import json
import os
import re
import subprocess
import sys

import pytest
import seqio
import tensorflow as tf

from pausejax import readers
from pausejax.errors import UsageError


def _texts(source, split="train", **kwargs):
  return [x["text"].decode() for x in source.get_dataset(split, shuffle=False, **kwargs)
          .as_numpy_iterator()]


def test_stream_documents_from_jsonl_and_text(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "one \\u00e9"}\n\n{"text": "two"}\n')
  with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
    f.write("three\nstill three\n\n  \nfour\n")
  (tmp_path / "c.txt").write_text("five\n\n\nsix")  # No newline at the end.
  source = readers.file_source({"train": str(tmp_path / "*.jsonl"),
                                "validation": str(tmp_path / "*.txt*")})
  assert _texts(source) == ["one \u00e9", "two"]
  assert _texts(source, "validation") == ["three\nstill three", "four", "five", "six"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": \n', r":2 is not JSON \("),
    ('{"text": "ok"}\n{"body": "x"}\n', r":2 has no 'text' field \(got \['body'\]\)"),
])
def test_malformed_jsonl_line_is_one_line_naming_file_and_line(tmp_path, content, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(content)
  source = readers.file_source({"train": str(path)})
  with pytest.raises(tf.errors.OpError) as e:
    _texts(source)
  assert re.fullmatch(f"{re.escape(str(path))}{message}.*", readers.error_line(e.value))
  assert "\n" not in readers.error_line(e.value)


def test_enough_files_are_sharded_by_file_else_by_example(tmp_path):
  for i in range(4):
    (tmp_path / f"part-{i}.txt").write_text("\n\n".join(f"file {i} doc {j}" for j in range(3)))
  (tmp_path / "one.txt").write_text("\n\n".join(f"doc {j}" for j in range(10)))
  files = readers.file_source({"train": str(tmp_path / "part-*.txt")})
  one = readers.file_source({"train": str(tmp_path / "one.txt")})
  task = lambda name, source: seqio.Task(name, source, preprocessors=[], output_features={})
  per_shard = [_texts(task("by_file", files), shard_info=seqio.ShardInfo(s, 2)) for s in (0, 1)]
  # Each shard reads whole files of its own: files 0 and 2, and 1 and 3.
  assert {d.split()[1] for d in per_shard[0]} == {"0", "2"}
  assert {d.split()[1] for d in per_shard[1]} == {"1", "3"}
  by_example = [_texts(task("by_example", one), shard_info=seqio.ShardInfo(s, 3)) for s in range(3)]
  assert by_example == [[f"doc {j}" for j in range(s, 10, 3)] for s in range(3)]


def test_jsonl_records_name_the_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"x": 1}) + "\n\n" + json.dumps([2]) + "\n")
  assert list(readers.jsonl_records(str(path))) == [(f"{path}:1", {"x": 1}), (f"{path}:3", [2])]


def test_truncated_gzip_is_one_line_naming_the_file(tmp_path):
  path = tmp_path / "cut.jsonl.gz"
  data = gzip.compress(("\n".join(json.dumps({"text": f"line {i}"}) for i in range(500))).encode())
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(UsageError) as e:
    list(readers.jsonl_records(str(path)))
  assert str(e.value).startswith(f"{path} cannot be read (") and "\n" not in str(e.value)


def test_no_matching_files(tmp_path):
  with pytest.raises(UsageError, match=r"^no files match '.*missing-\*\.jsonl'"):
    list(readers.jsonl_records(str(tmp_path / "missing-*.jsonl")))


def test_a_stream_reads_a_gzip_whose_tail_is_corrupt_up_to_the_damage(tmp_path):
  """A whole-file read of this file fails; a stream yields its first documents."""
  path = tmp_path / "cut.jsonl.gz"
  data = gzip.compress("".join(json.dumps({"text": f"line {i}"}) + "\n"
                               for i in range(200_000)).encode())
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(UsageError):
    readers.read_text(str(path))
  ds = readers.file_source({"train": str(path)}).get_dataset("train", shuffle=False)
  first = [x["text"].decode() for x in ds.take(3).as_numpy_iterator()]
  assert first == ["line 0", "line 1", "line 2"]


_MEMORY_PROBE = """
import resource, sys
from pausejax import readers
source = readers.file_source({"train": sys.argv[1]})
it = source.get_dataset("train", shuffle=False).as_numpy_iterator()
next(it)  # Everything is built and running: the baseline.
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(1 for _ in zip(range(20_000), it))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(n, (after - before) // 1024)
"""


def test_a_large_text_file_is_not_read_whole(tmp_path):
  """Reading 20k documents of a 256 MB file raises peak memory by far less than the file."""
  path = tmp_path / "big.txt"
  doc = ("All the world's a stage, and all the men and women merely players. " * 30 + "\n\n")
  with open(path, "w") as f:
    for _ in range(256 * 2**20 // len(doc)):
      f.write(doc)
  assert os.path.getsize(path) > 250 * 2**20
  out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  docs, grown_mib = map(int, out.stdout.split())
  assert docs == 20_000
  assert grown_mib < 64, grown_mib
