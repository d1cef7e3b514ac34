r"""Export a run to Hugging Face's Llama format, and import such a directory back.

    python -m pausejax.export --workdir=runs/tiny --out=hf/tiny [--step=N] \
        [--max_shard_size=5GB] [--dtype=float32]
    python -m pausejax.export --import_from=hf/tiny --workdir=runs/tiny_back

Export reads the run's settings from `<workdir>/config.json` (`--config` only for runs without
one) and the parameters of its latest checkpoint (or `--step`), not the optimizer state, in
either `model.scan_layers` layout, and writes into `--out` (absent or empty):

  config.json              `LlamaForCausalLM`; vocab_size = the embedding rows (specials and
                           padding included); the run's own config under "pausejax"
  generation_config.json   start (bos), eos, and the padding rows suppressed
  model.safetensors        or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                           above --max_shard_size; the params' dtype unless --dtype
  tokenizer.json, tokenizer_config.json, tokenizer.model
                           the run's SentencePiece model; `<pause>`, `<sink>`, `<backspace>` are
                           added tokens at V, V+1, V+2 (V: its size). Encoding prepends the run's
                           start token (BOS id 0, or `<sink>`); add_special_tokens=False does not.

    model = transformers.LlamaForCausalLM.from_pretrained("hf/tiny")
    tokenizer = transformers.AutoTokenizer.from_pretrained("hf/tiny")

Everything is written into a temporary directory next to --out and renamed at the end, so a
refusal or a failure leaves --out as it was. pausejax's rotary layout is already Llama's
rotate-half one, so q/k rows need no permuting. Refused, with one line (exit 2), because
`LlamaForCausalLM` would compute something else: `prefix_lm=True` (Llama is causal only),
`model.zero_sink=True` (SoftMax1), and model.d_model not divisible by model.num_heads
(transformers' LlamaConfig requires it, even with head_dim set). A model trained with
model.dtype=bfloat16 exports exactly, but float32 logits in torch differ by bfloat16 rounding.
transformers treats `<pause>` and `<backspace>` as ordinary tokens: append pauses to a prompt
yourself; deleting on `<backspace>` is pausejax.generate's.

Import turns an exported directory back into a run directory: config.json (the run's own config
when the export carries it, else the defaults with the Llama shape) and one Orbax checkpoint
(parameters and a fresh optimizer state) that `generate`, `evaluate` and `init_from` read. The
`--workdir` must hold no run yet. `import_hf(hf_dir, workdir)` does the same from Python.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import tempfile

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from sentencepiece import sentencepiece_model_pb2

from pausejax import build
from pausejax import checkpoint
from pausejax import config as config_lib
from pausejax import data as data_lib
from pausejax import fs
from pausejax import model as model_lib
from pausejax import registry
from pausejax import sinks
from pausejax import specials
from pausejax.errors import UsageError
from pausejax.errors import run

SP_MODEL = "tokenizer.model"
INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}
# Per layer: (HF name, pausejax path in a block, how a kernel maps to torch's [out, in]).
_LAYER = (("input_layernorm.weight", ("attn_norm", "scale"), "vector"),
          ("self_attn.q_proj.weight", ("attn", "query"), "to_heads"),
          ("self_attn.k_proj.weight", ("attn", "key"), "to_heads"),
          ("self_attn.v_proj.weight", ("attn", "value"), "to_heads"),
          ("self_attn.o_proj.weight", ("attn", "out"), "from_heads"),
          ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "vector"),
          ("mlp.gate_proj.weight", ("mlp", "gate"), "matrix"),
          ("mlp.up_proj.weight", ("mlp", "up"), "matrix"),
          ("mlp.down_proj.weight", ("mlp", "down"), "matrix"))


def _to_hf(x, kind: str) -> np.ndarray:
  """A pausejax kernel (input axes first) as a torch Linear weight [out, in]."""
  if kind == "to_heads":  # DxHxK -> (H*K)xD, head-major like Llama's view(..., H, K).
    return x.reshape(x.shape[0], -1).T
  if kind == "from_heads":  # HxKxD -> Dx(H*K).
    return x.reshape(-1, x.shape[-1]).T
  return x.T if kind == "matrix" else x


def _from_hf(w, kind: str, cfg: model_lib.ModelConfig) -> np.ndarray:
  if kind == "to_heads":
    return w.T.reshape(w.shape[1], cfg.num_heads, cfg.head_dim)
  if kind == "from_heads":
    return w.T.reshape(cfg.num_heads, cfg.head_dim, w.shape[0])
  return w.T if kind == "matrix" else w


def hf_tensors(params: dict, cfg: model_lib.ModelConfig, dtype=None) -> dict[str, np.ndarray]:
  """The HF state dict (name -> array) of pausejax `params` (a checkpoint's pure dict)."""
  params = jax.device_get(model_lib.unstack_layers(params) if cfg.scan_layers else params)
  cast = lambda x: np.ascontiguousarray(x, dtype=dtype or x.dtype)
  out = {"model.embed_tokens.weight": cast(params["embed"])}
  for i in range(cfg.num_layers):
    block = params["blocks"][i]
    for name, (module, leaf), kind in _LAYER:
      out[f"model.layers.{i}.{name}"] = cast(_to_hf(block[module][leaf], kind))
  out["model.norm.weight"] = cast(params["final_norm"]["scale"])
  if not cfg.tied_embeddings:
    out["lm_head.weight"] = cast(_to_hf(params["unembed"], "matrix"))
  return out


def pausejax_params(tensors: dict[str, np.ndarray], cfg: model_lib.ModelConfig) -> dict:
  """The inverse of `hf_tensors`: an unrolled pure dict of cfg.param_dtype arrays."""
  used = set()

  def take(name):
    used.add(name)
    if name not in tensors:
      raise UsageError(f"--import_from: the safetensors files have no {name}, which their "
                       "config.json implies")
    return np.asarray(tensors[name]).astype(cfg.param_dtype)
  blocks = {}
  for i in range(cfg.num_layers):
    block = {}
    for name, (module, leaf), kind in _LAYER:
      block.setdefault(module, {})[leaf] = _from_hf(take(f"model.layers.{i}.{name}"), kind, cfg)
    blocks[i] = block
  params = {"embed": take("model.embed_tokens.weight"), "blocks": blocks,
            "final_norm": {"scale": take("model.norm.weight")}}
  if not cfg.tied_embeddings:
    params["unembed"] = take("lm_head.weight").T
  # A weight pausejax has no place for (a bias, a norm) would be dropped: refuse instead.
  extra = sorted(set(tensors) - used - {"lm_head.weight"})  # Tied: the embedding again.
  extra = [name for name in extra if not name.endswith("rotary_emb.inv_freq")]
  if extra:
    raise UsageError(f"--import_from: {extra[0]} has no place in pausejax's decoder (it has no "
                     "biases and no other norms than Llama's); only those weights import")
  return params


def _refuse_unexportable(config: ml_collections.ConfigDict, cfg: model_lib.ModelConfig) -> None:
  if config.get("prefix_lm", False):
    raise UsageError.setting("prefix_lm", True, "False to export: LlamaForCausalLM is causal "
                             "only, and this run's prompts attend both ways")
  if cfg.zero_sink:
    raise UsageError.setting("model.zero_sink", True, "False to export: LlamaForCausalLM has "
                             "no SoftMax1 (zero key and value) attention")
  if cfg.d_model % cfg.num_heads:
    raise UsageError.setting("model.num_heads", cfg.num_heads, f"a divisor of model.d_model="
                             f"{cfg.d_model} to export: transformers' LlamaConfig requires it")


def _parse_size(text: str) -> int:
  match = _SIZE.fullmatch(str(text).strip())
  if not match or float(match.group(1)) <= 0:
    raise UsageError.setting("--max_shard_size", text, "a size such as 5GB, 500MB or 2GiB")
  return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def write_safetensors(tensors: dict[str, np.ndarray], out: str, max_shard_size: int) -> None:
  """HF's layout: one model.safetensors, or shards of at most max_shard_size bytes + index."""
  shards, size = [{}], 0
  for name, x in tensors.items():  # Insertion order keeps each layer together.
    if shards[-1] and size + x.nbytes > max_shard_size:
      shards, size = shards + [{}], 0
    shards[-1][name] = x
    size += x.nbytes
  n = len(shards)
  files = ["model.safetensors"] if n == 1 else [
      f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for filename, shard in zip(files, shards):
    safetensors.numpy.save_file(shard, os.path.join(out, filename), metadata={"format": "pt"})
  if n > 1:
    _write_json(os.path.join(out, INDEX), {
        "metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
        "weight_map": {k: f for f, shard in zip(files, shards) for k in shard}})


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  index = os.path.join(hf_dir, INDEX)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  tensors = {}
  for filename in files:
    path = os.path.join(hf_dir, filename)
    if not os.path.exists(path):
      raise UsageError.setting("--import_from", hf_dir, f"a directory with {filename}")
    tensors.update(safetensors.numpy.load_file(path))
  return tensors


def _write_json(path: str, value) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def tokenizer_files(sp_bytes: bytes, seq_len: int, start_ids: list[int]) -> dict[str, dict]:
  """tokenizer.json and tokenizer_config.json that encode as the SentencePiece model does.

  Plain JSON (export needs no `tokenizers`): a Unigram model with the pieces' scores, and
  SentencePiece's normalisation with its dummy prefix in the normaliser, which runs on each text
  between added tokens: "<pause>ROMEO:" gives [pause] + encode("ROMEO:"), as pausejax builds
  prompts. Added tokens: the control pieces and the specials (user-defined pieces, such as
  "\n", stay pieces, so the dummy prefix goes before them as in SentencePiece). The run's start
  token is prepended (a TemplateProcessing post-processor).
  """
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(sp_bytes)
  trainer, norm = proto.trainer_spec, proto.normalizer_spec
  if trainer.model_type != 1:
    raise UsageError.setting("vocab_path", "(the run's)", "a SentencePiece unigram model to "
                             "export (BPE models need merges that pausejax does not write)")
  names = [p.piece for p in proto.pieces] + list(specials.SPECIAL_TOKENS)
  controls = [i for i, p in enumerate(proto.pieces) if p.type == 3]
  added = [{"id": i, "content": names[i], "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}
           for i in controls + list(range(len(proto.pieces), len(names)))]
  meta = "\u2581"
  steps = []
  if norm.precompiled_charsmap:
    steps.append({"type": "Precompiled", "precompiled_charsmap":
                  base64.b64encode(norm.precompiled_charsmap).decode()})
  if norm.remove_extra_whitespaces:
    steps += [{"type": "Strip", "strip_left": True, "strip_right": True},
              {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
  if norm.add_dummy_prefix:
    steps.append({"type": "Prepend", "prepend": meta})
  steps.append({"type": "Replace", "pattern": {"String": " "}, "content": meta})
  decoders = [{"type": "Replace", "pattern": {"String": meta}, "content": " "},
              {"type": "ByteFallback"}, {"type": "Fuse"}]
  if norm.add_dummy_prefix:  # SentencePiece drops the prefix's space when decoding.
    decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
  start = [names[i] for i in start_ids]
  template = lambda seqs: ([{"SpecialToken": {"id": t, "type_id": 0}} for t in start]
                           + [{"Sequence": {"id": s, "type_id": 0}} for s in seqs])
  tokenizer = {
      "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
      "normalizer": {"type": "Sequence", "normalizers": steps}, "pre_tokenizer": None,
      "post_processor": {"type": "TemplateProcessing", "single": template(["A"]),
                         "pair": template(["A", "B"]),
                         "special_tokens": {t: {"id": t, "ids": [names.index(t)], "tokens": [t]}
                                            for t in start}},
      "decoder": {"type": "Sequence", "decoders": decoders},
      "model": {"type": "Unigram", "unk_id": trainer.unk_id, "byte_fallback":
                trainer.byte_fallback, "vocab": [[p.piece, p.score] for p in proto.pieces]}}
  piece = lambda i: names[i] if 0 <= i < len(proto.pieces) else None
  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len,
      "clean_up_tokenization_spaces": False, "bos_token": start[0] if start else None,
      "eos_token": piece(trainer.eos_id), "unk_token": piece(trainer.unk_id),
      "pad_token": piece(trainer.pad_id),
      "additional_special_tokens": list(specials.SPECIAL_TOKENS),
      "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                               for t in added}}
  return {"tokenizer.json": tokenizer, "tokenizer_config.json": tokenizer_config}


def _check_target(target: str, setting: str) -> str:
  """The absolute `target`; UsageError unless it is a new or empty local directory."""
  if "://" in target:
    raise UsageError.setting(setting, target, "a local directory")
  target = os.path.abspath(target)
  if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
    raise UsageError.setting(setting, target, "a new or empty directory (it holds files)")
  return target


@contextlib.contextmanager
def _staged(target: str, setting: str):
  """A temporary directory next to `target`, renamed to it on success, removed on failure."""
  target = _check_target(target, setting)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target))
  try:
    yield tmp
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp (and safetensors) create private files; give the result the usual permissions.
    os.chmod(tmp, 0o777 & ~umask)
    for entry in os.scandir(tmp):
      if entry.is_file():
        os.chmod(entry.path, 0o666 & ~umask)
    if os.path.isdir(target):
      os.rmdir(target)  # Empty (checked above); rename cannot replace it everywhere.
    os.rename(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _plain_mesh(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` on this host's devices, every parameter whole: a pod's mesh may not fit here."""
  config = config.copy_and_resolve_references()
  config.mesh = ml_collections.ConfigDict({"dcn_data": 1, "data": -1, "fsdp": 1, "tensor": 1})
  config.model.attention = "xla"  # The same attention; cudnn needs a GPU (validated already).
  return config


def export(workdir: str, out: str, *, step: int | None = None, max_shard_size: str = "5GB",
           dtype: str | None = None, given: ml_collections.ConfigDict | None = None) -> str:
  """Writes the run in `workdir` (latest checkpoint, or `step`) to `out`; returns `out`."""
  shard_bytes = _parse_size(max_shard_size)
  _check_target(out, "--out")
  ckpt_dir = checkpoint.run_checkpoint_dir(workdir)
  saved = config_lib.for_reading(workdir, given)
  config = _plain_mesh(saved)
  vocabulary = specials.load_vocabulary(data_lib.vocab_path(config))
  rows = specials.padded_vocab_size(vocabulary.vocab_size)
  start = sinks.start_ids(registry.start_token(config), vocabulary.sink_id)
  built = build.build(config, rows, vocabulary.pause_id, training=False)
  cfg = built.decode_model_cfg
  _refuse_unexportable(config, cfg)
  if step is not None:
    steps = sorted(ocp.utils.checkpoint_steps(ckpt_dir))  # Complete ones, as latest_step.
    if step not in steps:
      raise UsageError.setting("--step", step, f"one of the run's checkpoints {steps}")
    ckpt_dir = os.path.join(ckpt_dir, str(step))
  with checkpoint.reading_policy(config.checkpoint_on_unreadable):
    params, step = checkpoint.load_params_and_step(ckpt_dir, built.abstract_params_tree,
                                                   setting="--workdir")
  tensors = hf_tensors(params, cfg, jnp.dtype(dtype) if dtype else None)
  stored = str(next(iter(tensors.values())).dtype)
  sp_bytes = fs.read_bytes(specials.model_file(vocabulary))
  files = tokenizer_files(sp_bytes, config.seq_len, start)
  eos = vocabulary.eos_id
  hf_config = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": rows,
      "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_len or config.seq_len, "rms_norm_eps": cfg.norm_eps,
      # Both spellings: transformers 4.x reads rope_theta, 5.x rope_parameters.
      "rope_theta": cfg.rope_theta, "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
      "pretraining_tp": 1, "tie_word_embeddings": cfg.tied_embeddings, "use_cache": True,
      "bos_token_id": start[0] if start else None, "eos_token_id": eos,
      "torch_dtype": stored, "dtype": stored,
      "pausejax": {"step": step, "config": config_lib.flatten(saved)}}
  # No pad_token_id: pad and BOS share id 0, and generate() would mask a BOS it took for padding.
  generation = {"bos_token_id": start[0] if start else None, "eos_token_id": eos,
                "suppress_tokens": list(range(vocabulary.vocab_size, rows))}
  with _staged(out, "--out") as tmp:
    write_safetensors(tensors, tmp, shard_bytes)
    _write_json(os.path.join(tmp, "config.json"), hf_config)
    _write_json(os.path.join(tmp, "generation_config.json"), generation)
    for name, value in files.items():
      _write_json(os.path.join(tmp, name), value)
    with open(os.path.join(tmp, SP_MODEL), "wb") as f:
      f.write(sp_bytes)
  return os.path.abspath(out)


def _config_from_hf(hf: dict, where: str) -> ml_collections.ConfigDict:
  """The new run's config: the exported run's own, or the defaults, with the Llama shape."""
  def need(key):
    if key not in hf:
      raise UsageError.setting(f"{where} {key}", None, "a value (a Llama config has one)")
    return hf[key]
  heads = need("num_attention_heads")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  for key, value, ok, valid in (
      ("model_type", hf.get("model_type"), hf.get("model_type") == "llama", "'llama'"),
      ("hidden_act", hf.get("hidden_act"), hf.get("hidden_act", "silu") == "silu",
       "'silu' (SwiGLU)"),
      ("attention_bias", hf.get("attention_bias"), not hf.get("attention_bias"), "False"),
      ("mlp_bias", hf.get("mlp_bias"), not hf.get("mlp_bias"), "False"),
      ("num_key_value_heads", hf.get("num_key_value_heads"),
       hf.get("num_key_value_heads") in (None, heads),
       f"{heads} (num_attention_heads): pausejax has no grouped-query attention"),
      ("rope_type", rope.get("rope_type", rope.get("type")),
       rope.get("rope_type", rope.get("type", "default")) == "default",
       "'default': pausejax's RoPE has no scaling")):
    if not ok:
      raise UsageError.setting(f"{where} {key}", value, valid)
  saved = (hf.get("pausejax") or {}).get("config")
  config = config_lib.from_saved(saved) if saved else config_lib.defaults()
  if not saved:
    config.seq_len = hf.get("max_position_embeddings", config.seq_len)
  m = config.model
  m.num_layers, m.d_model, m.num_heads = need("num_hidden_layers"), need("hidden_size"), heads
  m.head_dim = hf.get("head_dim") or m.d_model // heads
  m.mlp_dim, m.tied_embeddings = need("intermediate_size"), bool(hf.get("tie_word_embeddings"))
  m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  eps = float(hf.get("rms_norm_eps", model_lib.ModelConfig.norm_eps))
  if eps != model_lib.ModelConfig.norm_eps or "norm_eps" in m:  # Not in configs by default.
    m.norm_eps = eps
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  m.param_dtype = dtype if dtype in config_lib.DTYPES else "float32"  # float16: exactly.
  return _plain_mesh(config)


def import_hf(hf_dir: str, workdir: str) -> int:
  """Writes the Llama directory `hf_dir` as a pausejax run in `workdir`; returns its step."""
  _check_target(workdir, "--workdir")
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path) or not os.path.exists(os.path.join(hf_dir, SP_MODEL)):
    raise UsageError.setting("--import_from", hf_dir, f"a directory with config.json and "
                             f"{SP_MODEL} (the SentencePiece model), as export writes")
  with open(path) as f:
    hf = json.load(f)
  config = _config_from_hf(hf, path)
  sp_path = os.path.join(hf_dir, SP_MODEL)
  vocabulary = specials.load_vocabulary(sp_path)
  rows = specials.padded_vocab_size(vocabulary.vocab_size)
  if hf.get("vocab_size") != rows:
    raise UsageError.setting(f"{path} vocab_size", hf.get("vocab_size"), f"{rows}: the "
                             f"SentencePiece model's {vocabulary.base_vocab_size} ids, pausejax's "
                             "3 specials, padded to a multiple of 128")
  try:  # Keep the run's own vocab_path when it is this model; else the copy in the new run.
    same = fs.read_bytes(data_lib.vocab_path(config)) == fs.read_bytes(sp_path)
  except (UsageError, OSError):
    same = False
  if not same:
    config.vocab_path = os.path.join(os.path.abspath(workdir), SP_MODEL)
  config_lib.validate(config)
  built = build.build(config, rows, vocabulary.pause_id, training=False)
  try:
    params = pausejax_params(read_safetensors(hf_dir), built.decode_model_cfg)
  except ValueError as e:  # A reshape to heads x head_dim that does not fit.
    raise UsageError.setting("--import_from", hf_dir, f"tensors of the shapes its config.json "
                             f"implies ({e})") from e
  if config.model.scan_layers:
    params = jax.tree.map(np.asarray, model_lib.stack_layers(params))
  shapes = lambda tree: {jax.tree_util.keystr(k): x.shape
                         for k, x in jax.tree_util.tree_leaves_with_path(tree)}
  want, have = shapes(built.abstract_params_tree), shapes(params)
  for key in want:
    if have.get(key) != want[key]:
      raise UsageError.setting("--import_from", hf_dir, f"tensors of the shapes its config.json "
                               f"implies: params{key} is {have.get(key)}, not {want[key]}")
  step = int((hf.get("pausejax") or {}).get("step") or 0)
  make = lambda p: {"step": jnp.asarray(step, jnp.int32), "params": p,
                    "opt_state": built.tx.init(p)}
  with _staged(workdir, "--workdir") as tmp:
    state = jax.jit(make, out_shardings=built.state_shardings)(params)
    if not same:
      shutil.copyfile(sp_path, os.path.join(tmp, SP_MODEL))
    config_lib.save(config, tmp)
    with checkpoint.Checkpointer(os.path.join(tmp, "checkpoints"), keep=1, save_every_steps=1,
                                 async_save=False) as ckpt:
      ckpt.save(step, state, force=True)
  return step


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Only for runs without config.json: the training config with the same "
      "overrides.")
  flags.DEFINE_string("workdir", None, "The run to export, or the new run of --import_from.")
  flags.DEFINE_string("out", None, "Export: the Hugging Face directory to write (new or empty).")
  flags.DEFINE_string("import_from", None, "Import: an exported Hugging Face directory.")
  flags.DEFINE_integer("step", None, "Export this checkpoint step (default: the latest).")
  flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file (e.g. 500MB, 2GiB).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Tensor dtype (default: the "
                    "params').")


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if not f.workdir:
    raise UsageError.setting("--workdir", f.workdir, "give the run directory")
  if bool(f.out) == bool(f.import_from):
    raise UsageError.setting("--out", f.out, "give exactly one of --out (export) and "
                             "--import_from (import)")
  if f.import_from:
    step = import_hf(f.import_from, f.workdir)
    print(f"imported {f.import_from} into {f.workdir} (checkpoint step {step})")
  else:
    out = export(f.workdir, f.out, step=f.step, max_shard_size=f.max_shard_size, dtype=f.dtype,
                 given=f.config)
    print(f"exported {f.workdir} to {out}")


if __name__ == "__main__":
  define_flags()
  run(main)
