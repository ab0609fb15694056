"""Names and layout of checkpoints: pure functions and records, no I/O (the lowest layer above errors)."""
