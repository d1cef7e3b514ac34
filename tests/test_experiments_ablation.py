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
  monkeypatch.setattr(ablation, "_trained_model", lambda workdir, config: (vocabulary, None))
  config = types.SimpleNamespace(tfds_data_dir="")
  assert ablation._exact_match(config, "unused", 3, 20) == expected
  assert calls == [(3, 16), (3, 16)]  # M_inf pauses; 20 examples in batches of 16.


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
