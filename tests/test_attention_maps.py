"""Tests for pausejax.attention_maps: the weights, the shares and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, TINY_CLI, cli_overrides
from pausejax import attention_maps
from pausejax import decode
from pausejax import model as model_lib

V = 128
SINK, PAUSE = 121, 120  # Any ids work: the tiny model has no vocabulary.
TOKENS = [SINK, 5, 6, 7, PAUSE, PAUSE, 9, 10]
CFG = model_lib.ModelConfig(vocab_size=V, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                            mlp_dim=64, tied_embeddings=True)


def _model(**overrides) -> model_lib.Decoder:
  return model_lib.Decoder(dataclasses.replace(CFG, **overrides), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
  return _model()


@pytest.fixture(scope="module")
def sink_model():
  return _model(zero_sink=True)


def _blind_queries(model: model_lib.Decoder) -> model_lib.Decoder:
  """`model` with every query kernel zero: all scores are 0, so attention is uniform."""
  for block in model.blocks:
    block.attn.query[...] = jnp.zeros_like(block.attn.query[...])
  return model


def test_weights_are_causal_probabilities(model):
  weights_NxHxLxL = attention_maps.attention_weights(model, TOKENS)
  length = len(TOKENS)
  assert weights_NxHxLxL.shape == (2, 4, length, length)
  assert weights_NxHxLxL.dtype == np.float32
  np.testing.assert_allclose(weights_NxHxLxL.sum(-1), 1.0, atol=1e-6)
  future_LxL = np.triu(np.ones((length, length), bool), k=1)
  assert (weights_NxHxLxL[..., future_LxL] == 0).all()
  assert (weights_NxHxLxL[..., ~future_LxL] > 0).all()


@pytest.mark.parametrize("zero_sink", [False, True])
def test_uniform_attention_known_answer(zero_sink):
  """Zero queries: query q spreads 1/(q + 1) over its q + 1 keys, or 1/(q + 2) with the zero
  key taking the remaining 1/(q + 2) = 1/(1 + sum exp(0))."""
  model = _blind_queries(_model(zero_sink=zero_sink))
  weights_NxHxLxL = attention_maps.attention_weights(model, TOKENS)
  q_L = np.arange(len(TOKENS))
  share_L = 1.0 / (q_L + 1 + zero_sink)
  expected_LxL = np.where(q_L[None, :] <= q_L[:, None], share_L[:, None], 0.0)
  np.testing.assert_allclose(weights_NxHxLxL, np.broadcast_to(expected_LxL, (2, 4, 8, 8)),
                             rtol=1e-6, atol=1e-7)
  if zero_sink:
    shares = attention_maps.shares(weights_NxHxLxL, TOKENS, SINK, PAUSE, zero_sink=True)
    np.testing.assert_allclose(shares["zero_sink"], np.mean(share_L[1:]), rtol=1e-5)


def test_zero_sink_remainder_is_one_over_one_plus_sum_exp(sink_model):
  """Layer 0 scores recomputed in float64 from the embeddings: the row remainder is the zero
  key's softmax1 weight."""
  weights_NxHxLxL = attention_maps.attention_weights(sink_model, TOKENS)
  row_sums_NxHxL = weights_NxHxLxL.sum(-1)
  assert (row_sums_NxHxL < 1).all() and (row_sums_NxHxL > 0).all()
  block = sink_model.blocks[0]
  x_1xLxD = sink_model._embed(jnp.asarray([TOKENS]))
  q_1xLxHxK, k_1xLxHxK, _ = block.attn._project(block.attn_norm(x_1xLxD),
                                                jnp.arange(len(TOKENS))[None])
  q_LxHxK, k_LxHxK = np.float64(q_1xLxHxK[0]), np.float64(k_1xLxHxK[0])
  scores_HxLxL = np.einsum("lhk,shk->hls", q_LxHxK, k_LxHxK) / np.sqrt(CFG.head_dim)
  future_LxL = np.triu(np.ones((len(TOKENS),) * 2, bool), k=1)
  exp_sum_HxL = np.where(future_LxL, 0.0, np.exp(scores_HxLxL)).sum(-1)
  np.testing.assert_allclose(1.0 - row_sums_NxHxL[0], 1.0 / (1.0 + exp_sum_HxL), rtol=2e-5)


@pytest.mark.parametrize("zero_sink", [False, True])
def test_logits_are_the_models_own(zero_sink, model, sink_model):
  model = sink_model if zero_sink else model
  logits_LxV, _ = attention_maps.forward(model, TOKENS)
  np.testing.assert_array_equal(logits_LxV, np.asarray(model(jnp.asarray([TOKENS])))[0])


def test_scanned_model_gives_the_same_maps(model):
  params = model_lib.stack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  scanned = decode.model_from_params(dataclasses.replace(model.cfg, scan_layers=True), params)
  logits_LxV, weights_NxHxLxL = attention_maps.forward(scanned, TOKENS)
  np.testing.assert_allclose(logits_LxV, np.asarray(model(jnp.asarray([TOKENS])))[0],
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(weights_NxHxLxL, attention_maps.attention_weights(model, TOKENS),
                             atol=1e-6)


@pytest.mark.parametrize("zero_sink", [False, True])
def test_weights_reproduce_each_blocks_attention_output(zero_sink, model, sink_model):
  """weights @ values, projected, is what each block's attention computes: the maps are the
  model's attention, layer by layer."""
  model = sink_model if zero_sink else model
  weights_NxHxLxL = attention_maps.attention_weights(model, TOKENS)
  positions_1xL = jnp.arange(len(TOKENS))[None]
  x_1xLxD = model._embed(jnp.asarray([TOKENS]))
  for layer, block in enumerate(model.blocks):
    h_1xLxD = block.attn_norm(x_1xLxD)
    _, _, v_1xLxHxK = block.attn._project(h_1xLxD, positions_1xL)
    o_LxHxK = np.einsum("hls,shk->lhk", weights_NxHxLxL[layer], np.asarray(v_1xLxHxK[0]))
    out_LxD = np.einsum("lhk,hkd->ld", o_LxHxK, np.asarray(block.attn.out[...]))
    np.testing.assert_allclose(out_LxD, block.attn(h_1xLxD, positions_1xL, None)[0],
                               atol=1e-5, rtol=1e-4)
    x_1xLxD = block(x_1xLxD, positions_1xL, None)


def test_prefix_attends_both_ways_and_keeps_the_models_logits(model):
  prefix_len = 4
  logits_LxV, weights_NxHxLxL = attention_maps.forward(model, TOKENS, prefix_len)
  prefix_1xL = (np.arange(len(TOKENS)) < prefix_len)[None].astype(np.int32)
  np.testing.assert_array_equal(
      logits_LxV, np.asarray(model(jnp.asarray([TOKENS]), prefix_BxL=prefix_1xL))[0])
  assert (weights_NxHxLxL[:, :, :prefix_len, :prefix_len] > 0).all()
  assert (weights_NxHxLxL[:, :, :prefix_len, prefix_len:] == 0).all()
  assert (weights_NxHxLxL[:, :, prefix_len, prefix_len + 1:] == 0).all()
  np.testing.assert_allclose(weights_NxHxLxL.sum(-1), 1.0, atol=1e-6)


def test_shares_known_answer():
  tokens_L = [SINK, 5, PAUSE, 6]
  weights_1x2x4x4 = np.zeros((1, 2, 4, 4), np.float32)
  # Head 0: every query after the first puts all its mass on the sink.
  weights_1x2x4x4[0, 0, :, 0] = 1.0
  # Head 1: query 1 splits .5/.5 over tokens 0, 1; query 2 puts .25 on 0 and .75 on the pause;
  # query 3 .1 on 0, .4 on the pause and .3 on itself, leaving .2 for a zero sink.
  weights_1x2x4x4[0, 1, 0, 0] = 1.0
  weights_1x2x4x4[0, 1, 1, :2] = [0.5, 0.5]
  weights_1x2x4x4[0, 1, 2, :3] = [0.25, 0.0, 0.75]
  weights_1x2x4x4[0, 1, 3] = [0.1, 0.0, 0.4, 0.3]
  shares = attention_maps.shares(weights_1x2x4x4, tokens_L, SINK, PAUSE, zero_sink=True)
  assert set(shares) == {"first", "sink", "pause", "zero_sink"}
  np.testing.assert_allclose(shares["first"], [[1.0, (0.5 + 0.25 + 0.1) / 3]], rtol=1e-6)
  np.testing.assert_allclose(shares["sink"], shares["first"], rtol=1e-6)
  np.testing.assert_allclose(shares["pause"], [[0.0, (0.75 + 0.4) / 3]], rtol=1e-6)
  np.testing.assert_allclose(shares["zero_sink"], [[0.0, 0.2 / 3]], atol=1e-7)
  # No sink token (a BOS run), and a pause counted wherever it is.
  shares = attention_maps.shares(weights_1x2x4x4, [0, PAUSE, PAUSE, 6], SINK, PAUSE)
  assert set(shares) == {"first", "sink", "pause"}
  np.testing.assert_array_equal(shares["sink"], [[0.0, 0.0]])
  np.testing.assert_allclose(shares["pause"], [[0.0, (0.5 + 0.75 + 0.4) / 3]], rtol=1e-6)
  table = attention_maps.format_table(shares).splitlines()
  assert table[0].split() == ["layer", "first", "<sink>", "<pause>"]
  assert table[1].split() == ["0", "0.642", "0.000", "0.275"]


def test_shares_need_two_tokens_that_match_the_weights():
  with pytest.raises(ValueError, match="at least 2 tokens"):
    attention_maps.shares(np.ones((1, 1, 1, 1)), [SINK], SINK, PAUSE)
  with pytest.raises(ValueError, match="do not match"):
    attention_maps.shares(np.ones((1, 1, 3, 3)), [SINK, 5], SINK, PAUSE)


def test_token_labels_show_specials():
  pieces = {5: "\u2581the", 6: "a$b"}
  vocabulary = types.SimpleNamespace(
      pause_id=100, sink_id=101, backspace_id=102, pad_id=0, eos_id=1, base_vocab_size=100,
      base=types.SimpleNamespace(tokenizer=types.SimpleNamespace(id_to_piece=pieces.get)))
  labels = attention_maps.token_labels(vocabulary, [0, 101, 5, 6, 100, 102, 1, 103])
  assert labels == ["BOS", "<sink>", "_the", "a$b", "<pause>", "<backspace>", "</s>",
                    "<unused_103>"]


def test_plot_layer_writes_a_png(tmp_path, sink_model):
  weights_NxHxLxL = attention_maps.attention_weights(sink_model, TOKENS)
  path = str(tmp_path / "map.png")
  attention_maps.plot_layer(weights_NxHxLxL[0], [str(t) for t in TOKENS], path, "t", True)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---- CLI ------------------------------------------------------------------------------------

def _cli(*args):
  cmd = [sys.executable, "-m", "pausejax.attention_maps", *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_workdir(tfds_dir, tmp_path_factory):
  """A few steps of a run with a <sink> start and a zero sink: every share has a subject."""
  workdir = tmp_path_factory.mktemp("trained")
  overrides = {**TINY_CLI, "num_train_steps": 4, "eval_every_steps": 0, "start_token": "sink",
               "model.zero_sink": True}
  cmd = [sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.tfds_data_dir={tfds_dir}", *cli_overrides(overrides)]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  return str(workdir)


@pytest.mark.slow
def test_cli_writes_maps_json_and_table(trained_workdir, tmp_path):
  outdir = tmp_path / "maps"
  proc = _cli(f"--workdir={trained_workdir}", "--prompt=ROMEO: Is it day?", f"--outdir={outdir}",
              "--layers=1", "--num_pauses=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("checkpoint step 4 | ") and "start sink, 3 pause(s)" in lines[0]
  assert "zero_sink True" in lines[0]
  assert lines[1].split() == ["layer", "first", "<sink>", "<pause>", "zero", "sink"]
  assert [line.split()[0] for line in lines[2:4]] == ["0", "1"]
  assert sorted(os.listdir(outdir)) == ["attention.json", "layer_1.png"]
  with open(outdir / "layer_1.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(outdir / "attention.json") as f:
    report = json.load(f)
  labels, length = report["labels"], len(report["tokens"])
  assert labels[0] == "<sink>" and labels[-3:] == ["<pause>"] * 3 and len(labels) == length
  assert report["start_token"] == "sink" and report["zero_sink"] is True
  assert [entry["layer"] for entry in report["layers"]] == [0, 1]
  layer0, layer1 = report["layers"]
  assert "weights" not in layer0 and layer1["png"] == "layer_1.png"
  for entry, line in zip(report["layers"], lines[2:4]):
    shares = entry["shares"]
    assert set(shares) == {"first", "sink", "pause", "zero_sink"}
    assert shares["first"] == shares["sink"]  # The sink is the first token.
    assert 0 < shares["zero_sink"] < 1 and 0 < shares["pause"] < 1
    assert line.split()[1:] == [f"{shares[n]:.3f}" for n in ("first", "sink", "pause",
                                                              "zero_sink")]
    assert len(entry["shares_per_head"]["pause"]) == TINY_CLI["model.num_heads"]
  weights_HxLxL = np.array(layer1["weights_per_head"])
  assert weights_HxLxL.shape == (TINY_CLI["model.num_heads"], length, length)
  np.testing.assert_allclose(np.array(layer1["weights"]), weights_HxLxL.mean(0), atol=1e-5)
  # Causal, and each row's missing mass is the zero sink's share.
  assert (np.triu(weights_HxLxL, k=1) == 0).all()
  zero_share = (1 - weights_HxLxL[:, 1:].sum(-1)).mean()
  assert abs(zero_share - layer1["shares"]["zero_sink"]) < 1e-4

  # A layer that does not exist: exit 2, one line, nothing written.
  bad = tmp_path / "bad"
  proc = _cli(f"--workdir={trained_workdir}", "--prompt=ROMEO:", f"--outdir={bad}", "--layers=2")
  assert proc.returncode == 2
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("error: --layers='2' is invalid") and "0..1" in line, line
  assert not bad.exists()


@pytest.mark.parametrize("args,message", [
    (["--prompt=hi", "--outdir={tmp}/out"], "error: --workdir=None is invalid"),
    (["--workdir={tmp}", "--outdir={tmp}/out"], "error: --prompt=None is invalid"),
    (["--workdir={tmp}", "--prompt=hi", "--outdir={tmp}/file"], "exists and is not a directory"),
])
def test_cli_bad_input_exits_2(tmp_path, args, message):
  (tmp_path / "file").write_text("not a directory")
  proc = _cli(*(a.format(tmp=tmp_path) for a in args))
  assert proc.returncode == 2, proc.stderr[-2000:]
  (line,) = proc.stderr.strip().splitlines()
  assert message in line, line
  assert sorted(os.listdir(tmp_path)) == ["file"]
