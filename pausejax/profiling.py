"""Where a training run's time goes: a phase timer, profiler annotations and a trace window.

    prof = profiling.Profiler(workdir, config.profile, first_step=start_step + 1,
                              last_step=config.num_train_steps, is_lead_host=lead)
    with prof.step(step, sync=guard.check):        # StepTraceAnnotation("train", step_num=step)
      with prof.phase("input"):                      # TraceAnnotation("input") + a timer
        ...
    logger.write(step, prof.take())   # time/<phase> seconds since the last take
    prof.summary()                    # the same over the whole run, for the summary
    prof.close()

The time split. Each phase's wall time on the host in seconds, since the last log line (`take`)
and over the run (`summary`); `time/other` is the rest of `time/wall` (logging, the loop
itself), so the parts add up to `time/wall`. A logged step's eval and checkpoint come after its
log line: they count in the next line's split (the last ones in the summary only).

  input            next(train_iter) (SequenceMatch's sample refresh included) and the batch put
                   on the devices;
  compute          the train step's dispatch and the waits for the device: a step is
                   dispatched asynchronously, so its device time shows up where the host waits
                   for it (the finite check of the previous step, the metrics fetched at a log
                   line). The input of step N+1 is read while the device runs step N: input time
                   the device covered is not lost, and only a large input share with a small
                   compute share means the run is input-bound;
  eval             held-out loss and accuracy; downstream_eval: `eval_tasks` decoding;
  checkpoint       saving (the blocking part of an async save) and the checks of earlier saves;
  trace            starting the profiler and writing its trace (only with `profile.num_steps`).

The trace window. With `profile.num_steps` > 0, steps `profile.start_step` ...
`start_step + num_steps - 1` are traced with `jax.profiler` into `<workdir>/profile/` in the
layout of TensorBoard's profile plugin (`plugins/profile/<time>/<host>.xplane.pb`, and
`<host>.trace.json.gz`, which Perfetto opens). The lead process traces; the others only
annotate. The annotations cost next to nothing when no trace runs, so a trace taken from
outside (`jax.profiler.start_server`) has them too.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator

import jax

PHASES = ("input", "compute", "eval", "downstream_eval", "checkpoint", "trace")
PROFILE_DIRNAME = "profile"


class Profiler:
  """The phase timer and the trace window of one training run (steps count from 1)."""

  def __init__(self, workdir: str, profile_cfg: Any, *, first_step: int, last_step: int,
               is_lead_host: bool, clock: Callable[[], float] = time.perf_counter):
    self.directory = os.path.join(workdir, PROFILE_DIRNAME)
    self._clock = clock
    num = int(profile_cfg.get("num_steps", 0)) if profile_cfg else 0
    start = int(profile_cfg.get("start_step", 1)) if profile_cfg else 1
    # A resumed run traces what is left of the window; a window already passed, nothing.
    self._trace = None
    if num and is_lead_host and start + num - 1 >= first_step and start <= last_step:
      self._trace = (max(start, first_step), min(start + num - 1, last_step))
    self._tracing = False
    self._window = dict.fromkeys(PHASES, 0.0)
    self._total = dict.fromkeys(PHASES, 0.0)
    self._window_start = self._run_start = clock()

  @property
  def trace_steps(self) -> tuple[int, int] | None:
    """(first, last) step this process traces, or None."""
    return self._trace

  @contextlib.contextmanager
  def step(self, step: int, sync: Callable[[], Any] | None = None) -> Iterator[None]:
    """Annotates training step `step` (the one that ends at state step `step`); starts the
    trace at the window's first step, ends it after its last. `sync()` is called before a
    trace ends and must wait for the device (e.g. read the step's metrics), so the trace holds
    the last step's device work, not only its dispatch."""
    if self._trace and step == self._trace[0]:
      with self.phase("trace"):
        jax.profiler.start_trace(self.directory)  # Creates the directory.
      self._tracing = True
      print(f"profile: tracing steps {self._trace[0]}-{self._trace[1]} into {self.directory}",
            flush=True)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      yield
    if self._tracing and step == self._trace[1]:
      if sync is not None:
        with self.phase("compute"):  # The wait for the device.
          sync()
      with self.phase("trace"):
        self._stop()

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Times the block as `name` (one of PHASES) and annotates it in a trace."""
    start = self._clock()
    try:
      with jax.profiler.TraceAnnotation(name):
        yield
    finally:
      seconds = self._clock() - start
      self._window[name] += seconds
      self._total[name] += seconds

  def take(self) -> dict[str, float]:
    """`time/<phase>` seconds since the last take (or the start), `time/other` and `time/wall`;
    starts the next window."""
    now = self._clock()
    split = _split(self._window, now - self._window_start)
    self._window = dict.fromkeys(PHASES, 0.0)
    self._window_start = now
    return {f"time/{k}": v for k, v in split.items()}

  def summary(self) -> dict[str, float]:
    """{phase: seconds, "other": ..., "wall": ...} since the Profiler was made."""
    return _split(self._total, self._clock() - self._run_start)

  def close(self) -> None:
    """Ends a trace still running (a run stopped inside its window)."""
    if self._tracing:
      self._stop()

  def _stop(self) -> None:
    self._tracing = False
    jax.profiler.stop_trace()


def _split(phases: dict[str, float], wall: float) -> dict[str, float]:
  return {**phases, "other": max(wall - sum(phases.values()), 0.0), "wall": wall}
