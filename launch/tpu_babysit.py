"""What `launch/tpu_pod.py babysit` decides, and the loop that does it.

Every poll it reads the state and health of each slice and what training does on every worker,
then does one of: nothing (training runs, or the slice is settling), resume training (it stopped
early with exit code 75, or a reboot took it away), set up and resume (a fresh slice), recreate
the slice (preempted, terminated, gone, or unhealthy for too long), finish (every worker exited
0) or give up (a crash, which would only crash again, or the recreation budget is spent).

Only successful recreations count against --max_restarts. A failed attempt (no capacity, a
queued resource that FAILED) is retried after a back-off that doubles up to a cap, with jitter,
so a stockout of hours does not end babysitting. What babysit waits for is written to a small
state file that `status` prints.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from typing import Callable

from launch import _common

# How a slice is, from its state (and health) in the Cloud TPU API.
HEALTHY, SETTLING, UNHEALTHY, GONE, NO_ANSWER = (
    "healthy", "settling", "unhealthy", "gone", "no answer")
_SEVERITY = (GONE, NO_ANSWER, SETTLING, UNHEALTHY, HEALTHY)  # Worst first.

MISSING = "MISSING"  # describe said NOT_FOUND.
UNREADABLE = "(gcloud could not tell)"  # describe failed otherwise; never an API state.

# Node.State: passing states wait; PREEMPTED, TERMINATED, STOPPED and UNKNOWN ("unknown state
# after a failed repair") mean the slice must be made again.
NODE_SETTLING = {"CREATING", "STARTING", "RESTARTING", "REIMAGING", "REPAIRING", "STOPPING",
                 "DELETING", "HIDING", "HIDDEN", "UNHIDING", "STATE_UNSPECIFIED", ""}
NODE_GONE = {"PREEMPTED", "TERMINATED", "STOPPED", "UNKNOWN", MISSING}
# Node.Health of a READY node: UNHEALTHY_MAINTENANCE "will resume running once rescheduled";
# TIMEOUT, UNHEALTHY_TENSORFLOW, DEPRECATED_UNHEALTHY (and anything newer) are unhealthy.
HEALTH_OK = {"HEALTHY", "HEALTH_UNSPECIFIED", ""}
HEALTH_SETTLING = {"UNHEALTHY_MAINTENANCE"}
# QueuedResourceState.State.
QUEUED_SETTLING = {"CREATING", "ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES",
                   "SUSPENDING", "DELETING", "STATE_UNSPECIFIED", ""}
QUEUED_GONE = {"FAILED", "SUSPENDED", MISSING}

# What training does, from every worker's answer.
FINISHED, RESUME, SETUP, RUNNING, PARTIAL, WAIT, CRASHED = (
    "finished", "resume", "setup", "running", "partial", "wait", "crashed")


def node_kind(state: str, health: str = "") -> tuple[str, str]:
  """(kind, text) of one TPU node from its state and health."""
  text = state + (f" (health {health})" if health not in HEALTH_OK else "")
  if state == UNREADABLE:
    return NO_ANSWER, state
  if state == "READY":
    if health in HEALTH_OK:
      return HEALTHY, text
    return (SETTLING if health in HEALTH_SETTLING else UNHEALTHY), text
  if state in NODE_GONE:
    return GONE, text
  if state not in NODE_SETTLING:
    text += ", a state this launcher does not know: waiting"
  return SETTLING, text


def queued_kind(state: str) -> tuple[str, str]:
  """(kind, text) of a queued resource from its state; ACTIVE means: look at its nodes."""
  if state == UNREADABLE:
    return NO_ANSWER, state
  if state == "ACTIVE":
    return HEALTHY, state
  if state in QUEUED_GONE:
    return GONE, state
  return SETTLING, state or "pending"


def worst(rows: list[tuple[str, str, str]]) -> tuple[str, str]:
  """(kind, text) of a slice or multislice from its (label, kind, text) rows."""
  for kind in _SEVERITY:
    hits = [(label, text) for label, k, text in rows if k == kind]
    if hits:
      if len(rows) == 1:
        return kind, hits[0][1]
      return kind, "; ".join(f"{label} {text}" for label, text in hits)
  return NO_ANSWER, "no slice"


def verdict(answers: list[str]) -> tuple[str, str]:
  """(what, detail) from the workers' answers (`running`, `exited N`, `not running`, ...).

  Exit code 0 everywhere is a finished run. 75 (stopped before its last step) or a vanished
  process (a reboot) means resume. Other codes with nothing running are a crash; some workers
  running and others not is PARTIAL (the rest usually follows within minutes).
  """
  if not answers or "unreachable" in answers:
    return WAIT, "not every worker answered"
  if "not set up" in answers:
    return SETUP, "not set up"
  running = answers.count("running")
  if running == len(answers):
    return RUNNING, "running"
  if running:
    return PARTIAL, f"running on {running} of {len(answers)} workers"
  codes = [a.split()[1] for a in answers if a.startswith("exited ") and len(a.split()) > 1]
  if len(codes) == len(answers) and set(codes) == {"0"}:
    return FINISHED, "exited 0"
  stopped_early = str(_common.EXIT_STOPPED_EARLY)
  if stopped_early in codes or "not running" in answers:
    why = ("stopped before its last step (exit code 75)" if stopped_early in codes
           else "not running (e.g. after a reboot)")
    return RESUME, why
  failed = sorted(set(codes) - {"0"}, key=lambda c: (len(c), c))
  return CRASHED, f"exit code {', '.join(failed) or '?'}"


def backoff(failures: int, base: float, cap: float, rng: Callable[[], float]) -> float:
  """Seconds before the next attempt after `failures` failed ones in a row: base * 2^(n-1),
  at most `cap`, then anywhere in its upper half (jitter)."""
  raw = min(cap, base * 2 ** min(failures - 1, 32))
  return raw / 2 + rng() * raw / 2


# ---------------------------------------------------------------------------------------------
# The state file that `status` reads
# ---------------------------------------------------------------------------------------------

def state_path(name: str, zone: str | None, project: str | None) -> str:
  """Where babysit says what it is doing: $XDG_STATE_HOME/pausejax (default ~/.local/state)."""
  base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "state")
  return os.path.join(base, "pausejax", f"babysit-{project or '-'}-{zone or '-'}-{name}.json")


class Journal:
  """Keeps the state file up to date (atomically) with what babysit waits for."""

  def __init__(self, path: str, clock: Callable[[], float], max_restarts: int):
    self.path, self.clock = path, clock
    self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": clock(),
                   "recreations": 0, "max_restarts": max_restarts}

  def note(self, doing: str, **extra) -> None:
    self.record.update(doing=doing, updated=self.clock(), **extra)
    if "next_attempt" not in extra:
      self.record.pop("next_attempt", None)
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      tmp = f"{self.path}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        json.dump(self.record, f)
      os.replace(tmp, self.path)
    except OSError as e:  # Babysitting matters more than its status line.
      print(f"warning: cannot write {self.path}: {e.strerror}", flush=True)


def describe(path: str, now: float) -> str | None:
  """One line for `status` from the state file, or None when there is none."""
  try:
    with open(path) as f:
      r = json.load(f)
  except (OSError, ValueError):
    return None
  alive = r.get("host") == socket.gethostname() and _alive(r.get("pid"))
  who = (f"babysit (pid {r.get('pid')}, {_ago(now - r.get('updated', now))})" if alive else
         f"babysit is not running here; it last said ({_ago(now - r.get('updated', now))})")
  line = f"{who}: {r.get('doing', '?')}"
  if r.get("next_attempt"):
    line += f"; next attempt in {max(0, round(r['next_attempt'] - now))} s"
  line += f"; recreations used: {r.get('recreations', 0)} of {r.get('max_restarts', '?')}"
  if r.get("last_error"):
    line += f"; last error: {r['last_error']}"
  return line


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (OSError, TypeError, ValueError):
    return False
  return True


def _ago(seconds: float) -> str:
  seconds = max(0, round(seconds))
  return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def dry_run(pod) -> int:
  a, runner = pod.args, pod.runner
  runner.comment(f"every {a.poll_seconds:g} s: the state and health of the slice, and training "
                 "on every worker")
  pod.health()
  pod.probe()
  runner.comment("when training stopped early (exit code 75) or vanished: start it again (it "
                 "resumes from the workdir)")
  pod.run()
  runner.comment(f"when the slice is preempted, gone or unhealthy (at most {a.max_restarts} "
                 f"recreations; a failed attempt is retried after {a.poll_seconds:g} s, doubling "
                 f"up to {a.max_backoff_seconds:g} s):")
  pod.delete(check=False)
  pod.create()
  pod.setup()
  pod.run()
  return 0


def babysit(pod, *, sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.time,
            rng: Callable[[], float] = random.random) -> int:
  """Watches the slice until training finishes; recreates, sets up and resumes as needed."""
  a = pod.args
  if pod.runner.dry_run:
    return dry_run(pod)
  journal = Journal(state_path(a.name, a.zone, a.project), clock, a.max_restarts)
  pod.note = journal.note  # A queued resource reports its wait for capacity through it.
  pod.sleep = sleep
  recreations = failures = patience = 0
  while True:
    kind, text = pod.health()
    action, doing = None, None
    if kind in (HEALTHY, UNHEALTHY):
      what, detail = verdict(pod.probe())
      if what == FINISHED:
        journal.note("nothing: training finished")
        print(f"training finished on {pod.name}", flush=True)
        return 0
      if what == CRASHED:
        journal.note(f"nothing: training crashed ({detail})")
        raise _common.CommandError(
            f"training exited with {detail} on {pod.name}; see `launch/tpu_pod.py logs` (a crash "
            "is not restarted: it would only crash again)")
      if (kind == UNHEALTHY and what != RUNNING) or what == PARTIAL:
        patience += 1
        why = f"slice {text}" if kind == UNHEALTHY else f"training {detail}"
        if patience > a.unhealthy_polls:
          action = "recreate" if kind == UNHEALTHY else "restart"
        else:
          doing = f"watching: {why} ({patience} of {a.unhealthy_polls} polls before acting)"
      else:
        patience = 0
        action = {SETUP: "setup", RESUME: "resume"}.get(what)
        doing = (f"watching: training {detail}" + (f"; slice {text}" if kind == UNHEALTHY else "")
                 if what == RUNNING else f"an answer from the workers ({detail})")
        if action:
          print(f"training on {pod.name}: {detail}; "
                + ("setting up and resuming" if action == "setup" else "resuming it"), flush=True)
    elif kind == GONE:
      action = "recreate"
    else:
      patience = 0
      doing = (f"the slice to settle: {text}" if kind == SETTLING
               else "gcloud to say what the slice is")
    delay = a.poll_seconds
    if action == "recreate":
      if recreations >= a.max_restarts:
        journal.note(f"nothing: the slice is {text} and the recreations are used up")
        raise _common.CommandError(
            f"slice {pod.name} is {text} and needs recreating, but the --max_restarts="
            f"{a.max_restarts} recreations are used up")
      print(f"slice {pod.name} is {text}: recreating it (recreation {recreations + 1} of at "
            f"most {a.max_restarts})", flush=True)
    if action:
      journal.note(f"{action}: {text if action == 'recreate' else 'training'}")
      try:
        if action == "recreate":
          pod.delete(check=False)
          pod.create()
          recreations += 1  # Only a slice that was really made again counts.
          journal.record["recreations"] = recreations
        if action == "restart":  # Some workers still hold the run: end it everywhere first.
          pod.stop(a.grace_seconds)
        if action in ("recreate", "setup"):
          pod.setup()
        pod.run()
        failures = patience = 0
        journal.note("watching: training started", last_error=None)
      except _common.CommandError as e:  # E.g. no capacity right now: try again, later each time.
        failures += 1
        delay = backoff(failures, a.poll_seconds, a.max_backoff_seconds, rng)
        print(f"{action} failed (attempt {failures} in a row, not counted as a recreation); "
              f"next attempt in {delay:.0f} s: {e}", flush=True)
        what = "capacity to recreate the slice" if action == "recreate" else f"a retry ({action})"
        journal.note(f"waiting for {what}: {failures} failed attempt(s) in a row",
                     last_error=str(e), next_attempt=clock() + delay)
    elif doing:
      journal.note(doing)
    sleep(delay)
