"""pausejax: pretraining language models with pause tokens in JAX/Flax."""

__version__ = "0.1.0"
