"""A stage's checkpoints on storage: commit records and aliases, listing and selection, retention, verification."""
