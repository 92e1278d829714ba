"""Shared test helpers: real function directories and a real ``nimbus up``."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "functions"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
