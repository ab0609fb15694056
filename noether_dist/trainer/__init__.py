"""The reference trainer (``python -m noether_dist.trainer``): an example user of the library; no library module imports it."""
