"""Start-up of the CLIs: the platform JAX gets, a quick --help, and no native noise on stderr."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from pausejax import platforms
from pausejax import startup

from conftest import REPO

CLIS = ["train", "generate", "evaluate", "inspect_data", "bench", "aot", "experiments.ablation",
        "experiments.parity"]
HEAVY = ("tensorflow", "jax", "flax", "seqio", "orbax", "optax", "tensorflow_datasets")


def _bare_env(**extra):
  """The environment of a newcomer's shell: no JAX_PLATFORMS, no TF_CPP_MIN_LOG_LEVEL."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
  env.update(extra)
  return env


def _python(*args, env=None, text=True):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env or _bare_env(),
                        capture_output=True, text=text, timeout=600)


# ------------------------------------------------------------------------------------------------
# Platform choice.

def _fake_machine(root, pci=(), dev=()):
  root.mkdir(parents=True, exist_ok=True)
  for i, (vendor, device) in enumerate(pci):
    d = root / "sys" / "bus" / "pci" / "devices" / f"0000:00:{i:02x}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
  for node in dev:
    (root / "dev").mkdir(exist_ok=True)
    (root / "dev" / node).write_text("")
  return str(root)


def test_no_accelerator_gets_cpu(tmp_path):
  root = _fake_machine(tmp_path, pci=[("0x8086", "0x1237"), ("0x1ae0", "0x0042")])  # gVNIC.
  assert not platforms.tpu_attached(root, {})
  assert platforms.choose(root, {}, plugins=[]) == "cpu"


def test_machine_without_sysfs_gets_cpu(tmp_path):
  assert platforms.choose(str(tmp_path / "nothing"), {}, plugins=[]) == "cpu"


@pytest.mark.parametrize("device", ["0x005e", "0x0063", "0x006f"])
def test_tpu_on_pci_leaves_the_choice_to_jax(tmp_path, device):
  root = _fake_machine(tmp_path, pci=[("0x1ae0", "0x0042"), ("0x1ae0", device)])
  assert platforms.tpu_attached(root, {})
  assert platforms.choose(root, {}, plugins=[]) is None


def test_forced_tpu_init_leaves_the_choice_to_jax(tmp_path):
  assert platforms.choose(str(tmp_path), {"JAX_FORCE_TPU_INIT": "1"}, plugins=[]) is None


@pytest.mark.parametrize("value", ["", "cpu", "tpu", "cuda"])
def test_the_users_jax_platforms_wins(tmp_path, value):
  assert platforms.choose(str(tmp_path), {"JAX_PLATFORMS": value}, plugins=[]) is None


def test_cuda_plugin_with_a_visible_gpu_gets_cuda_then_cpu(tmp_path):
  with_gpu = _fake_machine(tmp_path / "gpu", dev=["nvidiactl", "nvidia0"])
  without = _fake_machine(tmp_path / "cpu")
  assert platforms.choose(with_gpu, {}, plugins=["xla_cuda12"]) == "cuda,cpu"
  assert platforms.choose(without, {}, plugins=["xla_cuda12"]) == "cpu"
  assert platforms.choose(with_gpu, {}, plugins=[]) == "cpu"  # No plugin: JAX cannot use it.


def test_an_unknown_accelerator_plugin_leaves_the_choice_to_jax(tmp_path):
  assert platforms.choose(str(tmp_path), {}, plugins=["xla_cuda12", "xla_rocm7"]) is None


def test_tpu_device_ids_are_jaxs():
  from jax._src import hardware_utils
  assert platforms.TPU_PCI_DEVICE_IDS == set(hardware_utils._TPU_PCI_DEVICE_IDS)


def test_import_sets_jax_platforms_only_when_unset_and_jax_not_imported():
  expected = platforms.choose(environ=_bare_env())
  show = "import os; print(os.environ.get('JAX_PLATFORMS'))"
  assert _python("-c", "import pausejax; " + show).stdout.strip() == str(expected)
  assert _python("-c", "import pausejax; " + show,
                 env=_bare_env(JAX_PLATFORMS="")).stdout.strip() == ""
  # JAX read the environment when it was imported; changing it now would change nothing.
  assert _python("-c", "import jax, pausejax; " + show).stdout.strip() == "None"


def test_jax_starts_without_libtpu_errors():
  expected = platforms.choose(environ=_bare_env())
  if expected is None:
    pytest.skip("a TPU is attached: JAX chooses, and libtpu has a TPU to initialise")
  result = _python("-c", "import pausejax, jax; print(jax.default_backend())")
  assert result.stderr == ""
  first = expected.split(",")[0]
  assert result.stdout.strip() == {"cuda": "gpu"}.get(first, first)


# ------------------------------------------------------------------------------------------------
# --help.

@pytest.mark.parametrize("orig_argv, module", [
    (["python", "-m", "pausejax.train", "--help"], "pausejax.train"),
    (["python", "-X", "importtime", "-u", "-m", "pausejax.aot"], "pausejax.aot"),
    (["python", "-mpausejax.experiments.parity"], "pausejax.experiments.parity"),
    (["python", "-m", "pytest", "-m", "pausejax.train"], None),
    (["python", "-c", "import pausejax", "-m", "pausejax.train"], None),
    (["python", "script.py", "-m", "pausejax.train"], None),
    (["python"], None),
])
def test_cli_module(orig_argv, module):
  assert startup.cli_module(orig_argv) == module


def test_asks_for_help():
  assert startup.asks_for_help(["--config=c.py", "-h"])
  assert startup.asks_for_help(["-?"])
  assert not startup.asks_for_help(["--config=c.py", "--", "--help"])
  assert not startup.asks_for_help(["--helpfull"], startup.SHORT_HELP)


@pytest.mark.parametrize("cli", CLIS)
def test_every_cli_defines_its_flags_where_help_can_find_them(cli):
  path = os.path.join(REPO, "pausejax", *cli.split(".")) + ".py"
  with open(path, encoding="utf-8") as f:
    assert startup.flag_definitions(f.read(), path) is not None


@pytest.mark.parametrize("cli", CLIS)
def test_help_prints_the_flags_without_the_heavy_imports(cli):
  result = _python("-X", "importtime", "-m", f"pausejax.{cli}", "--help")
  assert result.returncode == 0, result.stderr
  assert "flags:" in result.stdout and "--" in result.stdout
  imported = set(re.findall(r"^import time:.*\|\s*([\w.]+)$", result.stderr, re.M))
  assert imported, "no -X importtime lines"
  assert not {m.split(".")[0] for m in imported} & set(HEAVY)
  other = [l for l in result.stderr.splitlines() if not l.startswith("import time:")]
  assert not other


def test_dash_h_and_question_mark_are_help():
  for flag in ("-h", "-?", "--helpshort"):
    result = _python("-m", "pausejax.inspect_data", flag)
    assert result.returncode == 0 and result.stderr == ""
    assert "--num_examples" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("cli, args", [("train", ["--help"]),
                                       ("inspect_data", ["--config=configs/tiny.py", "-h"])])
def test_quick_help_is_the_programs_own_help(cli, args):
  # Not run with -m, pausejax imports the whole program and absl prints the help after that.
  full = _python("-c", textwrap.dedent(f"""
      import runpy, sys
      sys.argv = ["{cli}", *{args!r}]
      runpy.run_module("pausejax.{cli}", run_name="__main__", alter_sys=True)"""))
  quick = _python("-m", f"pausejax.{cli}", *args)
  assert quick.returncode == full.returncode == 0
  assert quick.stdout == full.stdout


def _program(tmp_path, body):
  path = tmp_path / "prog.py"
  path.write_text(textwrap.dedent(body))
  return str(path)


def test_quick_help_leaves_absl_alone_when_definitions_need_more(tmp_path):
  path = _program(tmp_path, '''
      """A program."""
      from absl import flags
      from pausejax.errors import run
      from somewhere import DEFAULT

      def define_flags():
        flags.DEFINE_integer("seed", 0, "Seed.")  # Defined, then undone.
        flags.DEFINE_integer("steps", DEFAULT, "Steps.")

      if __name__ == "__main__":
        define_flags()
        run(main)
      ''')
  check = textwrap.dedent(f"""
      import sys
      sys.argv = ["-m", "--help"]
      from absl import flags
      from pausejax import errors, startup  # Their imports define absl's own flags.
      before = sorted(flags.FLAGS)
      startup.quick_help({path!r})
      assert sorted(flags.FLAGS) == before, set(flags.FLAGS) ^ set(before)
      assert sys.argv == ["-m", "--help"]
      print("returned")""")
  result = _python("-c", check)
  assert result.stdout.strip() == "returned", result.stderr


def test_quick_help_runs_top_level_definitions_and_constants(tmp_path):
  path = _program(tmp_path, '''
      """Counts to %s."""
      from __future__ import annotations
      from absl import flags
      from pausejax.errors import run
      import tensorflow as tf

      CHOICES = ("up", "down")
      _WAY = flags.DEFINE_enum("way", "up", list(CHOICES), "Which way.")

      if __name__ == "__main__":
        run(main)
      ''')
  check = f"import sys; sys.argv = ['-m', '--help']; from pausejax import startup; " \
          f"startup.quick_help({path!r})"
  result = _python("-X", "importtime", "-c", check)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"Counts to {path}.")
  assert "--way: <up|down>: Which way." in result.stdout
  assert "tensorflow" not in result.stderr


# ------------------------------------------------------------------------------------------------
# Native noise.

NOISE_SEEN = [  # As TensorFlow 2.21, tensorflow-text and absl print them on a CPU machine.
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796225262.593397    3737 cudart_stub.cc:31] Could not find cuda drivers on your "
    "machine, GPU will not be used.",
    "E0000 00:00:1796225270.417359    3737 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.",
]


def test_noise_patterns():
  for line in NOISE_SEEN:
    assert startup.is_noise(line.encode() + b"\n"), line
  for line in ["error: seq_len=1 is invalid: an integer >= 2",
               "E0000 00:00:1796225271.286782    3737 common_lib.cc:554] INVALID_ARGUMENT: x",
               "W1202 15:27:51.407493 139659871038336 pausejax.py:1] Could not find cuda drivers",
               "Traceback (most recent call last):"]:
    assert not startup.is_noise(line.encode() + b"\n"), line


def test_filter_drops_noise_and_keeps_the_rest_even_on_abort():
  noise = "".join(line + "\n" for line in NOISE_SEEN)
  script = textwrap.dedent(f"""
      import os, sys, time
      from pausejax import startup
      startup.filter_stderr()
      os.write(2, {noise.encode()!r})
      os.write(2, b"normalizer.cc(51) LOG(INFO) ")  # One log line in two writes.
      os.write(2, b"precompiled_charsmap is empty. use identity normalization.\\n")
      sys.stderr.write("kept\\n")
      sys.stderr.write("50%\\r")
      sys.stderr.flush()
      sys.stderr.write("partial")
      sys.stderr.flush()
      time.sleep(0.5)
      sys.stderr.write(" line\\n")
      sys.stderr.flush()
      os.write(2, b"F0000 last words before abort\\n")
      os.abort()""")
  result = _python("-c", script, text=False)
  assert result.returncode != 0
  assert result.stderr == b"kept\n50%\rpartial line\nF0000 last words before abort\n"


def test_bad_setting_prints_one_line_and_nothing_else(tmp_path):
  result = _python("-m", "pausejax.train", "--config=configs/tiny.py",
                   f"--workdir={tmp_path / 'w'}", "--config.seq_len=1")
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [result.stderr.splitlines()[0]]
  assert result.stderr.startswith("error: seq_len=1 is invalid")
  assert not os.path.exists(tmp_path / "w")


def test_library_import_leaves_logging_alone():
  show = "import os, sys, pausejax; print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
  result = _python("-c", show + "; os.write(2, b'normalizer.cc(51) LOG(INFO) precompiled_charsmap "
                   "is empty. use identity normalization.\\n')")
  assert result.stdout.strip() == "None"
  assert "normalizer.cc" in result.stderr


@pytest.mark.parametrize("level, filtered", [(None, True), ("3", True), ("0", False)])
def test_cli_filters_stderr_unless_tf_cpp_min_log_level_is_0(level, filtered):
  # What `python -m pausejax.x` does before importing pausejax.x, without a real program.
  noise = (NOISE_SEEN[1] + "\n").encode()
  script = textwrap.dedent(f"""
      import os, sys
      sys.orig_argv, sys.argv = [sys.executable, "-m", "pausejax.inspect_data"], ["-m"]
      from pausejax import startup
      startup.begin()
      print(os.environ["TF_CPP_MIN_LOG_LEVEL"])
      os.write(2, {noise!r})
      os.write(2, b"kept\\n")""")
  env = _bare_env() if level is None else _bare_env(TF_CPP_MIN_LOG_LEVEL=level)
  result = _python("-c", script, env=env)
  assert result.stdout.strip() == (level or "2")
  assert result.stderr == ("kept\n" if filtered else NOISE_SEEN[1] + "\nkept\n")
