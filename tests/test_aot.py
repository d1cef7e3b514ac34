"""pausejax.aot: the real train step compiled for TPU topologies that libtpu describes, on CPU."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

if importlib.util.find_spec("libtpu") is None:
  pytest.skip("libtpu is not installed (pip install -c constraints.txt -e '.[tpu]'); it describes "
              "the TPU chips these tests compile for", allow_module_level=True)

# configs/tiny.py shrunk to compile in seconds. A remote vocab_path is never read: the base
# vocabulary size comes from --vocab_size, so the embedding has a known number of rows.
TINY = {"seq_len": 64, "global_batch_size": 8, "model.num_layers": 1, "model.d_model": 64,
        "model.num_heads": 2, "model.head_dim": 32, "model.mlp_dim": 128,
        "model.tied_embeddings": True, "model.dtype": "float32", "model.param_dtype": "float32",
        "vocab_path": "gs://no-bucket/spm.model"}
BASE_VOCAB = 1000
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def run_aot(*args: str, **config) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  overrides = [f"--config.{k}={v}" for k, v in {**TINY, **config}.items()]
  return subprocess.run(
      [sys.executable, "-m", "pausejax.aot", "--config=configs/tiny.py",
       f"--vocab_size={BASE_VOCAB}", *overrides, *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def tiny_model_config():
  from pausejax import model as model_lib
  rows = -(-(BASE_VOCAB + 3) // 128) * 128  # Base + <pause>, <sink>, <backspace>; x128.
  return model_lib.ModelConfig(
      vocab_size=rows, num_layers=TINY["model.num_layers"], d_model=TINY["model.d_model"],
      num_heads=TINY["model.num_heads"], head_dim=TINY["model.head_dim"],
      mlp_dim=TINY["model.mlp_dim"], tied_embeddings=True)


@pytest.mark.slow
def test_tiny_config_compiles_for_v5e_and_reports_consistent_numbers():
  from pausejax import model as model_lib
  result = run_aot("--topology=v5e:2x2", "--mfu=0.5")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "v5e:2x2 = 4 x TPU v5 lite chips" in out
  # configs/tiny.py: mesh.data=-1 (and a DCN axis of 1 where the mesh has one).
  assert re.search(r"\| mesh (dcn_data=1 )?data=4 fsdp=1 tensor=1$", out, re.M), out
  cfg = tiny_model_config()
  assert f"vocab {cfg.vocab_size} rows (base {BASE_VOCAB}" in out

  # HBM per chip: every part printed, the total is their sum (within the printed rounding).
  memory = {}
  for name in ("arguments", "outputs", "aliased", "temporaries", "generated code", "total"):
    found = re.search(rf"^  {name}:\s+(-?[\d.]+) (B|KiB|MiB|GiB)", out, re.M)
    assert found, f"no '{name}' line in:\n{out}"
    memory[name] = float(found.group(1)) * UNITS[found.group(2)]
  parts = [v for k, v in memory.items() if k != "total"]
  assert abs(sum(parts) - memory["total"]) <= 0.005 * 2**20 * len(parts)
  assert memory["total"] > 0 and memory["temporaries"] >= 0
  # The state is replicated (pure data parallelism): float32 params + two Adam moments per chip,
  # and all of it is donated, so it is aliased into the new state rather than allocated twice.
  state_bytes = 3 * 4 * model_lib.count_params(cfg)
  assert state_bytes <= memory["arguments"] <= state_bytes + 2**20
  assert 0.99 * state_bytes <= -memory["aliased"] <= memory["outputs"]
  used = re.search(r"of ([\d.]+) GiB usable .*spec sheet: 16 GB HBM", out)
  assert used and 15 < float(used.group(1)) <= 16

  # FLOPs: the analytic count is flops_per_token x tokens; the compiled one agrees within 2x.
  flops = re.search(r"FLOPs per step: ([\d.e+]+) compiled .*\| ([\d.e+]+) analytic", out)
  compiled, analytic = float(flops.group(1)), float(flops.group(2))
  tokens = TINY["global_batch_size"] * TINY["seq_len"]
  assert analytic == pytest.approx(model_lib.flops_per_token(cfg, TINY["seq_len"]) * tokens,
                                   rel=1e-3)
  assert 0.5 < compiled / analytic < 2

  # Predicted speed at the requested MFU and the printed per-chip peak.
  speed = re.search(r"at 50% MFU \(.* bf16 peak ([\d.]+) TFLOP/s per chip\): step time "
                    r"([\d.e+-]+) s \| ([\d.e+]+) tokens/s", out)
  assert speed, out
  peak, step, tokens_per_s = (float(g) for g in speed.groups())
  assert peak > 0
  assert step == pytest.approx(analytic / (0.5 * peak * 1e12 * 4), rel=1e-3)
  assert tokens_per_s == pytest.approx(tokens / step, rel=1e-3)


def test_malformed_topology_exits_2_with_one_line():
  result = run_aot("--topology=v5p-8")
  assert result.returncode == 2
  assert result.stdout == ""
  (line,) = error_lines(result.stderr)
  assert line.startswith("error: --topology='v5p-8' is invalid")
  assert "v5p:2x2x1" in line and "v5e:2x4" in line


@pytest.mark.parametrize("value", ["", "v5p", "v5p:2x2", "v5e:2x2x1", "v9:2x2", "v5p:0x2x1",
                                   "v5p:2x2x1x1", "v5p-8", "2x2x1"])
def test_parse_topology_rejects(value):
  from pausejax import aot
  from pausejax.errors import UsageError
  with pytest.raises(UsageError, match="--topology"):
    aot.parse_topology(value)


def test_parse_topology_accepts():
  from pausejax import aot
  assert aot.parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4))
  assert aot.parse_topology("v5e:2x4") == ("v5e", (2, 4))
  assert aot.parse_topology("v4:2x2x1") == ("v4", (2, 2, 1))
  assert aot.parse_topology("v6e:16x16") == ("v6e", (16, 16))


@pytest.mark.slow
def test_config_too_large_for_the_chip_exits_2_with_suggestions():
  # 128 sequences of 4096 tokens per v5e chip: the float32 attention probabilities alone
  # (2 heads x 4096^2 x 4 bytes each) are 16 GiB, more than a v5e chip's HBM.
  result = run_aot("--topology=v5e:2x2", **{"seq_len": 4096, "global_batch_size": 512})
  assert result.returncode == 2, result.stdout + result.stderr[-3000:]
  (line,) = error_lines(result.stderr)
  needed = re.search(r"needs ([\d.]+) GiB of HBM per chip on v5e:2x2", line)
  assert needed and float(needed.group(1)) > 15.75, line
  assert "15.75 GiB usable" in line
  assert "--config.model.dtype=bfloat16" in line  # TINY computes in float32.
  assert "--config.model.remat=full" in line and "--config.model.scan_layers=True" in line
  smaller = re.search(r"--config.global_batch_size=(\d+)", line)
  assert smaller and int(smaller.group(1)) < 512
  if has_microbatches():
    assert re.search(r"--config.microbatches=\d+ \(gradient accumulation", line), line


@pytest.mark.slow
def test_scanned_rematerialised_fsdp_step_compiles():
  """model.scan_layers + model.remat on an fsdp mesh (the model constrains its activations)."""
  result = run_aot("--topology=v5e:2x2", **{"model.num_layers": 2, "model.scan_layers": True,
                                            "model.remat": "minimal", "mesh.data": 1,
                                            "mesh.fsdp": -1})
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert re.search(r"\| mesh .*\bfsdp=4 tensor=1$", out, re.M), out
  assert "| remat minimal | layers scanned" in out
  # cost_analysis would count one of the scanned layers: no compiled figure, the analytic one.
  assert re.search(r"FLOPs per step: n/a compiled \(model.scan_layers.*\| [\d.e+]+ analytic", out)
  assert re.search(r"step time [\d.e+-]+ s", out)
  # A remat setting the model does not know stops before compiling, naming the setting.
  result = run_aot("--topology=v5e:2x2", **{"model.remat": "sometimes"})
  assert result.returncode == 2
  (line,) = error_lines(result.stderr)
  assert line.startswith("error: model.remat='sometimes' is invalid"), line


def has_microbatches() -> bool:
  from pausejax import config as config_lib
  return "microbatches" in config_lib.defaults()


@pytest.mark.slow
def test_suggested_microbatches_fit_with_the_same_tokens_per_step():
  if not has_microbatches():
    pytest.skip("this tree's train step has no gradient accumulation (config.microbatches)")
  big = {"seq_len": 4096, "global_batch_size": 512}
  result = run_aot("--topology=v5e:2x2", **big)
  assert result.returncode == 2
  k = int(re.search(r"--config.microbatches=(\d+)", result.stderr).group(1))
  result = run_aot("--topology=v5e:2x2", **big, microbatches=k)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert f"512 x 4096 tokens per step, 128 sequences per batch shard in {k} microbatches" in out
  total = re.search(r"^  total:\s+([\d.]+) GiB of ([\d.]+) GiB usable", out, re.M)
  assert total and float(total.group(1)) < float(total.group(2))
  # cost_analysis counts the microbatch loop body once; the report scales it back.
  flops = re.search(r"FLOPs per step: ([\d.e+]+) compiled .* microbatches\) \| ([\d.e+]+) "
                    r"analytic .* ratio ([\d.]+)", out)
  assert flops and 0.5 < float(flops.group(3)) < 2, out


def test_topology_that_libtpu_rejects_exits_2():
  result = run_aot("--topology=v5p:3x3x1")  # Not a whole number of 2x2x1 hosts.
  assert result.returncode == 2
  (line,) = error_lines(result.stderr)
  assert line.startswith("error: --topology='v5p:3x3x1' is invalid: libtpu rejects it")


@pytest.mark.slow
def test_two_slices_put_the_data_axis_over_dcn():
  result = run_aot("--topology=v5e:2x2", "--num_slices=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "v5e:2x2 x 2 slices = 8 x TPU v5 lite chips" in result.stdout
  assert "mesh dcn_data=2 data=4 fsdp=1 tensor=1" in result.stdout
  # FSDP inside each slice, data parallel across them.
  result = run_aot("--topology=v5e:2x2", "--num_slices=2",
                   **{"mesh.data": 1, "mesh.fsdp": -1})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh dcn_data=2 data=1 fsdp=4 tensor=1" in result.stdout
  # A DCN axis that is not the number of slices.
  result = run_aot("--topology=v5e:2x2", "--num_slices=2", **{"mesh.dcn_data": 4})
  assert result.returncode == 2
  (line,) = error_lines(result.stderr)
  assert "mesh.dcn_data=4 is invalid" in line
