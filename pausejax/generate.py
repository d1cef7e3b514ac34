r"""Answer prompts with a trained (pause-token) model.

    python -m pausejax.generate --workdir=runs/tiny --prompt="ROMEO:" [--prompt="JULIET:" ...] \
        [--num_pauses=10] [--max_new_tokens=32] [--temperature=0.8 --top_k=40 --top_p=0.95] \
        [--num_sinks=4 --window=252] [--max_backspaces=4 --show_edits]

Reads the run's settings from `<workdir>/config.json` (model, vocabulary, and how it was
fine-tuned: M = `pause.num_finetune` pauses, `pause.position`, `prefix_lm`) and the parameters
of its latest checkpoint (read-only; not the optimizer state). Each prompt is encoded after the
run's start id (BOS 0, or `<sink>`, as its training sequences start; none for start_token
"none"); `--num_pauses` `<pause>` tokens (default: the run's M_ft) go after the prompt ("append")
or right after the start id ("prepend"); the answer is decoded after the last pause (see
`pausejax.decode`). Temperature 0 (default) is greedy. `--window=W` (with `--num_sinks=S`)
decodes with the streaming cache (`pausejax.stream`): S + W slots, so prompt + answer may exceed
the run's seq_len. `--max_backspaces=N` (default: the run's `backspace.max_per_sequence`) lets a
SequenceMatch model delete its own tokens with `<backspace>`, at most N times per answer; the
answer printed is the text after the deletions, and `--show_edits` also prints the edit trace,
each deleted token struck through as `[-token-]`. `--ids_out=FILE` writes the sampled ids (a
checkpoint's samples, for `backspace.noise_from`). `--config` is needed only for runs without
config.json, and must otherwise agree with it.
"""

from __future__ import annotations

from absl import flags
import jax
from ml_collections import config_flags

from pausejax import build
from pausejax import checkpoint
from pausejax import config as config_lib
from pausejax import data as data_lib
from pausejax import decode
from pausejax import distributed
from pausejax import model as model_lib
from pausejax import registry
from pausejax import sinks
from pausejax import specials
from pausejax.errors import UsageError
from pausejax.errors import run


def define_flags() -> None:
  """Flags of the CLI only, so other modules can import this one."""
  config_flags.DEFINE_config_file(
      "config", None, "Only for runs without config.json: the training config with the same "
      "overrides.")
  flags.DEFINE_string("workdir", None, "Training run directory holding checkpoints/.")
  flags.DEFINE_multi_string("prompt", None, "A prompt; repeat the flag for a batch.")
  flags.DEFINE_integer("num_pauses", None, "M_inf: <pause> tokens with each prompt (default: "
                       "the run's pause.num_finetune).")
  flags.DEFINE_enum("pause_position", None, ["append", "prepend"], "Pauses after the prompt "
                    "or before it (default: the run's pause.position).")
  flags.DEFINE_bool("prefix_lm", None, "Prompt and pauses attend both ways (default: the run's "
                    "prefix_lm).")
  flags.DEFINE_integer("max_new_tokens", 32, "Answer tokens to sample at most.")
  flags.DEFINE_integer(
      "max_len", 0, "KV-cache slots per prompt, >= prompt + pauses + answer (0 = config.seq_len).")
  flags.DEFINE_integer("num_sinks", 0, "Streaming cache: first tokens kept (with --window).")
  flags.DEFINE_integer("window", 0, "Streaming cache: recent tokens kept (0 = the dense cache "
                       "of --max_len slots).")
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
  flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = off).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("max_backspaces", None, "<backspace> moves allowed per answer (default: "
                       "the run's backspace.max_per_sequence; 0 = never).")
  flags.DEFINE_bool("show_edits", False, "Also print each answer's edit trace.")
  flags.DEFINE_string("ids_out", "", "Also write every sampled id (whitespace-separated) to this "
                      "file: e.g. the noise distribution of --config.backspace.noise_from.")


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; give prompts with --prompt=...")
  distributed.initialize()
  f = flags.FLAGS
  if not f.workdir:
    raise UsageError.setting("--workdir", f.workdir, "give the training run directory")
  if not f.prompt:
    raise UsageError.setting("--prompt", None, "give at least one --prompt=...")
  checkpoint.run_checkpoint_dir(f.workdir)  # Train first: said before anything else.
  config = config_lib.for_reading(f.workdir, f.config)
  num_pauses = config.pause.num_finetune if f.num_pauses is None else f.num_pauses
  position = f.pause_position or config.pause.position
  prefix_lm = bool(config.prefix_lm if f.prefix_lm is None else f.prefix_lm)
  if num_pauses < 0:
    raise UsageError.setting("--num_pauses", num_pauses, "an integer >= 0")
  if f.window and f.max_len:
    raise UsageError.setting("--max_len", f.max_len, "unset with --window (the streaming cache "
                             "has --num_sinks + --window slots, whatever the length)")
  vocabulary = specials.load_vocabulary(data_lib.vocab_path(config))
  # The run's start id(s), as its training sequences begin (BOS 0, <sink>, or none).
  start = sinks.start_ids(registry.start_token(config), vocabulary.sink_id)
  # "prepend": the pauses come right after the start id, as fine-tuning put them.
  prepended = [vocabulary.pause_id] * num_pauses if position == "prepend" else []
  prompts = [start + prepended + list(vocabulary.encode(p)) for p in f.prompt]
  request = dict(max_new_tokens=f.max_new_tokens,
                 num_pauses=0 if position == "prepend" else num_pauses,
                 pause_id=vocabulary.pause_id,
                 max_len=None if f.window else f.max_len or config.seq_len,
                 vocab_size=vocabulary.vocab_size, bos_id=start[0] if start else None,
                 num_sinks=f.num_sinks, window=f.window)
  max_backspaces = (config.backspace.max_per_sequence if f.max_backspaces is None
                    else f.max_backspaces)
  if max_backspaces < 0:
    raise UsageError.setting("--max_backspaces", max_backspaces, "an integer >= 0")
  if max_backspaces:
    if f.window:
      raise UsageError.setting("--max_backspaces", max_backspaces,
                               "0 with --window (backspace decoding uses the dense cache)")
    request.update(backspace_id=vocabulary.backspace_id, max_backspaces=max_backspaces)
  rows = specials.padded_vocab_size(vocabulary.vocab_size)
  # Bad settings fail before the (slow) restore; prompts[i] is the i-th --prompt.
  decode.Sampler(f.temperature, f.top_k, f.top_p)
  decode.prepare_inputs(model_lib.ModelConfig.from_config(config.model, rows), prompts,
                        prefix_lm=prefix_lm, **{k: v for k, v in request.items()
                                                if k not in ("backspace_id", "max_backspaces")})

  # The newest checkpoint that can be read, or one line (checkpoint_on_unreadable=refuse).
  with checkpoint.reading_policy(config.checkpoint_on_unreadable):
    model, step = build.restore_model(config, f.workdir, rows, vocabulary.pause_id)
  out = decode.generate(model, prompts, eos_id=vocabulary.eos_id, temperature=f.temperature,
                        top_k=f.top_k, top_p=f.top_p, seed=f.seed, prefix_lm=prefix_lm,
                        **request)
  if jax.process_index() == 0 and f.ids_out:
    with open(f.ids_out, "w") as fh:
      fh.write("\n".join(" ".join(map(str, r)) for r in out.raw_tokens) + "\n")
  if jax.process_index() == 0:
    cache = f" | streaming cache {f.num_sinks} + {f.window}" if f.window else ""
    edits = f" | up to {max_backspaces} <backspace> per answer" if max_backspaces else ""
    print(f"checkpoint step {step} | {num_pauses} pause(s), {position} | prefix_lm {prefix_lm}"
          f"{cache}{edits}")
    for i, (text, answer) in enumerate(zip(f.prompt, out.tokens)):
      print(f"prompt: {text}")
      print(f"answer: {vocabulary.decode(answer)}", flush=True)
      if f.show_edits:
        print(f"edits:  {_edit_trace(out.raw_tokens[i], vocabulary)}"
              + (f" ({out.num_backspaces[i]} deleted)" if out.num_backspaces else ""), flush=True)


def _edit_trace(raw: list[int], vocabulary) -> str:
  """The sampled moves as text: a token deleted later as [-token-], <backspace> dropped."""
  kept, deleted = [], set()
  for i, t in enumerate(raw):
    if t == vocabulary.backspace_id:
      if kept:
        deleted.add(kept.pop())
    else:
      kept.append(i)
  pieces, ids = [], []
  for i, t in enumerate(raw):
    if t == vocabulary.backspace_id or t == vocabulary.eos_id:
      continue
    # A token's text with its leading space: the text up to it minus the text before it.
    before = vocabulary.render(ids, show_eos=False)
    ids.append(t)
    piece = vocabulary.render(ids, show_eos=False)[len(before):]
    pieces.append(f"[-{piece}-]" if i in deleted else piece)
  return "".join(pieces)


if __name__ == "__main__":
  define_flags()
  run(main)
