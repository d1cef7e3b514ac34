"""Run outputs on local disk or on an object store (gs://...), through one filesystem layer.

Local paths use the os module; any path with a scheme ("gs://bucket/run", "s3://...", "ram://...")
goes through TensorFlow's `tf.io.gfile`. That is the layer the rest of a run already writes
through on gs://: Orbax checkpoints reach GCS via `etils.epath`, which hands gs:// paths to
`tf.io.gfile` whenever TensorFlow is installed (it always is here), and clu's TensorBoard writer
and the data digests use `tf.io.gfile` directly. TensorFlow is imported only for such paths.

  fs.makedirs(workdir)
  fs.write_text(os.path.join(workdir, "summary.txt"), text)  # Whole or not at all.
  fs.append_text(path, line)  # Local: an append. Elsewhere: a rewrite of the whole file.

Writes are atomic: the content goes to `<path>.tmp`, which is then renamed over `path`, so a reader
(or a killed run) sees the old file or the new one, never a torn one. Locally the rename is
`os.replace` after an fsync; on GCS a rename is a server-side copy and delete, which for the small
files written here (metrics, plots, summaries) costs little.
"""

from __future__ import annotations

import os


def is_local(path: str | os.PathLike) -> bool:
  """Whether `path` is on the local filesystem (it has no "scheme://" prefix)."""
  return "://" not in os.fspath(path)


def _gfile():
  import tensorflow as tf  # Here, not at the top: only non-local paths need it.
  return tf.io.gfile


def exists(path: str | os.PathLike) -> bool:
  path = os.fspath(path)
  return os.path.exists(path) if is_local(path) else _gfile().exists(path)


def makedirs(path: str | os.PathLike) -> None:
  """Creates `path` and its parents; nothing happens if it exists."""
  path = os.fspath(path)
  if is_local(path):
    os.makedirs(path, exist_ok=True)
  else:
    _gfile().makedirs(path)


def read_bytes(path: str | os.PathLike) -> bytes:
  path = os.fspath(path)
  if is_local(path):
    with open(path, "rb") as f:
      return f.read()
  with _gfile().GFile(path, "rb") as f:
    return f.read()


def read_text(path: str | os.PathLike) -> str:
  """The file's UTF-8 text, with its line endings as they are."""
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Replaces `path` with `data` atomically (a temporary file, then a rename)."""
  path = os.fspath(path)
  tmp_path = path + ".tmp"
  if is_local(path):
    with open(tmp_path, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
    return
  gfile = _gfile()
  with gfile.GFile(tmp_path, "wb") as f:
    f.write(data)
  gfile.rename(tmp_path, path, overwrite=True)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Replaces `path` with `text` (UTF-8) atomically."""
  write_bytes(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> None:
  """Adds `text` at the end of `path` (created if missing).

  Locally this is an append, opened and closed per call: no handle outlives a rename of the
  file, and closing flushes. Object stores cannot append, so elsewhere the file is read, extended
  and rewritten whole (atomically); callers that append often keep the content in memory and
  call `write_text` instead (see `pausejax.metrics.MetricsLogger`).
  """
  path = os.fspath(path)
  if is_local(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  write_text(path, (read_text(path) if exists(path) else "") + text)
