"""Benchmarks of noether_dist: every figure is a ratio of two things measured side by side
in one run on one machine. Run ``python benchmarks/run.py`` (see benchmarks/README.md)."""
