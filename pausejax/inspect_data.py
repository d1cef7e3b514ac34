r"""Show what a task feeds the model.

    python -m pausejax.inspect_data --config=configs/tiny.py [--num_examples=3] [--json]
        [--split=train|validation] [--config.task=my_task --config.pause.rate=0.2]

Readable view (default): the task and the pause rate it is read with, then each example's target
text with `<pause>`, `<backspace>` (after its noise token) and a leading `<sink>` visible, plus
counts (the task line goes to stderr with `--json`).
`--json`: one object per line with the model features as int lists under seqio's names
(`decoder_target_tokens`, `decoder_input_tokens`, `decoder_loss_weights`, and
`decoder_segment_ids` / `decoder_positions` when packed, `decoder_positions` / `decoder_lifetimes`
with backspaces: `pausejax.backspace`), `pause_id`, and `text`.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np

from pausejax import config as config_lib
from pausejax import data as data_lib
from pausejax import distributed
from pausejax import sinks
from pausejax.errors import UsageError
from pausejax.errors import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_NUM = flags.DEFINE_integer("num_examples", 3, "How many examples to show.")
_JSON = flags.DEFINE_bool("json", False, "One JSON object per example instead of the readable view.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "validation"],
                           "train: the training stream (shuffled as in training); validation: the "
                           "held-out eval stream.")


def examples(config, num_examples: int, train: bool):
  """The first `num_examples` model-feature dicts (numpy int arrays) and the resolved data.

  They are the examples of data shard 0, in order: row block 0 of the batches training reads.
  """
  data = data_lib.prepare(config)
  ds = data_lib.shard_dataset(data, config, 0, train=train, batch_size=1)
  out = []
  for batch in ds.take(num_examples):
    out.append({k: v.numpy()[0] for k, v in batch.items()})
  return data, out


def to_json(example: dict[str, np.ndarray], data: data_lib.Data) -> dict:
  obj = {k: v.astype(int).tolist() for k, v in sorted(example.items())}
  obj["pause_id"] = data.pause_id
  obj["text"] = data.vocabulary.render(example["decoder_target_tokens"])
  return obj


def readable(i: int, example: dict[str, np.ndarray], data: data_lib.Data,
             start: str = sinks.BOS) -> str:
  targets = example["decoder_target_tokens"]
  pauses = int(np.sum(targets == data.pause_id))
  edits = int(np.sum(targets == data.vocabulary.backspace_id))
  real = int(np.sum(example["decoder_loss_weights"]))
  # With a <sink> (or no start token) the chunk is fed as it is: show the inputs, sink first.
  shown = targets if start == sinks.BOS else example["decoder_input_tokens"]
  bar = "=" * 100
  return (f"{bar}\nexample {i}: {len(targets)} target tokens | {pauses} <pause> | {real} with loss "
          f"(pause targets, padding and deleted noise get none) | "
          f"{f'{edits} noise + <backspace> | ' if edits else ''}pause_id={data.pause_id} | "
          f"starts with "
          f"{'<sink>' if start == sinks.SINK else start}\n{bar}\n"
          f"{data.vocabulary.render(shown)}\n")


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  distributed.initialize()
  config = _CONFIG.value
  if config is None:
    raise UsageError.setting("--config", None, "give a config file, e.g. --config=configs/tiny.py")
  if _NUM.value < 1:
    raise UsageError.setting("--num_examples", _NUM.value, "a positive integer")
  config_lib.validate(config)
  data, exs = examples(config, _NUM.value, train=_SPLIT.value == "train")
  run_task = data.train if _SPLIT.value == "train" else data.eval
  print(f"task {run_task.describe()}, split {run_task.parts[0].split}",
        file=sys.stderr if _JSON.value else sys.stdout)
  for i, ex in enumerate(exs):
    sys.stdout.write(json.dumps(to_json(ex, data)) + "\n" if _JSON.value
                     else readable(i, ex, data, run_task.start))
  sys.stdout.flush()


if __name__ == "__main__":
  run(main)
