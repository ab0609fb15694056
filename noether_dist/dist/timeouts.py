"""The default upper bound of every wait across ranks. Torch-free, so that configs (imported
by tools that never load torch) and the collectives read the same value."""

from __future__ import annotations

import os

__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_ENV_VAR"]

TIMEOUT_ENV_VAR = "NOETHER_DIST_TIMEOUT_S"
"""The environment variable that sets the default (seconds)."""

DEFAULT_TIMEOUT_S = float(os.environ.get(TIMEOUT_ENV_VAR, "600"))
"""Seconds a collective waits when no timeout is given: ``NOETHER_DIST_TIMEOUT_S``, else 600."""
