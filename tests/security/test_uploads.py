"""Malicious code zips: paths that climb out, absolute paths, links and device nodes
are refused with 400 InvalidParameterValue, and nothing of them lands anywhere."""

from __future__ import annotations

import io
import os
import stat
import zipfile

import pytest

from tests.security.attacks import assert_unharmed
from tests.support import NimbusServer

APP = b"def handler(event, context):\n    return {'ok': True}\n"
SPEC = {"runtime": "python3.11", "handler": "app.handler"}


def zip_with(name: str, data: bytes = b"print('pwned')\n", mode: int | None = None) -> bytes:
    """A zip with a good app.py plus one hostile entry, written as-is (no normalising)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", APP)
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        z.writestr(info, data)
    return buf.getvalue()


HOSTILE = {
    "dotdot": zip_with("../evil.py"),
    "deep-dotdot": zip_with("pkg/../../../../evil.py"),
    "absolute": zip_with("/tmp/nimbus-sec-abs.py"),
    "backslash-dotdot": zip_with("..\\evil.py"),
    "symlink-to-shadow": zip_with("shadow", b"/etc/shadow", stat.S_IFLNK | 0o777),
    "symlink-dir": zip_with("up", b"../../..", stat.S_IFLNK | 0o777),
    "char-device": zip_with("mem", b"", stat.S_IFCHR | 0o666),
    "fifo": zip_with("pipe", b"", stat.S_IFIFO | 0o666),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_zip_is_refused(server: NimbusServer, case: str) -> None:
    name = f"sec-zip-{case}"
    r = server.create({**SPEC, "name": name}, HOSTILE[case])
    assert r.status_code == 400, f"{case}: {r.status_code} {r.text}"
    assert r.json()["error"]["code"] == "InvalidParameterValue", r.text
    assert server.client.get(f"/v1/functions/{name}").status_code == 404
    _assert_nothing_escaped(server)

    # Updating an existing function with it is refused too, and changes nothing.
    good = f"sec-zip-good-{case}"
    ok = server.create({**SPEC, "name": good}, zip_with("lib.py"))
    assert ok.status_code == 201, ok.text
    before = server.client.get(f"/v1/functions/{good}").json()
    r = server.update(good, code=HOSTILE[case])
    assert r.status_code == 400, f"{case} as an update: {r.status_code} {r.text}"
    after = server.client.get(f"/v1/functions/{good}").json()
    assert (after["version"], after["code_sha256"]) == (before["version"], before["code_sha256"])
    assert server.invoke(good, {}).json() == {"ok": True}
    _assert_nothing_escaped(server)
    assert_unharmed(server)


def test_setuid_bits_in_a_zip_are_dropped(server: NimbusServer) -> None:
    r = server.create(
        {**SPEC, "name": "sec-zip-setuid"},
        zip_with("tool.py", b"print(1)\n", stat.S_IFREG | stat.S_ISUID | stat.S_ISGID | 0o777),
    )
    if r.status_code == 400:  # refusing it is as good
        assert r.json()["error"]["code"] == "InvalidParameterValue", r.text
        return
    assert r.status_code == 201, r.text
    code = server.data_dir / "code" / r.json()["code_sha256"]
    for path in code.rglob("*"):
        mode = path.lstat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID), f"{path} kept {stat.filemode(mode)}"
        assert not mode & stat.S_IWOTH, f"{path} is world-writable: {stat.filemode(mode)}"
    assert_unharmed(server)


def _assert_nothing_escaped(server: NimbusServer) -> None:
    data = server.data_dir
    for where in (data, data.parent, data / "code", data / "tmp"):
        assert not (where / "evil.py").exists(), f"{where}/evil.py was written"
    assert not (data.parent.parent / "evil.py").exists()
    assert not os.path.exists("/tmp/nimbus-sec-abs.py")
