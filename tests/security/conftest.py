"""Attack tests against a real, sandboxed ``nimbus up``.

Each test module gets one server (sandboxed: the default when root) with a
marker in its environment that no function may ever see, and one neighbour
function (``hello`` as ``sec-neighbour``) that must keep answering whatever
the attackers do. Tests deploy their own attackers under their own names.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator

import pytest

from tests.security.attacks import ENV_MARKER, ENV_MARKER_NAME, NEIGHBOUR, deploy
from tests.support import NimbusServer, running


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The attacks use x86_64 syscall numbers, and only root can sandbox.
    reason = None
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        reason = "the attack function uses x86_64 Linux syscall numbers"
    elif os.geteuid() != 0:
        reason = "sandboxed instances need root"
    if reason:
        for item in items:
            if "tests/security/" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NimbusServer]:
    """One sandboxed ``nimbus up`` per test module, with the neighbour deployed."""
    with running(
        tmp_path_factory.mktemp("nimbus") / "data", env={ENV_MARKER_NAME: ENV_MARKER}
    ) as s:
        deploy(s, NEIGHBOUR, "hello")
        yield s
