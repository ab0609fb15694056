"""Tests that need the real Noether package; they run only in the Noether environment
(``bash scripts/setup_noether_env.sh``; ``scripts/test.sh`` runs them)."""
