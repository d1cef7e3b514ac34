"""The one reader of users' files: documents and JSON lines, plain or gzipped; bad files named."""

import gzip
import json

import pytest

from pausejax import readers
from pausejax.errors import UsageError


def test_documents_from_jsonl_and_text_in_file_order(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
  with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
    f.write("three\nstill three\n\n  \nfour\n")
  assert readers.documents(str(tmp_path / "*"), "text") == [
      "one", "two", "three\nstill three", "four"]


def test_jsonl_records_name_the_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"x": 1}) + "\n\n" + json.dumps([2]) + "\n")
  assert list(readers.jsonl_records(str(path))) == [(f"{path}:1", {"x": 1}), (f"{path}:3", [2])]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": \n', r":2 is not JSON \("),
    ('{"text": "ok"}\n{"body": "x"}\n', r":2 has no 'text' field \(got \['body'\]\)"),
])
def test_malformed_jsonl_is_one_line_naming_file_and_line(tmp_path, content, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(content)
  with pytest.raises(UsageError, match=f"^{str(path)}{message}"):
    readers.documents(str(path), "text")


def test_truncated_gzip_is_one_line_naming_the_file(tmp_path):
  path = tmp_path / "cut.jsonl.gz"
  data = gzip.compress(("\n".join(json.dumps({"text": f"line {i}"}) for i in range(500))).encode())
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(UsageError) as e:
    readers.documents(str(path), "text")
  assert str(e.value).startswith(f"{path} cannot be read (") and "\n" not in str(e.value)


def test_no_matching_files(tmp_path):
  with pytest.raises(UsageError, match=r"^no files match '.*missing-\*\.jsonl'"):
    list(readers.jsonl_records(str(tmp_path / "missing-*.jsonl")))
