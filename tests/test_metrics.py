"""Tests for pausejax.metrics: jsonl + TensorBoard, resume truncation, ETA, MFU, plot, summary."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import types

import jax
import numpy as np
import pytest

from pausejax import metrics


class FakeClock:
  """Returns the given times one per call, so ETA tests need no sleeping."""

  def __init__(self, times):
    self._times = iter(times)

  def __call__(self):
    return next(self._times)


def _lines(path):
  with open(path) as f:
    return f.read().splitlines()


def test_write_appends_one_json_object_per_call(tmp_path):
  with metrics.MetricsLogger(str(tmp_path), total_steps=10) as logger:
    logger.write(1, {"train_loss": np.float32(2.5), "tokens": np.int64(4096),
                     "lr": jax.numpy.array(1e-3)})
    logger.write(2, {"train_loss": 2.25, "tokens": 8192})
  lines = _lines(tmp_path / metrics.METRICS_FILENAME)
  assert len(lines) == 2
  rows = [json.loads(line) for line in lines]
  assert list(rows[0]) == ["step", "train_loss", "tokens", "lr"]  # "step" comes first.
  assert rows[0]["step"] == 1 and rows[1]["step"] == 2
  assert rows[0]["train_loss"] == 2.5 and rows[1]["train_loss"] == 2.25
  assert rows[0]["tokens"] == 4096 and isinstance(rows[0]["tokens"], int)
  assert rows[0]["lr"] == pytest.approx(1e-3)


def test_write_rejects_a_scalar_named_step(tmp_path):
  with metrics.MetricsLogger(str(tmp_path), total_steps=10) as logger:
    with pytest.raises(ValueError):
      logger.write(1, {"step": 3})


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  with metrics.MetricsLogger(str(tmp_path), total_steps=10) as logger:
    logger.write(5, {"train_loss": 3.5, "eval_accuracy": 0.25})
    logger.write(10, {"train_loss": 3.0})
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  acc = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  assert {"train_loss", "eval_accuracy"} <= set(acc.Tags()["tensors"])
  loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
          for e in acc.Tensors("train_loss")]
  assert loss == [(5, 3.5), (10, 3.0)]


def test_non_lead_host_writes_no_files(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricsLogger(str(workdir), total_steps=10, is_lead_host=False) as logger:
    logger.write(1, {"train_loss": 1.0})
    logger.truncate_after(0)
  assert not workdir.exists() or not os.listdir(workdir)


def test_truncate_after_keeps_exactly_the_lines_up_to_step(tmp_path):
  logger = metrics.MetricsLogger(str(tmp_path), total_steps=100)
  for step in (10, 20, 20, 30, 40):
    logger.write(step, {"train_loss": float(step)})
  path = tmp_path / metrics.METRICS_FILENAME
  before = _lines(path)
  with open(path, "a") as f:
    f.write('{"step": 5, "train_lo')  # A torn last line from a killed run.
  logger.truncate_after(20)
  assert _lines(path) == before[:3]
  # Writing after truncation appends to the new file (no stale handle on the replaced one).
  logger.write(30, {"train_loss": 7.0})
  logger.close()
  assert [json.loads(line)["step"] for line in _lines(path)] == [10, 20, 20, 30]
  assert not os.path.exists(str(path) + ".tmp")


def test_truncate_after_minus_one_empties_the_file(tmp_path):
  with metrics.MetricsLogger(str(tmp_path), total_steps=10) as logger:
    logger.write(0, {"eval_loss": 9.0})
    logger.truncate_after(-1)
  assert _lines(tmp_path / metrics.METRICS_FILENAME) == []


def test_progress_eta_excludes_the_first_compiling_steps_and_handles_resume(tmp_path):
  # Resumed at step 100 of 600. First progress call at step 110 after 50 s (compilation);
  # then 10 steps in 10 s: 1 s/step, 480 steps left -> 8 minutes.
  out = io.StringIO()
  logger = metrics.MetricsLogger(str(tmp_path), total_steps=600, clock=FakeClock([50.0, 60.0]),
                                 stream=out)
  first = logger.progress(110, {"train_loss": 5.0})
  line = logger.progress(120, {"train_loss": 5.2134, "tokens_per_sec": 41234.0, "mfu": 0.1234})
  logger.close()
  assert "ETA --" in first
  assert line == "step 120/600 | loss 5.213 | 41.2k tok/s | MFU 12.3% | ETA 8m00s"
  assert out.getvalue().splitlines() == [first, line]


def test_progress_is_silent_on_other_hosts(tmp_path):
  out = io.StringIO()
  logger = metrics.MetricsLogger(str(tmp_path), total_steps=10, is_lead_host=False, stream=out)
  line = logger.progress(1, {"loss": 1.0})
  logger.close()
  assert "loss 1.000" in line and out.getvalue() == ""


def test_plot_losses_writes_a_png(tmp_path):
  with metrics.MetricsLogger(str(tmp_path), total_steps=30) as logger:
    for step in range(1, 31):
      logger.write(step, {"train_loss": 5.0 / step})
      if step % 10 == 0:
        logger.write(step, {"eval_loss": 6.0 / step, "eval_accuracy": 0.1})
  out_png = str(tmp_path / metrics.PLOT_FILENAME)
  metrics.plot_losses(str(tmp_path / metrics.METRICS_FILENAME), out_png)
  with open(out_png, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(data) > 1000


def test_plot_losses_without_losses_still_writes_a_png(tmp_path):
  out_png = str(tmp_path / "empty.png")
  metrics.plot_losses(str(tmp_path / "missing.jsonl"), out_png)
  with open(out_png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_mfu_arithmetic():
  # 6e12 FLOPs in 2 s = 3e12 FLOP/s; 4 devices of 1e12 peak -> 75%.
  assert metrics.mfu(6e12, 2.0, 4, 1e12) == pytest.approx(0.75)
  assert metrics.mfu(1e9, 0.5, 1, 4e9) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    metrics.mfu(1e9, 0.0, 1, 1e9)


@pytest.mark.parametrize("kind, key, peak", [
    ("TPU v5 lite", "TPU v5 lite", 197e12),
    ("TPU v5", "TPU v5", 459e12),
    ("TPU v4", "TPU v4", 275e12),
    ("TPU v6 lite", "TPU v6 lite", 918e12),
    ("NVIDIA H100 80GB HBM3", "H100", 989e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-40GB", "A100", 312e12),
    ("NVIDIA L4", "L4", 121e12),
])
def test_lookup_peak_flops_picks_the_most_specific_entry(kind, key, peak):
  assert metrics.lookup_peak_flops(kind) == (key, peak)


def test_lookup_peak_flops_unknown_kinds():
  assert metrics.lookup_peak_flops("NVIDIA L40S") is None  # Not "L4".
  assert metrics.lookup_peak_flops("Banana 9000") is None


def test_peak_flops_per_device_for_fake_devices():
  v5e = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
  peak, how = metrics.peak_flops_per_device(v5e)
  assert peak == 197e12 and "spec sheet" in how and "TPU v5 lite" in how
  v3 = types.SimpleNamespace(platform="tpu", device_kind="TPU v3")
  peak, how = metrics.peak_flops_per_device(v3)
  assert peak == pytest.approx(123e12 / 2) and "2 devices per chip" in how


def test_cpu_probe_is_positive_and_finite():
  rate = metrics.measure_matmul_flops(n=256, repeats=2)
  assert math.isfinite(rate) and rate > 0


_EPYC = "processor\t: 0\ncpu MHz\t\t: 2445.404\nflags\t\t: fpu sse2 avx fma avx2\n" * 2


@pytest.mark.parametrize("cpuinfo, max_khz, peak, isa", [
    (_EPYC, None, 2 * 2.445404e9 * 32, "avx2"),
    (_EPYC, "3500000", 2 * 3.5e9 * 32, "avx2"),  # The cpufreq maximum wins.
    (_EPYC.replace("avx2", "avx512f avx2"), None, 2 * 2.445404e9 * 64, "avx512f"),
    (_EPYC.replace(" fma", ""), None, 2 * 2.445404e9 * 16, "avx"),
])
def test_cpu_nominal_peak_is_cores_times_clock_times_flops_per_cycle(cpuinfo, max_khz, peak,
                                                                     isa):
  rate, how = metrics.cpu_nominal_flops(cpuinfo, cores=2, max_khz=max_khz)
  assert rate == pytest.approx(peak) and how.startswith("nominal: 2 cores") and f"({isa})" in how
  assert metrics.cpu_nominal_flops("processor : 0\n", cores=2, max_khz=None) is None


def test_cpu_peak_is_the_same_every_time():
  peaks = {metrics.peak_flops_per_device(jax.devices("cpu")[0]) for _ in range(3)}
  assert len(peaks) == 1


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (12.4, "12s"), (59.6, "1m00s"), (252, "4m12s"), (3780, "1h03m"),
    (90000, "1d01h"), (-1, "--"), (float("nan"), "--"),
])
def test_format_duration(seconds, text):
  assert metrics.format_duration(seconds) == text


@pytest.mark.parametrize("x, text", [
    (812, "812"), (41234, "41.2k"), (999.7, "1k"), (1.5e6, "1.5M")])
def test_format_si(x, text):
  assert metrics.format_si(x) == text


def test_format_summary_shows_the_given_values(tmp_path):
  workdir = str(tmp_path)
  text = metrics.format_summary({
      "params": 12_345_678, "steps": 600, "total_steps": 600, "tokens_real": 1_230_000,
      "tokens_total": 1_570_000, "pause_fraction": 0.216, "final_train_loss": 3.21456,
      "first_eval_loss": 5.1, "final_eval_loss": 3.3051, "first_eval_accuracy": 0.121,
      "final_eval_accuracy": 0.352, "wall_seconds": 252, "tokens_per_sec": 41234,
      "mfu": 0.123, "peak_how": "measured: float32 matmul probe", "workdir": workdir,
      "checkpoint_dir": os.path.join(workdir, "checkpoints"), "seed": 17,
  })
  for expected in ("12.3M", "12,345,678", "600 / 600", "1.23M real", "1.57M total", "21.6%",
                   "3.2146", "5.1000 -> 3.3051", "12.1% -> 35.2%", "4m12s", "41.2k tokens/s",
                   "12.3%", "measured: float32 matmul probe",
                   os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss.png"),
                   os.path.join(workdir, "checkpoints"), f"tensorboard --logdir {workdir}", "seed"):
    assert expected in text, expected
  assert len(text.splitlines()) < 30  # One screen.


def test_format_summary_tolerates_missing_and_odd_values():
  text = metrics.format_summary({"final_eval_loss": 2.5, "mfu": None, "params": "many"})
  rows = {line.split("  ")[0]: line for line in text.splitlines()}
  assert "2.5000" in rows["eval loss"]
  assert "MFU" not in rows
  assert "unexpected value" in rows["model params"]
  assert "run summary" in metrics.format_summary({})


def test_format_summary_accepts_other_names_and_nested_evals():
  text = metrics.format_summary({
      "train_loss": 2.75, "wall_time": 3780.0, "peak_source": "spec sheet: H100",
      "first_eval": {"step": 100, "eval_loss": 4.5, "eval_accuracy": 0.2},
      "final_eval": {"step": 600, "eval_loss": 3.25, "eval_accuracy": 0.4},
      "real_tokens_per_sec": 1234.5678,
  })
  rows = {line.split("  ")[0]: line for line in text.splitlines()}
  for label, expected in (("final train loss", "2.7500"), ("wall time", "1h03m"),
                          ("peak FLOP/s", "spec sheet: H100"), ("eval loss", "4.5000 -> 3.2500"),
                          ("eval accuracy", "20.0% -> 40.0%"), ("real_tokens_per_sec", "1235")):
    assert expected in rows[label], (label, text)
