r"""Compile the real train step for a TPU topology, ahead of time, on a machine without TPUs.

    python -m pausejax.aot --config=configs/c4_130m.py --topology=v5p:2x2x1 \
        [--num_slices=2] [--mfu=0.4] [--config.key=value ...]

libtpu (`pip install -c constraints.txt -e '.[tpu]'`) describes the chips of a topology without
any being present. On them this builds the config's mesh, the train state and batch as shapes
with shardings (nothing is allocated, no data is read) and lowers and compiles the same jitted
train step as `pausejax.train` (same in/out shardings, state donated). It prints:

  * HBM per chip from the compiled executable: arguments, outputs, aliased (donated state reused
    for the new state), temporaries, generated code and their total, against the chip's HBM;
  * FLOPs per step from the compiled executable and from `model.flops_per_token` x tokens (the
    compiled count only without `model.scan_layers`: cost_analysis counts a loop body once);
  * the step time and tokens/s that the given MFU (default 40%) would give at the chip's bf16 peak.

It exits 2 with one line when the train step does not fit in HBM (with settings to try) or the
topology is malformed. Topologies are GENERATION:CHIPS_PER_AXIS, named like Cloud TPU's
`--topology`: v4:2x2x1 (v4-8), v5p:2x2x1 (v5p-8), v5p:4x4x4 (v5p-128), v5e:2x4 (v5e-8),
v6e:2x2 (v6e-4). `--num_slices=N` compiles for N such slices joined over the data-centre network
(DCN); the mesh's `dcn_data` axis spans the slices (`mesh.dcn_data` is set to N unless given).

Vocabulary: the embedding has `padded_vocab_size(base + 3 specials)` rows. `base` is read from
`vocab_path` when it is a local file; for remote paths (gs://...) it is `--vocab_size`, whose
default 32000 is T5's cc_all.32000, the vocabulary of configs/c4_*.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from ml_collections import config_flags

from pausejax import config as config_lib
from pausejax import model as model_lib
from pausejax import sharding
from pausejax.errors import UsageError
from pausejax.errors import run

# pausejax.train, .data, .specials and .metrics import TensorFlow (seconds): they are imported where
# needed, after the command line has been checked, so a mistyped --topology fails at once.

GiB = 2**30


def _size(n: float) -> str:
  for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation as libtpu names it, and its HBM per chip."""
  libtpu_name: str
  num_axes: int
  chip_config: str        # 'megacore': one jax device per chip (v4, v5p: two TensorCores fused).
  accelerator_type: str   # Cloud TPU accelerator type for N chips, e.g. 'v5p-{cores}'.
  hbm_spec: str           # HBM as cloud.google.com/tpu/docs/<generation> states it.
  usable_hbm_gib: float   # What libtpu 0.0.42.1's compiler accepts (its out-of-memory error).


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 3, "megacore", "v4-{cores}", "32 GiB", 30.75),
    "v5e": Chip("v5e", 2, "default", "v5litepod-{chips}", "16 GB", 15.75),
    "v5p": Chip("v5p", 3, "megacore", "v5p-{cores}", "95 GB", 95.74),
    "v6e": Chip("v6e", 2, "default", "v6e-{chips}", "32 GB", 31.25),
}
_TOPOLOGY_FORM = ("GENERATION:CHIPS_PER_AXIS with generation v4, v5e, v5p or v6e, e.g. v5p:2x2x1, "
                  "v5e:2x4, v4:2x2x1 (v4/v5p: 3 axes, v5e/v6e: 2)")


def parse_topology(value: str | None) -> tuple[str, tuple[int, ...]]:
  """'v5p:2x2x1' -> ('v5p', (2, 2, 1)); UsageError naming --topology otherwise."""
  match = re.fullmatch(r"(v\w+):(\d+(?:x\d+)*)", (value or "").strip())
  if not match or match.group(1) not in CHIPS:
    raise UsageError.setting("--topology", value, _TOPOLOGY_FORM)
  generation = match.group(1)
  axes = tuple(int(a) for a in match.group(2).split("x"))
  if len(axes) != CHIPS[generation].num_axes or min(axes) < 1:
    raise UsageError.setting("--topology", value, _TOPOLOGY_FORM)
  return generation, axes


def topology_devices(generation: str, axes: tuple[int, ...], num_slices: int = 1) -> list[Any]:
  """Compile-only devices of `num_slices` slices of this topology (needs libtpu, no TPU)."""
  chip = CHIPS[generation]
  chips = math.prod(axes)
  # Compile-only: no chips to guard, so skip libtpu's one-process-per-host lock (/tmp/
  # libtpu_lockfile), which any other JAX process that probed for a TPU may hold. There is no TPU
  # VM metadata either; without the next two libtpu logs errors about the hostnames and
  # accelerator type it could not find (the devices it describes do not depend on them).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        chip.accelerator_type.format(chips=chips, cores=2 * chips))
  from jax.experimental import topologies
  name = f"{chip.libtpu_name}:{'x'.join(map(str, axes))}"
  kwargs = {"chip_config_name": chip.chip_config}
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  try:
    return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
  except RuntimeError as e:  # JaxRuntimeError is one; so is "JAX TPU support not installed".
    message = " ".join(str(e).split())
    if "not installed" in message:
      raise UsageError.setting("--topology", name, "compiling for TPU needs libtpu: pip install "
                               "-c constraints.txt -e '.[tpu]'") from e
    raise UsageError.setting("--topology", name, f"libtpu rejects it ({message}); "
                             f"{_TOPOLOGY_FORM}") from e


def vocab_rows(config, assumed_base: int = 32000) -> tuple[int, int, str]:
  """(embedding rows, base vocabulary size, where the base size came from)."""
  from pausejax import data as data_lib
  from pausejax import specials
  path = data_lib.vocab_path(config)
  if "://" in path:
    base, source = assumed_base, f"assumed for remote {path}"
  else:
    base, source = specials.load_vocabulary(path).base_vocab_size, path
  return specials.padded_vocab_size(base + len(specials.SPECIAL_TOKENS)), base, source


def abstract_batch(config, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one global batch of the features `pausejax.data` produces."""
  names = ["decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"]
  if config.pack:
    names += ["decoder_segment_ids", "decoder_positions"]
  if config.get("backspace") and config.backspace.rate:  # pausejax.backspace's edit structure.
    names += ["decoder_lifetimes"] + ([] if config.pack else ["decoder_positions"])
  shape = (config.global_batch_size, config.seq_len)
  return {n: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding) for n in names}


def bytes_per_device(abstract_tree) -> int:
  """Bytes of one device's shards of a pytree of sharded ShapeDtypeStructs."""
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(abstract_tree))


@dataclasses.dataclass
class Report:
  topology: str
  num_slices: int
  device_kind: str
  num_chips: int
  mesh: dict[str, int]
  params: int
  vocab: tuple[int, int, str]   # Embedding rows, base vocabulary size, where that came from.
  num_specials: int
  remat: str
  scan_layers: bool
  global_batch_size: int
  seq_len: int
  batch_shards: int
  microbatches: int
  memory: dict[str, int]        # Per chip, bytes; 'total' = the others summed (aliased negative).
  hbm_spec: str
  usable_hbm_gib: float
  flops_compiled: float | None  # Whole step, all chips; None with scanned layers (see below).
  flops_analytic: float
  peak_name: str
  peak_per_chip: float
  mfu: float
  lower_s: float
  compile_s: float

  @property
  def tokens_per_step(self) -> int:
    return self.global_batch_size * self.seq_len

  @property
  def step_time(self) -> float:
    return self.flops_analytic / (self.mfu * self.peak_per_chip * self.num_chips)


def _fit_suggestions(config, mesh: Mesh, batch_shards: int, num_slices: int, needed_gib: float,
                     state_gib: float, usable_gib: float) -> list[str]:
  """Settings that would cut the per-chip HBM, the one addressing the larger part first."""
  chips_per_slice = mesh.devices.size // num_slices
  shard_state, cut_activations = [], []
  if mesh.shape["fsdp"] * mesh.shape["tensor"] < chips_per_slice and state_gib > 0.1 * needed_gib:
    shard_state.append(
        f"--config.mesh.data=1 --config.mesh.fsdp=-1 (shard parameters and optimizer "
        f"state, {_size(state_gib * GiB)} per chip now, over the {chips_per_slice} chips of a "
        "slice)")
  # (Pure data parallelism is no remedy: the model constrains its activations to split by batch
  # over data and fsdp alike, so fsdp holds the same activations and less state.)
  if config.model.get("remat", "none") == "none":
    cut_activations.append(
        "--config.model.remat=full (keep only each block's input and recompute the block in the "
        "backward pass; --config.model.remat=minimal also keeps its weight matmuls' outputs)")
  if not config.model.get("scan_layers", False):
    cut_activations.append(
        "--config.model.scan_layers=True (one compiled layer in a loop: less generated code and "
        "compile time; with remat one layer's activations at a time)")
  if config.model.dtype == "float32":
    cut_activations.append("--config.model.dtype=bfloat16 (half-size activations)")
  # Activations grow roughly linearly with the sequences a chip holds at once. Aim at 60% of HBM:
  # the compiler reports what its last failed attempt needed, not an exact slope.
  per_chip = config.global_batch_size // batch_shards
  microbatches = config.get("microbatches", 1)
  live = per_chip // microbatches
  activations = needed_gib - state_gib
  room = 0.6 * usable_gib - state_gib
  if live > 1 and activations > 0 and room > 0:
    fitting = max(1, min(live - 1, int(live * room / activations)))
    fitting = 2 ** int(math.log2(fitting))  # Powers of two tile best.
    if "microbatches" in config:  # Gradient accumulation keeps the tokens per step.
      more = next(k for k in range(microbatches + 1, per_chip + 1)
                  if per_chip % k == 0 and per_chip // k <= fitting)
      cut_activations.append(
          f"--config.microbatches={more} (gradient accumulation: {per_chip // more} of the "
          f"{per_chip} sequences per chip at a time; same tokens per step)")
    smaller = fitting * microbatches * batch_shards
    cut_activations.append(
        f"--config.global_batch_size={smaller} ({fitting} sequence{'s' if fitting > 1 else ''} "
        f"per chip at a time instead of {live}; fewer tokens per step)")
  ordered = (shard_state + cut_activations if state_gib >= activations
             else cut_activations + shard_state)
  return ordered + ["more chips (a larger --topology or --num_slices)"]


def _too_big(config, topology, mesh, batch_shards, num_slices, needed_gib, state_gib, chip):
  suggestions = _fit_suggestions(config, mesh, batch_shards, num_slices, needed_gib, state_gib,
                                 chip.usable_hbm_gib)
  return UsageError(
      f"the train step needs {needed_gib:.2f} GiB of HBM per chip on {topology} (train state "
      f"{_size(state_gib * GiB)} of it) but a {topology.split(':')[0]} chip has "
      f"{chip.usable_hbm_gib:g} GiB usable; try one or more of: " + "; ".join(suggestions))


def check_args(topology: str | None, num_slices: int, mfu: float) -> tuple[str, tuple[int, ...]]:
  """The command line's own settings (no config, no libtpu needed); returns the parsed topology."""
  parsed = parse_topology(topology)
  if not isinstance(num_slices, int) or num_slices < 1:
    raise UsageError.setting("--num_slices", num_slices, "a positive integer")
  if not 0 < mfu <= 1:
    raise UsageError.setting("--mfu", mfu, "a fraction in (0, 1], e.g. 0.4")
  return parsed


def compile_train_step(config, topology: str, num_slices: int = 1, mfu: float = 0.4,
                       assumed_vocab: int = 32000) -> Report:
  """Lowers and compiles `pausejax.train`'s train step for `topology`; raises UsageError."""
  generation, axes = check_args(topology, num_slices, mfu)
  config_lib.validate(config)
  from pausejax import build
  from pausejax import metrics
  from pausejax import specials
  chip = CHIPS[generation]
  devices = topology_devices(generation, axes, num_slices)

  # Several slices: the DCN data axis spans them (--num_slices=N implies mesh.dcn_data=N).
  if num_slices > 1 and config.mesh.dcn_data == 1:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.mesh.dcn_data = num_slices
  # Mesh, model, optimizer, state and train step exactly as pausejax.train builds them.
  rows, base, source = vocab_rows(config, assumed_vocab)
  pause_id = base + specials.SPECIAL_TOKENS.index(specials.PAUSE)
  built = build.build(config, rows, pause_id, devices=devices)
  mesh, rules, model_cfg = built.mesh, built.rules, built.model_cfg
  abstract_state, batch_sharding = built.abstract_state, built.batch_sharding
  train_step = built.train_step()

  batch_spec = sharding.logical_to_mesh(("batch",), rules)[0]
  batch_axes = batch_spec if isinstance(batch_spec, tuple) else (batch_spec,) if batch_spec else ()
  batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
  state_gib = bytes_per_device(abstract_state) / GiB

  t0 = time.perf_counter()
  lowered = train_step.lower(abstract_state, abstract_batch(config, batch_sharding))
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # "... required for HLO temporaries (1.19T) exceeds available HBM (95.74G)": binary units.
    found = re.search(r"required.*?\(([\d.]+)([KMGT])\).*?available HBM", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not found:
      raise
    needed_gib = float(found.group(1)) * 1024.0 ** ("KMGT".index(found.group(2)) - 2)
    raise _too_big(config, topology, mesh, batch_shards, num_slices, needed_gib, state_gib,
                   chip) from None
  t2 = time.perf_counter()

  stats = compiled.memory_analysis()
  memory = {
      "arguments": stats.argument_size_in_bytes,
      "outputs": stats.output_size_in_bytes,
      "aliased": -stats.alias_size_in_bytes,  # Donated state buffers reused for the new state.
      "temporaries": stats.temp_size_in_bytes,
      "generated code": stats.generated_code_size_in_bytes,
  }
  memory["total"] = sum(memory.values())
  if memory["total"] > chip.usable_hbm_gib * GiB:
    raise _too_big(config, topology, mesh, batch_shards, num_slices, memory["total"] / GiB,
                   state_gib, chip)

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # Older jax: one dict per module.
  tokens = config.global_batch_size * config.seq_len
  kind = devices[0].device_kind
  peak = metrics.lookup_peak_flops(kind)
  if peak is None:
    raise UsageError.setting("--topology", topology, f"no bf16 peak known for {kind!r}")
  return Report(
      topology=topology, num_slices=num_slices, device_kind=kind, num_chips=len(devices),
      mesh=dict(mesh.shape), params=model_lib.count_params(model_cfg),
      vocab=(rows, base, source), num_specials=len(specials.SPECIAL_TOKENS),
      remat=model_cfg.remat, scan_layers=model_cfg.scan_layers,
      global_batch_size=config.global_batch_size,
      seq_len=config.seq_len, batch_shards=batch_shards,
      microbatches=config.get("microbatches", 1), memory=memory,
      hbm_spec=chip.hbm_spec, usable_hbm_gib=chip.usable_hbm_gib,
      # cost_analysis counts one device's share of the SPMD program, and a loop body once: scale
      # by the microbatches (which also counts the optimizer update, a tiny part, that often).
      # A scan over layers would count one layer of N and no factor recovers the rest: not shown.
      flops_compiled=None if model_cfg.scan_layers else
      float(cost["flops"]) * len(devices) * config.get("microbatches", 1),
      flops_analytic=model_lib.flops_per_token(model_cfg, config.seq_len) * tokens,
      peak_name=peak[0], peak_per_chip=peak[1], mfu=mfu, lower_s=t1 - t0, compile_s=t2 - t1)


def format_report(r: Report) -> str:
  slices = f" x {r.num_slices} slices" if r.num_slices > 1 else ""
  rows, base, source = r.vocab
  lines = [
      f"topology: {r.topology}{slices} = {r.num_chips} x {r.device_kind} chips | mesh "
      + " ".join(f"{k}={v}" for k, v in r.mesh.items()),
      f"model: {r.params / 1e6:.1f}M params | vocab {rows} rows (base {base}, {source}; + "
      f"{r.num_specials} specials, padded to 128) | remat {r.remat}"
      + (" | layers scanned" if r.scan_layers else ""),
      f"batch: {r.global_batch_size} x {r.seq_len} tokens per step, "
      f"{r.global_batch_size // r.batch_shards} sequences per batch shard"
      + (f" in {r.microbatches} microbatches" if r.microbatches > 1 else ""),
      f"compile: lowered in {r.lower_s:.1f} s, compiled in {r.compile_s:.1f} s",
      "HBM per chip (compiled.memory_analysis):",
  ]
  lines += [f"  {name + ':':<16}{_size(value):>12}" for name, value in r.memory.items()
            if name != "total"]
  total = r.memory["total"]
  lines.append(f"  {'total:':<16}{_size(total):>12} of {r.usable_hbm_gib:g} GiB usable "
               f"({100 * total / (r.usable_hbm_gib * GiB):.1f}%; spec sheet: {r.hbm_spec} HBM)")
  analytic = f"{r.flops_analytic:.4g} analytic (flops_per_token x {r.tokens_per_step} tokens)"
  if r.flops_compiled is None:
    flops = (f"FLOPs per step: n/a compiled (model.scan_layers: cost_analysis counts the "
             f"scanned layer once) | {analytic}")
  else:
    flops = (f"FLOPs per step: {r.flops_compiled:.4g} compiled (cost_analysis x {r.num_chips} "
             f"chips" + (f" x {r.microbatches} microbatches" if r.microbatches > 1 else "")
             + f") | {analytic} | ratio {r.flops_compiled / r.flops_analytic:.2f}")
  lines += [
      flops,
      f"at {100 * r.mfu:g}% MFU ({r.peak_name} bf16 peak {r.peak_per_chip / 1e12:g} TFLOP/s per "
      f"chip): step time {r.step_time:.4g} s | {r.tokens_per_step / r.step_time:.4g} tokens/s",
  ]
  return "\n".join(lines)


def define_flags() -> None:
  """This program's flags; defined only when it runs, so importing the module defines none."""
  config_flags.DEFINE_config_file(
      "config", None, "Path to a config file in configs/ (e.g. configs/c4_130m.py). Override "
      "any key with --config.key=value, e.g. --config.mesh.fsdp=4.")
  flags.DEFINE_string(
      "topology", None, "TPU slice to compile for: GENERATION:CHIPS_PER_AXIS, e.g. v5p:2x2x1, "
      "v5e:2x4, v4:2x2x1, v6e:2x2 (v4/v5p: 3 axes, v5e/v6e: 2).")
  flags.DEFINE_integer(
      "num_slices", 1, "Number of such slices joined over DCN; sets mesh.dcn_data=N.")
  flags.DEFINE_float(
      "mfu", 0.4, "Model FLOPs utilization in (0, 1] assumed for the predicted step time and "
      "tokens/s.")
  flags.DEFINE_integer(
      "vocab_size", 32000, "Base vocabulary size assumed when vocab_path is not a local file "
      "(32000: T5's cc_all.32000).")


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.key=value")
  f = flags.FLAGS
  check_args(f.topology, f.num_slices, f.mfu)  # Before the TensorFlow imports: a typo fails fast.
  if f.config is None:
    raise UsageError.setting("--config", None,
                             "give a config file, e.g. --config=configs/c4_130m.py")
  # Everything runs on the host CPU; the TPU devices come from libtpu's topology description.
  jax.config.update("jax_platforms", "cpu")
  report = compile_train_step(f.config, f.topology, f.num_slices, f.mfu, f.vocab_size)
  print(format_report(report), flush=True)


if __name__ == "__main__":
  define_flags()
  run(main)
