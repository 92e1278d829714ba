"""Shared test helpers: real function directories and a real ``nimbus up``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "functions"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def _base_root() -> None:
    """The sandbox's base root filesystem, built before any test starts a server (once
    per machine: the build is cached under /var/cache/nimbus and shared by every
    worker, which wait for each other on its lock), so that no server's start-up
    pays for it."""
    if os.geteuid() != 0:
        return
    from tests.support import base_root

    base_root()
