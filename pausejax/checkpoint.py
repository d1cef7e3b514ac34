"""Checkpoints of the training state and the input pipeline's position, via Orbax.

`Checkpointer(directory, ...)` keeps one subdirectory per saved step, `<directory>/<step>/`,
holding two items:

  state/  the training state pytree (`{"step", "params", "opt_state"}`), written by
          Orbax's `StandardCheckpointHandler` (OCDBT/TensorStore, sharding-aware).
  data/   the position of the input pipeline: one `tf.train.Checkpoint` per data shard
          (`shard_<s>_of_<K>.*`, written by the process that reads shard s), or, for a plain
          `tf.data` iterator, one per process (`process_<i>.*`). Only written when an
          iterator is given.

`directory` should hold nothing but checkpoints (e.g. `<workdir>/checkpoints`).

Crash safety: a process killed at any moment (kill -9) leaves a restorable directory
----------------------------------------------------------------------------------
Orbax writes a step into `<step>.orbax-checkpoint-tmp/` (each item into
`<item>.orbax-checkpoint-tmp/` inside it). Only after every process has written all of its data
does the primary process rename the items, write `commit_success.txt` and rename the step
directory to `<step>/`. Renaming is atomic on POSIX filesystems; on GCS, where it is not, Orbax
instead counts a step as complete only once `commit_success.txt` exists. Only complete steps are
ever listed (`latest_step`, `has_checkpoint`, retention), so a save killed half-way leaves a
temporary directory that is never read. Old steps are deleted only after the new one is
committed, and never the newest, so a kill during deletion can leave a half-deleted *older* step
but never harms the newest complete one, which is what `restore(None, ...)` reads. On top of
that, creating a `Checkpointer` deletes the temporary directories left by a killed save
(synchronously, on the primary process, before anything else touches the directory).

Not covered: Orbax does not fsync, so a power loss or kernel crash (unlike a killed process)
may lose recently written files on filesystems that reorder writes.

Faults (`ckpt_faults`): a save that cannot be written raises one-line `SaveError` (a background
save as soon as `check_saves` sees it fail); `restore_newest` moves a checkpoint that cannot be
restored aside, never deleting it, and restores the newest one that can.

Multi-host
----------
Every process calls every method (Orbax synchronises them). `directory` must be one filesystem
that all processes see (GCS, NFS, ...). Arrays are written shard by shard by the processes that
hold them, and read back into whatever mesh and process count the restoring run has. Each
process writes the positions of the data shards it reads and, on restore, reads back those of
the shards it reads now, so the data position carries over to another number of processes as
long as the number of shards (`data_shards`) is the same. If it is not (with the default
`data_shards=0`, one shard per process, any change of the process count), the parameters,
optimizer state and step are restored but the input pipeline starts again from the beginning of
every shard, with a warning: examples seen before the checkpoint are seen again, in a different
order than an uninterrupted run would have used. A pipeline that no longer fits the saved
position (other data settings) is a `UsageError`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from pausejax import ckpt_faults
from pausejax.errors import UsageError

STATE = "state"
DATA = "data"

reading_policy = ckpt_faults.reading_policy  # For readers that reach `load_params_and_step`.

_DATA_FILE_PREFIX = "process_"
_SHARD_FILE = re.compile(r"shard_(\d+)_of_(\d+)$")


# ---------------------------------------------------------------------------------------------
# tf.data iterator position as an Orbax item.


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves `tf.data` iterator positions with `tf.train.Checkpoint`.

  The iterator is either a plain `tf.data` iterator (one file prefix per process) or one with
  `shard_iterators` ({shard: tf.data iterator}) and `num_shards`, like
  `pausejax.data.ShardedIterator` (one file prefix per shard, so another process may read it
  back). A saved layout that does not match the restoring iterator's is not an error: see the
  module docstring.

  Saving is synchronous on purpose: the iterator's position must be captured before the
  training loop draws the next batch. The state is small unless the pipeline holds large
  shuffle or prefetch buffers, which tf.data serialises too. The pipeline must be one tf.data
  can checkpoint (no `from_generator` or `py_function`). tf.data notices a changed pipeline
  structure on restore, but not changed parameters such as the batch size.
  """

  def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
    import tensorflow as tf  # Deferred: only runs whose pipeline is tf.data pay for the import.

    for name, iterator in _named_iterators(args.iterator).items():
      tf.train.Checkpoint(iterator=iterator).write(os.fspath(directory / name))

  def restore(self, directory: epath.Path, args: DataIteratorRestore) -> Any:
    """Moves the iterator(s) to the saved position; None if the shard layout changed."""
    import tensorflow as tf

    wanted = _named_iterators(args.iterator)
    saved = {p.name[:-len(".index")] for p in directory.glob("*.index")}
    # Every position is an .index file and its data; one without the other was damaged.
    data = {p.name.split(".data-")[0] for p in directory.glob("*.data-*")}
    if not saved or saved != data:
      raise ckpt_faults.Unreadable(
          f"the data positions in {directory} are incomplete (index files for "
          f"{sorted(saved) or 'none'}, data files for {sorted(data) or 'none'})")
    if _layout(saved) != _wanted_layout(args.iterator) or not set(wanted) <= saved:
      _warn_restart(directory, _layout(saved), _wanted_layout(args.iterator))
      return None
    for name, iterator in wanted.items():
      try:
        tf.train.Checkpoint(iterator=iterator).read(
            os.fspath(directory / name)).assert_consumed()
      except (tf.errors.OpError, AssertionError, ValueError) as e:
        # tf.data names a pipeline that does not fit as a missing iterator key; anything else
        # (a checksum, a short read) is damage to the files.
        misfit = not isinstance(e, tf.errors.OpError) or (
            isinstance(e, tf.errors.NotFoundError) and "restore dataset iterator" in str(e))
        if not misfit:
          raise ckpt_faults.Unreadable(
              f"{directory / name} cannot be read ({ckpt_faults.clean(str(e))})") from e
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"the data iterator in {directory} does not fit this input pipeline ({first_line});"
            " use the data settings of the checkpointed run or a fresh --workdir") from e
      except (OSError, IndexError) as e:  # A file cut short: "Read less bytes than requested".
        raise ckpt_faults.Unreadable(
            f"{directory / name} cannot be read ({ckpt_faults.reason(e)})") from e
    return args.iterator

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any  # A tf.data iterator (`iter(dataset)`) or a data.ShardedIterator.


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any  # A fresh iterator over the same pipeline; restored in place.


def _named_iterators(iterator: Any) -> dict[str, Any]:
  """{file prefix: tf.data iterator} that this process saves and restores."""
  shards = getattr(iterator, "shard_iterators", None)
  if shards is None:  # A plain tf.data iterator: one position per process.
    return {f"{_DATA_FILE_PREFIX}{jax.process_index()}": iterator}
  k = iterator.num_shards
  return {f"shard_{s:05d}_of_{k:05d}": it for s, it in shards.items()}


def _wanted_layout(iterator: Any) -> tuple[str, int]:
  if getattr(iterator, "shard_iterators", None) is None:
    return ("processes", jax.process_count())
  return ("shards", iterator.num_shards)


def _layout(names: set[str]) -> tuple[str, int] | None:
  """("shards", K) or ("processes", P) of the saved position files; None if unrecognised."""
  kinds = set()
  for name in names:
    match = _SHARD_FILE.fullmatch(name)
    kinds.add(("shards", int(match.group(2))) if match else
              ("processes", len(names)) if name.startswith(_DATA_FILE_PREFIX) else None)
  return kinds.pop() if len(kinds) == 1 else None


def _describe_layout(layout: tuple[str, int] | None) -> str:
  if layout is None:
    return "an unknown layout"
  kind, n = layout
  return f"{n} data shard(s)" if kind == "shards" else f"{n} process(es) (one position each)"


def _warn_restart(directory, saved_layout, wanted_layout) -> None:
  message = (
      f"data position not restored: {directory} holds the input positions of "
      f"{_describe_layout(saved_layout)} but this run reads {_describe_layout(wanted_layout)} on "
      f"{jax.process_count()} process(es). Parameters, optimizer state and step are restored; "
      "the input pipeline starts again from the beginning of every shard, so examples seen "
      "before this checkpoint are seen again and the data order differs from an uninterrupted "
      "run. To carry the position over, keep --config.data_shards the same (a multiple of "
      "every process count used).")
  if jax.process_index() == 0:  # Once, not once per process; printed so it is never filtered.
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Checkpointer.


def _as_path(directory: str | os.PathLike) -> epath.Path:
  directory = os.fspath(directory)
  if "://" not in directory:  # Local: Orbax compares paths, so make them absolute.
    directory = os.path.abspath(directory)
  return epath.Path(directory)


def has_checkpoint(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds at least one complete checkpoint. Creates nothing."""
  return latest_step(directory) is not None


def run_checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`, which must hold a complete checkpoint (checked; creates nothing)."""
  directory = os.path.join(workdir, "checkpoints")
  if not has_checkpoint(directory):
    raise UsageError.setting("--workdir", workdir,
                             f"no complete checkpoint in {directory}; train first")
  return directory


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest complete checkpoint's step in `directory`, or None. Creates nothing."""
  path = _as_path(directory)
  if not path.is_dir():
    return None
  return max(ocp.utils.checkpoint_steps(path), default=None)


def _remove_unfinished_saves(directory: epath.Path) -> None:
  """Deletes the temporary step directories that a killed save left behind.

  Orbax never reads them, but they take space and one may block the same step's next save.
  Done synchronously (Orbax's own clean-up runs in a background thread that nothing awaits
  before restore). Only names that parse as a step are touched: on GCS Orbax counts *any*
  directory without `commit_success.txt` as temporary.
  """
  if jax.process_index() != 0 or not directory.is_dir():
    return
  for tmp in ocp.step.all_temporary_paths(directory):
    path = tmp.get()
    try:
      ocp.step.step_from_checkpoint_name(path.name)
    except ValueError:
      continue
    path.rmtree()


class Checkpointer:
  """Saves and restores `(state, data iterator)` checkpoints in one directory.

  Call `save` after every training step; it writes only when `step % save_every_steps == 0`
  (or when the cluster signals a preemption, or with `force=True`). With `async_save`, `save`
  returns once the arrays are on the host and the iterator position is captured; the files are
  written in the background, so call `close()` (or `wait_until_finished()`) before exiting, and
  `check_saves()` after every step to stop as soon as a background save has failed.
  See the module docstring for what happens when a save is killed.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int, save_every_steps: int,
               async_save: bool = True, read_only: bool = False):
    # read_only: for readers (generate, evaluate) of a directory that a training run may be
    # writing: nothing is created, cleaned up, saved or deleted.
    # These come straight from the config (keep_checkpoints, checkpoint_every_steps).
    if not isinstance(keep, int) or keep < 1:
      raise UsageError.setting("keep_checkpoints", keep, "an integer >= 1")
    if not isinstance(save_every_steps, int) or save_every_steps < 1:
      raise UsageError.setting("checkpoint_every_steps", save_every_steps, "an integer >= 1")
    self._directory = _as_path(directory)
    self._name_format = ocp.step.standard_name_format()
    self.data_position_restored = False  # Set by `restore`.
    self._in_flight: int | None = None  # The step of a background save not yet waited for.
    if not read_only:
      _remove_unfinished_saves(self._directory)
      ckpt_faults.quiet_background_errors()

    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = ocp.StandardCheckpointHandler()
    registry.add(STATE, ocp.args.StandardSave, state_handler)
    registry.add(STATE, ocp.args.StandardRestore, state_handler)
    data_handler = DataIteratorHandler()
    registry.add(DATA, DataIteratorSave, data_handler)
    registry.add(DATA, DataIteratorRestore, data_handler)

    # Orbax's default policy also saves the first step it sees; we want exactly
    # "every N steps", plus a save when the cluster announces a preemption.
    save_policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
    ])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy,
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        step_name_format=self._name_format,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    self._manager = ocp.CheckpointManager(
        self._directory, options=options, handler_registry=registry)

  @property
  def directory(self) -> epath.Path:
    return self._directory

  def latest_step(self) -> int | None:
    """The newest checkpoint's step, or None.

    On a fresh start this is the newest *complete* checkpoint; afterwards it includes a save
    of this process that may still be finishing in the background.
    """
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all checkpoints, oldest first (as for `latest_step`; retention applied)."""
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether the save policy (every N steps, or a preemption) asks for a save at `step`."""
    return self._manager.should_save(int(step))

  def save(self, step: int, state: Any, data_iterator: Any = None, *,
           force: bool = False) -> bool:
    """Saves `state` (and the iterator's position) as `step` if the policy says so.

    Returns whether a save was started. A step that is already saved is skipped, so a final
    `save(..., force=True)` right after a periodic one is harmless. A save that cannot be
    written (this one, or the previous one in the background) raises `ckpt_faults.SaveError`.
    """
    step = int(step)
    if step in self._manager.all_steps() or not (force or self.should_save(step)):
      return False
    self.wait_until_finished()  # Orbax would wait too; this way a failure names its own step.
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[DATA] = DataIteratorSave(data_iterator)
    try:
      started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # The part written before `save` returns: sync saves, data positions.
      raise self._save_error(step, e) from None
    if started:
      self._in_flight = step
    return started

  def check_saves(self) -> None:
    """Raises `ckpt_faults.SaveError` if a background save has failed; call after every step.

    Never waits for a save that is still being written.
    """
    if self._in_flight is not None and not self._manager.is_saving_in_progress():
      self.wait_until_finished()

  def _save_error(self, step: int, error: BaseException) -> ckpt_faults.SaveError:
    last_good = max((s for s in ocp.utils.checkpoint_steps(self._directory) if s != step),
                    default=None) if self._directory.exists() else None
    return ckpt_faults.save_error(step, self._directory / str(step), self._directory, last_good,
                                  error)

  def restore(self, step: int | None, abstract_state: Any, data_iterator: Any = None) -> Any:
    """Restores the state saved at `step` (None: the latest) and, if given, the iterator.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with `.sharding` set; arrays are
    read straight into those shardings, which may differ from the ones they were saved with
    (another mesh, replicated, ...). `data_iterator` must be a fresh iterator over the same
    pipeline; it is moved, in place, to the position saved with the checkpoint. Where the saved
    positions are of another shard (or process) layout it is left at the start, with a
    warning, and `data_position_restored` is False. Damaged files raise
    `ckpt_faults.Unreadable` or the storage library's own error (see `restore_newest`).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {self._directory}")
    step = int(step)
    self._check_against(step, abstract_state)
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      step_dir = self._name_format.find_step(self._directory, step).path
      if not (step_dir / DATA).exists():
        raise UsageError(
            f"checkpoint {step_dir} holds no data iterator position, so the input pipeline"
            " cannot resume where it stopped; use a fresh --workdir")
      items[DATA] = DataIteratorRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    self.data_position_restored = data_iterator is not None and restored[DATA] is not None
    return restored[STATE]

  def restore_newest(self, abstract_state: Any, data_iterator: Any = None, *,
                     on_unreadable: str = "move_aside") -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores (as `restore`); (None, None) if
    there is no checkpoint.

    Newer checkpoints that cannot be restored are moved aside, with one WARNING line each, once
    an older one has restored; with `on_unreadable="refuse"` the first raises RunError instead,
    and so does a directory where none restores (nothing is moved then). A checkpoint of
    another model raises UsageError as `restore` does. See `ckpt_faults`.
    """
    return ckpt_faults.restore_newest(self, abstract_state, data_iterator, on_unreadable)

  def step_dir(self, step: int) -> epath.Path:
    """The directory of the complete checkpoint `step`."""
    return self._name_format.find_step(self._directory, int(step)).path

  def reload(self) -> None:
    """Lists the steps on disk again (after steps were moved away)."""
    self._manager.reload()

  def check_compatible(self, abstract_state: Any) -> None:
    """Raises `UsageError` if the latest checkpoint's arrays do not fit `abstract_state`.

    Reads only Orbax's metadata (shapes and dtypes), never the arrays. No-op without a
    checkpoint.
    """
    step = self.latest_step()
    if step is not None:
      self._check_against(step, abstract_state)

  def _check_against(self, step: int, abstract_state: Any) -> None:
    try:
      metadata = self._manager.item_metadata(step)[STATE]
    except Exception as e:
      raise ckpt_faults.Unreadable(
          f"its metadata in {STATE}/ cannot be read ({ckpt_faults.reason(e)})") from e
    if metadata is None:
      raise ckpt_faults.Unreadable(f"its metadata ({STATE}/_METADATA) is missing")
    stored = _shapes_by_name(metadata.tree)
    wanted = _shapes_by_name(abstract_state)
    advice = "use a fresh --workdir, or model.* settings that match the checkpoint"
    where = f"{self._directory} holds a checkpoint (step {step}) that does not fit this config"
    # Parameters first: a wrong parameter also makes its optimizer moments wrong.
    for name in sorted(wanted, key=lambda n: not n.startswith("params.")):
      if name not in stored:
        raise UsageError(f"{where}: {name} is in the config but not in the checkpoint; {advice}")
      (ck_shape, ck_dtype), (cfg_shape, cfg_dtype) = stored[name], wanted[name]
      if ck_shape != cfg_shape or ck_dtype != cfg_dtype:
        raise UsageError(
            f"{where}: {name} has {_describe(ck_shape, ck_dtype)} in the checkpoint but"
            f" {_describe(cfg_shape, cfg_dtype)} in the config; {advice}")
    for name in stored:
      if name not in wanted:
        raise UsageError(f"{where}: {name} is in the checkpoint but not in the config; {advice}")

  def wait_until_finished(self) -> None:
    """Blocks until a background save (and the clean-up of old steps) is done.

    Raises `ckpt_faults.SaveError` if it failed.
    """
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(step, e) from None

  def close(self) -> None:
    """Finishes pending saves (raising `ckpt_faults.SaveError` if one failed) and releases
    Orbax's resources."""
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _key_name(key: Any) -> str:
  # Same naming as Orbax's on-disk names: namedtuple fields and dict keys by name, tuple
  # entries by index ("opt_state.1.0.mu.embed.embedding").
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  raise TypeError(f"unsupported pytree key {key!r}")


def _shapes_by_name(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """`{"params.embed.embedding": (shape, dtype)}` for a pytree of arrays or array metadata."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
      ".".join(_key_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype))
      for path, leaf in leaves
  }


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
  return f"shape {shape} {dtype.name}"


# ---------------------------------------------------------------------------------------------
# Parameters only, for fine-tuning (`init_from`).

def _params_step_dirs(path: str, setting: str = "init_from") -> list[epath.Path]:
  """The step directories that `init_from=path` names, newest first: one, if `path` is a step
  directory; else the complete steps of a workdir or of its checkpoints/ directory."""
  root = _as_path(path)
  if (root / STATE).exists():
    return [root]
  if (root / "checkpoints").exists():
    root = root / "checkpoints"
  steps = []
  if root.exists():
    name_format = ocp.step.standard_name_format()
    steps = sorted(name_format.find_all(root), key=lambda m: m.step, reverse=True)
  if not steps:
    raise UsageError.setting(
        setting, path, "a workdir, its checkpoints/ directory or one step directory in it, "
        "holding a complete checkpoint")
  return [m.path for m in steps]


def load_params(path: str, abstract_params: Any, *, setting: str = "init_from",
                on_unreadable: str | None = None) -> Any:
  """The parameters of the checkpoint at `path` (see `_params_step_dirs`), nothing else.

  `abstract_params` gives shapes, dtypes and target shardings; the optimizer state and data
  position in the checkpoint are not read (a third of Adam's bytes). A checkpoint of another
  shape raises UsageError naming `setting`. Of a directory of steps the newest that can be read
  is used, with a WARNING line for each newer one that cannot ("move_aside"; nothing is moved
  here), or RunError ("refuse"); None takes `ckpt_faults.reading_policy`'s.
  """
  return load_params_and_step(path, abstract_params, setting=setting,
                              on_unreadable=on_unreadable)[0]


def load_params_and_step(path: str, abstract_params: Any, *, setting: str = "init_from",
                         on_unreadable: str | None = None) -> tuple[Any, int | None]:
  """(parameters, step) of the checkpoint at `path`; see `load_params`."""
  return ckpt_faults.read_newest(
      _params_step_dirs(path, setting),
      lambda step_dir: _read_params(step_dir, path, abstract_params, setting),
      on_unreadable or ckpt_faults.read_policy())


def _read_params(step_dir: epath.Path, path: str, abstract_params: Any,
                 setting: str) -> tuple[Any, int | None]:
  checkpointer = ocp.PyTreeCheckpointer()
  # A step directory written by this package's manager has no per-item metadata file, and Orbax
  # warns about it on every parameters-only read: a line readers cannot act on.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    stored = checkpointer.metadata(step_dir / STATE).item_metadata
  except Exception as e:
    raise ckpt_faults.Unreadable(
        f"its metadata in {STATE}/ cannot be read ({ckpt_faults.reason(e)})") from e
  finally:
    logging.set_verbosity(verbosity)
  if stored is None:
    raise ckpt_faults.Unreadable(f"its metadata ({STATE}/_METADATA) is missing")
  stored = stored.tree
  if not isinstance(stored, dict) or "params" not in stored:
    raise UsageError.setting(setting, path, f"a checkpoint with parameters ({step_dir} has none)")
  have = _shapes_by_name(stored["params"])
  want = _shapes_by_name(abstract_params)
  for name in sorted(set(have) | set(want)):
    if have.get(name) != want.get(name):
      got = _describe(*have[name]) if name in have else "nothing"
      need = _describe(*want[name]) if name in want else "nothing"
      raise UsageError.setting(
          setting, path, f"a checkpoint of this config's model: params.{name} is {got} there"
          f" but {need} here (check model.* and vocab_path)")
  item = {"params": abstract_params}
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    restored = checkpointer.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  finally:
    logging.set_verbosity(verbosity)
  return restored["params"], int(step_dir.name) if step_dir.name.isdigit() else None
