"""Integrations of noether_dist with training frameworks (each imports its framework)."""
