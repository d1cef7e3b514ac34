"""launch/tpu_pod.py against a fake gcloud: exact invocations, errors, babysitting, and the
worker-side shell scripts really run (with bash, in directories standing in for the workers)."""

from __future__ import annotations

import json
import pathlib
import shlex
import subprocess
import tarfile

import pytest


from fakes import harness as h  # tests/ is on sys.path (pytest rootdir conftest).
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
  assert calls[4] == ["compute", "tpus", "tpu-vm", "create", "pj", "--accelerator-type=v5p-32",
                      "--version=v2-alpha-tpuv5", "--spot", *WHERE]
  assert "git clone --quiet -- https://example.com/pj.git" in _command(calls[5])
  run = shlex.split(_command(calls[6]))
  i = run.index("-m") - 1
  assert run[i:i + 5] == [".venv/bin/python", "-m", "pausejax.train", *TRAIN]
  assert "restart 1/20: recreate" in r.stdout and "training finished" in r.stdout


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
  assert "restart 1 failed" in r.stdout


def test_babysit_restarts_only_training_when_the_process_is_gone(tools):
  r = _babysit(tools, FAKE_GCLOUD_PROBE="not running|exited 0")
  assert r.returncode == 0, r.stderr
  assert _verbs(tools.gcloud_calls()) == [("tpu-vm", "describe"), ("tpu-vm", "ssh"),
                                          ("tpu-vm", "ssh"),  # run
                                          ("tpu-vm", "describe"), ("tpu-vm", "ssh")]


def test_babysit_does_not_restart_a_crashed_training(tools):
  r = _babysit(tools, FAKE_GCLOUD_PROBE="exited 3")
  assert r.returncode == 1
  assert "exited with code 3" in h.error_lines(r.stderr)[-1]
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
  # The workdir is on GCS, so each worker copies its log there when training ends.
  copies = [c for c in tools.gcloud_calls() if c[:2] == ["storage", "cp"]]
  assert len(copies) == 2
  assert all(c[2] == "logs/train.log" and c[3].startswith("gs://bkt/runs/a/logs/worker-")
             for c in copies)


def test_run_before_setup_says_so(tools, tmp_path):
  tools.env["FAKE_GCLOUD_REMOTE"] = str(tmp_path / "bare_workers")
  r = tools.run("tpu_pod.py", *G, "run", "--", *TRAIN)
  assert r.returncode == 1
  assert "not set up on this worker; run the setup subcommand first" in h.error_lines(r.stderr)[-1]


def test_status_stop_and_logs_on_running_training(tools, workers):
  r = tools.run("tpu_pod.py", *G, "run", "--env=FAKE_TRAIN_SLEEP=60", "--env=FAKE_TRAIN_ON_TERM=0",
                "--no-copy_logs", "--", *TRAIN)
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
    # Training got exactly one SIGTERM and was allowed to finish its shutdown (exit code 0).
    assert h.wait_for(project / "logs" / "train.exitcode").strip() == "0"
    assert (project / "terms").read_text() == "TERM\n"
    pgid = int((project / "logs" / "train.pid").read_text())
    assert _live_members(pgid) == []  # Nothing of the run is left (zombies aside).
  status = tools.run("tpu_pod.py", *G, "status")
  assert status.stdout.count("pausejax-train: exited 0") == 2


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
