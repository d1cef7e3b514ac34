"""SequenceMatch's loss and model samples (Cundy & Ermon 2023, arXiv 2306.05426).

The data side (noise + `<backspace>`, the edit structure) is `pausejax.backspace`; decoding with
`<backspace>` is `pausejax.decode`. This module adds the χ²-mixture imitation loss, trained on
data rows and on rows the current model wrote (a replay buffer kept in the train state).

Derivation. Generation is an MDP: the state s is the prefix, an action a is a token or
`<backspace>` (which deterministically removes the last token). The policy is the model,
π(a|s) = softmax(ℓθ(·|s))_a, and, as in IQ-Learn (Garg et al. 2021), its logits are read as a soft
Q-function, Q(s, a) = ℓθ(a|s), with value V(s) = logsumexp_a' ℓθ(a'|s), so π = exp(Q - V). The
reward that Q implies through the soft Bellman equation is

    r(s, a) = Q(s, a) - γ (1 - done) V(s'),        V(s') = 0 after EOS (done = 1),

with s' the state after a. SequenceMatch minimises the χ²-mixture divergence between the
occupancy measures of the data and of the model, D_χ²(ρ_data, (ρ_data + ρθ)/2), whose variational
form with φ(x) = x - x²/4 becomes, after IQ-Learn's change of variables (telescoping the
initial-state term into a value term over visited states), the loss

    L_χ² = - E_data[r] + E_data∪model[V(s) - γ (1 - done) V(s')] + 1/(4α) E_data∪model[r²]

(IQ-Learn's `iq.py` "chi" divergence with its value loss over expert and policy states and the
χ² regulariser on both; the paper's exact terminal handling is not public: here V(s') = 0 after
EOS, and a row whose next state is not in the row, a chunk's last row without EOS, is left out).
Expectations are means over rows: data rows are the rows with loss weight (never the rows that
predict a noise token, see `backspace`), model rows are the generated part of the model's
samples. Gradients flow through V(s) and V(s') both (no target network). The defaults are the
figures reported for the paper, α = 0.01 and γ = 0.998, from secondary sources.

Training starts with behaviour cloning (plain MLE) for `bc_steps` steps, then minimises
(1 - weight) · MLE + weight · L_χ² (the paper mixes the two; `weight` is not published: a setting).

In the batch: a step's rows are the data batch plus `model_rows` rows of the replay buffer, read in
turn (row (step * model_rows + i) mod buffer_size). The state position s' of row t is row t + 1
(after a `<backspace>` that row is the replay of the restored prefix, so V(s') is the value of the
restored prefix, as the MDP says).

Model samples. Every `refresh_every_steps` steps (and at the first step of a run) the current
parameters continue `buffer_size` prompts taken from that step's data rows (a fine-tuning row's
prompt and pauses; a pretraining row's first `prompt_len` tokens, noise removed) with the KV-cache
decoder at `temperature`, `<backspace>` allowed up to `backspace.max_per_sequence` times, for up to
`sample_tokens` tokens. The buffer lives in the train state (`state["replay"]`), so checkpoints
hold it and a resumed run continues with the same rows; the samples depend only on the
parameters, the data and the step, so resume is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pausejax import step as step_lib

PyTree = Any
# The replay buffer's arrays, each [buffer_size, seq_len] int32.
REPLAY_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
               "decoder_positions", "decoder_lifetimes", "decoder_segment_ids")


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.sequencematch` (defaults and meanings in `pausejax.config`)."""
  weight: float
  bc_steps: int
  alpha: float
  gamma: float
  model_rows: int
  buffer_size: int
  refresh_every_steps: int
  sample_tokens: int
  temperature: float
  prompt_len: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Settings | None":
    """The run's settings, or None when SequenceMatch is off (weight 0 or no such section)."""
    sm = config.get("sequencematch")
    if not sm or not sm.weight:
      return None
    return cls(**{f.name: sm[f.name] for f in dataclasses.fields(cls)})


# ----------------------------------------------------------------------------------------------
# The loss.

def chi2_terms(logits_BxLxV: jax.Array, batch: dict[str, jax.Array], is_model_B: jax.Array, *,
               gamma: float, alpha: float, eos_id: int) -> dict[str, jax.Array]:
  """L_χ² of the module docstring and its parts, for a batch of data and model rows."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  targets_BxL = batch["decoder_target_tokens"]
  length = targets_BxL.shape[1]
  q_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  v_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  done_BxL = (targets_BxL == eos_id).astype(jnp.float32)
  next_v_BxL = jnp.pad(v_BxL[:, 1:], ((0, 0), (0, 1)))
  has_next_BxL = jnp.broadcast_to(jnp.arange(length) < length - 1, targets_BxL.shape)
  segments_BxL = batch.get("decoder_segment_ids")
  if segments_BxL is not None:
    has_next_BxL &= jnp.pad(segments_BxL[:, 1:] == segments_BxL[:, :-1], ((0, 0), (0, 1)))
  valid_BxL = (batch["decoder_loss_weights"] > 0) & ((done_BxL > 0) | has_next_BxL)
  every_BxL = valid_BxL.astype(jnp.float32)
  data_BxL = every_BxL * (1.0 - is_model_B.astype(jnp.float32))[:, None]
  next_BxL = gamma * (1.0 - done_BxL) * next_v_BxL
  r_BxL = q_BxL - next_BxL
  mean = lambda x, w: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)
  reward = mean(r_BxL, data_BxL)
  value = mean(v_BxL - next_BxL, every_BxL)
  chi2 = mean(r_BxL ** 2, every_BxL) / (4.0 * alpha)
  return {"chi2_loss": -reward + value + chi2, "chi2_reward": reward, "chi2_value": value,
          "chi2_reg": chi2}


def with_replay(batch: dict[str, jax.Array], replay: dict[str, jax.Array], step: jax.Array,
                model_rows: int):
  """(the data batch + `model_rows` replay rows, is_model_B). Features missing from one part
  take their default: positions 0..L-1, lifetimes 0, segment 1 (data rows are one sequence)."""
  size, length = replay["decoder_input_tokens"].shape
  index_M = (step * model_rows + jnp.arange(model_rows)) % size
  rows = {k: jnp.take(v, index_M, axis=0) for k, v in replay.items()}
  data_rows = batch["decoder_input_tokens"].shape[0]
  defaults_L = {"decoder_positions": jnp.arange(length, dtype=jnp.int32),
                "decoder_lifetimes": jnp.zeros(length, jnp.int32),
                "decoder_segment_ids": jnp.ones(length, jnp.int32)}
  joined = {}
  for key in REPLAY_KEYS:
    part = batch.get(key)
    if part is None:
      part = jnp.broadcast_to(defaults_L[key], (data_rows, length))
    joined[key] = jnp.concatenate([part.astype(jnp.int32), rows[key]], axis=0)
  is_model_B = jnp.concatenate([jnp.zeros(data_rows, bool), jnp.ones(model_rows, bool)])
  return joined, is_model_B


def make_train_step(graphdef, abstract_params, tx, schedule, pause_id: int, eos_id: int,
                    settings: Settings, skip_nonfinite: bool = False):
  """One optimizer step of (1 - w) MLE + w L_χ² (w = 0 for the first bc_steps steps).

  The state has a "replay" entry (the buffer); the MLE part is the usual per-token NLL of the
  data rows, so `train_loss` stays comparable with plain training.
  """
  def loss_fn(params, batch, is_model_B, w):
    logits_BxLxV = step_lib.apply_model(graphdef, abstract_params, params, batch)
    data_batch = {**batch, "decoder_loss_weights":
                  batch["decoder_loss_weights"] * (~is_model_B)[:, None].astype(jnp.int32)}
    terms = step_lib.loss_terms(logits_BxLxV, data_batch)
    mle = terms["nll_sum"] / jnp.maximum(terms["weight_sum"], 1.0)
    chi2 = chi2_terms(logits_BxLxV, batch, is_model_B, gamma=settings.gamma,
                      alpha=settings.alpha, eos_id=eos_id)
    return (1.0 - w) * mle + w * chi2["chi2_loss"], {**terms, **chi2, "mle": mle}

  def train_step(state: PyTree, batch: dict[str, jax.Array]):
    data_batch = batch
    batch, is_model_B = with_replay(batch, state["replay"], state["step"], settings.model_rows)
    w = jnp.where(state["step"] < settings.bc_steps, 0.0, settings.weight)
    grads, terms = jax.grad(loss_fn, has_aux=True)(state["params"], batch, is_model_B, w)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.global_norm(grads)
    loss = (1.0 - w) * terms["mle"] + w * terms["chi2_loss"]
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep, params, state["params"])
      opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
    real = jnp.maximum(terms["weight_sum"], 1.0)
    total = jnp.sum(data_batch["decoder_target_tokens"] != 0).astype(jnp.float32)
    step_metrics = {
        "train_loss": terms["mle"],
        "train_accuracy": terms["correct_sum"] / real,
        "objective": loss,
        "chi2_loss": terms["chi2_loss"],
        "chi2_weight": w,
        "grad_norm": grad_norm,
        "nonfinite": 1.0 - finite.astype(jnp.float32),
        "learning_rate": schedule(state["step"]),
        "pause_fraction": jnp.sum(data_batch["decoder_input_tokens"] == pause_id)
                          / jnp.maximum(total, 1),
        "real_tokens": terms["weight_sum"],
        "total_tokens": total,
    }
    new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new_state, step_metrics

  return train_step


# ----------------------------------------------------------------------------------------------
# Model samples: prompts from data rows, continuations from the current parameters.

def empty_replay(buffer_size: int, seq_len: int) -> dict[str, np.ndarray]:
  return {k: np.zeros((buffer_size, seq_len), np.int32) for k in REPLAY_KEYS}


def prompts_from(batch: dict[str, np.ndarray], count: int, prompt_len: int,
                 backspace_id: int) -> list[list[int]]:
  """`count` prompts from the data rows (cycling): a fine-tuning row's text before its first
  target with loss (prompt and pauses); a pretraining row's first `prompt_len` tokens, noise
  removed."""
  from pausejax import backspace  # Here: the train step (and build.py) needs no TensorFlow.
  inputs, targets = batch["decoder_input_tokens"], batch["decoder_target_tokens"]
  weights = batch["decoder_loss_weights"]
  prompts = []
  for i in range(count):
    row = i % inputs.shape[0]
    raw = np.concatenate([inputs[row, :1], targets[row, :-1]]).tolist()
    first = int(np.argmax(weights[row] > 0))
    end = raw.index(0, 1) if 0 in raw[1:] else len(raw)  # Padding ends the row.
    if first > 0:  # A fine-tuning row: its prompt (and pauses), never into the answer.
      prompts.append(raw[:first + 1])
    else:
      prompts.append(backspace.final_tokens(raw[:end], backspace_id, protected=1)[:prompt_len])
  return prompts


def sample_rows(prompts: list[list[int]], raw_tokens: list[list[int]], seq_len: int,
                backspace_id: int) -> dict[str, np.ndarray]:
  """Replay rows from prompts and their sampled continuations (edit traces)."""
  from pausejax import backspace
  out = empty_replay(len(prompts), seq_len)
  for i, (prompt, raw) in enumerate(zip(prompts, raw_tokens)):
    full = (list(prompt) + list(raw))[:seq_len + 1]
    n = len(full) - 1  # Rows with a target.
    inputs, positions, lifetimes, _ = backspace.edit_structure(
        np.array(full[:-1] + [0] * (seq_len - n)), None, backspace_id=backspace_id)
    out["decoder_input_tokens"][i] = inputs
    out["decoder_target_tokens"][i, :n] = full[1:]
    out["decoder_loss_weights"][i, len(prompt) - 1:n] = 1  # The model's own moves only.
    out["decoder_positions"][i] = positions
    out["decoder_lifetimes"][i] = lifetimes
    out["decoder_segment_ids"][i, :n] = 1
  return out


def refresh(state: PyTree, batch: dict[str, np.ndarray], *, model_cfg, settings: Settings,
            seq_len: int, seed: int, backspace_id: int, pause_id: int, eos_id: int,
            vocab_size: int, max_backspaces: int, replicated) -> tuple[PyTree, dict[str, float]]:
  """The state with a new replay buffer sampled from its parameters; and sample statistics."""
  from pausejax import decode  # Here: the step above needs no decoder.
  step = int(jax.device_get(state["step"]))
  prompts = prompts_from(batch, settings.buffer_size, settings.prompt_len, backspace_id)
  new_tokens = min(settings.sample_tokens, seq_len + 1 - max(map(len, prompts)))
  model = decode.model_from_params(model_cfg, state["params"])
  out = decode.generate(model, prompts, max_new_tokens=max(new_tokens, 1), num_pauses=0,
                        pause_id=pause_id, eos_id=eos_id, max_len=seq_len,
                        temperature=settings.temperature, seed=seed * 1_000_003 + step,
                        vocab_size=vocab_size, bos_id=None, backspace_id=backspace_id,
                        max_backspaces=max_backspaces)
  rows = sample_rows(prompts, out.raw_tokens, seq_len, backspace_id)
  replay = jax.device_put(rows, replicated)
  moves = sum(len(r) for r in out.raw_tokens)
  stats = {"sample_backspace_rate": sum(out.num_backspaces) / max(moves, 1),
           "sample_tokens": moves / len(prompts)}
  return {**state, "replay": replay}, stats


def refresher(config: ml_collections.ConfigDict, run, vocabulary):
  """`(state, host batch, logger) -> state` renewing the replay buffer when this step is due,
  for `train.py`; None when SequenceMatch is off."""
  settings = Settings.from_config(config)
  if settings is None:
    return None
  from pausejax.errors import UsageError
  if jax.process_count() > 1:
    raise UsageError.setting("sequencematch.weight", settings.weight, "0 on more than one process"
                             " (model samples are drawn on one host; multi-host is not built)")

  def maybe_refresh(state, batch, logger):
    step = int(jax.device_get(state["step"]))
    if step % settings.refresh_every_steps:
      return state
    state, stats = refresh(
        state, batch, model_cfg=run.decode_model_cfg, settings=settings,
        seq_len=config.seq_len, seed=config.seed, backspace_id=vocabulary.backspace_id,
        pause_id=vocabulary.pause_id, eos_id=vocabulary.eos_id,
        vocab_size=vocabulary.vocab_size, max_backspaces=config.backspace.max_per_sequence,
        replicated=run.replicated)
    logger.write(step, stats)
    return state

  return maybe_refresh
