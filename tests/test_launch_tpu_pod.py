"""launch/tpu_pod.py against a fake gcloud: exact invocations, errors, babysitting, and the
worker-side shell scripts really run (with bash, in directories standing in for the workers)."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile

import pytest


from fakes import harness as h  # tests/ is on sys.path (pytest rootdir conftest).
sys.path.insert(0, str(h.REPO))
# pylint: disable=g-import-not-at-top,wrong-import-position
from launch import _common, tpu_babysit, tpu_pod
G = ["--name=pj", "--zone=us-east5-a", "--project=my-proj"]
WHERE = ["--zone=us-east5-a", "--project=my-proj"]
TRAIN = ["--config=configs/c4_130m.py", "--workdir=gs://bkt/runs/a"]


@pytest.fixture
def tools(tmp_path):
  return h.Tools(tmp_path)


def _verbs(calls):
  """(group, verb) of each gcloud call, e.g. ('tpu-vm', 'create')."""
  return [tuple(c[2:4]) if c[:2] == ["compute", "tpus"] else tuple(c[:2]) for c in calls]


def _command(call):
  """The --command string of a recorded ssh call."""
  return next(a.split("=", 1)[1] for a in call if a.startswith("--command="))


def test_create_runs_the_exact_gcloud_command(tools):
  r = tools.run("tpu_pod.py", *G, "create", "--accelerator_type=v5p-32", "--spot")
  assert r.returncode == 0, r.stderr
  assert tools.gcloud_calls() == [
      ["compute", "tpus", "tpu-vm", "create", "pj", "--accelerator-type=v5p-32",
       "--version=v2-alpha-tpuv5", "--spot", *WHERE]]


def test_queued_create_waits_until_active(tools):
  r = tools.run("tpu_pod.py", *G, "--queued", "--poll_seconds=0", "create",
                "--accelerator_type=v6e-16", "--reserved", "--runtime_version=v2-alpha-tpuv6e",
                FAKE_GCLOUD_STATES="ACCEPTED,PROVISIONING,ACTIVE")
  assert r.returncode == 0, r.stderr
  calls = tools.gcloud_calls()
  assert calls[0] == ["compute", "tpus", "queued-resources", "create", "pj", "--node-id=pj",
                      "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e",
                      "--reserved", *WHERE]
  assert _verbs(calls[1:]) == [("queued-resources", "describe")] * 3
  assert "ACCEPTED" in r.stdout and "PROVISIONING" in r.stdout


def test_queued_create_fails_clearly_when_the_request_fails(tools):
  r = tools.run("tpu_pod.py", *G, "--queued", "--poll_seconds=0", "create",
                "--accelerator_type=v5p-8", FAKE_GCLOUD_STATES="ACCEPTED,FAILED")
  assert r.returncode == 1
  assert h.error_lines(r.stderr)[-1] == "error: queued resource pj is FAILED, not ACTIVE"


def test_quota_error_gives_one_clear_message(tools):
  quota = ("ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: Quota limit "
           "'TPUV5PPodPerProjectPerZone' has been exceeded.")
  r = tools.run("tpu_pod.py", *G, "create", "--accelerator_type=v5p-128",
                FAKE_GCLOUD_FAIL_ON="create", FAKE_GCLOUD_FAIL_STDERR=quota)
  assert r.returncode == 1
  errors = [l for l in h.error_lines(r.stderr) if l.startswith("error:")]
  assert len(errors) == 1
  assert "lack of quota or capacity" in errors[0] and "Quota limit" in errors[0]


def test_other_gcloud_failure_reports_exit_code_and_reason(tools):
  r = tools.run("tpu_pod.py", *G, "delete", FAKE_GCLOUD_FAIL_ON="all", FAKE_GCLOUD_FAIL_RC="7",
                FAKE_GCLOUD_FAIL_STDERR="ERROR: (gcloud) PERMISSION_DENIED: no access")
  assert r.returncode == 1
  last = h.error_lines(r.stderr)[-1]
  assert last.startswith("error: `gcloud compute tpus tpu-vm delete")
  assert "exit code 7" in last and "PERMISSION_DENIED: no access" in last


def test_missing_gcloud_is_reported(tools, tmp_path):
  empty = tmp_path / "empty_bin"
  empty.mkdir()
  r = tools.run("tpu_pod.py", *G, "delete", PATH=str(empty))
  assert r.returncode == 1
  assert h.error_lines(r.stderr) == ["error: 'gcloud' was not found on PATH; install it first"]


def test_name_zone_project_default_from_environment(tools):
  env = dict(PAUSEJAX_TPU_NAME="from-env", CLOUDSDK_COMPUTE_ZONE="europe-west4-a",
             CLOUDSDK_CORE_PROJECT="env-proj")
  assert tools.run("tpu_pod.py", "delete", **env).returncode == 0
  assert tools.run("tpu_pod.py", "delete", "--name=flag-wins", **env).returncode == 0
  assert tools.gcloud_calls() == [
      ["compute", "tpus", "tpu-vm", "delete", name, "--quiet", "--zone=europe-west4-a",
       "--project=env-proj"] for name in ("from-env", "flag-wins")]


@pytest.mark.parametrize("args", [
    ["delete"],  # No name anywhere.
    [*G, "create", "--accelerator_type=h100-8"],
    [*G, "create"],  # --accelerator_type is required.
    [*G, "create", "--accelerator_type=v5p-8", "--spot", "--reserved"],
    ["--name=Bad_Name", "delete"],
    [*G, "logs", "--worker=-1"],
    [*G, "logs", "--worker=x"],
    [*G, "run"],  # No training flags.
    [*G, "run", "--", "--config=configs/tiny.py"],  # No --workdir.
    [*G, "run", "--restart_on_preemption", "--", *TRAIN],  # Cannot recreate without a type.
    [*G, "run", "--env=1BAD=x", "--", *TRAIN],
    [*G, "delete", "--", "extra"],
    [*G, "frobnicate"],
    [*G, "--node_count=0", "delete"],
    [*G, "--node_count=2", "run", "--", *TRAIN, "--config.mesh.dcn_data=4"],  # Not the slices.
    [*G, "--node_count=2", "logs", "--node=2"],
    [*G, "--node_prefix=Bad_Prefix", "delete"],
    [*G, "babysit", "--accelerator_type=v5p-8", "--max_backoff_seconds=-1", "--", *TRAIN],
    [*G, "babysit", "--accelerator_type=v5p-8", "--unhealthy_polls=-1", "--", *TRAIN],
    [*G, "create", "--accelerator_type=v5p-8", "--network=my net"],
    [*G, "create", "--accelerator_type=v5p-8", "--subnetwork=$(touch x)"],
    [*G, "create", "--accelerator_type=v5p-8", "--service_account=not-an-email"],
    [*G, "create", "--accelerator_type=v5p-8", "--scopes=cloud-platform;rm"],
    [*G, "create", "--accelerator_type=v5p-8", "--labels=Team=x"],
    [*G, "create", "--accelerator_type=v5p-8", "--labels=team"],
])
def test_bad_flags_exit_2_with_one_line_and_run_nothing(tools, args):
  r = tools.run("tpu_pod.py", *args)
  assert r.returncode == 2, r.stderr
  lines = h.error_lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert tools.gcloud_calls() == []


def test_help_has_worked_examples(tools):
  r = tools.run("tpu_pod.py", "--help")
  assert r.returncode == 0
  for sub in ("create", "setup", "run", "status", "logs", "stop", "delete", "babysit"):
    assert f"launch/tpu_pod.py {sub}" in r.stdout


def test_setup_ships_a_tarball_of_this_checkout(tools):
  r = tools.run("tpu_pod.py", *G, "setup")
  assert r.returncode == 0, r.stderr
  scp, ssh = tools.gcloud_calls()
  tarball = h.REPO / "build" / "pausejax-src.tar.gz"
  assert scp == ["compute", "tpus", "tpu-vm", "scp", str(tarball), "pj:pausejax-src.tar.gz",
                 "--worker=all", *WHERE]
  with tarfile.open(tarball) as tar:
    names = tar.getnames()
  assert "./launch/tpu_pod.py" in names
  assert not any(n.startswith("./.git/") or "__pycache__" in n for n in names)
  assert ssh[4:6] == ["pj", "--worker=all"]
  script = shlex.split(_command(ssh))
  assert ["tar", "-xzf", "pausejax-src.tar.gz"] == script[script.index("tar"):][:3]
  assert ["-c", "constraints.txt", "-e", ".[tpu]"] == script[-4:]


def _babysit(tools, *extra, **env):
  return tools.run("tpu_pod.py", *G, "--poll_seconds=0", "babysit", "--accelerator_type=v5p-32",
                   "--spot", "--repo=https://example.com/pj.git", *extra, "--", *TRAIN, **env)


def test_babysit_recreates_a_preempted_slice_and_restarts_training(tools):
  r = _babysit(tools, FAKE_GCLOUD_STATES="READY,PREEMPTED,READY",
               FAKE_GCLOUD_PROBE="running|exited 0")
  assert r.returncode == 0, r.stderr
  calls = tools.gcloud_calls()
  assert _verbs(calls) == [
      ("tpu-vm", "describe"), ("tpu-vm", "ssh"),  # READY, training running.
      ("tpu-vm", "describe"),  # PREEMPTED:
      ("tpu-vm", "delete"), ("tpu-vm", "create"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
      ("tpu-vm", "describe"), ("tpu-vm", "ssh"),  # READY, training finished.
  ]
  assert calls[0][5] == "--format=value(state,health)"
  assert calls[1][5] == "--worker=all"  # Every worker says what its training does.
  assert calls[4] == ["compute", "tpus", "tpu-vm", "create", "pj", "--accelerator-type=v5p-32",
                      "--version=v2-alpha-tpuv5", "--spot", *WHERE]
  assert "git clone --quiet -- https://example.com/pj.git" in _command(calls[5])
  run = shlex.split(_command(calls[6]))
  i = run.index("-m") - 1
  assert run[i:i + 5] == [".venv/bin/python", "-m", "pausejax.train", *TRAIN]
  assert "slice pj is PREEMPTED: recreating it (recreation 1 of at most 20)" in r.stdout
  assert "training finished" in r.stdout


def test_babysit_gives_up_after_max_restarts(tools):
  r = _babysit(tools, "--max_restarts=1", FAKE_GCLOUD_STATES="PREEMPTED")
  assert r.returncode == 1
  assert "--max_restarts=1" in h.error_lines(r.stderr)[-1]
  assert _verbs(tools.gcloud_calls()).count(("tpu-vm", "create")) == 1


def test_babysit_retries_when_recreating_fails(tools):
  r = _babysit(tools, FAKE_GCLOUD_STATES="MISSING,MISSING,READY", FAKE_GCLOUD_PROBE="exited 0",
               FAKE_GCLOUD_FAIL_ON="create", FAKE_GCLOUD_FAIL_TIMES="1",
               FAKE_GCLOUD_FAIL_STDERR="ERROR: (gcloud) RESOURCE_EXHAUSTED: no more capacity")
  assert r.returncode == 0, r.stderr
  assert _verbs(tools.gcloud_calls()).count(("tpu-vm", "create")) == 2
  assert "recreate failed (attempt 1 in a row, not counted as a recreation)" in r.stdout


def test_babysit_restarts_only_training_when_the_process_is_gone(tools):
  r = _babysit(tools, FAKE_GCLOUD_PROBE="not running|exited 0")
  assert r.returncode == 0, r.stderr
  assert _verbs(tools.gcloud_calls()) == [("tpu-vm", "describe"), ("tpu-vm", "ssh"),
                                          ("tpu-vm", "ssh"),  # run
                                          ("tpu-vm", "describe"), ("tpu-vm", "ssh")]


def test_babysit_does_not_restart_a_crashed_training(tools):
  r = _babysit(tools, FAKE_GCLOUD_PROBE="exited 3")
  assert r.returncode == 1
  assert "exited with exit code 3" in h.error_lines(r.stderr)[-1]
  assert ("tpu-vm", "create") not in _verbs(tools.gcloud_calls())


# --- The worker-side scripts, really executed by bash in stand-in worker directories. ---------

def _live_members(pgid: int) -> list[int]:
  """Processes of group `pgid` that have not exited (from /proc, skipping zombies)."""
  members = []
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
      continue
    if int(fields[2]) == pgid and fields[0] != "Z":
      members.append(int(stat.parent.name))
  return members


@pytest.fixture
def workers(tools, tmp_path):
  """Two fake workers with the project set up (a recording stand-in for .venv/bin/python)."""
  remote = tmp_path / "remote"
  for k in range(2):
    h.install_fake_python(remote / f"worker-{k}" / "pausejax")
  tools.env["FAKE_GCLOUD_REMOTE"] = str(remote)
  yield [remote / f"worker-{k}" / "pausejax" for k in range(2)]
  tools.run("tpu_pod.py", *G, "stop")  # Never leave a detached process behind.


def test_run_starts_detached_training_on_every_worker(tools, workers):
  r = tools.run("tpu_pod.py", *G, "run", "--env=EXTRA=a b", "--", *TRAIN)
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("pausejax-train: started") == 2
  for project in workers:
    assert h.wait_for(project / "logs" / "train.exitcode").strip() == "0"
    record = json.loads((project / "argv.json").read_text())
    assert record["argv"] == ["-m", "pausejax.train", *TRAIN]
    assert record["env"]["EXTRA"] == "a b" and record["env"]["PYTHONUNBUFFERED"] == "1"
    assert "fake training started" in (project / "logs" / "train.log").read_text()
  # The workdir is on GCS, so each worker copies its log there at once (unless training ended
  # first) and when training ends.
  copies = [c for c in tools.gcloud_calls() if c[:2] == ["storage", "cp"]]
  assert 2 <= len(copies) <= 4
  assert all(c[2] == "logs/train.log" and c[3].startswith("gs://bkt/runs/a/logs/worker-")
             for c in copies)


def test_run_before_setup_says_so(tools, tmp_path):
  tools.env["FAKE_GCLOUD_REMOTE"] = str(tmp_path / "bare_workers")
  r = tools.run("tpu_pod.py", *G, "run", "--", *TRAIN)
  assert r.returncode == 1
  assert "not set up on this worker; run the setup subcommand first" in h.error_lines(r.stderr)[-1]


def test_status_stop_and_logs_on_running_training(tools, workers):
  r = tools.run("tpu_pod.py", *G, "run", "--env=FAKE_TRAIN_SLEEP=60",
                "--env=FAKE_TRAIN_ON_TERM=75", "--no-copy_logs", "--", *TRAIN)
  assert r.returncode == 0, r.stderr
  for project in workers:
    h.wait_for(project / "argv.json")
  status = tools.run("tpu_pod.py", *G, "status")
  assert status.returncode == 0, status.stderr
  assert status.stdout.count("pausejax-train: running") == 2 and "pj: READY" in status.stdout

  again = tools.run("tpu_pod.py", *G, "run", "--", *TRAIN)
  assert again.returncode == 1
  assert "already running" in again.stderr

  logs = tools.run("tpu_pod.py", *G, "logs", "--worker=1", "--lines=5")
  assert logs.returncode == 0 and "fake training started" in logs.stdout

  stop = tools.run("tpu_pod.py", *G, "stop")
  assert stop.returncode == 0, stop.stderr
  for project in workers:
    # Training got exactly one SIGTERM and was allowed to finish its shutdown: like
    # pausejax.train it saved a checkpoint and exited 75 (stopped early).
    assert h.wait_for(project / "logs" / "train.exitcode").strip() == "75"
    assert (project / "terms").read_text() == "TERM\n"
    pgid = int((project / "logs" / "train.pid").read_text())
    assert _live_members(pgid) == []  # Nothing of the run is left (zombies aside).
  status = tools.run("tpu_pod.py", *G, "status")
  assert status.stdout.count("pausejax-train: exited 75") == 2
  assert "training: stopped before its last step (exit code 75): `run`" in status.stdout


def test_a_stale_pid_file_never_gets_another_process_killed(tools, workers):
  # After a reboot the recorded number may belong to an unrelated process (group).
  bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
  try:
    for project in workers:
      (project / "logs").mkdir()
      (project / "logs" / "train.pid").write_text(f"{bystander.pid}\n")
    status = tools.run("tpu_pod.py", *G, "status")
    assert status.stdout.count("pausejax-train: not running") == 2
    assert tools.run("tpu_pod.py", *G, "stop", "--grace_seconds=1").returncode == 0
    assert bystander.poll() is None  # Still alive.
    r = tools.run("tpu_pod.py", *G, "run", "--no-copy_logs", "--", *TRAIN)  # Not "already running".
    assert r.returncode == 0, r.stderr
    for project in workers:
      assert h.wait_for(project / "logs" / "train.exitcode").strip() == "0"
  finally:
    bystander.kill()
    bystander.wait()


# --- Stopped early is not finished (exit code 75). --------------------------------------------

def test_pausejax_and_the_launchers_agree_on_the_stopped_early_exit_code():
  from pausejax import errors  # pylint: disable=g-import-not-at-top
  assert errors.EXIT_STOPPED_EARLY == _common.EXIT_STOPPED_EARLY == 75


@pytest.mark.parametrize("answers,what", [
    (["exited 0", "exited 0"], "finished"),
    (["exited 75", "exited 75"], "resume"),
    (["exited 75", "exited 1"], "resume"),  # The others failed because one host stopped.
    (["not running", "exited 0"], "resume"),  # A reboot took it away.
    (["exited 1", "exited 1"], "crashed"),
    (["exited 0", "exited 143"], "crashed"),
    (["running", "running"], "running"),
    (["running", "exited 75"], "partial"),
    (["running", "not set up"], "setup"),
    (["running", "unreachable"], "wait"),
    ([], "wait"),
])
def test_what_babysit_makes_of_the_workers_answers(answers, what):
  assert tpu_babysit.verdict(answers)[0] == what


def test_babysit_resumes_training_that_stopped_early(tools):
  r = _babysit(tools, FAKE_GCLOUD_PROBE="exited 75|exited 0")
  assert r.returncode == 0, r.stderr
  assert _verbs(tools.gcloud_calls()) == [("tpu-vm", "describe"), ("tpu-vm", "ssh"),
                                          ("tpu-vm", "ssh"),  # run again: it resumes
                                          ("tpu-vm", "describe"), ("tpu-vm", "ssh")]
  assert "stopped before its last step (exit code 75); resuming it" in r.stdout
  assert r.stdout.rstrip().endswith("training finished on pj")


def test_run_with_restart_on_preemption_resumes_training_that_stopped_early(tools):
  r = tools.run("tpu_pod.py", *G, "--poll_seconds=0", "run", "--restart-on-preemption",
                "--accelerator_type=v5p-32", "--", *TRAIN, FAKE_GCLOUD_PROBE="exited 75|exited 0")
  assert r.returncode == 0, r.stderr
  runs = [c for c in tools.gcloud_calls() if c[3] == "ssh" and "setsid nohup" in _command(c)]
  assert len(runs) == 2  # Started, then resumed after exit code 75.
  assert "training finished on pj" in r.stdout


# --- babysit: only recreations count; failed attempts back off; status says what it waits for.

def _in_process(tools, monkeypatch, *argv, **env):
  """A Pod for babysit in this process (injected sleep and clock), with the fake gcloud."""
  for key, value in {**tools.env, **env}.items():
    monkeypatch.setenv(key, value)
  args = tpu_pod.resolve([*G, *argv])
  return tpu_pod.Pod(args, _common.Runner(dry_run=False))


def test_failed_attempts_back_off_and_do_not_use_up_the_recreations(tools, monkeypatch):
  pod = _in_process(tools, monkeypatch, "--poll_seconds=100", "babysit", "--max_restarts=1",
                    "--max_backoff_seconds=500", "--accelerator_type=v5p-32", "--spot",
                    "--repo=https://example.com/pj.git", "--", *TRAIN,
                    FAKE_GCLOUD_STATES="MISSING,MISSING,MISSING,MISSING,MISSING,MISSING,READY",
                    FAKE_GCLOUD_PROBE="exited 0", FAKE_GCLOUD_FAIL_ON="create",
                    FAKE_GCLOUD_FAIL_TIMES="5",
                    FAKE_GCLOUD_FAIL_STDERR="ERROR: (gcloud) RESOURCE_EXHAUSTED: stockout")
  sleeps, statuses = [], []
  def sleep(seconds):
    sleeps.append(seconds)
    if len(sleeps) == 1:  # What `status` says while babysit waits for capacity.
      statuses.append(tools.run("tpu_pod.py", *G, "status", FAKE_GCLOUD_STATES="MISSING",
                                FAKE_GCLOUD_LOG=str(tools.tmp / "status.jsonl")).stdout)
  assert tpu_babysit.babysit(pod, sleep=sleep, rng=lambda: 1.0) == 0
  # Five stockouts in a row: 100, 200, 400 s, then capped at 500; then one recreation (the
  # budget of 1 was enough) and the normal poll.
  assert sleeps == [100, 200, 400, 500, 500, 100]
  assert _verbs(tools.gcloud_calls()).count(("tpu-vm", "create")) == 6
  status = statuses[0]
  assert "pj: MISSING" in status
  assert "waiting for capacity to recreate the slice: 1 failed attempt(s) in a row" in status
  assert "next attempt in" in status and "recreations used: 0 of 1" in status
  assert "RESOURCE_EXHAUSTED: stockout" in status
  assert f"babysit (pid {os.getpid()}," in status


def test_backoff_is_jittered_within_its_upper_half_and_capped():
  assert tpu_babysit.backoff(1, 120, 1800, lambda: 0.0) == 60
  assert tpu_babysit.backoff(3, 120, 1800, lambda: 1.0) == 480
  assert tpu_babysit.backoff(3, 120, 1800, lambda: 0.5) == 360
  assert tpu_babysit.backoff(40, 120, 1800, lambda: 1.0) == 1800
  assert tpu_babysit.backoff(5, 0, 1800, lambda: 1.0) == 0


def test_status_says_babysit_is_gone_when_it_is(tools):
  r = _babysit(tools, FAKE_GCLOUD_PROBE="exited 0")
  assert r.returncode == 0, r.stderr
  status = tools.run("tpu_pod.py", *G, "status", FAKE_GCLOUD_PROBE="exited 0")
  assert "babysit is not running here; it last said" in status.stdout
  assert "nothing: training finished" in status.stdout


# --- Every TPU node state, and the node's health. ---------------------------------------------

@pytest.mark.parametrize("state", ["REIMAGING", "HIDING", "HIDDEN", "UNHIDING", "REPAIRING",
                                   "READY/UNHEALTHY_MAINTENANCE", "SOME_NEW_STATE"])
def test_passing_states_and_maintenance_are_waited_out_not_deleted(tools, state):
  r = _babysit(tools, FAKE_GCLOUD_STATES=f"{state},{state},READY", FAKE_GCLOUD_PROBE="exited 0")
  assert r.returncode == 0, r.stderr
  assert _verbs(tools.gcloud_calls()) == [("tpu-vm", "describe")] * 3 + [("tpu-vm", "ssh")]


def test_the_apis_unknown_state_after_a_failed_repair_is_recreated(tools):
  r = _babysit(tools, FAKE_GCLOUD_STATES="UNKNOWN,READY", FAKE_GCLOUD_PROBE="exited 0")
  assert r.returncode == 0, r.stderr
  assert _verbs(tools.gcloud_calls())[:3] == [("tpu-vm", "describe"), ("tpu-vm", "delete"),
                                              ("tpu-vm", "create")]
  assert "slice pj is UNKNOWN: recreating it" in r.stdout


def test_when_gcloud_cannot_tell_the_slice_is_left_alone(tools):
  r = _babysit(tools, FAKE_GCLOUD_STATES="READY", FAKE_GCLOUD_PROBE="exited 0",
               FAKE_GCLOUD_FAIL_ON="describe", FAKE_GCLOUD_FAIL_TIMES="2",
               FAKE_GCLOUD_FAIL_STDERR="ERROR: (gcloud) UNAVAILABLE: try again")
  assert r.returncode == 0, r.stderr
  assert _verbs(tools.gcloud_calls()) == [("tpu-vm", "describe")] * 3 + [("tpu-vm", "ssh")]


def test_a_slice_unhealthy_for_too_long_without_training_is_recreated(tools):
  r = _babysit(tools, "--unhealthy_polls=1", FAKE_GCLOUD_STATES="READY/TIMEOUT,READY/TIMEOUT,READY",
               FAKE_GCLOUD_PROBE="not running|not running|exited 0")
  assert r.returncode == 0, r.stderr
  assert _verbs(tools.gcloud_calls()) == [
      ("tpu-vm", "describe"), ("tpu-vm", "ssh"),  # Unhealthy, nothing running: wait a poll.
      ("tpu-vm", "describe"), ("tpu-vm", "ssh"),  # Still: recreate.
      ("tpu-vm", "delete"), ("tpu-vm", "create"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
      ("tpu-vm", "describe"), ("tpu-vm", "ssh")]
  assert "slice pj is READY (health TIMEOUT): recreating it" in r.stdout


def test_workers_that_disagree_for_too_long_are_stopped_and_restarted(tools):
  split = "running\npausejax-train: not running"  # Worker 0 trains, worker 1 lost its run.
  r = _babysit(tools, "--unhealthy_polls=1", FAKE_GCLOUD_PROBE=f"{split}|{split}|exited 0")
  assert r.returncode == 0, r.stderr
  calls = tools.gcloud_calls()
  assert _verbs(calls) == [("tpu-vm", "describe"), ("tpu-vm", "ssh"),  # Wait a poll.
                           ("tpu-vm", "describe"), ("tpu-vm", "ssh"),  # Still split:
                           ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),  # stop, run.
                           ("tpu-vm", "describe"), ("tpu-vm", "ssh")]
  assert "kill -TERM" in _command(calls[4]) and "setsid nohup" in _command(calls[5])


def test_an_unhealthy_slice_that_trains_is_left_alone(tools):
  r = _babysit(tools, "--unhealthy_polls=0", FAKE_GCLOUD_STATES="READY/UNHEALTHY_TENSORFLOW",
               FAKE_GCLOUD_PROBE="running|running|exited 0")
  assert r.returncode == 0, r.stderr
  assert ("tpu-vm", "delete") not in _verbs(tools.gcloud_calls())


@pytest.mark.parametrize("state,health,kind", [
    ("READY", "", "healthy"), ("READY", "HEALTHY", "healthy"),
    ("READY", "UNHEALTHY_MAINTENANCE", "settling"), ("READY", "TIMEOUT", "unhealthy"),
    ("READY", "UNHEALTHY_TENSORFLOW", "unhealthy"), ("REIMAGING", "", "settling"),
    ("HIDDEN", "", "settling"), ("PREEMPTED", "", "gone"), ("TERMINATED", "", "gone"),
    ("UNKNOWN", "", "gone"), ("MISSING", "", "gone"), ("(gcloud could not tell)", "", "no answer"),
])
def test_node_states_and_health(state, health, kind):
  assert tpu_babysit.node_kind(state, health)[0] == kind


# --- Multislice: one queued resource, N slices. -----------------------------------------------

MS = [*G, "--node_count=2"]


def test_multislice_is_created_as_one_queued_resource(tools):
  r = tools.run("tpu_pod.py", *MS, "--poll_seconds=0", "create", "--accelerator_type=v5p-32",
                "--spot", FAKE_GCLOUD_STATES_JSON='{"qr:pj": "WAITING_FOR_RESOURCES,ACTIVE"}')
  assert r.returncode == 0, r.stderr
  calls = tools.gcloud_calls()
  assert calls[0] == ["compute", "tpus", "queued-resources", "create", "pj", "--node-count=2",
                      "--node-prefix=pj", "--accelerator-type=v5p-32",
                      "--runtime-version=v2-alpha-tpuv5", "--spot", *WHERE]
  assert _verbs(calls[1:]) == [("queued-resources", "describe")] * 2


@pytest.fixture
def slices(tools, tmp_path):
  """Two slices of two workers each, set up (recording stand-ins for .venv/bin/python)."""
  remote = tmp_path / "remote"
  projects = [remote / f"node-{j}" / f"worker-{k}" / "pausejax" for j in (0, 1) for k in (0, 1)]
  for project in projects:
    h.install_fake_python(project)
  tools.env["FAKE_GCLOUD_REMOTE"] = str(remote)
  tools.env["FAKE_GCLOUD_STATES_JSON"] = json.dumps({"qr:pj": "ACTIVE"})
  yield projects
  tools.run("tpu_pod.py", *MS, "stop")


def test_multislice_run_status_logs_and_stop_reach_every_slice(tools, slices):
  r = tools.run("tpu_pod.py", *MS, "run", "--env=FAKE_TRAIN_SLEEP=60",
                "--env=FAKE_TRAIN_ON_TERM=75", "--no-copy_logs", "--", *TRAIN)
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("pausejax-train: started") == 4
  run = tools.gcloud_calls()[-1]
  assert run[2:7] == ["queued-resources", "ssh", "pj", "--node=all", "--worker=all"]
  for project in slices:  # The mesh's dcn_data axis spans the 2 slices.
    record = json.loads(h.wait_for(project / "argv.json"))
    assert record["argv"] == ["-m", "pausejax.train", *TRAIN, "--config.mesh.dcn_data=2"]
  status = tools.run("tpu_pod.py", *MS, "status")
  assert "pj (queued resource): ACTIVE" in status.stdout
  assert "pj-0: READY" in status.stdout and "pj-1: READY" in status.stdout
  assert status.stdout.count("pausejax-train: running") == 4
  assert "training: running" in status.stdout
  logs = tools.run("tpu_pod.py", *MS, "logs", "--node=1", "--worker=1")
  assert logs.returncode == 0 and "fake training started" in logs.stdout
  assert tools.gcloud_calls()[-1][5:7] == ["--node=1", "--worker=1"]
  assert tools.run("tpu_pod.py", *MS, "stop", "--grace_seconds=10").returncode == 0
  for project in slices:
    assert h.wait_for(project / "logs" / "train.exitcode").strip() == "75"
  status = tools.run("tpu_pod.py", *MS, "status")
  assert status.stdout.count("pausejax-train: exited 75") == 4
  assert "training: stopped before its last step (exit code 75): `run`" in status.stdout


def test_multislice_babysit_recreates_all_slices_when_one_is_preempted(tools):
  r = tools.run("tpu_pod.py", *MS, "--poll_seconds=0", "babysit", "--accelerator_type=v5p-32",
                "--spot", "--repo=https://example.com/pj.git", "--", *TRAIN,
                FAKE_GCLOUD_STATES_JSON=json.dumps({"qr:pj": "ACTIVE", "pj-0": "READY",
                                                    "pj-1": "READY,PREEMPTED,READY"}),
                FAKE_GCLOUD_PROBE="running|exited 0")
  assert r.returncode == 0, r.stderr
  qr, tpu = "queued-resources", "tpu-vm"
  assert _verbs(tools.gcloud_calls()) == [
      (qr, "describe"), (tpu, "describe"), (tpu, "describe"), (qr, "ssh"),  # Running.
      (qr, "describe"), (tpu, "describe"), (tpu, "describe"),  # pj-1 PREEMPTED:
      (qr, "delete"), (qr, "create"), (qr, "describe"), (qr, "ssh"), (qr, "ssh"),
      (qr, "describe"), (tpu, "describe"), (tpu, "describe"), (qr, "ssh")]  # Finished.
  assert "slice pj is pj-1 PREEMPTED: recreating it" in r.stdout


# --- Networking and permissions. -------------------------------------------------------------

NET = ["--network=my-vpc", "--subnetwork=my-subnet",
       "--service_account=trainer@my-proj.iam.gserviceaccount.com",
       "--scopes=cloud-platform,https://www.googleapis.com/auth/devstorage.read_write",
       "--labels=team=lm,run=c4-130m"]
NET_GCLOUD = ["--network=my-vpc", "--subnetwork=my-subnet",
              "--service-account=trainer@my-proj.iam.gserviceaccount.com",
              "--scopes=cloud-platform,https://www.googleapis.com/auth/devstorage.read_write",
              "--labels=team=lm,run=c4-130m"]


def test_create_passes_network_service_account_scopes_and_labels(tools):
  r = tools.run("tpu_pod.py", *G, "create", "--accelerator_type=v5p-32", *NET)
  assert r.returncode == 0, r.stderr
  r = tools.run("tpu_pod.py", *G, "--queued", "--poll_seconds=0", "create",
                "--accelerator_type=v5p-32", *NET, FAKE_GCLOUD_STATES="ACTIVE")
  assert r.returncode == 0, r.stderr
  vm, queued = tools.gcloud_calls()[:2]
  assert vm == ["compute", "tpus", "tpu-vm", "create", "pj", "--accelerator-type=v5p-32",
                "--version=v2-alpha-tpuv5", *NET_GCLOUD, *WHERE]
  assert queued[-7:-2] == NET_GCLOUD


def test_internal_ip_reaches_the_workers_through_the_vpc(tools):
  assert tools.run("tpu_pod.py", *G, "--internal_ip", "setup").returncode == 0
  assert tools.run("tpu_pod.py", *MS, "--internal-ip", "stop").returncode == 0
  scp, ssh, ms_ssh = tools.gcloud_calls()
  assert scp[2:4] == ["tpu-vm", "scp"] and "--internal-ip" in scp
  assert ssh[2:4] == ["tpu-vm", "ssh"] and "--internal-ip" in ssh
  assert ms_ssh[2:4] == ["queued-resources", "ssh"] and "--internal-ip" in ms_ssh


def test_a_log_copy_that_fails_is_reported_by_status(tools, workers):
  denied = ("ERROR: (gcloud.storage.cp) [123-compute@developer.gserviceaccount.com] does not have "
            "permission to access b instance [bkt] (or it may not exist)")
  r = tools.run("tpu_pod.py", *G, "run", "--", *TRAIN, FAKE_GCLOUD_FAIL_ON="storage",
                FAKE_GCLOUD_FAIL_STDERR=denied)
  assert r.returncode == 0, r.stderr
  for project in workers:
    h.wait_for(project / "logs" / "train.exitcode")
  status = tools.run("tpu_pod.py", *G, "status")
  lines = [l for l in status.stdout.splitlines() if l.startswith("pausejax-logs:")]
  assert len(lines) == 2
  assert lines[0].startswith("pausejax-logs: copying the log to gs://bkt/runs/a/logs/worker-")
  assert lines[0].endswith(f"fails: {denied}")
  assert "the TPU VMs' service account needs write access" in status.stdout


# --- An exit code from before a reboot does not count. -----------------------------------------

def test_an_exit_code_from_an_earlier_boot_does_not_count(tools, workers):
  r = tools.run("tpu_pod.py", *G, "run", "--env=FAKE_TRAIN_EXIT=1", "--no-copy_logs", "--",
                *TRAIN)
  assert r.returncode == 0, r.stderr
  for project in workers:
    assert h.wait_for(project / "logs" / "train.exitcode").strip() == "1"
  status = tools.run("tpu_pod.py", *G, "status")
  assert status.stdout.count("pausejax-train: exited 1") == 2
  assert "training: crashed" in status.stdout
  for project in workers:  # The workers rebooted since (the files survive on the boot disk).
    (project / "logs" / "train.boot").write_text("a-boot-before-this-one\n")
  status = tools.run("tpu_pod.py", *G, "status")
  assert status.stdout.count("pausejax-train: not running") == 2
  assert ("training: not running (e.g. after a reboot): `run` (or babysit) resumes it"
          in status.stdout)
