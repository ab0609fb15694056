"""A small Noether project of our own: a tiny model, a synthetic dataset, a trainer that
checkpoints through noether_dist, and a deterministic validation metric. Only importable in
the Noether env."""
