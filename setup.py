"""pausejax: pretraining language models with pause tokens, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="pausejax",
    version="0.1.0",
    description="Pause-token pretraining (Goyal et al. 2023) in JAX/Flax NNX with SeqIO data.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pausejax", "pausejax.*"]),
    package_data={"pausejax": ["assets/*/*.gz", "assets/*/*.model", "assets/*/*.md"]},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<4.10",
        "seqio>=0.0.20",
        "ml-collections>=1.1.0,<2",
        "sentencepiece>=0.2",
        "clu>=0.0.12",
        "matplotlib>=3.8",
        "importlib_resources>=6",  # tensorflow-datasets imports it without declaring it.
        "tensorboard>=2.21,<2.22",  # clu's TensorBoard writer needs it.
        "numpy>=1.26",
        "safetensors>=0.4,<1",  # pausejax.export writes Hugging Face's weight files.
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],  # make test runs the fast set on 2 workers.
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    },
)
