"""Collection of tests/integration/noether fails loudly, never skips, when Noether is not importable."""

from __future__ import annotations

import sys

import pytest

try:
    import noether  # noqa: F401 - the check itself
except ImportError as exc:
    raise pytest.UsageError(
        f"tests/integration/noether needs the Noether package (emmiai-noether), which {sys.executable} cannot import ({exc}); "
        "run these tests in the Noether environment: bash scripts/setup_noether_env.sh && "
        "\"$(bash scripts/noether_env.sh)/bin/python\" -m pytest tests/integration/noether (scripts/test.sh does both)"
    ) from exc
