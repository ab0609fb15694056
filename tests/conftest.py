"""Shared fixtures: a real S3 endpoint (moto server over HTTP on 127.0.0.1)."""

from __future__ import annotations

import logging
import os
import uuid

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
logging.getLogger("noether_dist").setLevel(logging.INFO)
