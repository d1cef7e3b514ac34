"""PauseFT on CPU: fine-tune the `make demo` model on multi-digit addition with 10 pauses.

    make demo   # pretrains runs/demo (PausePT)
    python -m pausejax.train --config=configs/finetune_addition.py --workdir=runs/ft_addition
    python -m pausejax.evaluate --workdir=runs/ft_addition   # reads the run's config.json

Each example is "123+45=" + 10 x <pause> + "168" + EOS, loss on the answer only. The model
shapes must be the pretrained model's (configs/tiny.py); `init_from` reads its parameters and the
optimizer starts afresh. Set --config.pause.num_finetune=0 for the StdFT baseline.
"""

import importlib.util
import os


def _tiny():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")
  spec = importlib.util.spec_from_file_location("pausejax_configs_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _tiny().get_config()
  c.task = "addition"
  c.eval_task = ""
  c.init_from = "runs/demo"
  c.pause.num_finetune = 10          # M_ft; evaluation uses M_inf = M_ft unless told otherwise.
  c.pause.position = "append"
  c.targets_len = 8                  # Up to 4 answer digits + EOS.
  c.seq_len = 40                     # Prompt (<= 16 tokens) + pauses + answer.
  c.global_batch_size = 32
  c.num_train_steps = 1000
  c.log_every_steps = 20
  c.eval_every_steps = 250
  c.num_eval_steps = 10
  c.checkpoint_every_steps = 250
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 50
  return c
