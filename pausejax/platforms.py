"""The JAX platforms of this machine, chosen before JAX is imported and without importing it.

libtpu comes with the `tpu` extra (pausejax.aot compiles for TPU slices with it), and when
`JAX_PLATFORMS` is unset JAX tries every backend it finds: on a machine without a TPU, libtpu
then prints initialisation errors before JAX falls back to another backend. `configure` sets
`JAX_PLATFORMS` to the backends that can work here when, and only when,

  * the user has not set it (an empty value counts: it asks JAX to choose),
  * JAX is not imported yet (it reads the variable once, at import), and
  * no TPU is attached: no PCI device with a TPU chip's vendor and device id (the test JAX
    makes, jax/_src/hardware_utils.py) and no JAX_FORCE_TPU_INIT.

The choice is "cuda,cpu" when a CUDA plugin for JAX is installed and an NVIDIA GPU is visible (the
device nodes JAX looks for), else "cpu". Named platforms must start, so a CUDA set-up that fails
stops the program with JAX's error rather than falling back to the CPU unnoticed. A plugin for any
other accelerator (ROCm, Metal, ...) leaves the choice to JAX.

`import pausejax` calls `configure`, for library use as well as for the command-line programs:
it only takes away a backend that cannot work on this machine, so a program computes on the
devices it would have used anyway, minus libtpu's errors. Compile-only TPU topologies
(pausejax.aot) load libtpu themselves and work with "cpu".
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Mapping

_GOOGLE_PCI_VENDOR = "0x1ae0"
# TPU chips' PCI device ids, as jax/_src/hardware_utils.py lists them (v3 ... TPU7x). Google's
# other PCI devices (virtual NIC, NVMe) share the vendor id, so the device id decides.
TPU_PCI_DEVICE_IDS = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f",
                                "0x0076"})
# Device nodes whose presence makes JAX try CUDA (jax/_src/hardware_utils.py).
_NVIDIA_DEVICE_NODES = ("dev/nvidia0", "dev/nvidiactl", "dev/dxg")


def _read(path: str) -> str:
  try:
    with open(path, encoding="ascii") as f:
      return f.read().strip()
  except (OSError, ValueError):
    return ""


def tpu_attached(root: str = "/", environ: Mapping[str, str] = os.environ) -> bool:
  """Whether JAX would treat this machine as a TPU host (`root`: where /sys is mounted)."""
  if "JAX_FORCE_TPU_INIT" in environ:
    return True
  devices = os.path.join(root, "sys", "bus", "pci", "devices")
  try:
    names = os.listdir(devices)
  except OSError:  # No sysfs (macOS, some sandboxes): no PCI TPU either.
    return False
  return any(_read(os.path.join(devices, n, "vendor")) == _GOOGLE_PCI_VENDOR
             and _read(os.path.join(devices, n, "device")) in TPU_PCI_DEVICE_IDS for n in names)


def nvidia_gpu_visible(root: str = "/") -> bool:
  return any(os.path.exists(os.path.join(root, node)) for node in _NVIDIA_DEVICE_NODES)


def installed_jax_plugins() -> set[str]:
  """Names of the installed JAX plugin modules (the `jax_plugins` namespace and entry points)."""
  # Imported here: most runs set JAX_PLATFORMS or have a TPU and never get this far.
  import importlib.metadata
  import importlib.util
  import pkgutil

  names = set()
  try:
    spec = importlib.util.find_spec("jax_plugins")
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    names.update(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))
  names.update(e.value.rsplit(".", 1)[-1] for e in importlib.metadata.entry_points(
      group="jax_plugins"))
  return names


def choose(root: str = "/", environ: Mapping[str, str] = os.environ,
           plugins: Iterable[str] | None = None) -> str | None:
  """The JAX_PLATFORMS value to set, or None to leave the choice to the user or to JAX.

  Args:
    root: where the machine's /sys and /dev are mounted.
    environ: the process environment.
    plugins: installed JAX plugin module names (default: `installed_jax_plugins()`).
  """
  if "JAX_PLATFORMS" in environ or tpu_attached(root, environ):
    return None
  plugins = installed_jax_plugins() if plugins is None else set(plugins)
  cuda = {p for p in plugins if "cuda" in p}
  if plugins - cuda:  # An accelerator this module does not know how to detect.
    return None
  return "cuda,cpu" if cuda and nvidia_gpu_visible(root) else "cpu"


def configure() -> None:
  """Sets JAX_PLATFORMS as the module docstring says; call before JAX is imported."""
  if "jax" in sys.modules:
    return
  platforms = choose()
  if platforms is not None:
    os.environ["JAX_PLATFORMS"] = platforms
