"""Creates Cloud TPU slices, installs pausejax on every worker, runs and babysits training.

Every gcloud call is an argv list. Commands that run on the workers go through
`gcloud compute tpus tpu-vm ssh --command=STRING` (`queued-resources ssh` for a multislice); the
strings are built with shlex.quote (launch/tpu_remote.py), so any flag value (paths, URLs,
training flags) reaches the worker as exactly one literal argument.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # Run as `python launch/tpu_pod.py`: make `launch` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top
from launch import _common
from launch import tpu_babysit
from launch._common import UsageError, check
from launch.tpu_remote import (LOG_MARK, TARBALL, logs_command, parse_answers,
                               remote_path, run_command, setup_command, status_command,
                               stop_command)
# pylint: enable=g-import-not-at-top

__all__ = ["logs_command", "remote_path", "run_command", "setup_command", "status_command",
           "stop_command", "main"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Cloud TPU software versions per TPU generation (the first part of the accelerator type).
DEFAULT_RUNTIME = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
                   "v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                   "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
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

  # A multislice: 2 v5p-32 slices joined over the data-centre network (a queued resource);
  # pass --node_count=2 to every later command too (it sets --config.mesh.dcn_data=2):
  python launch/tpu_pod.py --node_count=2 create --accelerator_type=v5p-32 --spot

  # A project without a `default` network, driven from a VM inside the VPC:
  python launch/tpu_pod.py --internal_ip create --accelerator_type=v5p-32 \\
      --network=my-vpc --subnetwork=my-subnet \\
      --service_account=trainer@my-proj.iam.gserviceaccount.com --scopes=cloud-platform

exit codes: 0 done (for babysit: training finished), 1 a command failed or training crashed,
2 bad flags. Training itself exits 75 when it stopped before its last step (SIGTERM: stop,
preemption, maintenance) with a checkpoint saved; babysit resumes such a run.
"""


# ---------------------------------------------------------------------------------------------
# gcloud
# ---------------------------------------------------------------------------------------------

class Pod:
  """The slice: a TPU VM, the node of a queued resource with the same name, or (--node_count>1)
  the nodes PREFIX-0 ... PREFIX-(N-1) of one multislice queued resource."""

  def __init__(self, args: argparse.Namespace, runner: _common.Runner):
    self.args = args
    self.runner = runner
    self.name = args.name
    self.multislice = args.node_count > 1
    prefix = args.node_prefix or args.name
    self.nodes = ([f"{prefix}-{i}" for i in range(args.node_count)] if self.multislice
                  else [args.name])
    self.note = lambda doing, **extra: None  # Babysit's state file, while it runs.
    self.sleep = time.sleep

  def _gcloud(self, group: str, verb: str, *extra: str,
              positional: list[str] | None = None) -> list[str]:
    positional = [self.name] if positional is None else positional
    argv = ["gcloud", "compute", "tpus", group, verb, *positional, *extra]
    if self.args.zone:
      argv.append(f"--zone={self.args.zone}")
    if self.args.project:
      argv.append(f"--project={self.args.project}")
    return argv

  def _reach(self, worker: str, node: str) -> tuple[str, list[str]]:
    """The gcloud group and the flags that pick workers (and nodes) for ssh and scp."""
    flags = [f"--worker={worker}"] + (["--internal-ip"] if self.args.internal_ip else [])
    if self.multislice:
      return "queued-resources", [f"--node={node}"] + flags
    return "tpu-vm", flags

  def ssh(self, worker: str, command: str, node: str = "all", **kwargs) -> _common.Result:
    group, flags = self._reach(worker, node)
    return self.runner.run(self._gcloud(group, "ssh", *flags, f"--command={command}"), **kwargs)

  def create(self) -> None:
    a = self.args
    tier = ["--spot"] if a.spot else ["--reserved"] if a.reserved else []
    extra = [f"--{flag.replace('_', '-')}={getattr(a, flag)}"
             for flag in ("network", "subnetwork", "service_account", "scopes", "labels")
             if getattr(a, flag)]
    if a.queued:
      nodes = ([f"--node-count={a.node_count}", f"--node-prefix={a.node_prefix or self.name}"]
               if self.multislice else [f"--node-id={self.name}"])
      self.runner.run(self._gcloud("queued-resources", "create", *nodes,
                                   f"--accelerator-type={a.accelerator_type}",
                                   f"--runtime-version={a.runtime_version}", *tier, *extra))
      self.wait_until_active()
    else:  # Returns once the TPU VM is READY.
      self.runner.run(self._gcloud("tpu-vm", "create", f"--accelerator-type={a.accelerator_type}",
                                   f"--version={a.runtime_version}", *tier, *extra))

  def wait_until_active(self) -> None:
    """A queued resource waits for capacity; poll until it is ACTIVE."""
    last = None
    while True:
      state = self._describe("queued-resources", self.name)
      if self.runner.dry_run or state == "ACTIVE":
        return
      kind, text = tpu_babysit.queued_kind(state)
      if kind == tpu_babysit.GONE:
        raise _common.CommandError(f"queued resource {self.name} is {state}, not ACTIVE")
      if text != last:
        print(f"queued resource {self.name}: {text}; waiting", flush=True)
        last = text
      self.note(f"the queued resource to become ACTIVE: it is {text}")
      self.sleep(self.args.poll_seconds)

  def _describe(self, group: str, name: str) -> str:
    """`describe` output (state, or state and health), MISSING, or UNREADABLE."""
    fmt = "value(state.state)" if group == "queued-resources" else "value(state,health)"
    argv = self._gcloud(group, "describe", f"--format={fmt}", positional=[name])
    result = self.runner.run(argv, capture=True, check=False, echo_stderr=False)
    if result.returncode == 0:
      return result.stdout.strip()
    if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
      return tpu_babysit.MISSING
    sys.stderr.write(_common.explain_failure(argv, result.returncode, result.stderr) + "\n")
    return tpu_babysit.UNREADABLE

  def describe_all(self) -> list[tuple[str, str, str]]:
    """(label, kind, text) of the queued resource (with --queued) and of every node."""
    rows = []
    if self.args.queued:
      kind, text = tpu_babysit.queued_kind(self._describe("queued-resources", self.name))
      rows.append((f"{self.name} (queued resource)", kind, text))
      if kind != tpu_babysit.HEALTHY and not self.runner.dry_run:
        return rows  # Its nodes exist only while it is ACTIVE.
    for node in self.nodes:
      state, _, health = self._describe("tpu-vm", node).partition("\t")
      rows.append((node, *tpu_babysit.node_kind(state.strip(), health.strip())))
    return rows

  def health(self) -> tuple[str, str]:
    """(kind, text) of the whole slice: the worst of its queued resource and nodes."""
    return tpu_babysit.worst(self.describe_all())

  def delete(self, check: bool = True) -> None:
    if self.args.queued:  # --force also deletes the nodes the queued resource holds.
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
      group, flags = self._reach("all", "all")
      self.runner.run(self._gcloud(group, "scp", *flags,
                                   positional=[tarball, f"{self.name}:{TARBALL}"]))
    self.ssh("all", setup_command(a.remote_dir, a.repo, a.ref, a.python_version, a.extras))

  def run(self) -> None:
    a = self.args
    self.ssh("all", run_command(a.remote_dir, a.module, a.train_argv, a.env, a.log_dest))

  def stop(self, grace_seconds: int) -> None:
    self.ssh("all", stop_command(self.args.remote_dir, grace_seconds))

  def status(self, echo_stderr: bool = False) -> _common.Result:
    return self.ssh("all", status_command(self.args.remote_dir), capture=True, check=False,
                    echo_stderr=echo_stderr)

  def probe(self) -> list[str]:
    """What training does on every worker of every slice (`running`, `exited N`, ...)."""
    result = self.status()
    answers = parse_answers(result.stdout)
    if result.returncode != 0 or not answers:  # Some worker did not answer.
      answers.append("unreachable")
    return answers


def status(pod: Pod) -> None:
  """Prints the slice state, every worker's training and log copies, and what babysit does."""
  a = pod.args
  rows = pod.describe_all()
  if not a.dry_run:
    for label, _, text in rows:
      print(f"{label}: {text}", flush=True)
  kind, _ = tpu_babysit.worst(rows)
  if kind in (tpu_babysit.HEALTHY, tpu_babysit.UNHEALTHY) or a.dry_run:
    result = pod.status(echo_stderr=True)  # gcloud says there which worker failed, if any.
    sys.stdout.write(result.stdout)
    answers = parse_answers(result.stdout) + ([] if result.returncode == 0 else ["unreachable"])
    what, detail = tpu_babysit.verdict(answers)
    meaning = {
        tpu_babysit.FINISHED: "finished",
        tpu_babysit.RESUME: f"{detail}: `run` (or babysit) resumes it from the workdir",
        tpu_babysit.CRASHED: f"crashed ({detail}); see `logs`",
        tpu_babysit.SETUP: "not set up: run `setup`",
    }.get(what, detail)
    if not a.dry_run:
      print(f"training: {meaning}", flush=True)
    if any(line.startswith(LOG_MARK) for line in result.stdout.splitlines()):
      print("the workers cannot write their logs to the bucket: the TPU VMs' service account "
            "needs write access to it (see docs/launching.md, 'A bucket')", flush=True)
  line = tpu_babysit.describe(tpu_babysit.state_path(a.name, a.zone, a.project), time.time())
  if line and not a.dry_run:
    print(line, flush=True)


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
  p.add_argument("--node_count", type=int, default=d(1),
                 help="N > 1: a multislice of N slices in one queued resource (implies --queued)")
  p.add_argument("--node_prefix", default=d(None),
                 help="multislice nodes are PREFIX-0 ... PREFIX-(N-1) (default: the TPU name)")
  p.add_argument("--internal_ip", "--internal-ip", action="store_true", default=d(False),
                 help="ssh and scp to the workers' internal IPs (from a machine in the VPC)")
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
  g.add_argument("--network", default=None, help="VPC network (default: gcloud's, `default`)")
  g.add_argument("--subnetwork", default=None, help="subnetwork of --network")
  g.add_argument("--service_account", default=None,
                 help="service account of the TPU VMs (default: Compute Engine's default one); "
                 "it needs write access to the bucket")
  g.add_argument("--scopes", default=None,
                 help="access scopes of that account, comma-separated (e.g. cloud-platform)")
  g.add_argument("--labels", default=None, help="KEY=VALUE,... labels of the slice")


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


def _grace_flag(p) -> None:
  p.add_argument("--grace_seconds", type=int, default=120,
                 help="after SIGTERM, wait this long (a last checkpoint) before SIGKILL")


def _babysit_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("babysit")
  g.add_argument("--max_restarts", type=int, default=20,
                 help="give up when the slice needs recreating after this many recreations "
                 "(default 20); failed attempts and resumed training do not count")
  g.add_argument("--max_backoff_seconds", type=float, default=1800.0,
                 help="a failed attempt is retried after --poll_seconds, doubling up to this "
                 "(default 1800), with jitter")
  g.add_argument("--unhealthy_polls", type=int, default=3,
                 help="polls a READY slice may stay unhealthy without training, or its workers "
                 "disagree (some training, some not), before babysit acts (default 3)")
  _grace_flag(g)


def build_parser() -> argparse.ArgumentParser:
  p = _common.parser("launch/tpu_pod.py", __doc__.splitlines()[0], EPILOG)
  p.allow_abbrev = False  # Else `logs --node=1` is read as an abbreviation of --node_count.
  _global_flags(p, sub=False)
  subs = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
  def sub(name, help_text, *adders):
    sp = subs.add_parser(name, help=help_text, description=help_text, allow_abbrev=False,
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
  sub("status", "show the slice state, what training does on each worker, and what babysit "
      "waits for")
  logs = sub("logs", "print the training log of one worker")
  logs.add_argument("--worker", type=int, default=0, help="worker index (default 0)")
  logs.add_argument("--node", type=int, default=0,
                    help="slice index in a multislice (default 0)")
  logs.add_argument("--lines", type=int, default=100, help="lines to show (default 100)")
  logs.add_argument("--follow", action="store_true", help="keep printing new lines")
  stop = sub("stop", "stop training on all workers (the slice keeps running)")
  _grace_flag(stop)
  sub("delete", "delete the slice")
  sub("babysit", "watch the slice; after a preemption recreate it, set up and restart training",
      _create_flags, _setup_flags, _run_flags, _babysit_flags)
  return p


_NAME = r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"
_LABEL_KEY, _LABEL_VALUE = r"[a-z][-_a-z0-9]{0,62}", r"[-_a-z0-9]{0,63}"


def _check_create(a: argparse.Namespace) -> None:
  check(r"v[0-9][a-z0-9]*-[0-9]+", "--accelerator_type", a.accelerator_type,
        "a TPU type like v5p-32, v6e-16 or v5litepod-8")
  family = a.accelerator_type.split("-")[0]
  if a.runtime_version is None:
    a.runtime_version = DEFAULT_RUNTIME.get(family)
    if a.runtime_version is None:
      raise UsageError(f"no default --runtime_version for {family}: pass one")
  check(r"[A-Za-z0-9][-_.A-Za-z0-9]*", "--runtime_version", a.runtime_version,
        "a TPU software version like v2-alpha-tpuv5")
  resource = r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?|projects/[-a-z0-9.:]+/[-a-z0-9/]+"
  for flag in ("network", "subnetwork"):
    if getattr(a, flag) is not None:
      check(resource, f"--{flag}", getattr(a, flag),
            "a name like my-vpc, or projects/PROJECT/.../NAME")
  if a.service_account is not None:
    check(r"[a-z][-a-z0-9]*@[a-z][-a-z0-9.]*[a-z]", "--service_account", a.service_account,
          "a service account email like trainer@my-proj.iam.gserviceaccount.com")
  if a.scopes is not None:
    check(r"[-a-zA-Z0-9_.:/]+(,[-a-zA-Z0-9_.:/]+)*", "--scopes", a.scopes,
          "comma-separated scopes, e.g. cloud-platform")
  if a.labels is not None:
    pair = f"{_LABEL_KEY}={_LABEL_VALUE}"
    check(f"{pair}(,{pair})*", "--labels", a.labels,
          "KEY=VALUE,... in lowercase letters, digits, '-' and '_'")


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
  check(_NAME, "--name", a.name,
        "lowercase letters, digits and '-', starting with a letter (at most 63)")
  if a.zone:
    check(r"[a-z]+-[a-z]+[0-9]+-[a-z]", "--zone", a.zone, "a zone like us-central2-b")
  if a.project:
    check(r"[a-z][-a-z0-9.:]{4,61}[a-z0-9]", "--project", a.project,
          "a project id like my-proj-123")
  if a.node_count < 1:
    raise UsageError.setting("--node_count", a.node_count, "an integer >= 1")
  if a.node_prefix is not None:
    check(_NAME, "--node_prefix", a.node_prefix,
          "lowercase letters, digits and '-', starting with a letter")
  if a.node_count > 1:
    a.queued = True  # Cloud TPU makes a multislice only as a queued resource.
    check(r".{1,58}", "--node_prefix", a.node_prefix or a.name, "at most 58 characters")
  if not a.remote_dir or a.remote_dir.startswith("-"):
    raise UsageError.setting("--remote_dir", a.remote_dir, "a directory path not starting with '-'")
  if not a.poll_seconds >= 0:
    raise UsageError.setting("--poll_seconds", a.poll_seconds, "a number of seconds >= 0")
  if a.command in ("create", "run", "babysit") and getattr(a, "accelerator_type", None):
    _check_create(a)
  if a.command in ("setup", "run", "babysit"):
    if a.repo is not None and (not a.repo or a.repo.startswith("-")):
      raise UsageError.setting("--repo", a.repo, "a git URL or path")
    if not a.ref or a.ref.startswith("-"):
      raise UsageError.setting("--ref", a.ref, "a branch, tag or commit")
    check(r"3\.[0-9]+(\.[0-9]+)?", "--python_version", a.python_version, "like 3.11")
    check(r"[a-z0-9_-]+(,[a-z0-9_-]+)*", "--extras", a.extras, "comma-separated extras, e.g. tpu")
  if a.command in ("run", "babysit"):
    _resolve_run(a)
  elif a.train_argv:
    raise UsageError(f"{a.command} takes no arguments after `--`")
  if a.command in ("stop", "run", "babysit") and a.grace_seconds < 0:
    raise UsageError.setting("--grace_seconds", a.grace_seconds, "a number of seconds >= 0")
  if a.command == "logs":
    if a.worker < 0:
      raise UsageError.setting("--worker", a.worker, "a worker index >= 0")
    if not 0 <= a.node < a.node_count:
      raise UsageError.setting("--node", a.node, f"a slice index from 0 to {a.node_count - 1}")
    if a.lines < 0:
      raise UsageError.setting("--lines", a.lines, "a number of lines >= 0")
  return a


def _resolve_run(a: argparse.Namespace) -> None:
  a.env = _common.env_assignments(a.env)
  check(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", "--module", a.module,
        "a dotted module name like pausejax.train")
  workdir = _common.flag_value(a.train_argv, "workdir")
  if not workdir:
    raise UsageError(f"{a.command} needs the training flags after `--`, including --workdir "
                     "(where checkpoints go, and where a restart resumes from)")
  copy = a.copy_logs if a.copy_logs is not None else workdir.startswith("gs://")
  a.log_dest = workdir.rstrip("/") + "/logs" if copy else ""
  if a.node_count > 1:  # The mesh's dcn_data axis spans the slices.
    dcn = _common.flag_value(a.train_argv, "config.mesh.dcn_data")
    if dcn is None:
      a.train_argv = [*a.train_argv, f"--config.mesh.dcn_data={a.node_count}"]
    elif dcn != str(a.node_count):
      raise UsageError(f"--config.mesh.dcn_data={dcn} must equal --node_count={a.node_count} "
                       "(the mesh's dcn_data axis spans the slices)")
  if a.max_restarts < 0:
    raise UsageError.setting("--max_restarts", a.max_restarts, "an integer >= 0")
  if not a.max_backoff_seconds >= 0:
    raise UsageError.setting("--max_backoff_seconds", a.max_backoff_seconds,
                             "a number of seconds >= 0")
  if a.unhealthy_polls < 0:
    raise UsageError.setting("--unhealthy_polls", a.unhealthy_polls, "an integer >= 0")
  if (a.command == "babysit" or a.restart_on_preemption) and not a.accelerator_type:
    raise UsageError("restarting after a preemption recreates the slice: pass --accelerator_type")


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
      return tpu_babysit.babysit(pod)
  elif a.command == "babysit":
    return tpu_babysit.babysit(pod)
  elif a.command == "status":
    status(pod)
  elif a.command == "logs":
    pod.ssh(str(a.worker), logs_command(a.remote_dir, a.lines, a.follow), node=str(a.node))
  elif a.command == "stop":
    pod.stop(a.grace_seconds)
  elif a.command == "delete":
    pod.delete()
  return 0


if __name__ == "__main__":
  sys.exit(_common.main_wrapper(main))
