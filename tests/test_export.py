"""Tests for pausejax.export without torch: the files it writes, refusals, the round trip.

`tests/test_export_hf.py` (marker `hf`, `make test-hf`) loads the export in transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
import pytest
import safetensors.numpy

from conftest import REPO, tiny_config
from pausejax import build
from pausejax import checkpoint
from pausejax import config as config_lib
from pausejax import corpus
from pausejax import export
from pausejax import specials
from pausejax.errors import UsageError

VOCAB = specials.load_vocabulary(corpus.DEFAULT_VOCAB_PATH)
V, ROWS = VOCAB.vocab_size, specials.padded_vocab_size(VOCAB.vocab_size)  # 8003, 8064.
# Every setting export must carry over: layers scanned, untied, head_dim != d_model / num_heads,
# another RMSNorm eps and RoPE theta.
ODD = {"model.scan_layers": True, "model.tied_embeddings": False, "model.head_dim": 16,
       "model.norm_eps": 1e-5, "model.rope_theta": 500.0}


def make_run(workdir, step: int = 12, **overrides):
  """A run directory as training leaves it (config.json, one checkpoint), made in a second:
  random parameters drawn on the host (no compiled init), so no two norm scales or layers are
  alike, and a fresh optimizer state."""
  config = tiny_config(str(workdir / "unused_tfds"), **overrides)
  built = build.build(config, ROWS, VOCAB.pause_id, training=False)
  rng = np.random.default_rng(step)
  draw = lambda path, a: rng.normal(*((1.0, 0.2) if path[-1].key == "scale" else (0.0, 0.1)),
                                    a.shape).astype(a.dtype)  # Norm scales near 1.
  params = jax.tree_util.tree_map_with_path(draw, built.abstract_params_tree)
  state = {"step": np.int32(step), "params": params, "opt_state": built.tx.init(params)}
  os.makedirs(workdir, exist_ok=True)
  config_lib.save(config, str(workdir))
  with checkpoint.Checkpointer(workdir / "checkpoints", keep=3, save_every_steps=1,
                               async_save=False) as ckpt:
    ckpt.save(step, jax.device_put(state, built.state_shardings), force=True)
  return workdir


def tokens_with_specials():
  """BOS, text, pauses, a sink and a backspace, and text again: 1 x 32 ids."""
  text = list(VOCAB.encode("ROMEO:\nBut soft, what light through yonder window breaks?"))
  return np.array([[0] + text[:12] + [VOCAB.pause_id] * 3 + [VOCAB.sink_id,
                                                              VOCAB.backspace_id] + text[12:27]])


_forward = nnx.jit(lambda model, tokens: model(tokens))  # One compile per model shape.


def logits(workdir, tokens):
  config = config_lib.for_reading(str(workdir), None)
  model, step = build.restore_model(config, str(workdir), ROWS, VOCAB.pause_id)
  return np.asarray(_forward(model, tokens)), step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{name: (run, its export)} for the default layout and the ODD one."""
  root = tmp_path_factory.mktemp("export")
  out = {}
  for name, overrides in (("plain", {}), ("odd", ODD)):
    run = make_run(root / f"run_{name}", **overrides)
    out[name] = run, export.export(str(run), str(root / f"hf_{name}"))
  return out


def test_export_writes_llama_files(runs):
  run, hf = runs["plain"]
  assert sorted(os.listdir(hf)) == ["config.json", "generation_config.json", "model.safetensors",
                                    "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
  with open(os.path.join(hf, "config.json")) as f:
    config = json.load(f)
  assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == ROWS
  assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (64, 2, 32)
  assert config["tie_word_embeddings"] and config["bos_token_id"] == 0
  assert config["pausejax"]["step"] == 12
  assert config["pausejax"]["config"] == config_lib.load_saved(str(run))
  tensors = safetensors.numpy.load_file(os.path.join(hf, "model.safetensors"))
  assert "lm_head.weight" not in tensors  # Tied: transformers reuses the embedding.
  assert tensors["model.embed_tokens.weight"].shape == (ROWS, 64)
  assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (64, 64)
  assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
  assert len(tensors) == 1 + 2 * 9 + 1
  with open(os.path.join(hf, "generation_config.json")) as f:
    assert json.load(f)["suppress_tokens"] == list(range(V, ROWS))  # Padding rows.
  with open(os.path.join(hf, "tokenizer.json")) as f:
    added = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
  assert added == {"<pad>": 0, "</s>": 1, "<pause>": V - 3, "<sink>": V - 2, "<backspace>": V - 1}
  with open(os.path.join(hf, "tokenizer.model"), "rb") as f, \
      open(corpus.DEFAULT_VOCAB_PATH, "rb") as g:
    assert f.read() == g.read()


def test_export_carries_layout_and_shape(runs):
  _, hf = runs["odd"]
  with open(os.path.join(hf, "config.json")) as f:
    config = json.load(f)
  assert (config["head_dim"], config["rms_norm_eps"], config["rope_theta"]) == (16, 1e-5, 500.0)
  assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0}
  assert not config["tie_word_embeddings"]
  tensors = safetensors.numpy.load_file(os.path.join(hf, "model.safetensors"))
  assert tensors["lm_head.weight"].shape == (ROWS, 64)
  assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (2 * 16, 64)
  assert tensors["model.layers.1.self_attn.o_proj.weight"].shape == (64, 2 * 16)


@pytest.mark.parametrize("name", ["plain", "odd"])
def test_import_round_trip_gives_identical_logits(runs, name, tmp_path):
  run, hf = runs[name]
  assert export.import_hf(hf, str(tmp_path / "back")) == 12
  tokens = tokens_with_specials()
  (want, _), (got, step) = logits(run, tokens), logits(tmp_path / "back", tokens)
  assert step == 12 and np.array_equal(want, got)
  # The run's own settings come back; the vocabulary is the task's own file again.
  assert config_lib.load_saved(str(tmp_path / "back")) == config_lib.load_saved(str(run))
  assert sorted(os.listdir(tmp_path / "back")) == ["checkpoints", "config.json"]


def test_sharded_export_and_step(runs, tmp_path):
  run, hf = runs["plain"]
  run = shutil.copytree(run, tmp_path / "run")
  with checkpoint.Checkpointer(run / "checkpoints", keep=3, save_every_steps=1,
                               async_save=False) as ckpt:  # A newer step that --step skips.
    state = ckpt.restore(12, build.build(config_lib.for_reading(str(run), None), ROWS,
                                         VOCAB.pause_id, training=False).abstract_state)
    ckpt.save(20, state, force=True)
  out = export.export(str(run), str(tmp_path / "sharded"), step=12, max_shard_size="300KB")
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  files = sorted(set(weight_map.values()))
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  whole = safetensors.numpy.load_file(os.path.join(hf, "model.safetensors"))
  shards = export.read_safetensors(out)
  assert sorted(shards) == sorted(whole) == sorted(weight_map)
  assert all(np.array_equal(shards[k], whole[k]) for k in whole)
  # At most 300 KB a file, unless one tensor alone is larger (the embedding), as in HF.
  sizes = {f: os.path.getsize(os.path.join(out, f)) for f in files}
  assert all(sizes[f] < 310_000 or list(weight_map.values()).count(f) == 1 for f in files)
  with pytest.raises(UsageError, match=r"--step=7 is invalid: one of the run's checkpoints "
                     r"\[12, 20\]"):
    export.export(str(run), str(tmp_path / "none"), step=7)
  assert not os.path.exists(tmp_path / "none")


def _edited_run(run, tmp_path, **changes):
  """`run`'s checkpoints under a config.json with `changes` (flattened keys)."""
  edited = tmp_path / "edited"
  edited.mkdir()
  os.symlink(run / "checkpoints", edited / "checkpoints")
  saved = {**config_lib.load_saved(str(run)), **changes}
  config_lib.save(config_lib.from_saved(saved), str(edited))
  return edited


@pytest.mark.parametrize("changes, message", [
    ({"prefix_lm": True}, "prefix_lm=True is invalid: False to export: LlamaForCausalLM is "
     "causal only"),
    ({"model.zero_sink": True}, "model.zero_sink=True is invalid: False to export"),
    ({"model.num_heads": 3}, "model.num_heads=3 is invalid: a divisor of model.d_model=64"),
])
def test_unexportable_settings_are_refused(runs, tmp_path, changes, message):
  edited = _edited_run(runs["plain"][0], tmp_path, **changes)
  with pytest.raises(UsageError, match=message):
    export.export(str(edited), str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["edited"]  # Nothing written, no temporary left.


def test_bad_targets_are_refused(runs, tmp_path):
  run, hf = runs["plain"]
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(UsageError, match="--out=.* is invalid: a new or empty directory"):
    export.export(str(run), str(tmp_path / "full"))
  with pytest.raises(UsageError, match="--max_shard_size='5 parsecs' is invalid"):
    export.export(str(run), str(tmp_path / "out"), max_shard_size="5 parsecs")
  with pytest.raises(UsageError, match="--workdir=.* is invalid: a new or empty directory"):
    export.import_hf(hf, str(run))
  assert sorted(os.listdir(tmp_path)) == ["full"]


@pytest.mark.parametrize("changes, message", [
    ({"num_key_value_heads": 1}, "num_key_value_heads=1 is invalid: 2 .num_attention_heads.: "
     "pausejax has no grouped-query attention"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type='linear' is invalid"),
    ({"vocab_size": 8003}, "vocab_size=8003 is invalid: 8064"),
    ({"attention_bias": True}, "attention_bias=True is invalid: False"),
    ({"intermediate_size": 96}, r"tensors of the shapes its config.json implies: "
     r"params\['blocks'\]\[0\]\['mlp'\]\['down'\] is \(128, 64\), not \(96, 64\)"),
])
def test_import_refuses_what_pausejax_cannot_compute(runs, tmp_path, changes, message):
  hf = shutil.copytree(runs["plain"][1], tmp_path / "hf")
  with open(hf / "config.json") as f:
    config = json.load(f)
  with open(hf / "config.json", "w") as f:
    json.dump({**config, **changes}, f)
  with pytest.raises(UsageError, match=message):
    export.import_hf(str(hf), str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_import_refuses_weights_it_has_no_place_for_or_lacks(runs, tmp_path):
  hf = shutil.copytree(runs["plain"][1], tmp_path / "hf")
  tensors = safetensors.numpy.load_file(str(hf / "model.safetensors"))
  for edited, message in (
      ({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)},
       "q_proj.bias has no place in pausejax's decoder"),
      ({k: v for k, v in tensors.items() if k != "model.norm.weight"},
       "the safetensors files have no model.norm.weight")):
    safetensors.numpy.save_file(edited, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UsageError, match=message):
      export.import_hf(str(hf), str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "pausejax.export", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_cli_refusal_exits_2_and_writes_nothing(runs, tmp_path):
  edited = _edited_run(runs["plain"][0], tmp_path, **{"model.zero_sink": True})
  proc = _cli(f"--workdir={edited}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: model.zero_sink=True is invalid: False to export"), last
  assert sorted(os.listdir(tmp_path)) == ["edited"]


@pytest.mark.slow
def test_cli_export_import_generate(runs, tmp_path):
  run = runs["odd"][0]
  proc = _cli(f"--workdir={run}", f"--out={tmp_path / 'hf'}", "--dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == f"exported {run} to {tmp_path / 'hf'}"
  tensors = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert {str(x.dtype) for x in tensors.values()} == {"bfloat16"}
  proc = _cli(f"--import_from={tmp_path / 'hf'}", f"--workdir={tmp_path / 'back'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert config_lib.load_saved(str(tmp_path / "back"))["model.param_dtype"] == "bfloat16"
  cmd = [sys.executable, "-m", "pausejax.generate", f"--workdir={tmp_path / 'back'}",
         "--prompt=ROMEO:", "--max_new_tokens=4"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines()[0].startswith("checkpoint step 12 |"), proc.stdout
  assert proc.stdout.splitlines()[2].startswith("answer: ")
  proc = _cli(f"--workdir={run}", f"--out={tmp_path / 'x'}", f"--import_from={tmp_path / 'hf'}")
  assert proc.returncode == 2 and "give exactly one of --out" in proc.stderr
