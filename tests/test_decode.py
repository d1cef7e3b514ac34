"""Tests for pausejax.decode, the model's KV-cache path and the generate CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, TINY_CLI, cli_overrides
from pausejax import decode
from pausejax import model as model_lib
from pausejax import stream
from pausejax.errors import UsageError

V = 128
PAUSE = 120  # Any id works: the tiny model has no vocabulary.
# Different lengths, each starting with BOS (0) as every training sequence does.
PROMPTS = [[0, 5, 6, 7, 8, 9], [0, 10], [0, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
# max_len is exactly what the longest prompt needs: 10 tokens + 3 pauses + 10 new ones - 1 (the
# last new token is never fed back).
REQUEST = dict(max_new_tokens=10, num_pauses=3, pause_id=PAUSE, eos_id=None, max_len=22)


@pytest.fixture(scope="module")
def model():
  cfg = model_lib.ModelConfig(vocab_size=V, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                              mlp_dim=64, tied_embeddings=True)
  return model_lib.Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def greedy(model):
  return decode.generate(model, PROMPTS, **REQUEST)


def _request(**overrides):
  return {**REQUEST, **overrides}


def test_cache_equals_no_cache_greedy(model, greedy):
  reference = decode.generate_without_cache(model, PROMPTS, **REQUEST)
  assert greedy.raw_tokens == reference.raw_tokens
  assert greedy.tokens == reference.tokens
  assert [len(r) for r in greedy.raw_tokens] == [REQUEST["max_new_tokens"]] * len(PROMPTS)


@pytest.fixture(scope="module")
def scanned_model(model):
  """`model` with its layers stacked and scanned (model.scan_layers): the same parameters."""
  params = model_lib.stack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return decode.model_from_params(dataclasses.replace(model.cfg, scan_layers=True), params)


@pytest.fixture(scope="module")
def zero_sink_model(model):
  """`model` with SoftMax1 attention (model.zero_sink): the same parameters, scanned layers."""
  cfg = dataclasses.replace(model.cfg, zero_sink=True, scan_layers=True)
  params = model_lib.stack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return decode.model_from_params(cfg, params)


@pytest.mark.parametrize("which", ["model", "scanned_model", "zero_sink_model"])
def test_cache_logits_match_full_forward(which, request):
  """prefill + decode_step reproduce the full forward pass at every position, per row."""
  model = request.getfixturevalue(which)
  tokens_BxL = np.asarray(jax.random.randint(jax.random.key(1), (2, 12), 0, V))
  full_BxLxV = nnx.jit(lambda m, t: m(t))(model, tokens_BxL)
  lengths = np.array([3, 7])
  padded_BxL = np.where(np.arange(12) < lengths[:, None], tokens_BxL, 0)  # Right padding.
  prefill = nnx.jit(lambda m, t, n: m.prefill(t, n, 16))
  decode_step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  logits_BxV, cache = prefill(model, padded_BxL, lengths)
  rows = np.arange(2)
  for step in range(5):
    at = lengths + step - 1  # Position whose next-token logits we have.
    np.testing.assert_allclose(logits_BxV, full_BxLxV[rows, at], atol=1e-5, rtol=1e-5)
    logits_BxV, cache = decode_step(model, tokens_BxL[rows, at + 1], cache)
  np.testing.assert_array_equal(cache.lengths_B, lengths + 5)


@pytest.mark.parametrize("which", ["model", "scanned_model", "zero_sink_model"])
def test_prefix_lm_cache_matches_full_forward_with_the_prefix_mask(which, request):
  """prefill(prefix_lm=True) is the forward pass with the prompt attending both ways; the tokens
  after it stay causal, as in seqio's prefix-LM training sequences."""
  model = request.getfixturevalue(which)
  tokens_BxL = np.asarray(jax.random.randint(jax.random.key(2), (2, 12), 0, V))
  lengths = np.array([4, 6])
  prefix_BxL = (np.arange(12) < lengths[:, None]).astype(np.int32)
  full_BxLxV = nnx.jit(lambda m, t, p: m(t, prefix_BxL=p))(model, tokens_BxL, prefix_BxL)
  causal_BxLxV = nnx.jit(lambda m, t: m(t))(model, tokens_BxL)
  padded_BxL = np.where(prefix_BxL > 0, tokens_BxL, 0)
  logits_BxV, cache = nnx.jit(lambda m, t, n: m.prefill(t, n, 16, prefix_lm=True))(
      model, padded_BxL, lengths)
  decode_step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  rows = np.arange(2)
  # The mask matters: at the prompt's end the two-way logits are not the causal ones.
  assert np.abs(logits_BxV - causal_BxLxV[rows, lengths - 1]).max() > 1e-3
  for step in range(5):
    at = lengths + step - 1
    np.testing.assert_allclose(logits_BxV, full_BxLxV[rows, at], atol=1e-5, rtol=1e-5)
    logits_BxV, cache = decode_step(model, tokens_BxL[rows, at + 1], cache)


def test_prefix_lm_generation_with_and_without_cache_agree(model, greedy):
  cached = decode.generate(model, PROMPTS, **REQUEST, prefix_lm=True)
  assert cached.raw_tokens == decode.generate_without_cache(
      model, PROMPTS, **REQUEST, prefix_lm=True).raw_tokens
  assert cached.raw_tokens != greedy.raw_tokens  # The two-way prompt changes what is decoded.


def test_scanned_layers_decode_the_same_tokens(model, scanned_model, greedy):
  assert isinstance(scanned_model.init_cache(1, 4).keys, jax.Array)  # One NxBxSxHxK array.
  assert decode.generate(scanned_model, PROMPTS, **REQUEST).raw_tokens == greedy.raw_tokens
  sampled = _request(temperature=1.0, seed=3)
  assert (decode.generate(scanned_model, PROMPTS, **sampled).raw_tokens
          == decode.generate(model, PROMPTS, **sampled).raw_tokens)


def test_pauses_are_appended_and_fed_to_the_model(model, greedy):
  m = REQUEST["num_pauses"]
  for prompt, row in zip(PROMPTS, greedy.inputs):
    assert row == prompt + [PAUSE] * m
  # The model really reads them: the same as asking with the pauses already in the prompt.
  explicit = decode.generate(model, [p + [PAUSE] * m for p in PROMPTS], **_request(num_pauses=0))
  assert explicit.raw_tokens == greedy.raw_tokens
  no_pauses = decode.generate(model, PROMPTS, **_request(num_pauses=0))
  assert no_pauses.raw_tokens != greedy.raw_tokens


def test_model_emitted_pauses_are_dropped_but_counted(model, greedy):
  """Calling an id the model emits `pause` (without appending any) drops it from the answer."""
  emitted = greedy.raw_tokens[0][2]
  prompts = [p + [PAUSE] * 3 for p in PROMPTS]  # Same model inputs as `greedy`.
  out = decode.generate(model, prompts, **_request(num_pauses=0, pause_id=emitted))
  assert out.raw_tokens == greedy.raw_tokens  # Same trajectory: the pause is fed back.
  assert out.tokens == [[t for t in raw if t != emitted] for raw in greedy.raw_tokens]
  assert all(emitted not in answer for answer in out.tokens)
  assert all(len(raw) == REQUEST["max_new_tokens"] for raw in out.raw_tokens)


def test_appended_pauses_never_returned(model, greedy):
  assert all(PAUSE not in answer for answer in greedy.tokens)
  assert all(PAUSE not in raw for raw in greedy.raw_tokens)


def test_eos_stops_a_row(model, greedy):
  raw0 = greedy.raw_tokens[0]
  eos = next(t for i, t in enumerate(raw0) if i > 0 and t not in raw0[:i])  # First new id.
  out = decode.generate(model, PROMPTS, **_request(eos_id=eos))
  for before, raw, answer, stopped in zip(greedy.raw_tokens, out.raw_tokens, out.tokens,
                                          out.stopped_at_eos):
    cut = before.index(eos) + 1 if eos in before else len(before)
    assert raw == before[:cut]
    assert answer == [t for t in before[:cut] if t != eos]
    assert stopped == (eos in before)
  assert out.stopped_at_eos[0] and len(out.tokens[0]) < REQUEST["max_new_tokens"]
  assert out.tokens == decode.generate_without_cache(model, PROMPTS, **_request(eos_id=eos)).tokens


def test_sampling_is_seeded_and_matches_without_cache(model):
  a = decode.generate(model, PROMPTS, **_request(temperature=1.0, seed=3))
  b = decode.generate(model, PROMPTS, **_request(temperature=1.0, seed=3))
  c = decode.generate(model, PROMPTS, **_request(temperature=1.0, seed=4))
  assert a.raw_tokens == b.raw_tokens
  assert a.raw_tokens != c.raw_tokens
  ref = decode.generate_without_cache(model, PROMPTS, **_request(temperature=1.0, seed=3))
  assert ref.raw_tokens == a.raw_tokens


@pytest.mark.parametrize("setting", [dict(top_k=1), dict(top_p=1e-6)])
def test_narrowest_sampling_is_greedy(setting):
  logits_BxV = jax.random.normal(jax.random.key(0), (64, V)) * 3
  sampler = decode.Sampler(temperature=2.0, **setting)
  draws_KxB = jax.vmap(lambda k: decode.sample(logits_BxV, k, sampler))(
      jax.random.split(jax.random.key(1), 50))
  greedy_B = decode.sample(logits_BxV, jax.random.key(2), decode.Sampler())
  np.testing.assert_array_equal(draws_KxB, np.broadcast_to(greedy_B, draws_KxB.shape))
  # Without the restriction the same draws are not all greedy.
  free_KxB = jax.vmap(lambda k: decode.sample(logits_BxV, k, decode.Sampler(temperature=2.0)))(
      jax.random.split(jax.random.key(1), 50))
  assert np.any(np.asarray(free_KxB) != np.asarray(greedy_B))


def test_sample_keeps_top_k_and_nucleus():
  logits_1xV = jnp.log(jnp.array([[0.05, 0.5, 0.3, 0.15]]))
  keys = jax.random.split(jax.random.key(0), 2000)

  def support(sampler):
    draws = jax.vmap(lambda k: decode.sample(logits_1xV, k, sampler))(keys)
    return set(np.asarray(draws).ravel().tolist())

  assert support(decode.Sampler(temperature=1.0)) == {0, 1, 2, 3}
  assert support(decode.Sampler(temperature=1.0, top_k=2)) == {1, 2}
  # Mass before each id (sorted): 0, 0.5, 0.8, 0.95; top_p=0.6 keeps the first two.
  assert support(decode.Sampler(temperature=1.0, top_p=0.6)) == {1, 2}
  assert support(decode.Sampler(temperature=1.0, top_p=0.85)) == {1, 2, 3}


def test_padding_rows_are_never_sampled(model, greedy):
  assert max(max(r) for r in greedy.raw_tokens) >= 16  # Otherwise the test proves nothing.
  out = decode.generate(model, PROMPTS, **_request(vocab_size=16, temperature=1.0))
  assert max(max(r) for r in out.raw_tokens) < 16


@pytest.mark.parametrize("overrides, setting", [
    (dict(num_pauses=-1), "num_pauses"),
    (dict(max_len=REQUEST["max_len"] - 1), "max_len"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_bad_requests_raise_usage_error(model, overrides, setting):
  with pytest.raises(UsageError, match=setting) as e:
    decode.generate(model, PROMPTS, **_request(**overrides))
  assert "\n" not in str(e.value)


def test_prompts_must_start_with_bos(model):
  with pytest.raises(UsageError) as e:
    decode.generate(model, [PROMPTS[0], [7, 8], [0]], **REQUEST)
  assert str(e.value) == ("prompts[1] starts with 7: every prompt must start with the BOS id 0, as "
                          "every training sequence does (or pass bos_id=None)")
  with pytest.raises(UsageError, match=r"^prompts\[0\] is empty: .* BOS id 0"):
    decode.prepare_inputs(model.cfg, [[]], max_new_tokens=1, num_pauses=2, pause_id=PAUSE,
                          max_len=8)
  with pytest.raises(UsageError, match=r"^prompts\[0\] starts with 0: .* BOS id 3"):
    decode.generate_without_cache(model, PROMPTS, **REQUEST, bos_id=3)
  # bos_id=None: prompts are taken as they are.
  unchecked = decode.generate(model, [[7] + p[1:] for p in PROMPTS], **REQUEST, bos_id=None)
  assert unchecked.inputs[0][0] == 7


def test_a_sequence_that_fills_seq_len_decodes_at_max_len_seq_len(model):
  """A fine-tuning sequence of exactly seq_len inputs, BOS + prompt + pauses + answer, whose last
  target is the answer's EOS, decodes at max_len=seq_len with max_new_tokens = answer + 1: the
  final EOS is never fed back, so it needs no cache slot."""
  # A prompt whose greedy continuation's 7th token is new, so it can stand for EOS.
  prompt, num_pauses, answer_len = [0, 23, 62, 100, 68], 3, 6
  seq_len = len(prompt) + num_pauses + answer_len
  request = dict(max_new_tokens=answer_len + 1, num_pauses=num_pauses, pause_id=PAUSE,
                 max_len=seq_len)
  raw = decode.generate(model, [prompt], **{**request, "eos_id": None,
                                            "max_len": seq_len + 4}).raw_tokens[0]
  eos = raw[-1]  # Call the last greedy token EOS: then the answer is the 6 tokens before it.
  assert eos not in raw[:-1]
  for fn in (decode.generate, decode.generate_without_cache):
    out = fn(model, [prompt], eos_id=eos, **request)
    assert out.raw_tokens == [raw] and out.tokens == [raw[:-1]] and out.stopped_at_eos == [True]
  # The training sequence: a forward pass over these seq_len inputs predicts the answer and EOS.
  inputs = prompt + [PAUSE] * num_pauses + raw[:-1]
  assert len(inputs) == seq_len
  logits_LxV = nnx.jit(lambda m, t: m(t))(model, jnp.array([inputs]))[0]
  assert np.argmax(logits_LxV[len(prompt) + num_pauses - 1:], axis=-1).tolist() == raw
  with pytest.raises(UsageError, match="max_len=13 is too small .* = 14"):
    decode.generate(model, [prompt], eos_id=eos, **{**request, "max_len": seq_len - 1})


# ----------------------------------------------------------------------------------------------
# Decoding with the streaming cache (pausejax.stream).

def test_streaming_cache_that_holds_everything_decodes_what_the_dense_cache_does(model, greedy):
  """Sinks + window >= prompt + answer: nothing is evicted, so every position is the dense one."""
  for num_sinks, window in ((0, 22), (4, 18)):
    out = decode.generate(model, PROMPTS, **_request(max_len=None), num_sinks=num_sinks,
                          window=window)
    assert out.raw_tokens == greedy.raw_tokens and out.inputs == greedy.inputs
  sampled = _request(temperature=1.0, seed=3)
  assert (decode.generate(model, PROMPTS, **sampled, num_sinks=4, window=18).raw_tokens
          == decode.generate(model, PROMPTS, **sampled).raw_tokens)


def test_streaming_generation_goes_past_max_len(model):
  """A model limited to 16 positions decodes a 10-token prompt + pauses + 40 new tokens."""
  short = decode.model_from_params(dataclasses.replace(model.cfg, max_len=16),
                                   nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  request = _request(max_new_tokens=40, max_len=None)
  out = decode.generate(short, PROMPTS, **request, num_sinks=2, window=12)
  assert [len(r) for r in out.raw_tokens] == [40] * len(PROMPTS)
  with pytest.raises(UsageError, match="max_len=16 is too small"):
    decode.generate(short, PROMPTS, **{**request, "max_len": 16})
  # The same tokens as a greedy loop over stream.step, one prompt at a time.
  step = nnx.jit(stream.step)
  for row, raw in zip(out.inputs, out.raw_tokens):
    cache = stream.init(short, 1, 2, 12)
    for token in row:
      logits_1xV, cache = step(short, jnp.array([token]), cache)
    expected = []
    for _ in range(40):
      expected.append(int(jnp.argmax(logits_1xV[0])))
      logits_1xV, cache = step(short, jnp.array(expected[-1:]), cache)
    assert raw == expected


@pytest.mark.parametrize("settings, message", [
    (dict(num_sinks=2, window=0), "num_sinks=2 is invalid: 0 with window=0"),
    (dict(num_sinks=0, window=-3), "window=-3 is invalid: an integer >= 1"),
    (dict(num_sinks=-1, window=8), "num_sinks=-1 is invalid: an integer >= 0"),
    (dict(num_sinks=9, window=8), "num_sinks=9 is invalid: at most window=8"),
    (dict(num_sinks=1, window=8, prefix_lm=True), "prefix_lm=True is invalid"),
])
def test_bad_streaming_settings_raise_usage_error(model, settings, message):
  with pytest.raises(UsageError, match=message) as e:
    decode.generate(model, PROMPTS, **_request(max_len=None), **settings)
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_benchmark_reports_both_speeds():
  cfg = model_lib.ModelConfig(vocab_size=V, num_layers=1, d_model=16, num_heads=2, head_dim=8,
                              mlp_dim=32, tied_embeddings=True)
  results = decode.benchmark(cfg, pause_id=PAUSE, batch_size=2, prompt_len=4, num_pauses=2,
                             max_new_tokens=4, repeats=1)
  assert results["decode_tokens_per_sec_cache"] > 0
  assert results["decode_tokens_per_sec_no_cache"] > 0


# ----------------------------------------------------------------------------------------------
# The command line, on a real (2-step) training run.

def _generate_cli(workdir, *extra):
  cmd = [sys.executable, "-m", "pausejax.generate", "--config=configs/tiny.py",
         f"--workdir={workdir}", *cli_overrides(TINY_CLI), *extra]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_workdir(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  cmd = [sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.tfds_data_dir={tfds_dir}",
         *cli_overrides({**TINY_CLI, "num_train_steps": 2, "eval_every_steps": 0})]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  return workdir


@pytest.mark.slow
def test_cli_prints_answers_without_pauses(trained_workdir):
  proc = _generate_cli(trained_workdir, "--prompt=ROMEO:", "--prompt=To be, or not",
                       "--num_pauses=5", "--max_new_tokens=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("checkpoint step 2 | 5 pause(s)"), proc.stdout
  assert lines[1] == "prompt: ROMEO:" and lines[3] == "prompt: To be, or not"
  answers = [line for line in lines if line.startswith("answer: ")]
  assert len(answers) == 2 and all(len(a) > len("answer: ") for a in answers), proc.stdout
  assert "<pause>" not in proc.stdout


@pytest.mark.slow
def test_cli_streams_past_seq_len(trained_workdir):
  """seq_len is 64; with --window the prompt + answer may be longer (and --max_len is refused)."""
  proc = _generate_cli(trained_workdir, "--prompt=ROMEO:", "--max_new_tokens=90",
                       "--num_sinks=1", "--window=15")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0].endswith("| streaming cache 1 + 15"), proc.stdout
  assert lines[2].startswith("answer: ") and len(lines[2]) > len("answer: ")
  proc = _generate_cli(trained_workdir, "--prompt=ROMEO:", "--window=15", "--max_len=32")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --max_len=32 is invalid")


@pytest.mark.slow
def test_cli_reads_the_runs_settings_from_its_config_json(trained_workdir):
  cmd = [sys.executable, "-m", "pausejax.generate", f"--workdir={trained_workdir}",
         "--prompt=ROMEO:", "--max_new_tokens=4"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # A pretraining run: M_ft = 0, appended, causal.
  assert proc.stdout.splitlines()[0] == "checkpoint step 2 | 0 pause(s), append | prefix_lm False"
  # The config file again without the run's model overrides: refused, not decoded.
  cmd = [sys.executable, "-m", "pausejax.generate", "--config=configs/tiny.py",
         f"--workdir={trained_workdir}", "--prompt=ROMEO:"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("error: --config.") and "differs from the run in" in line, line


def test_cli_without_checkpoint_exits_2(tmp_path):
  proc = _generate_cli(tmp_path, "--prompt=ROMEO:", "--max_new_tokens=8")
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.splitlines()[-1]  # Earlier lines are TensorFlow's start-up logging.
  assert last.startswith("error: --workdir=") and "no complete checkpoint" in last, proc.stderr
  assert not os.path.exists(tmp_path / "checkpoints")  # Nothing created.
