"""pausejax: pretraining language models with pause tokens in JAX/Flax."""

from pausejax import platforms
from pausejax import startup

# Both before anything imports JAX or TensorFlow; see their docstrings.
startup.begin()  # Only under `python -m pausejax.<program>`: --help, and a stderr filter.
platforms.configure()

__version__ = "0.1.0"
