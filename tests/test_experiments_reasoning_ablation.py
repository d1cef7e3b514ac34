"""The reasoning-mix ablation runner: its statistics on known numbers, its layout with training
stubbed out, its bad inputs, and (slow) its quick mode end to end. Reusing finished runs is
`ablation.train_or_reuse`, tested with the ablation runner."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from pausejax.experiments import reasoning_ablation as ra

CLI = [sys.executable, "-m", "pausejax.experiments.reasoning_ablation"]


def _run(args, timeout=900, cli=CLI):
  return subprocess.run(cli + args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_paired_difference_is_beyond_the_interval_only_when_the_interval_excludes_zero():
  cells = [{"a": 50.0, "b": 40.0}, {"a": 61.0, "b": 50.0}, {"a": 69.0, "b": 60.0}]
  c = ra.compare(cells, "a", "b")
  assert c["per_seed"] == [10.0, 11.0, 9.0] and c["difference"] == pytest.approx(10.0)
  assert c["ci95"] == pytest.approx(4.303 * 1.0 / 3 ** 0.5)  # sd of 10, 11, 9 is 1.
  assert c["beyond_interval"]
  noisy = [{"a": 50.0, "b": 40.0}, {"a": 40.0, "b": 50.0}, {"a": 55.0, "b": 50.0}]
  c = ra.compare(noisy, "a", "b")
  assert c["difference"] == pytest.approx(5.0 / 3) and not c["beyond_interval"]
  assert ra.compare([{"a": 9.0, "b": 1.0}], "a", "b")["ci95"] is None  # One seed: no interval.
  assert not ra.compare([{"a": 9.0, "b": 1.0}], "a", "b")["beyond_interval"]
  assert ra.m_infs(8) == [0, 4, 8, 16] and ra.m_infs(1) == [0, 1, 2]


# Training and scoring stubbed out: each "run" records its config; a model scores
# 10 * seed + M_inf, + 3 when it was pause-pretrained, - 2 with its pauses before the prompt,
# + 7 on the extrapolation task; its learning curve is {50: seed, 100: 2 * seed}.
STUBBED = """
import json, os
from pausejax.errors import run
from pausejax.experiments import ablation
from pausejax.experiments import reasoning_ablation as ra

def train(config, workdir):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "run.json"), "w") as f:
    json.dump({"seed": config.seed, "init_from": config.init_from, "task": config.task,
               "m_ft": config.pause.get("num_finetune", 0),
               "position": config.pause.position, "eval_tasks": config.eval_tasks}, f)

def exact_match(config, workdir, task, m_inf, examples):
  return (10.0 * config.seed + m_inf + 3 * config.init_from.endswith("PausePT")
          - 2 * (config.pause.position == "prepend") + 7 * task.endswith("_long"))

def curve(workdir, task):
  seed = json.load(open(os.path.join(workdir, "run.json")))["seed"]
  return {50: float(seed), 100: 2.0 * seed}

ablation.train_or_reuse = train
ra.exact_match = exact_match
ra.curve = curve
ra.define_flags()
run(ra.main)
"""


def test_runs_per_seed_paired_comparisons_and_tables_with_stubbed_training(tmp_path):
  out = tmp_path / "ra"
  proc = _run([f"--outdir={out}", "--quick", "--m_ft=2", "--seed=3", "--seeds=2"],
              timeout=300, cli=[sys.executable, "-c", STUBBED])
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = ["StdPT", "PausePT", "NoPT_StdFT", "StdPT_StdFT", "StdPT_PauseFT", "PausePT_StdFT",
           "PausePT_PauseFT", "PausePT_PauseFT_prepend"]
  assert sorted(p.name for p in (out / "runs").iterdir()) == ["seed3", "seed4"]
  for s in (3, 4):
    runs = out / "runs" / f"seed{s}"
    assert sorted(p.name for p in runs.iterdir()) == sorted(names)
    got = {n: json.loads((runs / n / "run.json").read_text()) for n in names}
    assert got["StdPT"]["task"] == "reasoning_mix"
    assert got["PausePT"]["task"] == "reasoning_mix_pause"
    for n in names[2:]:  # Seed s fine-tunes from seed s's pretraining (NoPT from nothing).
      pt = n.split("_")[0]
      assert got[n]["seed"] == s and got[n]["task"] == "reason_chain"
      assert got[n]["eval_tasks"] == "reason_chain"  # The learning curve.
      assert got[n]["init_from"] == ("" if pt == "NoPT" else str(runs / pt)), n
      assert got[n]["m_ft"] == (2 if "PauseFT" in n else 0), n
      assert got[n]["position"] == ("prepend" if n.endswith("prepend") else "append"), n
  assert "[reasoning ablation 15/16 runs" in proc.stdout

  results = json.loads((out / "results.json").read_text())
  assert results["settings"]["tasks"] == ["reason_chain", "reason_chain_long"]
  cells = results["cells"]
  ci = 12.706 * 50 ** 0.5 / 2 ** 0.5  # t(0.975, 1 df) * sd(30, 40) / sqrt(2).
  assert cells["reason_chain/StdPT+StdFT"]["per_seed"] == [30.0, 40.0]
  assert cells["reason_chain/StdPT+StdFT"]["ci95"] == pytest.approx(ci)
  assert cells["reason_chain/PausePT+PauseFT"]["mean"] == 40.0
  assert cells["reason_chain_long/PausePT+PauseFT prepend"]["per_seed"] == [40.0, 50.0]
  assert cells["reason_chain/PausePT+PauseFT/M_inf=4"]["mean"] == 42.0
  assert cells["reason_chain/StdPT+PauseFT/M_inf=0"]["mean"] == 35.0
  assert results["curves"]["PausePT+StdFT"]["100"]["per_seed"] == [6.0, 8.0]
  by = {(c["task"], c["label"]): c for c in results["comparisons"]}
  head = by["reason_chain", "PausePT+PauseFT − StdPT+StdFT"]
  assert head["difference"] == 5.0 and head["ci95"] == 0.0 and head["beyond_interval"]
  same = by["reason_chain_long", "StdPT+StdFT − NoPT+StdFT"]
  assert same["difference"] == 0.0 and not same["beyond_interval"]
  assert by["reason_chain", "PausePT+PauseFT − PausePT+PauseFT prepend"]["difference"] == 2.0
  assert by["reason_chain", "PausePT+PauseFT/M_inf=0 − PausePT+PauseFT"]["difference"] == -2.0
  assert len(results["comparisons"]) == 2 * len(ra.COMPARISONS) + 3  # + M_inf 0, 1, 4 vs 2.
  md = (out / "results.md").read_text()
  assert "| PausePT+PauseFT | 40.0 ± 63.5 | 47.0 ± 63.5 |" in md
  assert "| StdPT+PauseFT | 35.0 ± 63.5 | 36.0 ± 63.5 | 37.0 ± 63.5 | 39.0 ± 63.5 |" in md
  assert ("| `reason_chain` | PausePT+PauseFT − StdPT+StdFT | pauses in both stages vs none "
          "(the paper's headline) | +5.0 ± 0.0 | **yes** |") in md
  assert "| `reason_chain_long` | StdPT+StdFT − NoPT+StdFT |" in md
  assert (out / "reasoning_ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,setting", [
    (["--seeds=0"], "--seeds"),
    (["--m_ft=0"], "--m_ft"),
    (["--curve_points=0"], "--curve_points"),
    (["--finetune_steps=-1"], "--finetune_steps"),
    (["--task=no_such_task"], "--task"),
    (["--task=piqa"], "--task"),  # Multiple choice: no exact match to report.
])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, args, setting):
  out = tmp_path / "ra"
  proc = _run([f"--outdir={out}", "--quick"] + args, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and setting in errors[0], proc.stderr[-2000:]
  assert not out.exists()


@pytest.mark.slow
def test_quick_mode_trains_and_scores_every_cell(tmp_path):
  out = tmp_path / "ra"
  proc = _run([f"--outdir={out}", "--quick", "--m_ft=2", "--seeds=2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert len(results["cells"]) == 2 * len(ra.VARIANTS) + 2 * 3  # + M_inf 0, 1, 4 for two models.
  for cell in results["cells"].values():
    assert len(cell["per_seed"]) == 2 and cell["ci95"] is not None
  # Each curve point is what the run logged while fine-tuning (4 steps, a score every step).
  for name in ra.VARIANTS:
    assert list(results["curves"][name]) == ["1", "2", "3", "4"], name
  # Every reported cell is the run's exact match when scored again (the scoring is a function
  # of the checkpoint), e.g. seed 1's prepend model.
  from pausejax import config as config_lib
  workdir = out / "runs" / "seed1" / "PausePT_PauseFT_prepend"
  config = config_lib.for_reading(str(workdir), None)
  assert config.pause.position == "prepend" and config.pause.num_finetune == 2
  assert ra.exact_match(config, str(workdir), "reason_chain", 2, 8) == (
      results["cells"]["reason_chain/PausePT+PauseFT prepend"]["per_seed"][1])
  # Five of the eight runs of a seed start from a checkpoint: all but NoPT and the pretraining.
  assert proc.stdout.count("Initialised parameters from") == 2 * 5, proc.stdout[-3000:]
