"""PauseFT: pause placement in (inputs, targets) examples, prefix-LM masking, init_from."""

import os

import numpy as np
import pytest

from pausejax.errors import UsageError

from conftest import tiny_config

PROMPTS = ["What is two plus two?", "Name the king of Denmark in Hamlet, and his brother."]
ANSWERS = ["four", "Claudius"]


def _examples(lengths, num_pauses, position="append", prefix_lm=False):
  """Converted examples of a two-example (inputs, targets) task built in the test."""
  import seqio
  import tensorflow as tf
  from pausejax import corpus, pause, specials
  vocab = specials.load_vocabulary(corpus.DEFAULT_VOCAB_PATH)

  def source(split, shuffle_files=False, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"inputs": PROMPTS, "targets": ANSWERS})

  task = seqio.Task(
      "finetune_test", source=seqio.FunctionDataSource(source, splits=["train"]),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos,
                     pause.finetune_pause_preprocessor(num_pauses, position)],
      output_features={"inputs": seqio.Feature(vocab, add_eos=False),
                       "targets": seqio.Feature(vocab, add_eos=True)})
  ds = task.get_dataset(lengths, split="train", shuffle=False)
  converter = pause.PauseFTFeatureConverter(vocab.pause_id, pack=False, prefix_lm=prefix_lm)
  examples = [{k: v.numpy() for k, v in ex.items()} for ex in converter(ds, lengths)]
  return vocab, examples


@pytest.mark.parametrize("position", ["append", "prepend"])
def test_pauses_sit_between_prompt_and_answer_or_before_the_prompt(position):
  lengths = {"inputs": 40, "targets": 8}
  vocab, examples = _examples(lengths, num_pauses=5, position=position)
  for prompt, answer, ex in zip(PROMPTS, ANSWERS, examples):
    p = vocab.encode(prompt)
    a = vocab.encode(answer) + [vocab.eos_id]
    m = [vocab.pause_id] * 5
    expected = (p + m if position == "append" else m + p) + a
    targets = ex["decoder_target_tokens"]
    assert targets.shape == (48,)
    assert targets[:len(expected)].tolist() == expected
    assert not targets[len(expected):].any()  # Padding after.
    # Loss exactly on the answer (and its EOS): never on the prompt or the pauses.
    weights = ex["decoder_loss_weights"]
    assert weights.tolist() == [0] * (len(p) + 5) + [1] * len(a) + [0] * (48 - len(expected))
    assert "decoder_causal_attention" not in ex  # Causal unless prefix_lm.


def test_long_prompt_keeps_its_end_and_every_pause():
  lengths = {"inputs": 8, "targets": 4}
  vocab, examples = _examples(lengths, num_pauses=3)
  p = vocab.encode(PROMPTS[1])
  assert len(p) > 5
  targets = examples[1]["decoder_target_tokens"]
  assert targets[:8].tolist() == p[-5:] + [vocab.pause_id] * 3


def test_zero_pauses_is_the_plain_prefix_lm_example():
  lengths = {"inputs": 40, "targets": 8}
  vocab, examples = _examples(lengths, num_pauses=0)
  p, a = vocab.encode(PROMPTS[0]), vocab.encode(ANSWERS[0]) + [vocab.eos_id]
  assert examples[0]["decoder_target_tokens"][:len(p) + len(a)].tolist() == p + a
  assert vocab.pause_id not in examples[0]["decoder_target_tokens"].tolist()


def test_prefix_lm_marks_the_prompt_and_its_pauses():
  lengths = {"inputs": 40, "targets": 8}
  vocab, examples = _examples(lengths, num_pauses=4, prefix_lm=True)
  p = vocab.encode(PROMPTS[0])
  causal = examples[0]["decoder_causal_attention"]
  # seqio marks the prompt's input positions plus the one that predicts the first answer token.
  assert causal.tolist() == [1] * (len(p) + 4 + 1) + [0] * (48 - len(p) - 5)


def test_prefix_lm_mask_is_bidirectional_on_the_prompt_only():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from pausejax import model as model_lib
  cfg = model_lib.ModelConfig(vocab_size=128, num_layers=2, d_model=32, num_heads=2, head_dim=16,
                              mlp_dim=64, tied_embeddings=True)
  model = model_lib.Decoder(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 12), 3, 128)
  prefix = jnp.array([[1] * 5 + [0] * 7])
  changed_prompt = tokens.at[0, 3].set((tokens[0, 3] + 1) % 128)
  changed_answer = tokens.at[0, 9].set((tokens[0, 9] + 1) % 128)
  base_prefix, base_causal = model(tokens, prefix_BxL=prefix), model(tokens)
  # Prefix-LM: a later prompt token changes earlier prompt positions; causal: it cannot.
  delta = jnp.abs(model(changed_prompt, prefix_BxL=prefix) - base_prefix).max(-1)[0]
  assert float(delta[:3].min()) > 1e-6
  delta_causal = jnp.abs(model(changed_prompt) - base_causal).max(-1)[0]
  assert float(delta_causal[:3].max()) == 0.0
  # An answer token never reaches anything before it, with or without the prefix.
  delta = jnp.abs(model(changed_answer, prefix_BxL=prefix) - base_prefix).max(-1)[0]
  assert float(delta[:9].max()) == 0.0
  assert float(delta[9:].min()) > 1e-6


def _params(workdir):
  import orbax.checkpoint as ocp
  from etils import epath
  step = ocp.step.latest_step_metadata(epath.Path(workdir) / "checkpoints",
                                       ocp.step.standard_name_format())
  tree = ocp.PyTreeCheckpointer().restore(step.path / "state")
  return step.step, tree


def test_init_from_takes_parameters_and_a_fresh_optimizer(tfds_dir, tmp_path):
  from pausejax import train
  import jax
  pre = tmp_path / "pretrain"
  train.train_and_evaluate(tiny_config(tfds_dir, num_train_steps=4, checkpoint_every_steps=4,
                                       eval_every_steps=0), str(pre))
  _, pre_state = _params(pre)
  # One step at a vanishing learning rate: the parameters must still be the pretrained ones.
  ft = tmp_path / "finetune"
  c = tiny_config(tfds_dir, num_train_steps=1, eval_every_steps=0, init_from=str(pre),
                  **{"optimizer.learning_rate": 1e-12, "optimizer.warmup_steps": 0,
                     "optimizer.weight_decay": 0.0})
  train.train_and_evaluate(c, str(ft))
  step, ft_state = _params(ft)
  assert step == 1 and int(ft_state["step"]) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
               ft_state["params"], pre_state["params"])
  counts = [int(x) for x in jax.tree.leaves(ft_state["opt_state"]) if np.ndim(x) == 0]
  assert counts and all(c == 1 for c in counts)  # The optimizer started over: one update.


def test_init_from_missing_path_is_a_usage_error(tfds_dir, tmp_path):
  from pausejax import train
  with pytest.raises(UsageError, match="init_from"):
    train.train_and_evaluate(tiny_config(tfds_dir, init_from=str(tmp_path / "nope")),
                             str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_init_from_another_model_shape_is_a_usage_error(tfds_dir, tmp_path):
  from pausejax import train
  pre = tmp_path / "pretrain"
  train.train_and_evaluate(tiny_config(tfds_dir, num_train_steps=1, eval_every_steps=0), str(pre))
  c = tiny_config(tfds_dir, init_from=str(pre), **{"model.mlp_dim": 96})
  with pytest.raises(UsageError) as e:
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert "init_from" in str(e.value) and "mlp" in str(e.value)
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("key,value", [("pause.num_finetune", -1), ("pause.position", "middle"),
                                       ("targets_len", 0)])
def test_bad_finetune_settings(tfds_dir, tmp_path, key, value):
  from pausejax import train
  with pytest.raises(UsageError, match=key.replace(".", r"\.")):
    train.train_and_evaluate(tiny_config(tfds_dir, **{key: value}), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
