"""Command-line tools over checkpoints: ``noether-ckpt`` (list, inspect, verify, prune, convert)."""
