"""SequenceMatch's data side and model side (pausejax.backspace): noise + <backspace>, the edit
structure that hides deleted tokens, and backspace decoding."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from pausejax import backspace
from pausejax import data as data_lib
from pausejax import decode
from pausejax import model as model_lib
from pausejax.errors import UsageError

from conftest import tiny_config

BS = 100  # The <backspace> id of the hand-worked examples.


def test_edit_structure_of_a_hand_worked_sequence():
  # Inputs BOS a b n1 <bs> c n2 n3 <bs> <bs> d: n1 deleted once, then n2 and n3 back to back.
  a, b, c, d, n1, n2, n3 = 10, 11, 12, 13, 50, 51, 52
  inputs = [0, a, b, n1, BS, c, n2, n3, BS, BS, d]
  got_inputs, positions, lifetimes, keep = backspace.edit_structure(
      np.array(inputs), None, backspace_id=BS)
  # A <backspace> row replays the restored top token at its position.
  assert got_inputs.tolist() == [0, a, b, n1, b, c, n2, n3, n3 * 0 + n2, c, d]
  assert positions.tolist() == [0, 1, 2, 3, 2, 3, 4, 5, 4, 3, 4]
  # n1 is seen by its own row only, n2 by rows 6..8, n3 by row 7; <backspace> columns by none.
  assert lifetimes.tolist() == [0, 0, 0, 1, -1, 0, 3, 1, -1, -1, 0]
  # No loss where the target is a deleted token: rows 2 (-> n1), 5 (-> n2) and 6 (-> n3).
  assert keep.tolist() == [1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1]
  mask = np.asarray(model_lib.attention_mask(11, None, None, jnp.asarray(lifetimes)[None]))[0, 0]
  seen = {i: np.flatnonzero(mask[i]).tolist() for i in range(11)}
  assert seen[3] == [0, 1, 2, 3]             # n1 sees the prefix and itself.
  assert seen[4] == [0, 1, 2]                # The replay of b sees what b saw (b's own key).
  assert seen[5] == [0, 1, 2, 5]             # c: n1 and its <backspace> are gone.
  assert seen[8] == [0, 1, 2, 5, 6]          # The replay of n2 after n3 is deleted.
  assert seen[9] == [0, 1, 2, 5]             # The replay of c after n2 is deleted too.
  assert seen[10] == [0, 1, 2, 5, 10]        # d follows the clean prefix BOS a b c.
  assert backspace.final_tokens(inputs[1:], BS) == [a, b, c, d]


def test_packed_segments_keep_their_own_stacks():
  inputs = np.array([0, 10, 50, BS, 11, 0, 20, 51, BS, 21])
  segments = np.array([1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
  got, positions, lifetimes, keep = backspace.edit_structure(inputs, segments, backspace_id=BS)
  assert got.tolist() == [0, 10, 50, 10, 11, 0, 20, 51, 20, 21]
  assert positions.tolist() == [0, 1, 2, 1, 2, 0, 1, 2, 1, 2]
  assert lifetimes.tolist() == [0, 0, 1, -1, 0, 0, 0, 1, -1, 0]
  assert keep.tolist() == [1, 0, 1, 1, 1, 1, 0, 1, 1, 1]


def test_a_backspace_with_nothing_to_delete_is_an_ordinary_token():
  got, positions, lifetimes, keep = backspace.edit_structure(np.array([0, BS, 10]), None,
                                                             backspace_id=BS)
  assert got.tolist() == [0, BS, 10] and positions.tolist() == [0, 1, 2]
  assert lifetimes.tolist() == [0, 0, 0] and keep.tolist() == [1, 1, 1]


def _tiny_model(**kwargs):
  cfg = model_lib.ModelConfig(vocab_size=128, num_layers=3, d_model=32, num_heads=2, head_dim=16,
                              mlp_dim=64, tied_embeddings=False, **kwargs)
  return model_lib.Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_output_after_a_backspace_is_the_output_on_the_clean_prefix(scan_layers):
  model = _tiny_model(scan_layers=scan_layers)
  noisy = np.array([0, 10, 11, 50, BS, 12, 13, 60, 61, BS, BS, 14])
  clean = np.array([0, 10, 11, 12, 13, 14])
  inputs, positions, lifetimes, _ = backspace.edit_structure(noisy, None, backspace_id=BS)
  out = model(jnp.asarray(inputs)[None], positions_BxL=jnp.asarray(positions)[None],
              lifetimes_BxL=jnp.asarray(lifetimes)[None])[0]
  ref = model(jnp.asarray(clean)[None])[0]
  # Noisy row -> the clean row it must equal (the <backspace> rows 4, 10 replay 11 and 13).
  for row, clean_row in [(0, 0), (1, 1), (2, 2), (4, 2), (5, 3), (6, 4), (10, 4), (11, 5)]:
    np.testing.assert_allclose(out[row], ref[clean_row], atol=2e-5, rtol=0)
  # And a noise row is not the clean row (the test can fail).
  assert float(jnp.max(jnp.abs(out[3] - ref[3]))) > 1e-3


def test_insert_backspaces_keeps_the_sequence_and_cuts_cleanly():
  tokens = tf.constant(np.arange(10, 70), tf.int32)
  hits = 0
  for s in range(20):
    out = backspace.insert_backspaces(tokens, rate=0.3, backspace_id=BS, vocab_size=90,
                                      seed=tf.constant([s, 7], tf.int64), length=64).numpy()
    assert len(out) in (63, 64)
    final = backspace.final_tokens(out.tolist(), BS)
    # Every noise token is deleted again, and what is left is a prefix of the original.
    assert final == list(range(10, 10 + len(final)))
    bs_at = np.flatnonzero(out == BS)
    assert np.all((out[bs_at - 1] >= backspace.FIRST_NOISE_ID) & (out[bs_at - 1] < 90))
    # A final noise token would never be deleted: the cut drops it with its <backspace>.
    assert not (backspace.FIRST_NOISE_ID <= out[-1] < 90 and out[-1] not in range(10, 70))
    hits += len(bs_at)
  # About 0.3 edits per original token among the ~64 / 1.6 kept: between 10 and 35 per row.
  assert 10 * 20 < hits < 35 * 20


def test_noise_from_a_sample_file_follows_its_frequencies(tmp_path):
  path = tmp_path / "samples.txt"
  path.write_text("7 7 7 7 9\n1 0 2 200")  # Ids outside [3, 90) are not noise.
  weights = backspace.noise_weights(str(path), 90)
  assert weights[7] == 4 and weights[9] == 1 and weights.sum() == 5
  tokens = tf.constant(np.arange(110, 510), tf.int32)  # No id equals BS.
  out = backspace.insert_backspaces(tokens, rate=0.5, backspace_id=BS, vocab_size=90,
                                    seed=tf.constant([1, 2], tf.int64), weights_V=weights).numpy()
  noise = out[np.flatnonzero(out == BS) - 1]
  assert set(noise.tolist()) <= {7, 9} and np.mean(noise == 7) > 0.65


def test_training_rows_carry_the_edit_structure_and_eval_stays_clean(tfds_dir):
  config = tiny_config(tfds_dir, **{"backspace.rate": 0.1})
  data = data_lib.prepare(config)
  bs_id = data.vocabulary.backspace_id
  assert "backspace rate 0.1" in data.train.describe()
  batch = next(iter(data_lib.shard_dataset(data, config, 0, train=True, batch_size=4)))
  batch = {k: v.numpy() for k, v in batch.items()}
  targets, inputs = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
  assert np.sum(targets == bs_id) > 0 and not np.any(inputs == bs_id)  # Replayed, never fed.
  for row in range(4):
    raw = np.concatenate([[0], targets[row, :-1]])
    want = backspace.edit_structure(raw, None, backspace_id=bs_id)
    np.testing.assert_array_equal(inputs[row], want[0])
    np.testing.assert_array_equal(batch["decoder_positions"][row], want[1])
    np.testing.assert_array_equal(batch["decoder_lifetimes"][row], want[2])
    # Rows predicting noise have no loss; rows predicting <backspace> do.
    noise_rows = np.flatnonzero(targets[row] == bs_id) - 1
    assert np.all(batch["decoder_loss_weights"][row, noise_rows[noise_rows >= 0]] == 0)
    assert np.all(batch["decoder_loss_weights"][row, targets[row] == bs_id] == 1)
  ev = next(iter(data_lib.shard_dataset(data, config, 0, train=False, batch_size=4)))
  assert "decoder_lifetimes" not in ev and not np.any(ev["decoder_target_tokens"].numpy() == bs_id)


@pytest.mark.parametrize("key,value,valid", [
    ("backspace.rate", 1.0, "[0, 1)"), ("backspace.rate", -0.1, "[0, 1)"),
    ("backspace.max_per_sequence", -1, ">= 0"), ("backspace.noise_from", "/no/such", "no such")])
def test_bad_backspace_settings_are_one_error(tfds_dir, key, value, valid):
  from pausejax import config as config_lib
  with pytest.raises(UsageError, match=key.replace(".", r"\.")) as e:
    config_lib.validate(tiny_config(tfds_dir, **{key: value}))
  assert valid in str(e.value)


# ----------------------------------------------------------------------------------------------
# Decoding.

def test_decoding_after_a_backspace_continues_from_the_restored_prefix():
  model = _tiny_model()
  prompt = np.array([[0, 5, 6, 7, 0, 0, 0, 0, 0, 0]], np.int32)
  advance, mask = decode.backspace_advance(model, jnp.asarray(prompt), jnp.array([4]),
                                           jnp.int32(BS), 4)
  _, cache = model.prefill(jnp.asarray(prompt), jnp.array([4]), prompt.shape[1])
  st = (cache, jnp.asarray(prompt), jnp.array([4]), jnp.zeros((1,), jnp.int32))
  for token in (20, 50, BS):  # t1, a noise token, then <backspace>.
    logits, st = advance(jnp.array([token], jnp.int32), st)
  ref, _ = model.prefill(jnp.array([[0, 5, 6, 7, 20]]), jnp.array([5]), 10)
  keep = np.arange(128) != BS
  np.testing.assert_allclose(np.asarray(logits)[0, keep], np.asarray(ref)[0, keep], atol=2e-5)
  assert int(st[0].lengths_B[0]) == 5 and int(st[3][0]) == 1
  # Deleting t1 too leaves the prompt, and then <backspace> may not be sampled.
  logits, st = advance(jnp.array([BS], jnp.int32), st)
  ref, _ = model.prefill(jnp.asarray(prompt), jnp.array([4]), 10)
  np.testing.assert_allclose(np.asarray(logits)[0, keep], np.asarray(ref)[0, keep], atol=2e-5)
  assert np.isneginf(np.asarray(logits)[0, BS])


@pytest.mark.parametrize("cap", [0, 3, 100])
def test_backspace_decoding_never_deletes_the_prompt_and_keeps_the_cap(cap):
  model = _tiny_model()
  prompts = [[0, 5, 6], [0, 7, 8, 9, 10]]
  out = decode.generate(model, prompts, max_new_tokens=40, num_pauses=2, pause_id=101,
                        eos_id=None, max_len=48, temperature=3.0, seed=1, vocab_size=102,
                        backspace_id=BS, max_backspaces=cap)
  for raw, final, used in zip(out.raw_tokens, out.tokens, out.num_backspaces):
    live = 0
    for t in raw:
      live += -1 if t == BS else 1
      assert live >= 0  # Never below the prompt (and its pauses).
    assert used == raw.count(BS) <= cap
    assert final == [t for t in backspace.final_tokens(raw, BS) if t != 101]
  # High temperature over 102 ids: with room for deletions, some happen (the test can fail).
  assert (sum(out.num_backspaces) > 0) == (cap > 0)


def test_backspace_decoding_bad_settings():
  model = _tiny_model()
  kwargs = dict(max_new_tokens=4, num_pauses=0, pause_id=101, eos_id=None, max_len=8)
  with pytest.raises(UsageError, match="backspace_id=500.*no such embedding row"):
    decode.generate(model, [[0, 5]], backspace_id=500, max_backspaces=2, **kwargs)
  with pytest.raises(UsageError, match="max_backspaces=2.*without a backspace_id"):
    decode.generate(model, [[0, 5]], max_backspaces=2, **kwargs)
  with pytest.raises(UsageError, match="max_backspaces.*streaming"):
    decode.generate(model, [[0, 5]], backspace_id=BS, max_backspaces=2, window=8,
                    **{**kwargs, "max_len": None})


def test_evaluate_decodes_with_the_runs_backspaces(tfds_dir):
  from pausejax import corpus
  from pausejax import evaluate
  from pausejax import specials
  config = tiny_config(tfds_dir, **{"backspace.max_per_sequence": 3, "task": "arith_base7"})
  assert evaluate.Settings.from_config(config).max_backspaces == 3
  vocabulary = specials.load_vocabulary(corpus.DEFAULT_VOCAB_PATH)
  cfg = model_lib.ModelConfig(vocab_size=specials.padded_vocab_size(vocabulary.vocab_size),
                              num_layers=1, d_model=32, num_heads=2, head_dim=16, mlp_dim=64,
                              tied_embeddings=True)
  model = model_lib.Decoder(cfg, rngs=nnx.Rngs(0))
  plain = evaluate.evaluate(model, "arith_base7", vocabulary, max_examples=4, max_len=48,
                            batch_size=4)
  edits = evaluate.evaluate(model, "arith_base7", vocabulary, max_examples=4, max_len=48,
                            batch_size=4, max_backspaces=3)
  # Two more moves per allowed deletion: the budget grows by 6.
  assert edits["max_new_tokens"] == plain["max_new_tokens"] + 6
  with pytest.raises(UsageError, match="max_backspaces"):
    evaluate.Settings(max_backspaces=-1).validate()


@pytest.mark.slow
def test_inspect_data_shows_the_edits(tfds_dir):
  import subprocess
  import sys
  from conftest import REPO
  r = subprocess.run([sys.executable, "-m", "pausejax.inspect_data", "--config=configs/tiny.py",
                      f"--config.tfds_data_dir={tfds_dir}", "--config.backspace.rate=0.2",
                      "--num_examples=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "backspace rate 0.2" in r.stdout and "noise + <backspace>" in r.stdout
  assert r.stdout.count("<backspace>") > 5
