r"""Answer prompts with a trained (pause-token) model.

    python -m pausejax.generate --config=configs/tiny.py --workdir=runs/tiny \
        --prompt="ROMEO:" [--prompt="JULIET:" ...] --num_pauses=10 --max_new_tokens=32 \
        [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0]

Loads the parameters of the latest checkpoint in `<workdir>/checkpoints` read-only (the config must
describe the same model, including any --config.model.* overrides used for training), encodes each
prompt with the config's vocabulary after the BOS id 0 that training sequences start with, appends
`num_pauses` `<pause>` tokens, and prints the prompt and the answer decoded after the last pause
(see `pausejax.decode`). Temperature 0 (default) is greedy.
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pausejax import checkpoint
from pausejax import config as config_lib
from pausejax import data as data_lib
from pausejax import decode
from pausejax import distributed
from pausejax import model as model_lib
from pausejax import sharding
from pausejax import specials
from pausejax import step as step_lib
from pausejax.errors import UsageError
from pausejax.errors import run


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`, which must hold a complete checkpoint (checked; creates nothing)."""
  directory = os.path.join(workdir, "checkpoints")
  if not checkpoint.has_checkpoint(directory):
    raise UsageError.setting("--workdir", workdir,
                             f"no complete checkpoint in {directory}; train first")
  return directory


def load_params(config, directory: str, model_cfg: model_lib.ModelConfig):
  """The params of the latest checkpoint in `directory`, in the config's shardings."""
  return load_checkpoint(config, directory, model_cfg)[0]


def load_checkpoint(config, directory: str, model_cfg: model_lib.ModelConfig):
  """(params, step) of the latest checkpoint in `directory`; reads only, writes nothing.

  Read-only, so it is safe while a training run is still writing to the same directory.
  """
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_dict(config.logical_axis_rules)
  _, abstract_params = step_lib.abstract_model(model_cfg)
  specs = step_lib.param_logical_specs(abstract_params)
  tx, _ = step_lib.make_optimizer(config.optimizer, config.num_train_steps, specs)
  _, abstract_state, _ = step_lib.make_state(
      model_cfg, tx, config.seed, sharding.named_shardings(specs, mesh, rules), mesh)
  ckpt = checkpoint.Checkpointer(directory, keep=config.keep_checkpoints, save_every_steps=1,
                                 async_save=False, read_only=True)
  try:
    step = ckpt.latest_step()
    state = ckpt.restore(step, abstract_state)  # UsageError if it holds another model.
  finally:
    ckpt.close()
  return state["params"], step


def define_flags() -> None:
  """Flags of the CLI only, so other modules can import this one."""
  config_flags.DEFINE_config_file(
      "config", None, "The training config (e.g. configs/tiny.py) with the same overrides.")
  flags.DEFINE_string("workdir", None, "Training run directory holding checkpoints/.")
  flags.DEFINE_multi_string("prompt", None, "A prompt; repeat the flag for a batch.")
  flags.DEFINE_integer("num_pauses", 10, "<pause> tokens appended to each prompt.")
  flags.DEFINE_integer("max_new_tokens", 32, "Answer tokens to sample at most.")
  flags.DEFINE_integer(
      "max_len", 0, "KV-cache slots per prompt, >= prompt + pauses + answer (0 = config.seq_len).")
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
  flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = off).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; give prompts with --prompt=...")
  distributed.initialize()
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore detail at INFO.
  f = flags.FLAGS
  config = f.config
  if config is None:
    raise UsageError.setting("--config", None, "give a config file, e.g. --config=configs/tiny.py")
  if not f.workdir:
    raise UsageError.setting("--workdir", f.workdir, "give the training run directory")
  if not f.prompt:
    raise UsageError.setting("--prompt", None, "give at least one --prompt=...")
  config_lib.validate(config)
  directory = checkpoint_dir(f.workdir)
  vocabulary = specials.load_vocabulary(data_lib.vocab_path(config))
  # BOS: seqio's converters start every training sequence with id 0 (the shifted-in pad).
  prompts = [[vocabulary.pad_id] + list(vocabulary.encode(p)) for p in f.prompt]
  max_len = f.max_len or config.seq_len
  model_cfg = model_lib.ModelConfig.from_config(
      config.model, specials.padded_vocab_size(vocabulary.vocab_size))
  request = dict(max_new_tokens=f.max_new_tokens, num_pauses=f.num_pauses,
                 pause_id=vocabulary.pause_id, max_len=max_len,
                 vocab_size=vocabulary.vocab_size)
  # Bad settings fail before the (slow) restore; prompts[i] is the i-th --prompt.
  decode.Sampler(f.temperature, f.top_k, f.top_p)
  decode.prepare_inputs(model_cfg, prompts, **request)

  model = decode.model_from_params(model_cfg, load_params(config, directory, model_cfg))
  out = decode.generate(model, prompts, eos_id=vocabulary.eos_id, temperature=f.temperature,
                        top_k=f.top_k, top_p=f.top_p, seed=f.seed,
                        prefix_lm=bool(config.get("prefix_lm", False)), **request)
  if jax.process_index() == 0:
    for text, answer in zip(f.prompt, out.tokens):
      print(f"prompt: {text}")
      print(f"answer: {vocabulary.decode(answer)}", flush=True)


if __name__ == "__main__":
  define_flags()
  run(main)
