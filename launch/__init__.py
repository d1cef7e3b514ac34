"""Launchers: local multi-process, Cloud TPU pods, GPU hosts and SLURM clusters."""
