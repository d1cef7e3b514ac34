"""The StdPT/PausePT x StdFT/PauseFT runner: its quick mode end to end, and its bad inputs."""

import functools
import json
import os
import subprocess
import sys
import types

import pytest

from conftest import REPO
from pausejax.experiments import ablation

CLI = [sys.executable, "-m", "pausejax.experiments.ablation"]


def _run(args, timeout=900):
  return subprocess.run(CLI + args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@functools.lru_cache(maxsize=None)
def _restored(workdir):
  """(vocabulary, model) of a finished run, through the public API only: its own config.json
  and its latest checkpoint."""
  from pausejax import build
  from pausejax import config as config_lib
  from pausejax import data as data_lib
  from pausejax import specials
  config = config_lib.for_reading(workdir, None)
  vocabulary = specials.load_vocabulary(data_lib.vocab_path(config))
  model, _ = build.restore_model(config, workdir,
                                 specials.padded_vocab_size(vocabulary.vocab_size),
                                 vocabulary.pause_id)
  return vocabulary, model


def _exact_match_of_checkpoint(workdir, m_inf):
  """Exact match (%) of a finished fine-tuning run with M_inf pauses, as the quick mode scores."""
  from pausejax import evaluate
  vocabulary, model = _restored(str(workdir))
  result = evaluate.evaluate(model, "addition", vocabulary, num_pauses=m_inf,
                             max_len=ablation.TARGETS_LEN + 16 + 2 * m_inf + 2,
                             max_examples=ablation.EVAL_EXAMPLES[1])
  return result["metrics"]["exact_match"]


@pytest.mark.parametrize("off_by, expected", [(0, 100.0), (1, 0.0)])
def test_scores_are_exact_match_percentages_at_m_inf(monkeypatch, off_by, expected):
  """The runner's score of a predictor that answers every sum right is 100, off by one 0."""
  from pausejax import corpus
  from pausejax import decode
  from pausejax import specials
  vocabulary = specials.load_vocabulary(corpus.DEFAULT_VOCAB_PATH)
  calls = []

  def generate(model, prompts, *, num_pauses, **kwargs):
    calls.append((num_pauses, len(prompts)))
    answers = []
    for prompt in prompts:
      a, b = vocabulary.decode(prompt[1:]).rstrip("=").split("+")
      answers.append(vocabulary.encode(str(int(a) + int(b) + off_by)))
    return decode.Generation(tokens=answers, raw_tokens=answers, stopped_at_eos=[True] * len(
        answers), inputs=[list(p) for p in prompts])

  monkeypatch.setattr(decode, "generate", generate)
  monkeypatch.setattr(ablation, "trained_model", lambda workdir, config: (vocabulary, None))
  config = types.SimpleNamespace(tfds_data_dir="")
  assert ablation._exact_match(config, "unused", 3, 20) == expected
  assert calls == [(3, 16), (3, 16)]  # M_inf pauses; 20 examples in batches of 16.


def _seed_scores(score):
  """One seed's scores as the runner hands them to aggregate, every cell `score` except a few
  offsets that keep the cells apart."""
  names = [("NoPT", "none (random init)"), ("StdPT", "StdPT"), ("PausePT", "PausePT")]
  variants = {f"{pt}+{ft}": {"pretraining": label, "finetuning": f"{ft} (M_ft={m})", "m_ft": m,
                             "exact_match": score + m}
              for pt, label in names for ft, m in (("StdFT", 0), ("PauseFT", 2))}
  return {"variants": variants,
          "m_ft_sweep": {"0": score, "1": score + 1, "2": score + 2},
          "m_inf_robustness": {f"{pt}+PauseFT": {str(m): score - m for m in range(5)}
                               for pt in ("NoPT", "PausePT")}}


def _results(scores, k):
  settings = {"quick": True, "seed": 3, "seeds": k, "m_ft": 2, "pretrain_steps": 6,
              "finetune_steps": 6, "eval_examples": 8, "task": "addition"}
  return {"settings": settings, **scores, "wall_time_s": 12.0}


def test_aggregate_reports_mean_per_seed_and_ci95_over_seeds(tmp_path):
  per_seed = [_seed_scores(40.0), _seed_scores(50.0), _seed_scores(60.0)]
  agg = ablation.aggregate(per_seed)
  ci = 4.303 * 10.0 / 3 ** 0.5  # t(0.975, 2 df) * sd / sqrt(3); sd of 40, 50, 60 is 10.
  v = agg["variants"]["PausePT+PauseFT"]
  assert v["exact_match"] == pytest.approx(52.0)
  assert v["exact_match_per_seed"] == [42.0, 52.0, 62.0]
  assert v["exact_match_ci95"] == pytest.approx(ci)
  assert v["pretraining"] == "PausePT" and v["m_ft"] == 2
  assert agg["m_ft_sweep"] == pytest.approx({"0": 50.0, "1": 51.0, "2": 52.0})
  assert agg["m_ft_sweep_per_seed"]["1"] == [41.0, 51.0, 61.0]
  assert agg["m_ft_sweep_ci95"] == pytest.approx({m: ci for m in ("0", "1", "2")})
  assert list(agg["m_inf_robustness"]) == ["NoPT+PauseFT", "PausePT+PauseFT"]
  assert agg["m_inf_robustness"]["NoPT+PauseFT"]["4"] == pytest.approx(46.0)
  assert agg["m_inf_robustness_per_seed"]["NoPT+PauseFT"]["4"] == [36.0, 46.0, 56.0]
  assert agg["m_inf_robustness_ci95"]["PausePT+PauseFT"]["0"] == pytest.approx(ci)
  json.dumps(agg)  # What results.json holds.

  md = ablation._markdown(_results(agg, 3))
  assert "3 seeds (3 to 5)" in md
  assert "| PausePT | PauseFT (M_ft=2) | 52.0% ± 24.8 |" in md
  assert "| exact match | 50.0% ± 24.8 | 51.0% ± 24.8 | 52.0% ± 24.8 |" in md
  assert "| NoPT+PauseFT | 50.0% ± 24.8 | 49.0% ± 24.8 |" in md
  ablation._plot(_results(agg, 3), str(tmp_path / "ablation.png"))  # With error bars.
  assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregate_of_one_seed_is_its_scores_and_tables_have_no_ci():
  one = _seed_scores(40.0)
  agg = ablation.aggregate([one])
  assert agg == one and agg is not one
  md = ablation._markdown(_results(agg, 1))
  assert "±" not in md and "seeds" not in md
  assert "| PausePT | PauseFT (M_ft=2) | 42.0% |" in md
  assert "M_inf = M_ft unless stated. Wall time 12 s." in md


# The runner with training and scoring stubbed out: each "run" records its config, and each run of
# seed s scores 10 * s + M_inf, so the layout, the seeds and the aggregation show in seconds.
STUBBED = """
import json, os
from pausejax.errors import run
from pausejax.experiments import ablation

def train(config, workdir):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "run.json"), "w") as f:
    json.dump({"seed": config.seed, "init_from": config.init_from, "task": config.task}, f)

ablation.train_or_reuse = train
ablation._exact_match = lambda config, workdir, m_inf, examples: 10.0 * config.seed + m_inf
ablation.define_flags()
run(ablation.main)
"""


@pytest.mark.parametrize("k", [1, 2])
def test_seeds_repeat_the_sweep_per_seed_and_report_over_seeds(tmp_path, k):
  out = tmp_path / "ablation"
  proc = subprocess.run(
      [sys.executable, "-c", STUBBED, f"--outdir={out}", "--quick", "--m_ft=2",
       "--m_ft_sweep=0,1,2", "--seed=3", f"--seeds={k}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = ["StdPT", "PausePT", "NoPT_ft0", "NoPT_ft2", "StdPT_ft0", "StdPT_ft2", "PausePT_ft0",
           "PausePT_ft1", "PausePT_ft2"]
  seeds = list(range(3, 3 + k))
  runs = {s: out / "runs" / ("" if k == 1 else f"seed{s}") for s in seeds}
  assert sorted(p.name for p in (out / "runs").iterdir()) == (
      sorted(names) if k == 1 else ["seed3", "seed4"])
  for s in seeds:
    assert sorted(p.name for p in runs[s].iterdir()) == sorted(names)
    for name in names:
      run = json.loads((runs[s] / name / "run.json").read_text())
      assert run["seed"] == s, (s, name)
      pt = name.split("_")[0]
      if "_ft" in name:  # Seed s fine-tunes from seed s's pretraining (NoPT from nothing).
        assert run["init_from"] == ("" if pt == "NoPT" else str(runs[s] / pt)), (s, name)
  assert f"[ablation {9 * k - 1}/{9 * k} runs" in proc.stdout

  results = json.loads((out / "results.json").read_text())
  assert results["settings"]["seed"] == 3 and results["settings"]["seeds"] == k
  v = results["variants"]["StdPT+PauseFT"]
  robust = results["m_inf_robustness"]["PausePT+PauseFT"]
  md = (out / "results.md").read_text()
  if k == 1:  # The single-seed results as they always were.
    assert v["exact_match"] == 32.0 and "exact_match_per_seed" not in v
    assert results["m_ft_sweep"] == {"0": 30.0, "1": 31.0, "2": 32.0}
    assert robust == {"0": 30.0, "1": 31.0, "2": 32.0, "3": 33.0, "4": 34.0}
    assert not [key for key in results if key.endswith(("_per_seed", "_ci95"))]
    assert "±" not in md and "| StdPT | PauseFT (M_ft=2) | 32.0% |" in md
  else:
    ci = 12.706 * 50 ** 0.5 / 2 ** 0.5  # t(0.975, 1 df) * sd(30, 40) / sqrt(2).
    assert v["exact_match"] == 37.0 and v["exact_match_per_seed"] == [32.0, 42.0]
    assert v["exact_match_ci95"] == pytest.approx(ci)
    assert results["m_ft_sweep"] == {"0": 35.0, "1": 36.0, "2": 37.0}
    assert results["m_ft_sweep_per_seed"] == {"0": [30.0, 40.0], "1": [31.0, 41.0],
                                              "2": [32.0, 42.0]}
    assert robust["4"] == 39.0
    assert results["m_inf_robustness_per_seed"]["PausePT+PauseFT"]["4"] == [34.0, 44.0]
    assert results["m_inf_robustness_ci95"]["NoPT+PauseFT"]["0"] == pytest.approx(ci)
    assert "2 seeds (3 to 4)" in md and "| StdPT | PauseFT (M_ft=2) | 37.0% ± 63.5 |" in md
  assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
  # Every reported number is the exact match that evaluate gives on that run's final checkpoint
  # (restored from its own config.json) with M_inf pauses on the 8 quick-mode examples.
  m_ft = results["settings"]["m_ft"]
  reported = [(f"{name.split('+')[0]}_ft{v['m_ft']}", v["m_ft"], v["exact_match"])
              for name, v in results["variants"].items()]
  reported += [(f"PausePT_ft{m}", int(m), score) for m, score in results["m_ft_sweep"].items()]
  reported += [(f"{name.split('+')[0]}_ft{m_ft}", int(m_inf), score)
               for name, row in results["m_inf_robustness"].items()
               for m_inf, score in row.items()]
  assert len(reported) == 6 + 3 + 2 * 5
  expected = {}  # (run, M_inf) -> exact match; 15 distinct cells.
  for run, m_inf, score in reported:
    if (run, m_inf) not in expected:
      expected[run, m_inf] = _exact_match_of_checkpoint(out / "runs" / run, m_inf)
    assert score == expected[run, m_inf], (run, m_inf)
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
    (["--seeds=0"], "--seeds"),
])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, args, setting):
  out = tmp_path / "ablation"
  proc = _run([f"--outdir={out}", "--quick"] + args, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and setting in errors[0], proc.stderr[-2000:]
  assert not out.exists()


def test_unwritable_outdir_exits_2(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  proc = _run([f"--outdir={blocker}/sub", "--quick"], timeout=120)
  assert proc.returncode == 2 and "--outdir" in proc.stderr
