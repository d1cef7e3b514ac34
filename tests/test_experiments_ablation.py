"""The StdPT/PausePT x StdFT/PauseFT runner: its quick mode end to end, and its bad inputs."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

CLI = [sys.executable, "-m", "pausejax.experiments.ablation"]


def _run(args, timeout=900):
  return subprocess.run(CLI + args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_quick_mode_writes_the_tables_and_the_plot(tmp_path):
  out = tmp_path / "ablation"
  proc = _run([f"--outdir={out}", "--quick", "--m_ft=2", "--m_ft_sweep=0,1,2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert list(results["variants"]) == ["NoPT+StdFT", "NoPT+PauseFT", "StdPT+StdFT",
                                        "StdPT+PauseFT", "PausePT+StdFT", "PausePT+PauseFT"]
  assert [v["m_ft"] for v in results["variants"].values()] == [0, 2, 0, 2, 0, 2]
  assert list(results["m_ft_sweep"]) == ["0", "1", "2"]
  assert list(results["m_inf_robustness"]) == ["NoPT+PauseFT", "PausePT+PauseFT"]
  for row in results["m_inf_robustness"].values():
    assert list(row) == ["0", "1", "2", "3", "4"]
  for score in ([v["exact_match"] for v in results["variants"].values()]
                + list(results["m_ft_sweep"].values())
                + [v for row in results["m_inf_robustness"].values() for v in row.values()]):
    assert 0.0 <= score <= 100.0  # Percentages.
  md = (out / "results.md").read_text()
  assert "| PausePT | PauseFT (M_ft=2) |" in md
  assert "| none (random init) | StdFT (M_ft=0) |" in md
  assert "| NoPT+PauseFT |" in md
  assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Every run is an ordinary workdir; the fine-tuned ones started from their pretrained model.
  for run in ("StdPT", "PausePT", "StdPT_ft0", "StdPT_ft2", "PausePT_ft1", "NoPT_ft0"):
    assert (out / "runs" / run / "metrics.jsonl").exists(), run
  # StdPT x {0, 2} and PausePT x {0, 1, 2} start from their checkpoint; NoPT x {0, 2} do not.
  assert proc.stdout.count("Initialised parameters from") == 5, proc.stdout[-3000:]
  # A second invocation reuses the finished runs: no training line is written again.
  before = (out / "runs" / "PausePT_ft2" / "metrics.jsonl").read_text()
  proc = _run([f"--outdir={out}", "--quick", "--m_ft=2", "--m_ft_sweep=0,1,2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / "runs" / "PausePT_ft2" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("args,setting", [
    (["--m_ft=0"], "--m_ft"),
    (["--m_ft_sweep=0,-2"], "--m_ft_sweep"),
    (["--m_ft_sweep=a,b"], "--m_ft_sweep"),
    (["--pretrain_steps=-1"], "--pretrain_steps"),
])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, args, setting):
  out = tmp_path / "ablation"
  proc = _run([f"--outdir={out}", "--quick"] + args, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert setting in proc.stderr
  assert not out.exists()


def test_unwritable_outdir_exits_2(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  proc = _run([f"--outdir={blocker}/sub", "--quick"], timeout=120)
  assert proc.returncode == 2 and "--outdir" in proc.stderr
