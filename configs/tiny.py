"""CPU demo: a ~3M-parameter pause-token model on the embedded Shakespeare corpus.

`make demo` runs this. It finishes in a few minutes on 2 CPU cores.
"""

from pausejax import config as base


def get_config():
  c = base.defaults()
  c.task = "shakespeare_pause"
  c.seq_len = 256
  c.global_batch_size = 8
  c.num_train_steps = 200
  c.log_every_steps = 10
  c.eval_every_steps = 50
  c.num_eval_steps = 10
  c.checkpoint_every_steps = 50
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 20
  c.model.num_layers = 4
  c.model.d_model = 192
  c.model.num_heads = 3
  c.model.head_dim = 64
  c.model.mlp_dim = 512
  return c
