"""Paper scale, small: a ~134M-parameter pause-token model on C4 (L = 2048, pause rate 0.1).

The paper (Goyal et al. 2023) does not publish its shapes; these follow GPT-3 Small / T5 practice:
12 layers, d_model 768, 12 heads of 64, SwiGLU MLP 2048, untied 32k T5 vocabulary
(`cc_all.32000`, the pause id is 32000). 200B tokens = 200k steps of 512 x 2048 tokens.
Needs C4 prepared under `tfds_data_dir` (see README).
"""

from pausejax import config as base


def get_config():
  c = base.defaults()
  c.task = "c4_pause"
  c.tfds_data_dir = "gs://YOUR_BUCKET/tensorflow_datasets"
  c.seq_len = 2048
  c.global_batch_size = 512
  c.num_train_steps = 200_000
  c.log_every_steps = 100
  c.eval_every_steps = 5_000
  c.num_eval_steps = 50
  c.checkpoint_every_steps = 5_000
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.head_dim = 64
  c.model.mlp_dim = 2048
  c.model.tied_embeddings = False
  c.model.dtype = "bfloat16"
  c.optimizer.learning_rate = 6e-4
  c.optimizer.warmup_steps = 2_000
  c.optimizer.weight_decay = 0.1
  c.mesh.data = -1
  # Fits v4-8 (20.8 GiB of 30.75 per chip) and v5e-8 (11.8 of 15.75): docs/aot.md.
  c.model.scan_layers = True
  c.model.remat = "full"
  c.microbatches = 4
  return c
