"""The input pipeline: a config in, batches of seqio model features out.

    task recipe (tasks.py) --built with vocab_path, pause.rate, tfds_data_dir--> seqio.Task
      -> Task.get_dataset(split, seed, ShardInfo(s, K))  one shard only
      -> PauseLMFeatureConverter                         decoder_* features, no loss on pause targets
      -> batch(global_batch_size / K)

Multi-host input. The data is split into K = `data_shards` disjoint shards (0: one per process),
and row block s of every global batch comes from shard s. Each process reads only the shards
whose rows its devices hold (`plan`: with the usual meshes, K / process_count shards of its own),
and `jax.make_array_from_process_local_data` joins the processes' rows into the global batch. So
the batches depend on K, never on the number of processes or the mesh.

Each shard has its own `tf.data` iterator, and `checkpoint.py` saves each one's position under
the shard's name: a resumed run sees exactly the batches an uninterrupted run would, also on
another number of processes as long as K is the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import seqio
import tensorflow as tf

from pausejax import corpus
from pausejax import downstream
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
  converter: seqio.FeatureConverter  # PauseLM (pretraining) or PauseFT (fine-tuning).
  feature_lengths: dict[str, int]    # Task feature lengths: {"targets": L} or inputs + targets.

  @property
  def pause_id(self) -> int:
    return self.vocabulary.pause_id


def vocab_path(config: ml_collections.ConfigDict) -> str:
  return config.vocab_path or corpus.DEFAULT_VOCAB_PATH


def prepare(config: ml_collections.ConfigDict) -> Data:
  """Resolves tasks and vocabulary and checks the data exists. Raises UsageError, writes nothing.

  A pretraining task (tasks.py) gives the PausePT stream; a downstream task (downstream.py) gives
  PauseFT examples, `prompt + pause.num_finetune x <pause> + answer`, loss on the answer only.
  """
  vocabulary = specials.load_vocabulary(vocab_path(config))
  data_dir = config.tfds_data_dir or None
  if downstream.recipe(config.task) is not None:
    return _prepare_finetuning(config, vocabulary, data_dir)
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
      feature_lengths={"targets": config.seq_len},
  )


def _prepare_finetuning(config, vocabulary, data_dir) -> Data:
  train_recipe = downstream.resolve(config.task, setting="task")
  eval_name = config.eval_task or config.task
  if downstream.recipe(eval_name) is None:
    raise UsageError.setting("eval_task", eval_name, "a downstream task like `task` (fine-tuning "
                             f"evaluates the answer loss); registered: "
                             f"{', '.join(downstream.downstream_task_names())}")
  eval_recipe = downstream.resolve(eval_name, setting="eval_task")
  m_ft, targets_len = config.pause.num_finetune, config.targets_len
  if targets_len + m_ft >= config.seq_len:
    raise UsageError.setting(
        "targets_len", targets_len, f"less than seq_len - pause.num_finetune = "
        f"{config.seq_len - m_ft}, so every prompt keeps at least one token")
  for r in (train_recipe, eval_recipe):
    r.ensure_prepared(data_dir)
  # The eval split is built like the training one: its loss is the answer loss, teacher-forced.
  # Generation metrics (exact match, ...) come from `python -m pausejax.evaluate`.
  pauses = [pause.finetune_pause_preprocessor(m_ft, config.pause.position)]
  build = dict(mode="train", tfds_data_dir=data_dir, extra_preprocessors=pauses)
  return Data(
      vocabulary=vocabulary,
      train_task=train_recipe.build(vocabulary, **build),
      eval_task=eval_recipe.build(vocabulary, **build),
      train_split=train_recipe.train_split,
      eval_split=eval_recipe.eval_split,
      converter=pause.PauseFTFeatureConverter(vocabulary.pause_id, pack=config.pack,
                                              prefix_lm=config.prefix_lm),
      feature_lengths={"inputs": config.seq_len - targets_len, "targets": targets_len},
  )


def num_shards(config: ml_collections.ConfigDict) -> int:
  """K: the shards the data is split into (`data_shards`; 0 = one per process)."""
  return config.get("data_shards", 0) or jax.process_count()


def shard_dataset(data: Data, config: ml_collections.ConfigDict, shard: int, *, train: bool,
                  batch_size: int) -> tf.data.Dataset:
  """Shard `shard` of `num_shards(config)`, batched: row block `shard` of the batches training
  reads (what `inspect_data` and `bench` look at)."""
  return _shard_dataset(data, config, seqio.ShardInfo(shard, num_shards(config)), train=train,
                        batch_size=batch_size)


def _shard_dataset(data: Data, config: ml_collections.ConfigDict, shard: seqio.ShardInfo, *,
                   train: bool, batch_size: int) -> tf.data.Dataset:
  """One shard's batches. Training drops a last partial batch (it repeats forever anyway);
  evaluation keeps it, so the whole split is scored (`EvalBatches` pads it)."""
  # Every shard uses the same seed: when seqio shards by example (fewer files than shards), the
  # shards are disjoint only if they all see the source in the same order.
  task = data.train_task if train else data.eval_task
  lengths = data.feature_lengths
  ds = task.get_dataset(
      sequence_length=lengths,
      split=data.train_split if train else data.eval_split,
      shuffle=train,
      seed=config.seed if train else 0,
      shard_info=shard,
      num_epochs=None if train else 1,  # Training repeats forever; eval is one pass.
      use_cached=False,
      # No in-memory cache: it would be written into every data-iterator checkpoint.
      try_in_mem_cache=False,
  )
  ds = data.converter(ds, lengths)
  ds = ds.batch(batch_size, drop_remainder=train)
  if not train and config.num_eval_steps:
    ds = ds.take(config.num_eval_steps)
  return ds.prefetch(tf.data.AUTOTUNE)


def to_numpy(batch) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Multi-host input: which shards this process reads, and their batches joined.


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  num_shards: int           # K: the data's shards; row block s of a global batch is shard s.
  shards: tuple[int, ...]   # The shards this process reads, in row order.
  rows_per_shard: int       # global_batch_size / K.


def plan(config: ml_collections.ConfigDict, batch_sharding: jax.sharding.Sharding) -> ShardPlan:
  """The shards this process must read to feed the rows of the batch that its devices hold.

  Raises UsageError (before anything is read or written) if the batch does not split into
  `data_shards` equal shards, or a process would need part of a shard.
  """
  batch = config.global_batch_size
  k = num_shards(config)
  if batch % k:
    raise UsageError.setting("global_batch_size", batch,
                             f"must be divisible by the {k} data shards (data_shards; "
                             "0 = one per process)")
  per = batch // k
  rows = set()
  for index in batch_sharding.addressable_devices_indices_map((batch, config.seq_len)).values():
    rows.update(range(*index[0].indices(batch)))
  shards = tuple(sorted({r // per for r in rows}))
  if len(shards) * per != len(rows):  # Some shard is only partly this process's.
    groups = batch // len(rows)
    raise UsageError.setting(
        "data_shards", config.get("data_shards", 0),
        f"a multiple of {groups}: the batch is split over {groups} groups of processes, and each "
        f"must read whole shards (this process holds {len(rows)} of the {batch} rows)")
  return ShardPlan(k, shards, per)


def _digests(batch: dict[str, np.ndarray]) -> list[str]:
  """A short digest of each example (row) of `batch`, over all of its features."""
  out = []
  for row in range(len(next(iter(batch.values())))):
    h = hashlib.sha256()
    for key in sorted(batch):
      h.update(key.encode() + np.ascontiguousarray(batch[key][row]).tobytes())
    out.append(h.hexdigest()[:16])
  return out


class ShardedIterator:
  """This process's rows of each training batch: one batch per shard, in row order.

  Each shard keeps its own `tf.data` iterator (`shard_iterators`, by shard number) so that
  `checkpoint.py` can save and restore each shard's position on its own, whichever process reads
  it. With `digest_path`, every draw appends one JSON line (process, draw number, and for each
  shard a digest of each of its examples) to that file: a record of what this process fed.
  """

  def __init__(self, shard_iterators: dict[int, Any], num_shards: int,
               digest_path: str | None = None):
    self.shard_iterators = dict(sorted(shard_iterators.items()))
    self.num_shards = num_shards
    self._digest_path = digest_path
    self._draws = 0
    if digest_path:
      tf.io.gfile.makedirs(os.path.dirname(digest_path))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = {s: to_numpy(next(it)) for s, it in self.shard_iterators.items()}
    first = next(iter(parts.values()))
    batch = first if len(parts) == 1 else {
        k: np.concatenate([p[k] for p in parts.values()]) for k in first}
    self._draws += 1
    if self._digest_path:
      line = {"process": jax.process_index(), "draw": self._draws,
              "shards": {str(s): _digests(p) for s, p in parts.items()}}
      with tf.io.gfile.GFile(self._digest_path, "a") as f:
        f.write(json.dumps(line) + "\n")
    return batch


def train_iterator(data: Data, config: ml_collections.ConfigDict, shard_plan: ShardPlan,
                   digest_dir: str | None = None) -> ShardedIterator:
  """This process's training batches (numpy), endless; see `ShardedIterator`."""
  iterators = {
      s: iter(_shard_dataset(data, config, seqio.ShardInfo(s, shard_plan.num_shards), train=True,
                             batch_size=shard_plan.rows_per_shard))
      for s in shard_plan.shards}
  path = digest_dir and os.path.join(digest_dir, f"process_{jax.process_index()}.jsonl")
  return ShardedIterator(iterators, shard_plan.num_shards, path)


class EvalBatches:
  """This process's rows of each eval batch (numpy): its shards of the held-out split, joined.

  Every row block has `rows_per_shard` rows: a shard's last partial batch, and a shard that has
  run out while another has not, are filled with all-zero rows, whose loss weight is 0. So an
  uneven split is scored whole (`num_eval_steps=0`) and every batch has the compiled shape.
  `zeros()` is a batch of such rows only: a process that has run out feeds it while others still
  have batches (see `train.evaluate`). Iterating again starts a fresh pass.
  """

  def __init__(self, data: Data, config: ml_collections.ConfigDict, shard_plan: ShardPlan):
    self._datasets = [
        _shard_dataset(data, config, seqio.ShardInfo(s, shard_plan.num_shards), train=False,
                       batch_size=shard_plan.rows_per_shard)
        for s in shard_plan.shards]
    self._rows = shard_plan.rows_per_shard
    spec = self._datasets[0].element_spec
    self._features = {k: (v.shape[1:], v.dtype.as_numpy_dtype) for k, v in spec.items()}

  def _pad(self, part: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    out = {}
    for k, (shape, dtype) in self._features.items():
      block = np.zeros((self._rows, *shape), dtype)
      if part is not None:
        block[:len(part[k])] = part[k]
      out[k] = block
    return out

  def _join(self, parts) -> dict[str, np.ndarray]:
    blocks = [self._pad(p) for p in parts]
    return {k: np.concatenate([b[k] for b in blocks]) for k in self._features}

  def zeros(self) -> dict[str, np.ndarray]:
    return self._join([None] * len(self._datasets))

  def __iter__(self):
    iterators = [ds.as_numpy_iterator() for ds in self._datasets]
    while True:
      parts = [next(it, None) for it in iterators]
      if all(p is None for p in parts):
        return
      yield self._join(parts)


def eval_dataset(data: Data, config: ml_collections.ConfigDict,
                 shard_plan: ShardPlan) -> EvalBatches:
  """This process's eval batches; see `EvalBatches`."""
  return EvalBatches(data, config, shard_plan)
