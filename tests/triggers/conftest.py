from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import NimbusServer, running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NimbusServer]:
    """One real, sandboxed ``nimbus up`` per test module; tests use their own function names."""
    with running(tmp_path_factory.mktemp("nimbus") / "data") as s:
        yield s
