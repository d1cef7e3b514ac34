"""The input pipeline: a config in, batches of seqio model features out.

    config.task --registry.resolve--> the run's seqio Task(s): a Task, or a Mixture's tasks
      -> Task.get_dataset(split, seed, ShardInfo(s, K))  one shard only, per task
      -> PauseLM/PauseFT FeatureConverter                decoder_* features, no loss on pauses
      -> (a Mixture) sample the tasks at their rates     each row tagged with its task
      -> batch(global_batch_size / K)

A Mixture's tasks are converted before they are mixed (with `pack`, a packed row holds one task's
examples), so every row has a task index: `ShardedIterator` counts the rows of each task, and
training logs them. Sampling is a `tf.data` op, so a mixture's position is checkpointed too.

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

from pausejax import backspace
from pausejax import pause
from pausejax import readers
from pausejax import registry
from pausejax import sinks
from pausejax import specials
from pausejax.errors import RunError
from pausejax.errors import UsageError

# TF must not grab accelerators or threads that JAX needs.
tf.config.set_visible_devices([], "GPU")

TASK_INDEX = "task_index"  # Which task of a mixture a row comes from; never fed to the model.


@dataclasses.dataclass
class Data:
  """Everything the training loop needs to know about its data."""
  vocabulary: specials.SpecialsVocabulary
  train: registry.RunTask
  eval: registry.RunTask
  converter: seqio.FeatureConverter  # PauseLM (pretraining) or PauseFT (fine-tuning).
  feature_lengths: dict[str, int]    # Task feature lengths: {"targets": L} or inputs + targets.

  @property
  def pause_id(self) -> int:
    return self.vocabulary.pause_id


def vocab_path(config: ml_collections.ConfigDict) -> str:
  """The run's SentencePiece model: `vocab_path`, else its task's."""
  return registry.vocab_path(config)


def prepare(config: ml_collections.ConfigDict) -> Data:
  """Resolves tasks and vocabulary and checks the data exists. Raises UsageError, writes nothing.

  A pretraining task gives the PausePT stream; a fine-tuning task ("inputs" and "targets", e.g.
  a downstream task of downstream.py) gives PauseFT examples, `prompt + pause.num_finetune x
  <pause> + answer`, loss on the answer only. See `registry` for what is added to a task.
  """
  train = registry.resolve(config, "task")
  evaluation = registry.resolve(config, "eval_task")
  if evaluation.start != train.start:
    raise UsageError.setting("eval_task", evaluation.name, f"a task that starts like `task` "
                             f"{train.name} (start token {train.start}, not {evaluation.start})")
  if evaluation.kind != train.kind:
    raise UsageError.setting("eval_task", evaluation.name, f"a {train.kind} task like `task` "
                             f"{train.name} (it is a {evaluation.kind} task)")
  if specials.model_file(evaluation.vocabulary) != specials.model_file(train.vocabulary):
    raise UsageError.setting("eval_task", evaluation.name,
                             f"a task with the vocabulary of {train.name}")
  if train.kind == registry.PRETRAINING:
    # "bos": seqio shifts BOS in; "sink" and "none": the chunk is fed as it is (sinks.py).
    converter = pause.PauseLMFeatureConverter(
        train.vocabulary.pause_id, sink_id=train.vocabulary.sink_id, pack=config.pack,
        shift=train.start == sinks.BOS)
    lengths = {"targets": config.seq_len}
  else:
    m_ft, targets_len = config.pause.num_finetune, config.targets_len
    if targets_len + m_ft >= config.seq_len:
      raise UsageError.setting(
          "targets_len", targets_len, f"less than seq_len - pause.num_finetune = "
          f"{config.seq_len - m_ft}, so every prompt keeps at least one token")
    # The eval split is built like the training one: its loss is the answer loss,
    # teacher-forced. Generation metrics (exact match, ...) come from `pausejax.evaluate`.
    converter = pause.PauseFTFeatureConverter(train.vocabulary.pause_id, pack=config.pack,
                                              bos_id=train.start_ids[0],
                                              prefix_lm=config.prefix_lm)
    lengths = {"inputs": config.seq_len - targets_len, "targets": targets_len}
  return Data(vocabulary=train.vocabulary, train=train, eval=evaluation, converter=converter,
              feature_lengths=lengths)


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
  run_task = data.train if train else data.eval
  lengths = data.feature_lengths
  datasets = []
  for index, part in enumerate(run_task.parts):
    # Every shard uses the same seed: when seqio shards by example (fewer files than shards),
    # the shards are disjoint only if they all see the source in the same order.
    ds = part.task.get_dataset(
        sequence_length=lengths,
        split=part.split,
        shuffle=train,
        seed=config.seed if train else 0,
        shard_info=shard,
        num_epochs=None if train else 1,  # Training repeats forever; eval is one pass.
        use_cached=False,
        # No in-memory cache: it would be written into every data-iterator checkpoint.
        try_in_mem_cache=False,
    )
    ds = data.converter(ds, lengths)
    if run_task.backspace_rate:  # Positions and lifetimes that hide deleted tokens.
      ds = backspace.add_edit_structure(ds, data.vocabulary.backspace_id)
    if run_task.is_mixture:
      ds = ds.map(lambda ex, i=index: {**ex, TASK_INDEX: tf.constant(i, tf.int32)})
    datasets.append(ds)
  if run_task.is_mixture:
    # Each shard draws its own sequence of tasks; evaluation reads every task to its end.
    weights = [p.weight for p in run_task.parts]
    ds = tf.data.Dataset.sample_from_datasets(
        datasets, weights=[w / sum(weights) for w in weights],
        seed=(config.seed if train else 0) * 1_000_003 + shard.index,
        stop_on_empty_dataset=False)
  else:
    ds = datasets[0]
  ds = ds.batch(batch_size, drop_remainder=train)
  if not train and config.num_eval_steps:
    ds = ds.take(config.num_eval_steps)
  return ds.prefetch(tf.data.AUTOTUNE)


def to_numpy(batch) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in batch.items()}


def sources(run_task: registry.RunTask) -> str:
  """Where each part of `run_task` is read from: task, split, and its files or TFDS dataset."""
  out = []
  for part in run_task.parts:
    source, where = part.task.source, ""
    if part.split in getattr(source, "patterns", {}):  # readers.FileSplits: users' files.
      where = f": {source.patterns[part.split]}"
    elif getattr(source, "tfds_dataset", None) is not None:
      tfds = source.tfds_dataset
      where = f": TFDS {tfds.name}" + (f" in {tfds.data_dir}" if tfds.data_dir else "")
    out.append(f"task {part.name}, split {part.split}{where}")
  return "; ".join(out)


def read_error(what: str, e: tf.errors.OpError, where: str) -> RunError:
  """One line for a `tf.data` failure reading the `what` data; `where` (`sources`) is added
  when the error names no file (a TFRecord cut short, a corrupt gzip stream)."""
  line = readers.error_line(e)
  if where and "/" not in line:
    line += f" (in {where})"
  return RunError(f"the {what} data cannot be read: {line}")


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
               digest_path: str | None = None, num_tasks: int = 1, sources: str = ""):
    self.shard_iterators = dict(sorted(shard_iterators.items()))
    self.num_shards = num_shards
    self._sources = sources  # Where the data comes from, for errors that name no file.
    self._digest_path = digest_path
    self._draws = 0
    self._task_rows = np.zeros(num_tasks, np.int64)
    if digest_path:
      tf.io.gfile.makedirs(os.path.dirname(digest_path))

  def __iter__(self):
    return self

  def _next(self, shard: int, iterator) -> dict[str, np.ndarray]:
    try:
      batch = to_numpy(next(iterator))
    except StopIteration:
      raise RunError(f"data shard {shard} of {self.num_shards} has no training examples (an "
                     "empty file, or fewer documents than shards)") from None
    except tf.errors.OpError as e:
      raise read_error("training", e, self._sources) from None
    if TASK_INDEX in batch:
      self._task_rows += np.bincount(batch.pop(TASK_INDEX), minlength=len(self._task_rows))
    return batch

  def take_task_rows(self) -> np.ndarray:
    """Rows of each task of the mixture read by this process since the last call."""
    rows, self._task_rows = self._task_rows, np.zeros_like(self._task_rows)
    return rows

  def __next__(self) -> dict[str, np.ndarray]:
    parts = {s: self._next(s, it) for s, it in self.shard_iterators.items()}
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
  return ShardedIterator(iterators, shard_plan.num_shards, path, len(data.train.parts),
                         sources(data.train))


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
    self._sources = sources(data.eval)
    spec = self._datasets[0].element_spec
    self._features = {k: (v.shape[1:], v.dtype.as_numpy_dtype) for k, v in spec.items()
                      if k != TASK_INDEX}

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
      try:
        parts = [next(it, None) for it in iterators]
      except tf.errors.OpError as e:
        raise read_error("eval", e, self._sources) from None
      if all(p is None for p in parts):
        return
      yield self._join(parts)


def eval_dataset(data: Data, config: ml_collections.ConfigDict,
                 shard_plan: ShardPlan) -> EvalBatches:
  """This process's eval batches; see `EvalBatches`."""
  return EvalBatches(data, config, shard_plan)
