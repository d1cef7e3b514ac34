"""Pause insertion (PausePT) and the pause loss mask."""

import numpy as np
import seqio
from scipy import stats
import tensorflow as tf

from pausejax import pause
from pausejax import specials

PAUSE_ID = 1000


def _insert(tokens, count, seed, trim=True):
  return pause.insert_pauses(tf.constant(tokens, tf.int32), count=count, pause_id=PAUSE_ID,
                             seed=tf.constant(seed, tf.int64), trim=trim).numpy()


def test_num_pauses_rounds_half_up():
  assert pause.num_pauses(0.1, 2048) == 205  # The paper's ~205 for L = 2048.
  assert pause.num_pauses(0.1, 256) == 26
  assert pause.num_pauses(0.5, 5) == 3  # 2.5 rounds up, not to even.
  assert pause.num_pauses(0.0, 1024) == 0


def test_untrimmed_has_exact_count_and_keeps_order():
  tokens = np.arange(3, 103)  # 100 distinct real tokens.
  out = _insert(tokens, 10, [1, 2], trim=False)
  assert len(out) == 110
  assert np.sum(out == PAUSE_ID) == 10
  np.testing.assert_array_equal(out[out != PAUSE_ID], tokens)


def test_trimmed_is_length_l_and_real_tokens_are_a_prefix():
  tokens = np.arange(3, 259)
  for s in range(20):
    out = _insert(tokens, 26, [s, 7])
    assert len(out) == 256
    real = out[out != PAUSE_ID]
    np.testing.assert_array_equal(real, tokens[:len(real)])
    assert 256 - 26 <= len(real) <= 256


def test_deterministic_given_seed_and_different_across_seeds():
  tokens = np.arange(3, 67)
  a, b = _insert(tokens, 8, [5, 9]), _insert(tokens, 8, [5, 9])
  np.testing.assert_array_equal(a, b)
  others = [_insert(tokens, 8, [5, s]) for s in range(10, 20)]
  assert any(not np.array_equal(a, o) for o in others)


def test_rate_zero_is_identity():
  tokens = np.arange(3, 67)
  np.testing.assert_array_equal(_insert(tokens, 0, [1, 1]), tokens)


def test_positions_are_uniform():
  """Fixed-seed chi-square test: every one of the L + n slots is equally likely to be a pause."""
  length, count, trials = 40, 8, 3000
  tokens = np.arange(3, 3 + length)
  hist = np.zeros(length + count)
  for t in range(trials):
    out = _insert(tokens, count, [t, 12345], trim=False)
    hist += out == PAUSE_ID
  expected = np.full_like(hist, trials * count / (length + count))
  _, p_value = stats.chisquare(hist, expected)
  assert p_value > 1e-3, (p_value, hist)
  # And they are not all piled up together: first and second half get about the same share.
  half = (length + count) // 2
  assert abs(hist[:half].sum() - hist[half:].sum()) < 0.1 * hist.sum()


def _vocab():
  return specials.SpecialsVocabulary(seqio.PassThroughVocabulary(size=100, eos_id=1))


def _preprocess(ds, rate, seq_len, seed):
  features = {"targets": seqio.Feature(_vocab(), add_eos=False)}
  with seqio.utils.map_seed_manager(seed):
    return pause.insert_pauses_preprocessor(ds, {"targets": seq_len}, features, rate=rate)


def test_preprocessor_independent_per_example_and_deterministic():
  seq_len = 64
  same_chunk = np.arange(3, 3 + seq_len, dtype=np.int32)
  ds = tf.data.Dataset.from_tensors({"targets": same_chunk}).repeat(6)
  run1 = [x["targets"] for x in _preprocess(ds, 0.25, seq_len, 42).as_numpy_iterator()]
  run2 = [x["targets"] for x in _preprocess(ds, 0.25, seq_len, 42).as_numpy_iterator()]
  run3 = [x["targets"] for x in _preprocess(ds, 0.25, seq_len, 43).as_numpy_iterator()]
  pause_id = _vocab().pause_id
  assert all(np.any(r == pause_id) for r in run1)
  np.testing.assert_array_equal(run1, run2)  # Deterministic from the seed.
  # Identical inputs get different pause patterns: seeds are per example.
  assert len({r.tobytes() for r in run1}) == len(run1)
  assert not np.array_equal(run1, run3)


def test_same_index_of_different_shards_gets_different_pauses():
  # Data shards share the task seed (pausejax/data.py), so seqio gives the i-th example of every
  # shard the same seed; the chunk's content must still change where its pauses go.
  seq_len = 64
  a = tf.data.Dataset.from_tensors({"targets": np.arange(3, 3 + seq_len, dtype=np.int32)})
  b = tf.data.Dataset.from_tensors({"targets": np.arange(103, 103 + seq_len, dtype=np.int32)})
  pause_id = _vocab().pause_id
  mask_a = [x["targets"] == pause_id for x in _preprocess(a, 0.25, seq_len, 7).as_numpy_iterator()]
  mask_b = [x["targets"] == pause_id for x in _preprocess(b, 0.25, seq_len, 7).as_numpy_iterator()]
  assert not np.array_equal(mask_a[0], mask_b[0])


def test_preprocessor_rate_zero_returns_dataset_unchanged():
  ds = tf.data.Dataset.from_tensors({"targets": np.arange(3, 19, dtype=np.int32)})
  assert _preprocess(ds, 0.0, 16, 1) is ds


def test_converter_masks_pause_targets_only():
  vocab = _vocab()
  p = vocab.pause_id
  targets = np.array([5, p, 6, 7, p, p, 8, 1, 9, 10, 0, 0], np.int32)
  ds = tf.data.Dataset.from_tensors({"targets": targets})
  conv = pause.PauseLMFeatureConverter(p, pack=False)
  out = next(conv(ds, {"targets": 12}).as_numpy_iterator())
  np.testing.assert_array_equal(out["decoder_target_tokens"], targets)
  np.testing.assert_array_equal(out["decoder_loss_weights"], (targets != 0) & (targets != p))
  # Pauses stay visible as inputs (shifted right by one).
  np.testing.assert_array_equal(out["decoder_input_tokens"][1:], targets[:-1])


def test_special_ids_follow_base_vocab_and_decode_visibly():
  vocab = _vocab()
  assert (vocab.pause_id, vocab.sink_id, vocab.backspace_id) == (100, 101, 102)
  assert vocab.vocab_size == 103
  assert specials.padded_vocab_size(vocab.vocab_size) == 128
  assert specials.padded_vocab_size(8003) == 8064
  assert specials.padded_vocab_size(128) == 128
