"""pausejax.fs and the run outputs written through it, locally and on a non-local filesystem.

TensorFlow's in-memory `ram://` filesystem stands in for GCS (a mock of gs://): paths with a
scheme go through `tf.io.gfile` as gs:// ones do, and nothing of it ever touches the local disk,
so any output still written with local file calls shows up as a stray `ram:` folder.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from pausejax import fs
from pausejax import metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def ram_dir():
  """A fresh directory on the in-memory filesystem (it lives as long as the process)."""
  import tensorflow as tf
  path = f"ram://pausejax-test-{uuid.uuid4().hex}"
  yield path
  if tf.io.gfile.exists(path):
    tf.io.gfile.rmtree(path)


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
  """Runs the test in an empty directory, which must still be empty afterwards."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield cwd
  assert sorted(os.listdir(cwd)) == [], "a non-local path was written to the local disk"


def test_is_local():
  assert fs.is_local("runs/tiny") and fs.is_local("/abs/path")
  assert not fs.is_local("gs://bucket/run") and not fs.is_local("ram://x")


def test_local_write_text_is_atomic_and_read_back(tmp_path):
  path = tmp_path / "sub" / "summary.txt"
  fs.makedirs(path.parent)
  fs.makedirs(path.parent)  # Exists already: no error.
  assert not fs.exists(path)
  fs.write_text(path, "first\n")
  fs.write_text(path, "naïve — second\n")  # Replaces, in UTF-8.
  assert fs.read_text(path) == "naïve — second\n"
  assert path.read_bytes() == "naïve — second\n".encode("utf-8")
  fs.append_text(path, "third\n")
  assert fs.read_text(path) == "naïve — second\nthird\n"
  assert sorted(os.listdir(path.parent)) == ["summary.txt"]  # No temporary file left.


def test_helpers_on_the_in_memory_filesystem(ram_dir, empty_cwd):
  import tensorflow as tf
  run = f"{ram_dir}/a/b"
  fs.makedirs(run)
  assert fs.exists(run) and tf.io.gfile.isdir(run)
  path = f"{run}/config.json"
  fs.write_text(path, '{"seed": 1}\n')
  fs.write_text(path, '{"seed": 2}\n')
  fs.append_text(path, "tail\n")
  fs.append_text(f"{run}/new.txt", "one\n")  # Appending creates the file.
  fs.write_bytes(f"{run}/blob.bin", b"\x00\xff")
  assert fs.read_text(path) == '{"seed": 2}\ntail\n'
  assert fs.read_text(f"{run}/new.txt") == "one\n"
  assert fs.read_bytes(f"{run}/blob.bin") == b"\x00\xff"
  assert sorted(tf.io.gfile.listdir(run)) == ["blob.bin", "config.json", "new.txt"]


def test_run_outputs_on_a_non_local_workdir_stay_off_the_local_disk(ram_dir, empty_cwd):
  """metrics.jsonl, its truncation, loss.png and summary.txt all land on ram://, none locally."""
  import tensorflow as tf
  workdir = f"{ram_dir}/run"
  metrics_path = f"{workdir}/{metrics.METRICS_FILENAME}"
  with metrics.MetricsLogger(workdir, total_steps=40) as logger:
    assert logger.metrics_path == metrics_path
    for step in (10, 20, 30):
      logger.write(step, {"train_loss": 4.0 - step / 10})
    assert [r["step"] for r in metrics.read_metrics(metrics_path)] == [10, 20, 30]
    logger.truncate_after(20)  # As on a resume from step 20.
    assert [r["step"] for r in metrics.read_metrics(metrics_path)] == [10, 20]
    logger.write(30, {"train_loss": 1.5})
    logger.write(40, {"train_loss": 1.25, "eval_loss": 1.75})
  rows = [json.loads(line) for line in fs.read_text(metrics_path).splitlines()]
  assert rows == [{"step": 10, "train_loss": 3.0}, {"step": 20, "train_loss": 2.0},
                  {"step": 30, "train_loss": 1.5},
                  {"step": 40, "train_loss": 1.25, "eval_loss": 1.75}]

  # A new logger on the same workdir (a restarted process) appends after what is there.
  with metrics.MetricsLogger(workdir, total_steps=50) as logger:
    logger.write(50, {"train_loss": 1.0})
  assert [r["step"] for r in metrics.read_metrics(metrics_path)] == [10, 20, 30, 40, 50]

  plot_path = f"{workdir}/{metrics.PLOT_FILENAME}"
  metrics.plot_losses(metrics_path, plot_path)
  png = fs.read_bytes(plot_path)
  assert png[:8] == PNG_MAGIC and len(png) > 1000

  summary = metrics.format_summary({"final_train_loss": 1.0, "workdir": workdir})
  fs.write_text(f"{workdir}/summary.txt", summary)
  assert fs.read_text(f"{workdir}/summary.txt") == summary

  names = sorted(tf.io.gfile.listdir(workdir))
  assert [n for n in names if not n.startswith("events.out.tfevents.")] == [
      "loss.png", "metrics.jsonl", "summary.txt"]  # No temporary file left.
  assert any(n.startswith("events.out.tfevents.") for n in names)  # TensorBoard went there too.
  # empty_cwd checks that no local "ram:" folder (or anything else) appeared.


def test_truncate_on_a_non_local_workdir_drops_torn_lines(ram_dir, empty_cwd):
  workdir = f"{ram_dir}/run"
  fs.makedirs(workdir)
  metrics_path = f"{workdir}/{metrics.METRICS_FILENAME}"
  fs.write_text(metrics_path, '{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n{"step": 3, "x"')
  with metrics.MetricsLogger(workdir, total_steps=10) as logger:
    logger.truncate_after(5)
    logger.write(3, {"x": 3})
  assert fs.read_text(metrics_path) == (
      '{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n{"step": 3, "x": 3}\n')


def test_plot_of_missing_metrics_on_a_non_local_path(ram_dir, empty_cwd):
  fs.makedirs(ram_dir)
  metrics.plot_losses(f"{ram_dir}/missing.jsonl", f"{ram_dir}/empty.png")
  assert fs.read_bytes(f"{ram_dir}/empty.png")[:8] == PNG_MAGIC
