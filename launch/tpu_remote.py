"""Shell text that runs on the Cloud TPU workers (through `gcloud ... ssh --command=TEXT`).

User values (paths, URLs, training flags) only ever appear through shlex.quote, so each one
reaches the worker as exactly one literal argument.

Files each worker keeps under the project directory:
  logs/train.log       training's output
  logs/train.pid       the detached runner's pid (its process group is the whole run)
  logs/train.exitcode  training's exit code, written last: "finished, log copied"
  logs/train.boot      the boot id when that code was written; a code from an earlier boot does
                       not count (the reboot may have caused it), so such a run reads as "not
                       running" and is resumed
  logs/copy.err        why the last copy of the log to GCS failed (destination, then the error)
"""

from __future__ import annotations

import shlex

TARBALL = "pausejax-src.tar.gz"  # Name of the source tarball, locally under build/ and on workers.
LOG, PID, EXITCODE, BOOT = ("logs/train.log", "logs/train.pid", "logs/train.exitcode",
                            "logs/train.boot")
COPY_ERROR = "logs/copy.err"
MARK = "pausejax-train:"  # Prefix of the lines saying what training does on a worker.
LOG_MARK = "pausejax-logs:"  # Prefix of the line saying that copying the log fails.
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def remote_path(path: str) -> str:
  """Shell text for `path` on a worker; a leading `~/` still means the home directory."""
  if path == "~":
    return '"$HOME"'
  if path.startswith("~/"):
    return '"$HOME"/' + shlex.quote(path[2:])
  return shlex.quote(path)


# Runs detached on each worker as `bash -c RUNNER pausejax-train LOG_DEST CMD...`: starts CMD,
# copies the log to LOG_DEST at once (so that a bucket it cannot write to shows up in `status`
# right away), every 5 minutes and at the end (if given), then records CMD's exit code.
RUNNER = (
    # The signal that stops training reaches the whole process group, so this shell ignores it
    # (`trap :`), waits for training to finish (e.g. writing a last checkpoint) and records why.
    'dest=$1; shift; sync=; trap : TERM INT HUP; '
    # A failed copy is recorded (destination, then gcloud's error) instead of being discarded.
    'copy() { if gcloud storage cp ' + LOG + ' "$dest/worker-$w.log" >/dev/null 2>logs/copy.out; '
    f'then rm -f {COPY_ERROR}; '
    f'else {{ echo "$dest/worker-$w.log"; tail -n 5 logs/copy.out; }} > {COPY_ERROR}; fi; '
    'rm -f logs/copy.out; }; '
    '"$@" & pid=$!; '
    'if [ -n "$dest" ]; then '
    'w=$(curl -sf -m 5 -H "Metadata-Flavor: Google" '
    '"http://${GCE_METADATA_IP:-metadata.google.internal}'
    '/computeMetadata/v1/instance/attributes/agent-worker-number" || hostname); '
    '(copy; while sleep 300; do copy; done) & sync=$!; fi; '
    'wait "$pid"; rc=$?; '
    'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done; '
    'if [ -n "$sync" ]; then pkill -P "$sync" 2>/dev/null; kill "$sync" 2>/dev/null; copy; fi; '
    f'cat {BOOT_ID} > {BOOT} 2>/dev/null; echo "$rc" > {EXITCODE}; exit "$rc"')

# True (and $p set) while the runner recorded in PID is alive. The pid file alone is not enough:
# after a reboot, or once the run is over, that number may belong to another process.
ALIVE = f'[ -f {PID} ] && p=$(cat {PID}) && grep -aqs pausejax-train "/proc/$p/cmdline"'

# True when EXITCODE was written in this boot.
_THIS_BOOT = (f'[ -f {EXITCODE} ] && '
              f'[ "$(cat {BOOT} 2>/dev/null)" = "$(cat {BOOT_ID} 2>/dev/null)" ]')

# Prints one `pausejax-train: ...` line saying what the training process on this worker does:
# `exited N`, `running` or `not running`.
PROBE = (
    f'if {_THIS_BOOT}; then echo "{MARK} exited $(cat {EXITCODE})"; '
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
      f"rm -f {EXITCODE} {BOOT} {COPY_ERROR}; "
      f"setsid nohup bash -c {shlex.quote(RUNNER)} pausejax-train {shlex.quote(log_dest)} "
      f"{shlex.join(cmd)} > {LOG} 2>&1 < /dev/null & echo $! > {PID}; "
      f'echo "{MARK} started on $(hostname)"')


def status_command(remote_dir: str) -> str:
  """Worker shell text: the PROBE line, a failing log copy if any, the last lines of the log."""
  d = remote_path(remote_dir)
  return (f"cd -- {d} 2>/dev/null || {{ echo '{MARK} not set up'; exit 0; }}; {PROBE}; "
          f'if [ -s {COPY_ERROR} ]; then echo "{LOG_MARK} copying the log to '
          f'$(head -n 1 {COPY_ERROR}) fails: $(tail -n +2 {COPY_ERROR} | grep . | tail -n 1)"; '
          f"fi; tail -n 3 {LOG} 2>/dev/null || true")


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


def parse_answers(stdout: str) -> list[str]:
  """The answers (`running`, `exited 0`, ...) in the output of status_command on some workers."""
  return [line[len(MARK):].strip() for line in stdout.splitlines() if line.startswith(MARK)]
