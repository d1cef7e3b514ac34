"""The jitted pieces of training: model state as pytrees, optimizer, loss, train and eval steps.

Pure JAX/Flax/Optax (no TensorFlow), so benchmarks, AOT compilation and decoding build exactly the
step that `train.py` runs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pausejax import model as model_lib

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Model state as plain pytrees: params is a nested dict of arrays, so checkpoints and shardings
# never depend on module internals.

def abstract_model(model_cfg: model_lib.ModelConfig):
  """(graphdef, abstract nnx.State of params) without allocating anything."""
  abstract = nnx.eval_shape(lambda: model_lib.Decoder(model_cfg, rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param)


def param_logical_specs(abstract_params: nnx.State) -> PyTree:
  return nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))


def apply_model(graphdef, abstract_params: nnx.State, params: PyTree, batch: dict[str, jax.Array]):
  """Logits [B, L, V] (float32) for a batch of seqio decoder features."""
  state = jax.tree.map(lambda x: x, abstract_params)  # Fresh copy: replace_by_pure_dict mutates.
  nnx.replace_by_pure_dict(state, params)
  model = nnx.merge(graphdef, state)
  # decoder_causal_attention (prefix-LM fine-tuning) is in the batch only with config.prefix_lm,
  # decoder_lifetimes (pausejax.backspace) only with backspaces.
  return model(batch["decoder_input_tokens"], batch.get("decoder_segment_ids"),
               batch.get("decoder_positions"), batch.get("decoder_causal_attention"),
               batch.get("decoder_lifetimes"))


# ----------------------------------------------------------------------------------------------
# Optimizer: AdamW, linear warmup + cosine decay, global-norm clipping. Weight decay only on the
# weight matrices (kernels): not on norm scales, nor on the (un)embedding tables (logical axis
# `vocab`), whether or not the layers are stacked on a leading `layers` axis (scan_layers).

def make_optimizer(oc, num_train_steps: int, param_specs: PyTree):
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=oc.learning_rate, warmup_steps=oc.warmup_steps,
      decay_steps=max(num_train_steps, oc.warmup_steps + 1),
      end_value=oc.learning_rate * oc.end_lr_ratio)
  def is_kernel(spec) -> bool:
    # `layers` only stacks copies: a stacked norm scale ("layers", "norm") is still a vector.
    axes = [name for name in spec if name != "layers"]
    return len(axes) >= 2 and "vocab" not in axes

  decay_mask = jax.tree.map(is_kernel, param_specs,
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  tx = optax.chain(
      optax.clip_by_global_norm(oc.grad_clip_norm) if oc.grad_clip_norm else optax.identity(),
      optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay,
                  mask=decay_mask))
  return tx, schedule


def make_state(model_cfg, tx, seed: int, param_shardings: PyTree, mesh,
               replay: dict[str, tuple[int, ...]] | None = None):
  """The train state {step, params, opt_state}: an init function, its shapes and its shardings.

  Optimizer moments take their parameter's sharding; everything else is replicated. `replay`
  (name -> shape) adds SequenceMatch's replay buffer of int32 arrays, zeros at first.
  """
  def init_state():
    model = model_lib.Decoder(model_cfg, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if replay:
      state["replay"] = {k: jnp.zeros(shape, jnp.int32) for k, shape in replay.items()}
    return state

  shapes = jax.eval_shape(init_state)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = {
      "step": replicated,
      "params": param_shardings,
      "opt_state": optax.tree_map_params(
          tx, lambda _, s: s, shapes["opt_state"], param_shardings,
          transform_non_params=lambda _: replicated,
          is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)),
  }
  if replay:
    shardings["replay"] = {k: replicated for k in replay}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  return init_state, abstract, shardings


# ----------------------------------------------------------------------------------------------
# Loss: next-token cross-entropy weighted by decoder_loss_weights, which the data pipeline has
# already zeroed on padding and on `<pause>` targets (pause.PauseLMFeatureConverter).

def loss_terms(logits_BxLxV: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums over the batch: weighted NLL, correct predictions, real-target count.

  NLL = logsumexp - target logit, and a prediction is correct when the target's logit is the
  largest (the max is the one logsumexp needs anyway). A log-softmax over the vocabulary plus a
  separate argmax cost a quarter of the tiny model's train step.
  """
  targets_BxL = batch["decoder_target_tokens"]
  weights_BxL = batch["decoder_loss_weights"].astype(jnp.float32)
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  max_BxL = jax.lax.stop_gradient(jnp.max(logits_BxLxV, axis=-1))
  lse_BxL = max_BxL + jnp.log(jnp.sum(jnp.exp(logits_BxLxV - max_BxL[..., None]), axis=-1))
  target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = lse_BxL - target_BxL
  correct_BxL = (target_BxL >= max_BxL).astype(jnp.float32)
  return {"nll_sum": jnp.sum(nll_BxL * weights_BxL),
          "correct_sum": jnp.sum(correct_BxL * weights_BxL),
          "weight_sum": jnp.sum(weights_BxL)}


def make_train_step(graphdef, abstract_params, tx, schedule, pause_id: int,
                    microbatches: int = 1, skip_nonfinite: bool = False):
  """One optimizer step on a global batch, optionally accumulated over `microbatches`.

  Gradients are of the *summed* NLL, divided once by the batch's real-token count, so any number
  of microbatches gives the update of one big batch. The metric `nonfinite` is 1 when the loss or
  the gradient norm is NaN/Inf; with `skip_nonfinite` such a step leaves parameters and optimizer
  state as they were (only the step counter moves on), so the state stays finite.
  """
  def nll_sum(params, batch):
    terms = loss_terms(apply_model(graphdef, abstract_params, params, batch), batch)
    return terms["nll_sum"], terms

  grad_fn = jax.grad(nll_sum, has_aux=True)

  def accumulate(params, batch):
    if microbatches == 1:
      return grad_fn(params, batch)
    # Microbatch j takes rows j, j + k, j + 2k, ...: every device keeps its own rows.
    split = jax.tree.map(
        lambda x: x.reshape(-1, microbatches, *x.shape[1:]).swapaxes(0, 1), batch)

    def body(carry, microbatch):
      return jax.tree.map(jnp.add, carry, grad_fn(params, microbatch)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params,
                                                        jax.tree.map(lambda x: x[0], split)))
    return jax.lax.scan(body, zeros, split)[0]

  def train_step(state: PyTree, batch: dict[str, jax.Array]):
    grads, terms = accumulate(state["params"], batch)
    real = jnp.maximum(terms["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / real, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    loss, grad_norm = terms["nll_sum"] / real, optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(finite, new, old)
      params = jax.tree.map(keep, params, state["params"])
      opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
    total = jnp.sum(batch["decoder_target_tokens"] != 0).astype(jnp.float32)
    step_metrics = {
        "train_loss": loss,
        "train_accuracy": terms["correct_sum"] / real,
        "grad_norm": grad_norm,
        "nonfinite": 1.0 - finite.astype(jnp.float32),
        "learning_rate": schedule(state["step"]),
        "pause_fraction": jnp.sum(batch["decoder_input_tokens"] == pause_id) / jnp.maximum(total, 1),
        "real_tokens": terms["weight_sum"],
        "total_tokens": total,
    }
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, step_metrics

  return train_step


def make_eval_step(graphdef, abstract_params):
  def eval_step(params: PyTree, batch: dict[str, jax.Array]):
    return loss_terms(apply_model(graphdef, abstract_params, params, batch), batch)
  return eval_step
