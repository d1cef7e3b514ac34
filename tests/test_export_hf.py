"""transformers loads pausejax.export's directories and computes what pausejax computes.

Needs torch and transformers, which `make test-hf` installs (too heavy for `make test`); without
them every test here is skipped. Marker `hf`: `make test` and `make test-slow` leave it out.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece

from conftest import REPO, TINY_CLI, cli_overrides
from pausejax import decode
from pausejax import export
from test_export import ODD, ROWS, V, VOCAB, logits, make_run, tokens_with_specials

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def runs(tfds_dir, tmp_path_factory):
  """{name: (run, its export)}: a 2-step training run (unrolled, tied) and the ODD layout
  (scanned, untied, head_dim 16, other eps and theta) with random parameters."""
  root = tmp_path_factory.mktemp("export_hf")
  trained = root / "run_trained"
  cmd = [sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py",
         f"--workdir={trained}", f"--config.tfds_data_dir={tfds_dir}",
         *cli_overrides({**TINY_CLI, "num_train_steps": 2, "eval_every_steps": 0})]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  odd = make_run(root / "run_odd", **ODD)
  return {name: (run, export.export(str(run), str(root / f"hf_{name}")))
          for name, run in (("trained", trained), ("odd", odd))}


def _hf_model(hf_dir):
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  return model.eval()


@pytest.mark.parametrize("name", ["trained", "odd"])
def test_transformers_logits_match(runs, name):
  run, hf = runs[name]
  tokens = tokens_with_specials()  # <pause>, <sink> and <backspace> included.
  want, _ = logits(run, tokens)
  with torch.no_grad():
    got = _hf_model(hf)(torch.from_numpy(tokens)).logits.numpy()
  assert got.shape == want.shape == (1, tokens.shape[1], ROWS)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_transformers_greedy_generation_matches(runs):
  run, hf = runs["odd"]
  config = export.config_lib.for_reading(str(run), None)
  model, _ = export.build.restore_model(config, str(run), ROWS, VOCAB.pause_id)
  prompts = [[0] + list(VOCAB.encode(p)) for p in ("ROMEO:", "To be, or not to be")]
  want = decode.generate(model, prompts, max_new_tokens=8, num_pauses=3,
                         pause_id=VOCAB.pause_id, eos_id=VOCAB.eos_id, max_len=64,
                         vocab_size=V).raw_tokens
  assert sum(map(len, want)) > 8  # Not just an EOS each.
  hf_model = _hf_model(hf)
  for prompt, expected in zip(prompts, want):
    ids = torch.tensor([prompt + [VOCAB.pause_id] * 3])
    with torch.no_grad():
      out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=8)
    assert out[0, ids.shape[1]:].tolist()[:len(expected)] == expected


def _texts():
  with gzip.open(f"{REPO}/pausejax/assets/shakespeare/validation.jsonl.gz", "rt") as f:
    texts = [json.loads(line)["text"] for line in f][:40]
  return texts + ["ROMEO:", "  two spaces", "\nnewline first", "tab\tand ünïcødé 😀", ""]


def test_tokenizer_encodes_like_pausejax(runs):
  tokenizer = transformers.AutoTokenizer.from_pretrained(runs["trained"][1])
  texts = _texts()
  for text in texts:
    ids = list(VOCAB.encode(text))
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text[:80]
    assert tokenizer(text)["input_ids"] == [0] + ids  # The run's start id (BOS 0) first.
    assert tokenizer.decode(ids) == text
  assert tokenizer.convert_tokens_to_ids(["<pause>", "<sink>", "<backspace>"]) == [
      VOCAB.pause_id, VOCAB.sink_id, VOCAB.backspace_id]
  assert tokenizer.eos_token_id == VOCAB.eos_id and tokenizer.pad_token_id == 0
  # Specials written as text are the specials, and the text after them is encoded on its own,
  # as pausejax builds a prompt with prepended pauses.
  pause = VOCAB.pause_id
  assert tokenizer("<pause><pause>ROMEO:<sink>", add_special_tokens=False)["input_ids"] == [
      pause, pause, *VOCAB.encode("ROMEO:"), VOCAB.sink_id]
  ids = [0, *VOCAB.encode("ROMEO:"), pause, VOCAB.backspace_id]
  assert tokenizer.decode(ids, skip_special_tokens=True) == "ROMEO:"
  assert len(tokenizer) == V


def test_tokenizer_of_a_normalising_sentencepiece_model():
  """A T5-style model (NFKC, extra whitespace removed; the embedded one has neither) too."""
  tokenizers = pytest.importorskip("tokenizers")
  texts = _texts()
  lines = (line for text in texts for line in text.split("\n") if line)
  proto = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=lines, model_writer=proto, vocab_size=2000, model_type="unigram",
      normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      byte_fallback=True, minloglevel=2)
  sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
  files = export.tokenizer_files(proto.getvalue(), 64, [])
  tokenizer = tokenizers.Tokenizer.from_str(json.dumps(files["tokenizer.json"]))
  for text in texts + ["  lead and trail  ", "a   b", "\ufb01 ligature \u2460 \uff26\uff55"]:
    assert tokenizer.encode(text).ids == sp.encode(text), text[:80]
    assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))
