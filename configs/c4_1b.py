"""Paper scale, large: a ~1.1B-parameter pause-token model on C4 (L = 2048, pause rate 0.1).

Shapes are our choice (the paper's are unpublished): 24 layers, d_model 2048, 16 heads of 128,
SwiGLU MLP 4096, untied 32k T5 vocabulary. 200B tokens = 200k steps of 512 x 2048 tokens.
Parameters and optimizer state are sharded over `fsdp` (set mesh.fsdp to the chips per slice).
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
  c.checkpoint_every_steps = 2_000
  c.model.num_layers = 24
  c.model.d_model = 2048
  c.model.num_heads = 16
  c.model.head_dim = 128
  c.model.mlp_dim = 4096
  c.model.tied_embeddings = False
  c.model.dtype = "bfloat16"
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 2_000
  c.optimizer.weight_decay = 0.1
  c.mesh.data = 1
  c.mesh.fsdp = -1
  # Fits v5p-128 at 25 GiB per chip (docs/aot.md); on v5p-8 use remat="full", microbatches=2.
  c.model.scan_layers = True
  c.model.remat = "minimal"
  return c
