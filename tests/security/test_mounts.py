"""File-trigger mounts: the directory bound into a sandbox is the one checked at
deploy, never what a symbolic link swapped in later points to."""

from __future__ import annotations

import os
from pathlib import Path

from tests.security.attacks import assert_unharmed
from tests.support import NimbusServer, make_zip

LISTER = b"""
import os

def handler(event, context):
    return {"entries": sorted(os.listdir("/mnt/inbox"))}
"""


def spec(name: str, path: Path) -> dict[str, object]:
    trigger = {"type": "files", "path": str(path), "mount": "/mnt/inbox", "events": ["deleted"]}
    return {
        "name": name,
        "handler": "app.handler",
        "scaling": {"keep_warm": 0, "zygote_keep_warm": 0},
        "triggers": [trigger],
    }


def test_a_path_through_a_link_is_refused_at_deploy(server: NimbusServer, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    r = server.create(spec("sec-mount-link", link), make_zip({"app.py": LISTER}))
    assert r.status_code == 400, r.text
    assert "symbolic link" in r.json()["error"]["message"]
    assert str(real) in r.json()["error"]["message"]


def test_a_directory_swapped_for_a_link_after_deploy_is_not_mounted(
    server: NimbusServer, tmp_path: Path
) -> None:
    os.chmod(tmp_path, 0o755)
    watched = tmp_path / "watched"
    watched.mkdir(mode=0o755)
    (watched / "mine.txt").write_text("mine")
    assert (
        server.create(spec("sec-mount-swap", watched), make_zip({"app.py": LISTER})).status_code
        == 201
    )
    r = server.invoke("sec-mount-swap", {})
    assert r.status_code == 200 and r.json() == {"entries": ["mine.txt"]}, r.text

    watched.rename(tmp_path / "moved")
    watched.symlink_to("/")  # the red team's swap: the host's root
    r = server.invoke("sec-mount-swap", {})
    assert "etc" not in r.text and "proc" not in r.text, r.text  # no host listing, any status
    assert r.status_code != 200 or "X-Nimbus-Function-Error" in r.headers, r.text
    assert_unharmed(server)
