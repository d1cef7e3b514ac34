"""Small-scale experiments that reproduce the pause-token papers' effects (see docs/results.md)."""
