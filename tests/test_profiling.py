"""Profiling: a jax.profiler trace of the chosen steps, and where the run's time went."""

import glob
import gzip
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_CLI, cli_overrides, tiny_config

PARTS = ("input", "compute", "eval", "downstream_eval", "checkpoint", "trace")


def _train(config, workdir):
  from pausejax import train
  return train.train_and_evaluate(config, str(workdir))


def _read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _check_split(split, wall_key):
  parts = [split[k] for k in PARTS]
  assert all(v >= 0 for v in parts), split
  assert sum(parts) <= split[wall_key] + 1e-6, split
  assert split["input"] + split["compute"] > 0, split
  assert split["other"] == pytest.approx(split[wall_key] - sum(parts), abs=1e-6)


def test_trace_of_the_chosen_steps_and_the_time_split(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir, num_train_steps=5, log_every_steps=2, eval_every_steps=2,
                       checkpoint_every_steps=5, **{"profile.start_step": 3,
                                                    "profile.num_steps": 2})
  info = _train(config, tmp_path)
  # TensorBoard's profile plugin layout under <workdir>/profile/: one session, both files.
  sessions = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*"))
  assert len(sessions) == 1
  names = os.listdir(sessions[0])
  assert any(n.endswith(".xplane.pb") for n in names), names
  [trace] = [n for n in names if n.endswith(".trace.json.gz")]
  with gzip.open(os.path.join(sessions[0], trace)) as f:
    events = json.load(f)["traceEvents"]
  steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
  assert steps == [3, 4]  # The chosen steps, and only those.
  phases = {e.get("name") for e in events}
  assert {"input", "compute", "eval", "checkpoint"} <= phases  # Step 4 logs and evaluates.
  # Every log line carries the split of the time since the previous one.
  logged = [r for r in _read(tmp_path) if "train_loss" in r]
  assert [r["step"] for r in logged] == [2, 4, 5]
  for row in logged:
    _check_split({k[len("time/"):]: v for k, v in row.items() if k.startswith("time/")}, "wall")
  assert logged[1]["time/eval"] > 0 and logged[1]["time/trace"] > 0  # Step 2's eval; the trace.
  _check_split(info["time_split"], "wall")
  assert info["time_split"]["eval"] > 0 and info["time_split"]["checkpoint"] > 0
  assert info["time_split"]["wall"] == pytest.approx(info["wall_time"], abs=0.05)
  assert "time split" in (tmp_path / "summary.txt").read_text()


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _profiler(monkeypatch, calls, *, start, num, first, last, lead=True):
  import jax
  from pausejax import profiling
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d: calls.append(("start", d)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  clock = _Clock()
  cfg = {"start_step": start, "num_steps": num}
  return profiling.Profiler("w", cfg, first_step=first, last_step=last, is_lead_host=lead,
                            clock=clock), clock


@pytest.mark.parametrize("start, num, first, last, lead, window", [
    (3, 2, 1, 10, True, (3, 4)),
    (3, 4, 5, 10, True, (5, 6)),     # Resumed at step 5: what is left of the window.
    (3, 2, 5, 10, True, None),       # The window passed before the resume.
    (9, 5, 1, 10, True, (9, 10)),    # Cut at the last step.
    (3, 2, 1, 10, False, None),      # Only the lead process traces.
    (3, 0, 1, 10, True, None),       # num_steps 0: off.
])
def test_trace_window(monkeypatch, start, num, first, last, lead, window):
  calls = []
  prof, _ = _profiler(monkeypatch, calls, start=start, num=num, first=first, last=last, lead=lead)
  assert prof.trace_steps == window
  synced = []
  for step in range(first, last + 1):
    with prof.step(step, sync=lambda: synced.append(True)):
      pass
  prof.close()
  if window is None:
    assert calls == [] and synced == []
  else:
    assert calls == [("start", os.path.join("w", "profile")), ("stop",)] and synced == [True]


def test_a_run_stopped_inside_the_window_ends_its_trace(monkeypatch):
  calls = []
  prof, _ = _profiler(monkeypatch, calls, start=2, num=5, first=1, last=10)
  for step in (1, 2, 3):
    with prof.step(step):
      pass
  assert calls == [("start", os.path.join("w", "profile"))]
  prof.close()
  assert calls[-1] == ("stop",)


def test_phase_seconds_since_the_last_take_and_over_the_run(monkeypatch):
  prof, clock = _profiler(monkeypatch, [], start=1, num=0, first=1, last=10)
  with prof.phase("input"):
    clock.now += 1.0
  with prof.phase("compute"):
    clock.now += 3.0
  clock.now += 0.5  # Logging: other.
  assert prof.take() == {"time/input": 1.0, "time/compute": 3.0, "time/eval": 0.0,
                         "time/downstream_eval": 0.0, "time/checkpoint": 0.0, "time/trace": 0.0,
                         "time/other": 0.5, "time/wall": 4.5}
  with prof.phase("eval"):
    clock.now += 2.0
  assert prof.take()["time/eval"] == 2.0 and prof.take()["time/wall"] == 0.0
  assert prof.summary() == {"input": 1.0, "compute": 3.0, "eval": 2.0, "downstream_eval": 0.0,
                            "checkpoint": 0.0, "trace": 0.0, "other": 0.5, "wall": 6.5}


def test_summary_line():
  from pausejax import metrics
  text = metrics.format_summary({"time_split": {"input": 1.0, "compute": 7.0, "eval": 0.0,
                                                "other": 2.0, "wall": 10.0}})
  assert "time split  input 10% | compute 70% | other 20% of 10s" in text


@pytest.mark.parametrize("overrides, message", [
    ({"profile.num_steps": -1}, "profile.num_steps=-1 is invalid: a non-negative integer"),
    ({"profile.start_step": 0, "profile.num_steps": 2},
     "profile.start_step=0 is invalid: a step number >= 1"),
    ({"profile.start_step": 13, "profile.num_steps": 2},
     "profile.start_step=13 is invalid: a step in 1 ... num_train_steps=12"),
])
def test_bad_profile_settings_are_one_line_and_write_nothing(tfds_dir, tmp_path, overrides,
                                                            message):
  from pausejax.errors import UsageError
  with pytest.raises(UsageError) as e:
    _train(tiny_config(tfds_dir, **overrides), tmp_path / "w")
  assert str(e.value).startswith(message) and "\n" not in str(e.value)
  assert not (tmp_path / "w").exists()


def test_bad_profile_setting_exits_2(tfds_dir, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
       f"--config.tfds_data_dir={tfds_dir}", *cli_overrides(TINY_CLI),
       "--config.profile.num_steps=3", "--config.profile.start_step=20"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: profile.start_step=20 is invalid: a step in 1 ... "
                         "num_train_steps=12"), last
  assert not workdir.exists()
