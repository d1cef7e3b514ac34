"""Default settings shared by every config in `configs/`, and their validation.

Configs are `ml_collections.ConfigDict`s (Flax-examples style): a file in `configs/` calls
`defaults()`, changes what it needs and returns it; any key can be overridden on the command line
with `--config.key=value`. `validate` turns every bad value into one `UsageError` line before
anything is written.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from pausejax.errors import UsageError

DTYPES = ("float32", "bfloat16")

# Logical parameter/activation axis -> mesh axis (or None = replicated). MaxText-style defaults:
# batch over dcn_data, data and fsdp, parameters' embed dimension over fsdp, wide dimensions over
# tensor. These names are all the logical axes there are: a rule for any other name is an error.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("dcn_data", "data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("norm", None),
    ("length", None),
    ("layers", None),            # The stacked-layer axis of model.scan_layers parameters.
    ("activation_embed", None),  # The residual stream's d_model: its batch is what is split.
)
# model.remat choices (pausejax.model.REMAT_POLICIES: what each block keeps for the backward pass).
REMAT_CHOICES = ("none", "full", "minimal", "dots_saveable")
NONFINITE_CHOICES = ("stop", "skip")
UNREADABLE_CHOICES = ("move_aside", "refuse")  # What pausejax.ckpt_faults does with one.
START_TOKENS = ("bos", "sink", "none")  # pausejax.sinks: what every sequence starts with.


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data.
  c.task = "shakespeare_pause"      # Any registered seqio Task or Mixture (pausejax.registry).
  c.eval_task = ""                  # Its "validation" split is scored ("" = same as `task`).
  c.task_modules = ""               # Modules or .py files registering your tasks, comma-separated.
  c.tfds_data_dir = ""              # Where TFDS datasets live ("" = where each task says).
  # The task's SentencePiece model ("" = the task's own). pausejax's downstream tasks take this
  # one (default: the embedded Shakespeare 8k model); any other task must match it.
  c.vocab_path = ""
  c.seq_len = 256
  c.pack = False                    # Chunks are already exactly seq_len long; packing adds segment ids.
  # The data is split into this many disjoint shards, read by the processes in equal contiguous
  # groups (0 = one per process). Batches depend on data_shards, not on the number of processes:
  # fix it (a multiple of every process count to be used) to resume the data position exactly
  # on another number of hosts.
  c.data_shards = 0
  c.debug_input_digests = False     # Digest of every example fed -> workdir/input_digests/.
  c.pause = ml_collections.ConfigDict()
  # PausePT: round(rate * seq_len) pauses per chunk, then trim. Set once: a `*_pause` task sets
  # its own (leave this unset); a task without a pause step takes this (unset: no pauses).
  c.pause.rate = ml_collections.config_dict.placeholder(float)
  # Fine-tuning on (inputs, targets) tasks: prompt + num_finetune pauses + answer, loss on the
  # answer only. "append" puts the pauses after the prompt (the paper's), "prepend" before it.
  c.pause.num_finetune = 0
  c.pause.position = "append"
  # What every sequence starts with (pausejax.sinks): "bos" (id 0, seqio's shifted-in start),
  # "sink" (a learnable <sink> at position 0, StreamingLLM's learnable sink) or "none" (the
  # chunk's own first token; pretraining only). Set once: a `*_sink` task sets "sink" itself.
  c.start_token = ml_collections.config_dict.placeholder(str)
  c.targets_len = 32                # (inputs, targets) tasks: answer tokens; the prompt gets the rest.
  # SequenceMatch (pausejax.backspace): training targets get a noise token + <backspace> after
  # each token with probability `rate` (the eval split stays clean). Noise is uniform over the
  # ordinary ids, or drawn with the frequencies of the ids in `noise_from` (.npy or text, e.g. a
  # model's own samples). `max_per_sequence`: <backspace> moves decoding may make per answer.
  c.backspace = ml_collections.ConfigDict()
  c.backspace.rate = 0.0
  c.backspace.noise_from = ""
  c.backspace.max_per_sequence = 0
  # SequenceMatch's loss (pausejax.sequencematch): after bc_steps of plain MLE, (1 - weight) MLE
  # + weight * the chi^2-mixture loss over data rows and model_rows rows of the model's own
  # samples (a replay buffer of buffer_size, renewed every refresh_every_steps; continuations of
  # up to sample_tokens at temperature, from the data rows' prompts, or their first prompt_len
  # tokens when pretraining). alpha, gamma: the paper's reported 0.01 and 0.998. weight 0: off.
  c.sequencematch = ml_collections.ConfigDict()
  c.sequencematch.weight = 0.0
  c.sequencematch.bc_steps = 100
  c.sequencematch.alpha = 0.01
  c.sequencematch.gamma = 0.998
  c.sequencematch.model_rows = 8
  c.sequencematch.buffer_size = 32
  c.sequencematch.refresh_every_steps = 50
  c.sequencematch.sample_tokens = 32
  c.sequencematch.temperature = 1.0
  c.sequencematch.prompt_len = 16
  c.prefix_lm = False               # Prompt (and its pauses) attend bidirectionally; else causal.
  c.init_from = ""                  # Start from this checkpoint's parameters (fresh optimizer).
  # Schedule.
  c.global_batch_size = 16
  c.microbatches = 1                # Gradient accumulation: split each global batch into this many.
  c.num_train_steps = 1000
  c.log_every_steps = 10
  c.eval_every_steps = 200          # 0 = only at the end.
  c.num_eval_steps = 20             # Eval batches (0 = the whole held-out split).
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  # A checkpoint that cannot be restored (truncated, deleted or corrupt files): "move_aside"
  # moves it next to checkpoints/ (never deletes it) and resumes from the newest one that
  # restores, loudly; "refuse" stops with one line. Readers (init_from, generate, evaluate) move
  # nothing: they read the newest that restores, or refuse.
  c.checkpoint_on_unreadable = "move_aside"
  # Downstream evaluation during training (pausejax.downstream_eval, T5X-style): the registered
  # downstream tasks named here (comma-separated; "" = none) are decoded or scored on the live
  # parameters with the run's M_inf = pause.num_finetune, pause.position, prefix_lm and
  # backspace.max_per_sequence, every downstream_eval_every_steps (0 = at the last step only),
  # on the first downstream_eval_max_examples examples of each (0 = all). One process only.
  c.eval_tasks = ""
  c.downstream_eval_every_steps = 0
  c.downstream_eval_max_examples = 100
  # Profiling (pausejax.profiling): a jax.profiler trace of steps start_step ...
  # start_step + num_steps - 1 into <workdir>/profile/ (TensorBoard's profile plugin; the
  # .trace.json.gz opens in Perfetto), written by the lead process. num_steps 0 = no trace.
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 2          # After the first step, which compiles.
  c.profile.num_steps = 0
  c.seed = 0
  # A NaN/Inf loss or gradient norm: "stop" ends the run at that step (exit 1, nothing saved
  # after the last good checkpoint); "skip" leaves that step's update out and goes on, loudly.
  c.nonfinite = "stop"
  # Model.
  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.head_dim = 64
  c.model.mlp_dim = 1024
  c.model.tied_embeddings = True
  c.model.dtype = "float32"         # Compute dtype; bfloat16 on TPU/GPU.
  c.model.param_dtype = "float32"
  c.model.rope_theta = 10_000.0
  c.model.attention = "xla"         # "cudnn": fused flash attention on NVIDIA GPUs (bf16).
  c.model.zero_sink = False         # SoftMax1 attention (an all-zero key/value in every row).
  c.model.scan_layers = False       # True: layers stacked and run by lax.scan (faster compiles).
  c.model.remat = "none"            # "full"/"minimal"/"dots_saveable": recompute in the backward.
  # Optimizer: AdamW, linear warmup then cosine decay, global-norm clipping.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.end_lr_ratio = 0.1
  c.optimizer.weight_decay = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 1.0
  # Device mesh (one of data/fsdp/tensor may be -1 = all remaining devices).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.dcn_data = 1               # Data parallel over DCN: number of TPU slices (or GPU hosts).
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES
  return c


def _check(ok: bool, name: str, value, valid: str) -> None:
  if not ok:
    raise UsageError.setting(name, value, valid)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _check_sequencematch(c: ml_collections.ConfigDict) -> None:
  sm = c.get("sequencematch")
  if not sm:
    return
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  _check(number(sm.weight) and 0 <= sm.weight <= 1, "sequencematch.weight", sm.weight,
         "a number in [0, 1] (0: off, plain MLE)")
  _check(number(sm.gamma) and 0 < sm.gamma <= 1, "sequencematch.gamma", sm.gamma,
         "a discount in (0, 1]")
  _check(number(sm.alpha) and sm.alpha > 0, "sequencematch.alpha", sm.alpha, "a number > 0")
  _check(number(sm.temperature) and sm.temperature >= 0, "sequencematch.temperature",
         sm.temperature, "a number >= 0 (0: greedy samples)")
  _check(_is_int(sm.bc_steps) and sm.bc_steps >= 0, "sequencematch.bc_steps", sm.bc_steps,
         "an integer >= 0")
  for key in ("model_rows", "buffer_size", "refresh_every_steps", "sample_tokens", "prompt_len"):
    _check(_is_int(sm[key]) and sm[key] >= 1, f"sequencematch.{key}", sm[key],
           "a positive integer")
  if sm.weight:
    _check(c.microbatches == 1, "microbatches", c.microbatches,
           "1 with sequencematch.weight > 0 (its step takes the whole batch)")
    _check(not c.prefix_lm, "prefix_lm", c.prefix_lm,
           "False with sequencematch.weight > 0 (model rows are causal)")
    _check(sm.prompt_len < c.seq_len, "sequencematch.prompt_len", sm.prompt_len,
           f"less than seq_len={c.seq_len}, leaving room for the model's continuation")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises UsageError (one line: setting, bad value, what is valid) for the first bad setting."""
  rate = c.pause.rate
  _check(rate is None or isinstance(rate, (int, float)) and 0.0 <= rate < 1.0, "pause.rate",
         rate, "unset (the task's rate), or a fraction in [0, 1) for a task without a pause "
         "step, e.g. 0.1 for the paper's PausePT")
  _check(_is_int(c.seq_len) and c.seq_len >= 2, "seq_len", c.seq_len,
         "an integer >= 2 (the paper uses 2048)")
  _check(isinstance(c.get("task_modules", ""), str), "task_modules", c.get("task_modules"),
         "module names separated by commas")
  m_ft = c.pause.num_finetune
  _check(_is_int(m_ft) and m_ft >= 0, "pause.num_finetune", m_ft,
         "a non-negative integer (pauses between prompt and answer when fine-tuning)")
  _check(c.pause.position in ("append", "prepend"), "pause.position", c.pause.position,
         "'append' (pauses after the prompt) or 'prepend' (before it)")
  _check(_is_int(c.targets_len) and c.targets_len >= 1, "targets_len", c.targets_len,
         "a positive integer")  # Its upper bound depends on the task: data.prepare checks it.
  bs = c.get("backspace") or ml_collections.ConfigDict({"rate": 0.0, "noise_from": "",
                                                          "max_per_sequence": 0})
  _check(isinstance(bs.rate, (int, float)) and not isinstance(bs.rate, bool)
         and 0.0 <= bs.rate < 1.0, "backspace.rate", bs.rate,
         "a fraction in [0, 1): the chance of a noise token + <backspace> after a target token")
  _check(isinstance(bs.noise_from, str), "backspace.noise_from", bs.noise_from,
         "'' (uniform noise) or the path of a file of token ids")
  if bs.noise_from:
    from pausejax import fs
    _check(fs.exists(bs.noise_from), "backspace.noise_from", bs.noise_from,
           "an existing .npy or text file of token ids (no such file)")
  _check(_is_int(bs.max_per_sequence) and bs.max_per_sequence >= 0, "backspace.max_per_sequence",
         bs.max_per_sequence, "an integer >= 0 (0: decoding never deletes)")
  _check_sequencematch(c)
  start = c.get("start_token")
  _check(start is None or start in START_TOKENS, "start_token", start,
         "unset (the task's), 'bos', 'sink' or 'none'")
  _check(isinstance(c.model.get("zero_sink", False), bool), "model.zero_sink",
         c.model.get("zero_sink"), "True or False")
  _check(isinstance(c.prefix_lm, bool), "prefix_lm", c.prefix_lm, "True or False")
  _check(isinstance(c.init_from, str), "init_from", c.init_from,
         "a checkpoint path (a workdir, its checkpoints/ or one step in it), or '' for none")
  _check(_is_int(c.global_batch_size) and c.global_batch_size >= 1, "global_batch_size",
         c.global_batch_size, "a positive integer")
  for key in ("num_train_steps", "eval_every_steps", "num_eval_steps", "checkpoint_every_steps",
              "keep_checkpoints", "optimizer.warmup_steps"):
    value = c
    for part in key.split("."):
      value = value[part]
    _check(_is_int(value) and value >= 0, key, value, "a non-negative integer")
  _check(_is_int(c.microbatches) and c.microbatches >= 1 and
         c.global_batch_size % c.microbatches == 0, "microbatches", c.microbatches,
         f"a positive integer dividing global_batch_size={c.global_batch_size}")
  _check(_is_int(c.log_every_steps) and c.log_every_steps >= 1, "log_every_steps",
         c.log_every_steps, "a positive integer")
  _check(c.keep_checkpoints >= 1, "keep_checkpoints", c.keep_checkpoints, "at least 1")
  m = c.model
  for key in ("num_layers", "d_model", "num_heads", "head_dim", "mlp_dim"):
    _check(_is_int(m[key]) and m[key] >= 1, f"model.{key}", m[key], "a positive integer")
  _check(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "an even integer (RoPE rotates pairs)")
  for key in ("dtype", "param_dtype"):
    _check(m[key] in DTYPES, f"model.{key}", m[key], f"one of {', '.join(DTYPES)}")
  scan_layers = m.get("scan_layers", False)
  _check(isinstance(scan_layers, bool), "model.scan_layers", scan_layers, "True or False")
  remat = m.get("remat", "none")
  _check(isinstance(remat, str) and remat in REMAT_CHOICES, "model.remat", remat,
         f"one of {', '.join(REMAT_CHOICES)}")
  if m.get("attention", "xla") == "cudnn":
    import jax  # Here: validation of everything else must not start a backend.
    _check(jax.default_backend() == "gpu", "model.attention", "cudnn",
           f"'xla' on {jax.default_backend()}; cudnn attention runs on NVIDIA GPUs only")
  o = c.optimizer
  _check(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "a positive number")
  _check(0 <= o.end_lr_ratio <= 1, "optimizer.end_lr_ratio", o.end_lr_ratio, "a number in [0, 1]")
  _check(o.grad_clip_norm >= 0, "optimizer.grad_clip_norm", o.grad_clip_norm,
         "a non-negative number (0 = no clipping)")
  for axis in ("data", "fsdp", "tensor"):
    v = c.mesh[axis]
    _check(_is_int(v) and (v >= 1 or v == -1), f"mesh.{axis}", v,
           "a positive integer or -1 (all remaining devices)")
  _check([c.mesh.data, c.mesh.fsdp, c.mesh.tensor].count(-1) <= 1, "mesh", c.mesh.to_dict(),
         "at most one of mesh.data/fsdp/tensor may be -1")
  dcn = c.mesh.get("dcn_data", 1)
  _check(_is_int(dcn) and dcn >= 1, "mesh.dcn_data", dcn,
         "a positive integer (1 on one slice or host; else the number of TPU slices or GPU hosts)")
  shards = c.get("data_shards", 0)
  _check(_is_int(shards) and shards >= 0, "data_shards", shards,
         "a non-negative integer (0 = one shard per process)")
  _check(shards == 0 or c.global_batch_size % shards == 0, "data_shards", shards,
         f"a divisor of global_batch_size={c.global_batch_size} (each shard gives equal rows)")
  _check(isinstance(c.get("debug_input_digests", False), bool), "debug_input_digests",
         c.get("debug_input_digests"), "True or False")
  _check(c.get("nonfinite", "stop") in NONFINITE_CHOICES, "nonfinite", c.get("nonfinite"),
         "'stop' (end the run at a NaN/Inf loss) or 'skip' (leave that update out)")
  _check(c.get("checkpoint_on_unreadable", "move_aside") in UNREADABLE_CHOICES,
         "checkpoint_on_unreadable", c.get("checkpoint_on_unreadable"),
         "'move_aside' (resume from the newest checkpoint that restores) or 'refuse'")
  _check_downstream_and_profile(c)


def _check_downstream_and_profile(c: ml_collections.ConfigDict) -> None:
  # Task names are checked against the registry when the data is prepared (task_modules first).
  _check(isinstance(c.get("eval_tasks", ""), str), "eval_tasks", c.get("eval_tasks"),
         "downstream task names separated by commas, or '' for none")
  for key, zero in (("downstream_eval_every_steps", "at the last step only"),
                    ("downstream_eval_max_examples", "every example of the split")):
    value = c.get(key, 0)
    _check(_is_int(value) and value >= 0, key, value, f"a non-negative integer (0: {zero})")
  p = c.get("profile") or ml_collections.ConfigDict({"start_step": 1, "num_steps": 0})
  _check(_is_int(p.num_steps) and p.num_steps >= 0, "profile.num_steps", p.num_steps,
         "a non-negative integer: steps to trace (0: no trace)")
  _check(_is_int(p.start_step) and p.start_step >= 1, "profile.start_step", p.start_step,
         "a step number >= 1 (the first step traced)")
  _check(not p.num_steps or p.start_step <= c.num_train_steps, "profile.start_step",
         p.start_step, f"a step in 1 ... num_train_steps={c.num_train_steps}, or "
         "profile.num_steps=0 for no trace")


# ---------------------------------------------------------------------------------------------
# The run's config, saved in its workdir (`config.json`) at the first start. A resumed run must
# compute what the saved one did; `generate` and `evaluate` read the run's settings from it.

CONFIG_FILENAME = "config.json"

# Settings that change how a run is carried out, not what it computes (or only its length):
# free to change when resuming, and not compared when a reader is given --config again.
OPERATIONAL_KEYS = (
    "num_train_steps", "log_every_steps", "eval_every_steps", "num_eval_steps",
    "checkpoint_every_steps", "keep_checkpoints", "async_checkpointing", "debug_input_digests",
    "tfds_data_dir", "init_from", "nonfinite", "checkpoint_on_unreadable", "microbatches",
    "mesh", "logical_axis_rules",
    "model.remat", "model.attention",
    "eval_tasks", "downstream_eval_every_steps", "downstream_eval_max_examples", "profile",
)


def _is_operational(key: str) -> bool:
  return any(key == k or key.startswith(k + ".") for k in OPERATIONAL_KEYS)


def flatten(config) -> dict[str, Any]:
  """{"model.d_model": 256, ...} with JSON values (tuples as lists), for saving and comparing."""
  plain = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") \
      else json.loads(json.dumps(config))
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}{k}.", v)
    else:
      out[prefix[:-1]] = node
  walk("", plain)
  return out


def save(config, workdir: str) -> str:
  """Writes the resolved config to `<workdir>/config.json` (whole or not at all).

  Resolve what the run used first (e.g. `data_shards`: the number of shards, not 0)."""
  from pausejax import fs
  path = os.path.join(workdir, CONFIG_FILENAME)
  fs.write_text(path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  return path


def load_saved(workdir: str) -> dict[str, Any] | None:
  """The flattened saved config of the run in `workdir`, or None if it has none."""
  from pausejax import fs
  path = os.path.join(workdir, CONFIG_FILENAME)
  if not fs.exists(path):
    return None
  try:
    return flatten(json.loads(fs.read_text(path)))
  except ValueError as e:
    raise UsageError(f"{path} is not a config saved by pausejax ({e}); move it away to "
                     "use the --config given") from e


def changes(saved: dict[str, Any], config) -> dict[str, tuple[Any, Any]]:
  """{key: (saved value, value now)} for every key set in both that differs."""
  now = flatten(config)
  return {k: (saved[k], now[k]) for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]}


def check_same_run(saved: dict[str, Any], config, workdir: str, *,
                   reading: bool = False) -> list[str]:
  """UsageError for the first changed setting that alters what the run computes.

  Returns the changed operational settings as `key: old -> new` texts (to be printed). Keys in
  only one of the two (a config from another pausejax version) are not compared.
  """
  # The run saves the data shards it used; data_shards=0 (one per process) takes whatever the
  # hosts give now, and the checkpoint warns when the data position cannot carry over.
  changed = {k: v for k, v in changes(saved, config).items()
             if not (k == "data_shards" and v[1] == 0)}
  for key, (old, new) in changed.items():
    if not _is_operational(key):
      use = ("leave out --config: the run's own settings are read from its config.json" if reading
             else "use the saved value, or a fresh --workdir for a new run")
      raise UsageError(
          f"--config.{key}={new!r} differs from the run in {workdir}, which has {old!r} "
          f"({CONFIG_FILENAME}); it changes what the run computes: {use}")
  return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()]


def from_saved(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """A full config: the defaults, then every saved value (lists back to tuples)."""
  def plain(v):
    return tuple(plain(x) for x in v) if isinstance(v, list) else v
  c = defaults()
  for key, value in saved.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    try:
      node[leaf] = plain(value)
    except TypeError:  # Another type than the default's (e.g. a float where an int is usual).
      del node[leaf]
      node[leaf] = plain(value)
  return c


def for_reading(workdir: str, given: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """The config of the run in `workdir` for `generate` and `evaluate`.

  Its saved config.json, unless a `--config` is given too; that one must then agree with it on
  every setting that shapes the model or its data (a forgotten override must not score a run
  with other settings than it was trained with). A run without config.json (written before
  pausejax saved one) needs `--config`.
  """
  saved = load_saved(workdir)
  if saved is None:
    if given is None:
      raise UsageError.setting("--config", None, f"{workdir} has no {CONFIG_FILENAME}; give the "
                               "training config with the overrides it was trained with")
    validate(given)
    return given
  if given is None:
    config = from_saved(saved)
  else:
    check_same_run(saved, given, workdir, reading=True)
    config = given
  validate(config)
  return config
