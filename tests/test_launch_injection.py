"""Hostile flag values through every launch script: each must arrive as exactly one literal
argument (or be refused with exit 2), and nothing they spell may run.

The commands meant for TPU workers and the SLURM batch script are really executed here (bash in
stand-in worker directories; the batch script with a fake srun), so a quoting mistake would
run `touch` and create the marker file, not just look wrong.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import subprocess
import sys

import pytest


from fakes import harness as h  # tests/ is on sys.path (pytest rootdir conftest).
sys.path.insert(0, str(h.REPO))
# pylint: disable=g-import-not-at-top,wrong-import-position
from launch import _common, gpu, local, slurm, tpu_pod

G = ["--name=pj", "--zone=us-east5-a", "--project=my-proj"]

# {m} becomes the marker file's absolute path: if any of these is ever run by a shell, it appears.
HOSTILE = [
    "x; touch {m}",
    "x && touch {m}",
    "`touch {m}`",
    "$(touch {m})",
    "x | touch {m}",
    "'; touch {m}; echo '",
    '"; touch {m}; echo "',
    "it's \"quoted\" 'twice'",
    "line one\ntouch {m}",
    "two words\tand a tab",
    "--flag=evil",
]


@pytest.fixture
def tools(tmp_path):
  return h.Tools(tmp_path)


@pytest.fixture
def marker(tmp_path):
  path = tmp_path / "PWNED"
  yield path
  assert not path.exists(), "a hostile value was executed by a shell"


def _values(marker):
  return [v.format(m=marker) for v in HOSTILE]


def _sample(marker):
  """A few of them, for flags that must refuse every one (keeps the test fast)."""
  values = _values(marker)
  return [values[i] for i in (0, 3, 5, 8, 10)]


def _shell_tokens(command: str) -> list[str]:
  """The words a POSIX shell sees in `command`, with ; && | etc. as separate tokens."""
  lex = shlex.shlex(command, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  return list(lex)


def _assert_refused(r, tools):
  assert r.returncode == 2, (r.returncode, r.stderr)
  lines = h.error_lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert tools.gcloud_calls() == [] and tools.sbatch_calls() == []


# --- tpu_pod.py: flags that must be one plain word are refused. ------------------------------

VALIDATED = [
    ([], "--name"), ([], "--zone"), ([], "--project"),
    (["create"], "--accelerator_type"),
    (["create", "--accelerator_type=v5p-8"], "--runtime_version"),
    (["setup"], "--python_version"), (["setup"], "--extras"),
    (["run"], "--module"), (["run"], "--env"),
    (["logs"], "--worker"), (["logs"], "--lines"), (["status"], "--poll_seconds"),
    (["babysit", "--accelerator_type=v5p-8"], "--max_restarts"),
]


def _refuses(tools, marker, script, main, argv_for):
  """Every hostile value is refused: in-process (--dry-run, so a miss could run nothing) for all
  of them, and through the real command line (no dry run) for one."""
  for value in _values(marker):
    with pytest.raises(_common.UsageError):
      main(["--dry-run", *argv_for(value)])
  _assert_refused(tools.run(script, *argv_for(_values(marker)[3])), tools)


@pytest.mark.parametrize("prefix,flag", VALIDATED, ids=[f for _, f in VALIDATED])
def test_tpu_pod_refuses_hostile_words(tools, marker, prefix, flag):
  train = ["--", "--workdir=/tmp/w"] if prefix[:1] in (["run"], ["babysit"]) else []
  def argv_for(value):
    if not prefix:
      return [f"{flag}={value}", *G[1:], "delete"]
    return [*G, *prefix, f"{flag}={value}", *train]
  _refuses(tools, marker, "tpu_pod.py", tpu_pod.main, argv_for)


# --- tpu_pod.py: free-form values reach the worker literally. --------------------------------

def _remote(tools, tmp_path, project_dirs):
  remote = tmp_path / "remote"
  for rel in project_dirs:
    for k in range(2):
      h.install_fake_python(remote / f"worker-{k}" / rel)
  tools.env["FAKE_GCLOUD_REMOTE"] = str(remote)
  return remote


def test_tpu_pod_training_flags_and_env_arrive_literally_on_every_worker(tools, marker, tmp_path):
  values = _values(marker)
  train = ["--workdir=/tmp/w"] + values + [f"--config.note={v}" for v in values]
  env = [f"--env=V{i}={v}" for i, v in enumerate(values)]
  remote = _remote(tools, tmp_path, ["pausejax"])
  r = tools.run("tpu_pod.py", *G, "run", *env, "--", *train)
  assert r.returncode == 0, r.stderr
  for k in range(2):
    project = remote / f"worker-{k}" / "pausejax"
    assert h.wait_for(project / "logs" / "train.exitcode").strip() == "0"
    record = json.loads((project / "argv.json").read_text())
    assert record["argv"] == ["-m", "pausejax.train", *train]
    assert [record["env"][f"V{i}"] for i in range(len(values))] == values


def test_tpu_pod_remote_dir_is_one_literal_path(tools, marker, tmp_path):
  accepted = [v for v in _values(marker) if not v.startswith("-")]
  executed = [v for v in _sample(marker) if not v.startswith("-")]
  remote = _remote(tools, tmp_path, executed)
  for value in executed:
    r = tools.run("tpu_pod.py", *G, f"--remote_dir={value}", "run", "--", "--workdir=/tmp/w")
    assert r.returncode == 0, r.stderr
    project = remote / "worker-1" / value
    h.wait_for(project / "logs" / "train.exitcode")
    assert pathlib.Path(json.loads((project / "argv.json").read_text())["cwd"]) == project
  # Every worker script names the directory as the same single token.
  for value in accepted:
    for command in (tpu_pod.status_command(value), tpu_pod.stop_command(value, 1),
                    tpu_pod.logs_command(value, 10, True),
                    tpu_pod.run_command(value, "m", ["--workdir=w"], [], ""),
                    tpu_pod.setup_command(value, None, "HEAD", "3.11", "tpu"),
                    tpu_pod.setup_command(value, "https://x", "HEAD", "3.11", "tpu")):
      tokens = _shell_tokens(command)
      assert value in tokens or f"{value}/logs/train.log" in tokens, (command, value)
  tools.clear()
  r = tools.run("tpu_pod.py", *G, "--remote_dir=--flag=evil", "status")
  _assert_refused(r, tools)


def _git_repo(tmp_path):
  """A local repository to clone, holding a constraints.txt like the real one."""
  src = tmp_path / "src"
  src.mkdir()
  (src / "constraints.txt").write_text("")
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(src)]
  subprocess.run(["git", "init", "-q", str(src)], check=True)
  subprocess.run(git + ["add", "-A"], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "init"], check=True)
  return src


def _fake_python3(tools):
  """`python3` on the workers' PATH that records its argv instead of installing anything."""
  path = tools.bin / "python3"
  path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                  "with open(os.path.expanduser('~/python3.jsonl'), 'a') as f:\n"
                  "  f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
  path.chmod(0o755)


def test_tpu_pod_setup_repo_and_ref_are_literal(tools, marker, tmp_path):
  _fake_python3(tools)
  remote = tmp_path / "remote"
  tools.env["FAKE_GCLOUD_REMOTE"] = str(remote)
  src = _git_repo(tmp_path)
  # A real clone works end to end; pip is reached with the literal extras.
  r = tools.run("tpu_pod.py", *G, "setup", f"--repo={src}")
  assert r.returncode == 0, r.stderr
  for k in range(2):
    assert (remote / f"worker-{k}" / "pausejax" / "constraints.txt").exists()
    installs = (remote / f"worker-{k}" / "python3.jsonl").read_text().splitlines()
    assert json.loads(installs[-1])[-4:] == ["-c", "constraints.txt", "-e", ".[tpu]"]
  # Hostile URLs and refs: git refuses them, the setup fails, and nothing they spell runs.
  for n, value in enumerate(_sample(marker)):
    for flag in ("--repo", "--ref"):
      tools.clear()
      args = [f"{flag}={value}"] + ([f"--repo={src}"] if flag == "--ref" else [])
      r = tools.run("tpu_pod.py", *G, f"--remote_dir={flag[2:]}{n}", "setup", *args)
      if value.startswith("-"):
        _assert_refused(r, tools)
        continue
      assert r.returncode == 1, (flag, value, r.stderr)
      assert h.error_lines(r.stderr)[-1].startswith("error: `gcloud compute tpus tpu-vm ssh")
      command = _shell_tokens(tools.gcloud_calls()[-1][-3].split("=", 1)[1])
      assert value in command


# --- local.py --------------------------------------------------------------------------------

def test_local_passes_the_command_argv_literally(tools, marker, tmp_path):
  values = _values(marker)
  out = tmp_path / "argv"
  program = ("import json, os, sys; "
             "open(sys.argv[1] + os.environ['PAUSEJAX_PROCESS_ID'], 'w')"
             ".write(json.dumps(sys.argv[2:]))")
  r = tools.run("local.py", "--num_processes=2", "--", sys.executable, "-c", program, str(out),
                *values)
  assert r.returncode == 0, r.stderr
  for i in range(2):
    assert json.loads(pathlib.Path(f"{out}{i}").read_text()) == values
  for flag in ("--num_processes", "--devices_per_process", "--port"):
    for value in _sample(marker):
      with pytest.raises(_common.UsageError):
        local.main([f"{flag}={value}", "--", "true"])
    _assert_refused(tools.run("local.py", f"{flag}={values[3]}", "--", "true"), tools)


# --- gpu.py ----------------------------------------------------------------------------------

def test_gpu_passes_values_literally(tools, marker, tmp_path):
  values = _values(marker)
  h.install_fake_python(tmp_path / "cwd")  # Records into its working directory.
  python = str(tmp_path / "cwd" / ".venv" / "bin" / "python")
  xla = "--xla_dump_to=/tmp/$(touch)`x`;y|z&&w'q\"r"  # One word: XLA_FLAGS splits on spaces.
  env = [f"--env=V{i}={v}" for i, v in enumerate(values)]
  r = tools.run("gpu.py", f"--python={python}", f"--xla_flags={xla}", *env, "--", *values)
  assert r.returncode == 0, r.stderr
  record = json.loads((tmp_path / "cwd" / "argv.json").read_text())
  assert record["argv"] == ["-m", "pausejax.train", *values]
  assert [record["env"][f"V{i}"] for i in range(len(values))] == values
  assert record["env"]["XLA_FLAGS"].endswith(" " + xla)
  for flag in ("--module", "--mem_fraction", "--xla_flags"):
    _refuses(tools, marker, "gpu.py", gpu.main, lambda v, flag=flag: [f"{flag}={v}", "--", "x"])
  r = tools.run("gpu.py", f"--python={values[3]}", "--", "x")
  assert r.returncode == 1  # "cannot start": the value was a program name, never shell text.
  assert h.error_lines(r.stderr) == [
      f"error: cannot start {values[3]!r}: No such file or directory"]


# --- slurm.py --------------------------------------------------------------------------------

def test_slurm_script_runs_srun_with_literal_values(tools, marker, tmp_path):
  values = _values(marker)
  env = [f"--env=V{i}={v}" for i, v in enumerate(values)]
  xla = "--xla_dump_to=/tmp/$(touch)`x`;y|z&&w'q\"r"  # One word: XLA_FLAGS splits on spaces.
  jobs_xla = f"--xla_dump_to=$(touch {marker})"  # XLA_FLAGS in the job's environment.
  r = tools.run("slurm.py", "--nodes=2", f"--python={values[0]}", f"--xla_flags={xla}", *env,
                "--", *values)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == "submitted job 4242; follow it with: squeue -j 4242"
  (call,) = tools.sbatch_calls()
  assert call["argv"] == ["--parsable"]
  script = tmp_path / "job.sbatch"
  script.write_text(call["script"])
  for line in call["script"].splitlines():
    if line.startswith("#SBATCH"):
      assert len(shlex.split(line)) == 2, line  # One directive, one plain word.
  subprocess.run(["bash", str(script)], env=dict(tools.env, XLA_FLAGS=jobs_xla), check=True,
                 cwd=tmp_path)
  (srun,) = tools.srun_calls()
  assert srun["argv"] == ["--kill-on-bad-exit=1", "--cpus-per-task=8", values[0], "-m",
                          "pausejax.train", *values]
  assert [srun["env"][f"V{i}"] for i in range(len(values))] == values
  assert srun["env"]["XLA_FLAGS"].endswith(f" {jobs_xla} {xla}")


@pytest.mark.parametrize("flag", ["--job_name", "--partition", "--account", "--time", "--output",
                                  "--nodes", "--gpus_per_node", "--cpus_per_task", "--module",
                                  "--process_per", "--gpu_request", "--signal_seconds"])
def test_slurm_refuses_hostile_sbatch_values(tools, marker, flag):
  _refuses(tools, marker, "slurm.py", slurm.main, lambda v: [f"{flag}={v}", "--", "--workdir=/w"])
