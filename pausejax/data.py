"""The input pipeline: a config in, batches of seqio model features out.

    task recipe (tasks.py) --built with vocab_path, pause.rate, tfds_data_dir--> seqio.Task
      -> Task.get_dataset(split, seed, shard_info)      this host's shard only
      -> PauseLMFeatureConverter                         decoder_* features, no loss on pause targets
      -> batch(global_batch_size / process_count)

The iterator is a plain `tf.data` iterator so its position can be saved in the checkpoint
(`checkpoint.py`); that is what makes a resumed run see exactly the batches an uninterrupted run
would.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
import seqio
import tensorflow as tf

from pausejax import corpus
from pausejax import pause
from pausejax import specials
from pausejax import tasks
from pausejax.errors import UsageError

# TF must not grab accelerators or threads that JAX needs.
tf.config.set_visible_devices([], "GPU")


@dataclasses.dataclass
class Data:
  """Everything the training loop needs to know about its data."""
  vocabulary: specials.SpecialsVocabulary
  train_task: seqio.Task
  eval_task: seqio.Task
  train_split: str
  eval_split: str
  converter: pause.PauseLMFeatureConverter

  @property
  def pause_id(self) -> int:
    return self.vocabulary.pause_id


def vocab_path(config: ml_collections.ConfigDict) -> str:
  return config.vocab_path or corpus.DEFAULT_VOCAB_PATH


def prepare(config: ml_collections.ConfigDict) -> Data:
  """Resolves tasks and vocabulary and checks the data exists. Raises UsageError, writes nothing."""
  vocabulary = specials.load_vocabulary(vocab_path(config))
  data_dir = config.tfds_data_dir or None
  train_recipe = tasks.resolve(config.task, setting="task")
  eval_recipe = tasks.resolve(config.eval_task or config.task, setting="eval_task")
  for r in {train_recipe.name: train_recipe, eval_recipe.name: eval_recipe}.values():
    if r.tfds_name:
      corpus.ensure_prepared(r.tfds_name, data_dir)
  build = dict(pause_rate=config.pause.rate, tfds_data_dir=data_dir)
  return Data(
      vocabulary=vocabulary,
      train_task=train_recipe.build(vocabulary, **build),
      eval_task=eval_recipe.build(vocabulary, **build),
      train_split=train_recipe.train_split,
      eval_split=eval_recipe.eval_split,
      converter=pause.PauseLMFeatureConverter(vocabulary.pause_id, pack=config.pack),
  )


def shard_info() -> seqio.ShardInfo:
  """This process's share of the data: each host reads a disjoint shard."""
  return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def per_process_batch_size(global_batch_size: int) -> int:
  n = jax.process_count()
  if global_batch_size % n:
    raise UsageError.setting("global_batch_size", global_batch_size,
                             f"must be divisible by the number of processes ({n})")
  return global_batch_size // n


def dataset(data: Data, config: ml_collections.ConfigDict, *, train: bool,
            batch_size: int | None = None) -> tf.data.Dataset:
  """Batched model features for this process (`decoder_*` int32 arrays of shape [B, seq_len])."""
  task = data.train_task if train else data.eval_task
  lengths = {"targets": config.seq_len}
  ds = task.get_dataset(
      sequence_length=lengths,
      split=data.train_split if train else data.eval_split,
      shuffle=train,
      seed=config.seed if train else 0,
      shard_info=shard_info(),
      num_epochs=None if train else 1,  # Training repeats forever; eval is one pass.
      use_cached=False,
      # No in-memory cache: it would be written into every data-iterator checkpoint.
      try_in_mem_cache=False,
  )
  ds = data.converter(ds, lengths)
  ds = ds.batch(batch_size or per_process_batch_size(config.global_batch_size),
                drop_remainder=True)
  if not train and config.num_eval_steps:
    ds = ds.take(config.num_eval_steps)
  return ds.prefetch(tf.data.AUTOTUNE)


def to_numpy(batch) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in batch.items()}
