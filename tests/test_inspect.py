"""`python -m pausejax.inspect_data`: the JSON schema and the readable view."""

import json
import subprocess
import sys

import numpy as np

from conftest import REPO

FEATURES = {"decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"}


def _inspect(tfds_dir, *args):
  r = subprocess.run(
      [sys.executable, "-m", "pausejax.inspect_data", "--config=configs/tiny.py",
       f"--config.tfds_data_dir={tfds_dir}", "--config.seq_len=64", *args],
      cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def test_json_schema(tfds_dir):
  lines = _inspect(tfds_dir, "--json", "--num_examples=3").splitlines()
  assert len(lines) == 3
  for line in lines:
    obj = json.loads(line)
    assert set(obj) == FEATURES | {"pause_id", "text"}
    pause_id = obj["pause_id"]
    assert pause_id == 8000  # Right after the embedded 8000-piece vocabulary.
    targets = np.array(obj["decoder_target_tokens"])
    assert all(len(obj[k]) == 64 and all(isinstance(v, int) for v in obj[k]) for k in FEATURES)
    np.testing.assert_array_equal(obj["decoder_input_tokens"][1:], targets[:-1])
    np.testing.assert_array_equal(obj["decoder_loss_weights"],
                                  ((targets != 0) & (targets != pause_id)).astype(int))
    assert obj["text"].count("<pause>") == int(np.sum(targets == pause_id)) > 0


def test_json_packed_adds_segment_features(tfds_dir):
  obj = json.loads(_inspect(tfds_dir, "--json", "--num_examples=1",
                            "--config.pack=True").splitlines()[0])
  assert set(obj) == FEATURES | {"decoder_segment_ids", "decoder_positions", "pause_id", "text"}
  assert obj["decoder_positions"][:3] == [0, 1, 2]


def test_readable_view_shows_pauses(tfds_dir):
  out = _inspect(tfds_dir, "--num_examples=2", "--split=validation")
  assert out.splitlines()[0] == ("task shakespeare_pause (pause rate 0.1, set by the task), "
                                 "split validation")
  assert out.count("example ") == 2
  assert "<pause>" in out and "pause_id=8000" in out


def test_readable_view_names_the_rate_actually_used(tfds_dir):
  out = _inspect(tfds_dir, "--num_examples=1", "--config.task=shakespeare",
                 "--config.pause.rate=0.2")
  assert out.splitlines()[0] == "task shakespeare (pause rate 0.2, set by pause.rate), split train"
  # 64-token chunks get round(0.2 * 64) = 13 pauses before the trim.
  assert 0 < out.count("<pause>") <= 13
