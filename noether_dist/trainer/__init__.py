"""The reference trainer (``python -m noether_dist.trainer``): an example user of the library;
no library module imports it.

Its modules import one way: ``run`` (the entry point: arguments, ``main``, error reporting)
-> ``loop`` (build, resume or initialise, train, checkpoint, summarise) -> ``model`` (the
toy MLP, its sharding, synthetic data) -> ``config`` (TrainConfig, overrides).
"""
