"""Fixtures for the reliability matrix (issue 19): the multi-rank tests' tiny corpus and recipe,
and their launch helpers (``import multirank_util as mr``), shared rather than copied."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MULTIRANK = Path(__file__).resolve().parents[1] / "multirank"
if str(MULTIRANK) not in sys.path:
    sys.path.insert(0, str(MULTIRANK))

_spec = importlib.util.spec_from_file_location("multirank_fixtures", MULTIRANK / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

RECIPE = _fixtures.RECIPE
tiny_data = _fixtures.tiny_data
tiny_recipe = _fixtures.tiny_recipe
