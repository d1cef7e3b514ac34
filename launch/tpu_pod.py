"""Creates a Cloud TPU slice, installs pausejax on every worker, runs and babysits training.

Every gcloud call is an argv list. Commands that run on the workers go through
`gcloud compute tpus tpu-vm ssh --command=STRING`; those strings are built with shlex.quote, so
any flag value (paths, URLs, training flags) reaches the worker as exactly one literal argument.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

if __package__ in (None, ""):  # Run as `python launch/tpu_pod.py`: make `launch` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import _common  # pylint: disable=g-import-not-at-top
from launch._common import UsageError, check  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARBALL = "pausejax-src.tar.gz"  # Name of the source tarball, locally under build/ and on workers.
LOG, PID, EXITCODE = "logs/train.log", "logs/train.pid", "logs/train.exitcode"
MARK = "pausejax-train:"  # Prefix of the status lines the workers print.

# Cloud TPU software versions per TPU generation (the first part of the accelerator type).
DEFAULT_RUNTIME = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
                   "v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                   "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
# Slice states (`describe --format=value(state)`, or state.state of a queued resource).
HEALTHY = {"READY", "ACTIVE"}
SETTLING = {"CREATING", "STARTING", "RESTARTING", "REPAIRING", "ACCEPTED", "PROVISIONING",
            "WAITING_FOR_RESOURCES", "SUSPENDING", "STOPPING", "DELETING", ""}
EXCLUDED = (".git", ".venv", "build", "runs", "__pycache__", "*.egg-info", ".pytest_cache")

EPILOG = """\
The TPU name, zone and project default to $PAUSEJAX_TPU_NAME, $CLOUDSDK_COMPUTE_ZONE and
$CLOUDSDK_CORE_PROJECT (else gcloud's own configuration). Training flags go after `--`.
--dry-run prints every command instead of running it.

examples:
  export PAUSEJAX_TPU_NAME=pj-v5p CLOUDSDK_COMPUTE_ZONE=us-east5-a CLOUDSDK_CORE_PROJECT=my-proj

  # 1. Create a v5p-32 slice (4 hosts) as spot capacity:
  python launch/tpu_pod.py create --accelerator_type=v5p-32 --spot

  # 2. Put this checkout on every worker and install it (or: --repo=URL --ref=BRANCH):
  python launch/tpu_pod.py setup

  # 3. Start training on all workers, detached; logs go to ~/pausejax/logs/train.log on each
  #    worker and to gs://my-bucket/runs/c4_130m_pause/logs/:
  python launch/tpu_pod.py run -- --config=configs/c4_130m.py \\
      --workdir=gs://my-bucket/runs/c4_130m_pause --config.tfds_data_dir=gs://my-bucket/tfds

  # 4. Watch it:
  python launch/tpu_pod.py status
  python launch/tpu_pod.py logs --worker=0 --follow

  # Keep it alive through preemptions: recreate, set up and restart (resumes from the workdir):
  python launch/tpu_pod.py babysit --accelerator_type=v5p-32 --spot -- \\
      --config=configs/c4_130m.py --workdir=gs://my-bucket/runs/c4_130m_pause

  # 5. Stop and delete:
  python launch/tpu_pod.py stop
  python launch/tpu_pod.py delete
"""


# ---------------------------------------------------------------------------------------------
# Shell text that runs on the workers. User values only ever appear through shlex.quote.
# ---------------------------------------------------------------------------------------------

def remote_path(path: str) -> str:
  """Shell text for `path` on a worker; a leading `~/` still means the home directory."""
  if path == "~":
    return '"$HOME"'
  if path.startswith("~/"):
    return '"$HOME"/' + shlex.quote(path[2:])
  return shlex.quote(path)


# Runs detached on each worker as `bash -c RUNNER pausejax-train LOG_DEST CMD...`: starts CMD,
# copies the log to LOG_DEST every 5 minutes and at the end (if given), then records CMD's exit
# code in EXITCODE (so that file means "finished, log copied").
RUNNER = (
    # The signal that stops training reaches the whole process group, so this shell ignores it
    # (`trap :`), waits for training to finish (e.g. writing a last checkpoint) and records why.
    'dest=$1; shift; sync=; trap : TERM INT HUP; '
    '"$@" & pid=$!; '
    'if [ -n "$dest" ]; then '
    'w=$(curl -sf -m 5 -H "Metadata-Flavor: Google" '
    '"http://${GCE_METADATA_IP:-metadata.google.internal}'
    '/computeMetadata/v1/instance/attributes/agent-worker-number" || hostname); '
    f'(while sleep 300; do gcloud storage cp {LOG} "$dest/worker-$w.log" >/dev/null 2>&1; done) '
    '& sync=$!; fi; '
    'wait "$pid"; rc=$?; '
    'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done; '
    'if [ -n "$sync" ]; then pkill -P "$sync" 2>/dev/null; kill "$sync" 2>/dev/null; '
    f'gcloud storage cp {LOG} "$dest/worker-$w.log" >/dev/null 2>&1; fi; '
    f'echo "$rc" > {EXITCODE}; exit "$rc"')

# True (and $p set) while the runner recorded in PID is alive. The pid file alone is not enough:
# after a reboot, or once the run is over, that number may belong to another process.
ALIVE = f'[ -f {PID} ] && p=$(cat {PID}) && grep -aqs pausejax-train "/proc/$p/cmdline"'

# Prints one `pausejax-train: ...` line saying what the training process on this worker does.
PROBE = (
    f'if [ -f {EXITCODE} ]; then echo "{MARK} exited $(cat {EXITCODE})"; '
    f'elif {ALIVE}; then echo "{MARK} running"; '
    f'else echo "{MARK} not running"; fi')


def setup_command(remote_dir: str, repo: str | None, ref: str, python_version: str,
                  extras: str) -> str:
  """Worker shell text: fetch the source (unpack the tarball, or git), make .venv, install."""
  d = remote_path(remote_dir)
  if repo:
    fetch = [f"if [ ! -d {d}/.git ]; then git clone --quiet -- {shlex.quote(repo)} {d}; fi",
             f"git -C {d} fetch --quiet origin -- {shlex.quote(ref)}",
             f"git -C {d} checkout --quiet --detach FETCH_HEAD"]
  else:
    fetch = [f"mkdir -p -- {d}", f"tar -xzf {TARBALL} -C {d}", f"rm -f {TARBALL}"]
  install = [
      f"cd -- {d}",
      # uv makes the venv with the requested Python even where the image's python3 is older.
      "python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet --user uv || "
      "python3 -m pip install --quiet --user --break-system-packages uv",
      f"python3 -m uv venv --quiet --allow-existing --python {shlex.quote(python_version)} .venv",
      "python3 -m uv pip install --quiet --python .venv/bin/python -c constraints.txt -e "
      + shlex.quote(f".[{extras}]"),
  ]
  return "set -e; " + "; ".join(fetch + install)


def run_command(remote_dir: str, module: str, train_argv: list[str], env: list[tuple[str, str]],
                log_dest: str) -> str:
  """Worker shell text: start training detached (setsid nohup), one log and pid file per worker."""
  d = remote_path(remote_dir)
  cmd = (["env", "PYTHONUNBUFFERED=1"] + [f"{k}={v}" for k, v in env]
         + [".venv/bin/python", "-m", module] + list(train_argv))
  missing = "echo 'pausejax: not set up on this worker; run the setup subcommand first' >&2; exit 1"
  return (
      f"set -e; cd -- {d} 2>/dev/null || {{ {missing}; }}; "
      f"[ -x .venv/bin/python ] || {{ {missing}; }}; mkdir -p logs; "
      f"if [ ! -f {EXITCODE} ] && {ALIVE}; then "
      f"echo 'pausejax: training is already running on this worker; run the stop subcommand "
      f"first' >&2; exit 1; fi; "
      f"rm -f {EXITCODE}; "
      f"setsid nohup bash -c {shlex.quote(RUNNER)} pausejax-train {shlex.quote(log_dest)} "
      f"{shlex.join(cmd)} > {LOG} 2>&1 < /dev/null & echo $! > {PID}; "
      f'echo "{MARK} started on $(hostname)"')


def status_command(remote_dir: str) -> str:
  d = remote_path(remote_dir)
  return (f"cd -- {d} 2>/dev/null || {{ echo '{MARK} not set up'; exit 0; }}; {PROBE}; "
          f"tail -n 3 {LOG} 2>/dev/null || true")


def stop_command(remote_dir: str, grace_seconds: int) -> str:
  """Worker shell text: SIGTERM the training process group, SIGKILL what is left after the grace."""
  d = remote_path(remote_dir)
  return (f"cd -- {d} 2>/dev/null || exit 0; if {ALIVE}; then "
          'kill -TERM -- "-$p" 2>/dev/null || true; '
          f'for i in $(seq {5 * grace_seconds}); do {ALIVE} || break; sleep 0.2; done; '
          f'if {ALIVE}; then kill -KILL -- "-$p" 2>/dev/null || true; fi; fi; '
          f'echo "{MARK} stopped on $(hostname)"')


def logs_command(remote_dir: str, lines: int, follow: bool) -> str:
  argv = ["tail", "-n", str(lines)] + (["-F"] if follow else [])
  return f"{shlex.join(argv)} -- {remote_path(remote_dir)}/{LOG}"


# ---------------------------------------------------------------------------------------------
# gcloud
# ---------------------------------------------------------------------------------------------

class Pod:
  """One TPU slice (a TPU VM, or the node of a queued resource with the same name)."""

  def __init__(self, args: argparse.Namespace, runner: _common.Runner):
    self.args = args
    self.runner = runner
    self.name = args.name

  def _gcloud(self, group: str, verb: str, *extra: str,
              positional: list[str] | None = None) -> list[str]:
    positional = [self.name] if positional is None else positional
    argv = ["gcloud", "compute", "tpus", group, verb, *positional, *extra]
    if self.args.zone:
      argv.append(f"--zone={self.args.zone}")
    if self.args.project:
      argv.append(f"--project={self.args.project}")
    return argv

  def ssh(self, worker: str, command: str, **kwargs) -> _common.Result:
    return self.runner.run(self._gcloud("tpu-vm", "ssh", f"--worker={worker}",
                                        f"--command={command}"), **kwargs)

  def create(self) -> None:
    a = self.args
    tier = ["--spot"] if a.spot else ["--reserved"] if a.reserved else []
    if a.queued:
      self.runner.run(self._gcloud("queued-resources", "create", f"--node-id={self.name}",
                                   f"--accelerator-type={a.accelerator_type}",
                                   f"--runtime-version={a.runtime_version}", *tier))
      self.wait_until_active()
    else:  # Returns once the TPU VM is READY.
      self.runner.run(self._gcloud("tpu-vm", "create", f"--accelerator-type={a.accelerator_type}",
                                   f"--version={a.runtime_version}", *tier))

  def wait_until_active(self) -> None:
    """A queued resource waits for capacity; poll until it is ACTIVE."""
    last = None
    while True:
      state = self.state()
      if self.runner.dry_run or state == "ACTIVE":
        return
      if state not in SETTLING:
        raise _common.CommandError(f"queued resource {self.name} is {state}, not ACTIVE")
      if state != last:
        print(f"queued resource {self.name}: {state or 'pending'}; waiting", flush=True)
        last = state
      time.sleep(self.args.poll_seconds)

  def state(self) -> str:
    """The slice state, MISSING when it does not exist, UNKNOWN when gcloud could not tell."""
    if self.args.queued:
      argv = self._gcloud("queued-resources", "describe", "--format=value(state.state)")
    else:
      argv = self._gcloud("tpu-vm", "describe", "--format=value(state)")
    result = self.runner.run(argv, capture=True, check=False, echo_stderr=False)
    if result.returncode == 0:
      return result.stdout.strip()
    if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
      return "MISSING"
    sys.stderr.write(_common.explain_failure(argv, result.returncode, result.stderr) + "\n")
    return "UNKNOWN"

  def delete(self, check: bool = True) -> None:
    if self.args.queued:  # --force also deletes the node the queued resource holds.
      self.runner.run(self._gcloud("queued-resources", "delete", "--force", "--quiet"),
                      check=check)
    else:
      self.runner.run(self._gcloud("tpu-vm", "delete", "--quiet"), check=check)

  def setup(self) -> None:
    a = self.args
    if not a.repo:
      tarball = os.path.join(REPO, "build", TARBALL)
      if not self.runner.dry_run:
        os.makedirs(os.path.dirname(tarball), exist_ok=True)
      self.runner.run(["tar", "-czf", tarball] + [f"--exclude={x}" for x in EXCLUDED]
                      + ["-C", REPO, "."])
      self.runner.run(self._gcloud("tpu-vm", "scp", "--worker=all",
                                   positional=[tarball, f"{self.name}:{TARBALL}"]))
    self.ssh("all", setup_command(a.remote_dir, a.repo, a.ref, a.python_version, a.extras))

  def run(self) -> None:
    a = self.args
    self.ssh("all", run_command(a.remote_dir, a.module, a.train_argv, a.env, a.log_dest))

  def probe(self) -> str:
    """What training does on worker 0: `running`, `exited N`, `not running` or `not set up`."""
    result = self.ssh("0", status_command(self.args.remote_dir), capture=True, check=False,
                      echo_stderr=False)
    for line in result.stdout.splitlines():
      if line.startswith(MARK):
        return line[len(MARK):].strip()
    return "unreachable"


def babysit(pod: Pod) -> int:
  """Polls the slice; recreates, sets up and restarts it when preempted or gone."""
  a, runner = pod.args, pod.runner
  if runner.dry_run:
    runner.comment(f"every {a.poll_seconds:g} s: the slice state, and training on worker 0")
    pod.state()
    pod.probe()
    runner.comment(f"when the slice is preempted or gone (at most {a.max_restarts} times):")
    pod.delete(check=False)
    pod.create()
    pod.setup()
    pod.run()
    return 0
  restarts = 0
  while True:
    state = pod.state()
    action = None
    if state in HEALTHY:
      probe = pod.probe()
      if probe.startswith("exited"):
        code = probe.split()[-1]
        if code == "0":
          print(f"training finished on {pod.name}", flush=True)
          return 0
        raise _common.CommandError(
            f"training exited with code {code} on worker 0; see `launch/tpu_pod.py logs "
            "--worker=0` (a crash is not restarted)")
      action = {"not set up": "setup", "not running": "run"}.get(probe)
    elif state not in SETTLING and state != "UNKNOWN":
      action = "recreate"
    if action:
      if restarts >= a.max_restarts:
        raise _common.CommandError(
            f"slice {pod.name} is {state} and needs a restart, but --max_restarts={a.max_restarts} "
            "restarts are used up")
      restarts += 1
      print(f"slice {pod.name} is {state}; restart {restarts}/{a.max_restarts}: {action}",
            flush=True)
      try:
        if action == "recreate":
          pod.delete(check=False)
          pod.create()
        if action in ("recreate", "setup"):
          pod.setup()
        pod.run()
      except _common.CommandError as e:  # E.g. no capacity right now: try again next poll.
        print(f"restart {restarts} failed: {e}", flush=True)
    time.sleep(a.poll_seconds)


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

def _global_flags(p: argparse.ArgumentParser, sub: bool) -> None:
  # On the subcommands the defaults are SUPPRESSed so they do not undo a flag given before the
  # subcommand name: both `tpu_pod.py --zone=Z run` and `tpu_pod.py run --zone=Z` work.
  d = (lambda v: argparse.SUPPRESS) if sub else (lambda v: v)
  p.add_argument("--name", default=d(None), help="TPU name (default $PAUSEJAX_TPU_NAME)")
  p.add_argument("--zone", default=d(None), help="zone (default $CLOUDSDK_COMPUTE_ZONE)")
  p.add_argument("--project", default=d(None), help="project (default $CLOUDSDK_CORE_PROJECT)")
  p.add_argument("--queued", action="store_true", default=d(False),
                 help="the slice is a queued resource (create it as one, delete it as one)")
  p.add_argument("--remote_dir", default=d("~/pausejax"),
                 help="where the project lives on each worker (default ~/pausejax)")
  p.add_argument("--poll_seconds", type=float, default=d(120.0),
                 help="seconds between state checks (default 120)")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 default=d(False), help="print the commands instead of running them")


def _create_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("slice")
  g.add_argument("--accelerator_type", required=True, help="e.g. v5p-32, v6e-16, v4-8")
  g.add_argument("--runtime_version", default=None,
                 help="TPU software version (default: the one for the TPU generation)")
  tier = g.add_mutually_exclusive_group()
  tier.add_argument("--spot", action="store_true", help="spot capacity (can be preempted)")
  tier.add_argument("--reserved", action="store_true", help="use the project's reservation")


def _setup_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("setup")
  g.add_argument("--repo", default=None,
                 help="git URL to clone on the workers (default: copy this checkout)")
  g.add_argument("--ref", default="HEAD", help="branch, tag or commit with --repo (default HEAD)")
  g.add_argument("--python_version", default="3.11", help="Python of the venv (default 3.11)")
  g.add_argument("--extras", default="tpu", help="pip extras to install (default tpu)")


def _run_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("run")
  g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for training (repeatable)")
  g.add_argument("--module", default="pausejax.train",
                 help="module to run (default pausejax.train)")
  g.add_argument("--copy_logs", action=argparse.BooleanOptionalAction, default=None,
                 help="copy each worker's log to WORKDIR/logs/ (default: when --workdir is gs://)")


def _babysit_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("babysit")
  g.add_argument("--max_restarts", type=int, default=20,
                 help="give up after this many restarts (default 20)")


def build_parser() -> argparse.ArgumentParser:
  p = _common.parser("launch/tpu_pod.py", __doc__.splitlines()[0], EPILOG)
  _global_flags(p, sub=False)
  subs = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
  def sub(name, help_text, *adders):
    sp = subs.add_parser(name, help=help_text, description=help_text,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_flags(sp, sub=True)
    for add in adders:
      add(sp)
    return sp
  sub("create", "create the TPU slice (a TPU VM, or with --queued a queued resource)",
      _create_flags)
  sub("setup", "copy this project to every worker (or git clone it), make the venv, install",
      _setup_flags)
  run = sub("run", "start training on all workers, detached; training flags after --",
            _run_flags, _create_flags, _setup_flags, _babysit_flags)
  for action in run._actions:  # Slice flags are only needed to recreate the slice.
    if action.dest == "accelerator_type":
      action.required = False
  run.add_argument("--restart_on_preemption", "--restart-on-preemption", action="store_true",
                   help="after starting, babysit the slice (needs --accelerator_type)")
  sub("status", "show the slice state and what training does on each worker")
  logs = sub("logs", "print the training log of one worker")
  logs.add_argument("--worker", type=int, default=0, help="worker index (default 0)")
  logs.add_argument("--lines", type=int, default=100, help="lines to show (default 100)")
  logs.add_argument("--follow", action="store_true", help="keep printing new lines")
  stop = sub("stop", "stop training on all workers (the slice keeps running)")
  stop.add_argument("--grace_seconds", type=int, default=120,
                    help="after SIGTERM, wait this long (a last checkpoint) before SIGKILL")
  sub("delete", "delete the slice")
  sub("babysit", "watch the slice; after a preemption recreate it, set up and restart training",
      _create_flags, _setup_flags, _run_flags, _babysit_flags)
  return p


def resolve(argv: list[str]) -> argparse.Namespace:
  """Parses and checks every flag; raises UsageError (one line) for the first bad one."""
  own, train_argv = _common.split_at_double_dash(argv)
  a = build_parser().parse_args(own)
  a.train_argv = train_argv
  a.name = a.name or os.environ.get("PAUSEJAX_TPU_NAME")
  a.zone = a.zone or os.environ.get("CLOUDSDK_COMPUTE_ZONE")
  a.project = a.project or os.environ.get("CLOUDSDK_CORE_PROJECT")
  if not a.name:
    raise UsageError("no TPU name: pass --name=NAME or set PAUSEJAX_TPU_NAME")
  check(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", "--name", a.name,
        "lowercase letters, digits and '-', starting with a letter (at most 63)")
  if a.zone:
    check(r"[a-z]+-[a-z]+[0-9]+-[a-z]", "--zone", a.zone, "a zone like us-central2-b")
  if a.project:
    check(r"[a-z][-a-z0-9.:]{4,61}[a-z0-9]", "--project", a.project,
          "a project id like my-proj-123")
  if not a.remote_dir or a.remote_dir.startswith("-"):
    raise UsageError.setting("--remote_dir", a.remote_dir, "a directory path not starting with '-'")
  if not a.poll_seconds >= 0:
    raise UsageError.setting("--poll_seconds", a.poll_seconds, "a number of seconds >= 0")
  if a.command in ("create", "run", "babysit") and getattr(a, "accelerator_type", None):
    check(r"v[0-9][a-z0-9]*-[0-9]+", "--accelerator_type", a.accelerator_type,
          "a TPU type like v5p-32, v6e-16 or v5litepod-8")
    family = a.accelerator_type.split("-")[0]
    if a.runtime_version is None:
      a.runtime_version = DEFAULT_RUNTIME.get(family)
      if a.runtime_version is None:
        raise UsageError(f"no default --runtime_version for {family}: pass one")
    check(r"[A-Za-z0-9][-_.A-Za-z0-9]*", "--runtime_version", a.runtime_version,
          "a TPU software version like v2-alpha-tpuv5")
  if a.command in ("setup", "run", "babysit"):
    if a.repo is not None and (not a.repo or a.repo.startswith("-")):
      raise UsageError.setting("--repo", a.repo, "a git URL or path")
    if not a.ref or a.ref.startswith("-"):
      raise UsageError.setting("--ref", a.ref, "a branch, tag or commit")
    check(r"3\.[0-9]+(\.[0-9]+)?", "--python_version", a.python_version, "like 3.11")
    check(r"[a-z0-9_-]+(,[a-z0-9_-]+)*", "--extras", a.extras, "comma-separated extras, e.g. tpu")
  if a.command in ("run", "babysit"):
    a.env = _common.env_assignments(a.env)
    check(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", "--module", a.module,
          "a dotted module name like pausejax.train")
    workdir = _common.flag_value(train_argv, "workdir")
    if not workdir:
      raise UsageError(f"{a.command} needs the training flags after `--`, including --workdir "
                       "(where checkpoints go, and where a restart resumes from)")
    copy = a.copy_logs if a.copy_logs is not None else workdir.startswith("gs://")
    a.log_dest = workdir.rstrip("/") + "/logs" if copy else ""
    if a.max_restarts < 0:
      raise UsageError.setting("--max_restarts", a.max_restarts, "an integer >= 0")
    if (a.command == "babysit" or a.restart_on_preemption) and not a.accelerator_type:
      raise UsageError("restarting after a preemption recreates the slice: pass --accelerator_type")
  elif a.train_argv:
    raise UsageError(f"{a.command} takes no arguments after `--`")
  if a.command == "stop" and a.grace_seconds < 0:
    raise UsageError.setting("--grace_seconds", a.grace_seconds, "a number of seconds >= 0")
  if a.command == "logs":
    if a.worker < 0:
      raise UsageError.setting("--worker", a.worker, "a worker index >= 0")
    if a.lines < 0:
      raise UsageError.setting("--lines", a.lines, "a number of lines >= 0")
  return a


def main(argv: list[str]) -> int:
  a = resolve(argv)
  pod = Pod(a, _common.Runner(a.dry_run))
  if a.command == "create":
    pod.create()
  elif a.command == "setup":
    pod.setup()
  elif a.command == "run":
    pod.run()
    if not a.dry_run:
      print(f"training started; follow it with: python launch/tpu_pod.py --name={pod.name} logs "
            "--worker=0 --follow", flush=True)
    if a.restart_on_preemption:
      return babysit(pod)
  elif a.command == "babysit":
    return babysit(pod)
  elif a.command == "status":
    state = pod.state()
    if not a.dry_run:
      print(f"{pod.name}: {state}", flush=True)
    if state in HEALTHY or a.dry_run:
      pod.ssh("all", status_command(a.remote_dir))
  elif a.command == "logs":
    pod.ssh(str(a.worker), logs_command(a.remote_dir, a.lines, a.follow))
  elif a.command == "stop":
    pod.ssh("all", stop_command(a.remote_dir, a.grace_seconds))
  elif a.command == "delete":
    pod.delete()
  return 0


if __name__ == "__main__":
  sys.exit(_common.main_wrapper(main))
