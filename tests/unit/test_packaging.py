"""nimbus.packaging: zip validation, the code store, dependency layers, package_directory."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import stat
import struct
import sys
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from nimbus.errors import (
    CodeStorageExceeded,
    DependencyInstallError,
    InvalidParameterValue,
    RequestTooLarge,
    ResourceNotFound,
)
from nimbus.packaging import CodeStore, LayerStore, has_requirements, package_directory
from nimbus.packaging.builder import HostBuilder, pip_environment
from nimbus.packaging.code import remove_tree
from nimbus.packaging.layers import check_requirements
from nimbus.packaging.zips import (
    MAX_DEPTH,
    check_entries,
    declared_entries,
    extract,
    human_size,
)

MB = 1 << 20
CACHE_TAG = sys.implementation.cache_tag

# --- helpers -------------------------------------------------------------------------


def info(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    zi.create_system = 3
    zi.external_attr = mode << 16
    zi.compress_type = zipfile.ZIP_DEFLATED
    return zi


Member = tuple[str | zipfile.ZipInfo, bytes]


def write_zip(path: Path, members: list[Member]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name" is what some tests want
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(info(name) if isinstance(name, str) else name, data)
    return path


HELLO: list[Member] = [
    ("app.py", b"def handler(event, context):\n    return {'ok': True}\n"),
    ("pkg/__init__.py", b""),
    ("pkg/sub.py", b"def handler(event, context):\n    return 1\n"),
    ("requirements.txt", b"# nothing\n"),
    (info("bin/run.sh", stat.S_IFREG | 0o755), b"#!/bin/sh\necho hi\n"),
    (info("data/", stat.S_IFDIR | 0o755), b""),
]


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    yield data
    remove_tree(data)  # read-only trees: make them removable even when not root


def make_store(root: Path, **overrides: Any) -> CodeStore:
    options: dict[str, Any] = {
        "max_zip_bytes": 50 * MB,
        "max_unpacked_bytes": 250 * MB,
        "python": sys.executable,
    }
    options.update(overrides)
    return CodeStore(root, **options)


def leftovers(root: Path) -> list[str]:
    """Everything in the store except what a successful put legitimately leaves."""
    found = []
    for sub in ("code", "blobs/sha256", "tmp"):
        directory = root / sub
        if directory.is_dir():
            found += [f"{sub}/{p.name}" for p in directory.iterdir()]
    return found


# --- CodeStore: the happy path ---------------------------------------------------------


def test_put_stores_blob_and_read_only_compiled_tree(root: Path, tmp_path: Path) -> None:
    zip_path = write_zip(tmp_path / "hello.zip", HELLO)
    store = make_store(root)

    sha = store.put(zip_path)

    assert sha == hashlib.sha256(zip_path.read_bytes()).hexdigest()
    code = store.path(sha)
    assert code == root / "code" / sha
    assert (root / "blobs" / "sha256" / sha).read_bytes() == zip_path.read_bytes()
    assert (code / "app.py").read_bytes() == HELLO[0][1]
    assert (code / "data").is_dir()
    assert (code / "__pycache__" / f"app.{CACHE_TAG}.pyc").is_file()
    assert (code / "pkg" / "__pycache__" / f"sub.{CACHE_TAG}.pyc").is_file()

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.lstat().st_mode)

    assert mode(code / "app.py") == 0o444
    assert mode(code / "bin" / "run.sh") == 0o555
    assert mode(code / "__pycache__" / f"app.{CACHE_TAG}.pyc") == 0o444
    for directory in (code, code / "pkg", code / "bin", code / "data", code / "__pycache__"):
        assert mode(directory) == 0o555, directory
    assert list((root / "tmp").iterdir()) == []


def test_put_is_idempotent_and_content_addressed(root: Path, tmp_path: Path) -> None:
    store = make_store(root)
    first = write_zip(tmp_path / "a.zip", HELLO)
    sha = store.put(first)
    inode = store.path(sha).stat().st_ino

    copy = tmp_path / "b.zip"
    copy.write_bytes(first.read_bytes())
    # No rework: an unpack would now fail, since there is no interpreter to compile with.
    broken = make_store(root, python="/nonexistent/python", max_unpacked_bytes=1)
    assert broken.put(copy) == sha
    assert store.path(sha).stat().st_ino == inode

    other = write_zip(tmp_path / "c.zip", [*HELLO, ("extra.py", b"x = 1\n")])
    assert store.put(other) != sha
    assert list((root / "tmp").iterdir()) == []


def test_concurrent_puts_of_the_same_zip(root: Path, tmp_path: Path) -> None:
    zip_path = write_zip(tmp_path / "hello.zip", HELLO)
    store = make_store(root)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: store.put(zip_path), range(4)))
    assert len(set(results)) == 1
    assert [p.name for p in (root / "code").iterdir()] == [results[0]]
    assert list((root / "tmp").iterdir()) == []


def test_syntax_error_does_not_fail_the_deploy(root: Path, tmp_path: Path) -> None:
    zip_path = write_zip(
        tmp_path / "bad.zip", [("app.py", b"def handler(:\n"), ("ok.py", b"x = 1\n")]
    )
    store = make_store(root)
    sha = store.put(zip_path)
    assert (store.path(sha) / "app.py").is_file()
    assert not (store.path(sha) / "__pycache__" / f"app.{CACHE_TAG}.pyc").exists()
    assert (store.path(sha) / "__pycache__" / f"ok.{CACHE_TAG}.pyc").is_file()


def test_dot_components_are_normalised(root: Path, tmp_path: Path) -> None:
    zip_path = write_zip(tmp_path / "dots.zip", [("./app.py", b"x = 1\n"), ("a//b.py", b"")])
    store = make_store(root)
    sha = store.put(zip_path)
    assert (store.path(sha) / "app.py").is_file()
    assert (store.path(sha) / "a" / "b.py").is_file()


def test_requirements(root: Path, tmp_path: Path) -> None:
    store = make_store(root)
    with_reqs = store.put(write_zip(tmp_path / "a.zip", HELLO))
    without = store.put(write_zip(tmp_path / "b.zip", HELLO[:3]))
    assert store.requirements(with_reqs) == b"# nothing\n"
    assert store.requirements(without) is None
    with pytest.raises(ResourceNotFound):
        store.requirements("0" * 64)


def test_check_handler(root: Path, tmp_path: Path) -> None:
    store = make_store(root)
    sha = store.put(write_zip(tmp_path / "a.zip", HELLO))
    store.check_handler(sha, "app.handler")
    store.check_handler(sha, "pkg.sub.handler")
    store.check_handler(sha, "pkg.handler")  # pkg/__init__.py
    store.check_handler(sha, "pkg/sub.handler")  # awslambdaric accepts slashes too

    with pytest.raises(InvalidParameterValue) as e:
        store.check_handler(sha, "main.handler")
    assert e.value.message == (
        "handler 'main.handler': module 'main' not found in the code "
        "(expected main.py or main/__init__.py)"
    )
    with pytest.raises(InvalidParameterValue) as e:
        store.check_handler(sha, "pkg.nope.handler")
    assert "expected pkg/nope.py or pkg/nope/__init__.py" in e.value.message
    with pytest.raises(InvalidParameterValue, match=r"must be module\.function"):
        store.check_handler(sha, "app")
    with pytest.raises(InvalidParameterValue, match="identifiers"):
        store.check_handler(sha, "../app.handler")
    with pytest.raises(InvalidParameterValue):
        store.check_handler(sha, "data.handler")  # a directory without __init__.py


def test_path_rejects_non_digests(root: Path) -> None:
    with pytest.raises(ValueError):
        make_store(root).path("../../etc")


# --- CodeStore: rejections -------------------------------------------------------------


def special(name: str, kind: int) -> Member:
    return (info(name, kind | 0o644), b"")


REJECTIONS: dict[str, tuple[list[Member], str]] = {
    "absolute": ([("/etc/passwd", b"x")], "zip entry '/etc/passwd' has an absolute path"),
    "drive": ([("C:/app.py", b"x")], "zip entry 'C:/app.py' has an absolute path"),
    "backslash": ([("..\\evil.py", b"x")], "zip entry '..\\\\evil.py' uses backslashes"),
    "dotdot": ([("../evil.py", b"x")], "zip entry '../evil.py' contains a '..' component"),
    "dotdot-inside": (
        [("a/../../evil.py", b"x")],
        "zip entry 'a/../../evil.py' contains a '..' component",
    ),
    "symlink": (
        [("app.py", b""), (info("link", stat.S_IFLNK | 0o777), b"/etc/passwd")],
        "zip entry 'link' is a symbolic link",
    ),
    "chardev": ([special("null", stat.S_IFCHR)], "zip entry 'null' is a character device"),
    "blockdev": ([special("sda", stat.S_IFBLK)], "zip entry 'sda' is a block device"),
    "fifo": ([special("pipe", stat.S_IFIFO)], "zip entry 'pipe' is a FIFO"),
    "socket": ([special("sock", stat.S_IFSOCK)], "zip entry 'sock' is a socket"),
    "duplicate": (
        [("app.py", b"a"), ("app.py", b"b")],
        "zip entry 'app.py' appears more than once",
    ),
    "duplicate-normalised": (
        [("app.py", b"a"), ("./app.py", b"b")],
        "zip entry './app.py' appears more than once",
    ),
    "file-and-dir": (
        [("lib", b"a"), ("lib/x.py", b"b")],
        "zip entry 'lib/x.py' needs 'lib' to be a directory",
    ),
    "empty": ([], "code zip is empty"),
    "only-dirs": ([(info("a/", stat.S_IFDIR | 0o755), b"")], "code zip contains no files"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_put_rejects(case: str, root: Path, tmp_path: Path) -> None:
    members, message = REJECTIONS[case]
    zip_path = write_zip(tmp_path / f"{case}.zip", members)
    with pytest.raises(InvalidParameterValue) as e:
        make_store(root).put(zip_path)
    assert message in e.value.message
    assert leftovers(root) == []


def test_put_rejects_what_is_not_a_zip(root: Path, tmp_path: Path) -> None:
    store = make_store(root)
    text = tmp_path / "code.zip"
    text.write_text("def handler(e, c): pass\n")
    with pytest.raises(InvalidParameterValue, match="code is not a valid zip file"):
        store.put(text)

    whole = write_zip(tmp_path / "whole.zip", HELLO).read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InvalidParameterValue, match="code is not a valid zip file"):
        store.put(truncated)
    assert leftovers(root) == []


def test_put_rejects_corrupt_member(root: Path, tmp_path: Path) -> None:
    data = bytearray(write_zip(tmp_path / "a.zip", [("app.py", b"x = 1\n" * 1000)]).read_bytes())
    at = data.index(b"app.py") + len(b"app.py") + 10  # inside the deflated data
    data[at] ^= 0xFF
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(InvalidParameterValue, match=r"zip entry 'app\.py' is corrupt"):
        make_store(root).put(corrupt)
    assert leftovers(root) == []


def test_zip_over_the_size_limit(root: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.zip"
    with big.open("wb") as f:
        f.truncate(int(61.2 * MB))  # sparse: the size check comes before any reading
    with pytest.raises(RequestTooLarge) as e:
        make_store(root).put(big)
    assert e.value.message == "code zip is 61.2 MB; the limit is 50 MB"
    assert leftovers(root) == []


def test_declared_unpacked_size_over_the_limit(root: Path, tmp_path: Path) -> None:
    zip_path = write_zip(tmp_path / "bomb.zip", [("zeros.bin", bytes(2 * MB)), ("a.py", b"")])
    assert zip_path.stat().st_size < 64 * 1024
    with pytest.raises(InvalidParameterValue) as e:
        make_store(root, max_unpacked_bytes=MB).put(zip_path)
    assert e.value.message == "code zip unpacks to 2 MB; the limit is 1 MB"
    assert leftovers(root) == []


def lie_about_size(data: bytes, declared: int) -> bytes:
    """Rewrite every header's uncompressed size of a one-entry zip."""
    out = bytearray(data)
    local = out.index(b"PK\x03\x04")
    struct.pack_into("<I", out, local + 22, declared)
    central = out.index(b"PK\x01\x02")
    struct.pack_into("<I", out, central + 24, declared)
    return bytes(out)


def test_lying_header_cannot_zip_bomb(root: Path, tmp_path: Path) -> None:
    honest = write_zip(tmp_path / "honest.zip", [("zeros.bin", bytes(4 * MB))])
    liar = tmp_path / "liar.zip"
    liar.write_bytes(lie_about_size(honest.read_bytes(), 100))
    with zipfile.ZipFile(liar) as zf:
        assert zf.infolist()[0].file_size == 100  # the declared size passes the check

    with pytest.raises(InvalidParameterValue) as e:
        make_store(root, max_unpacked_bytes=MB).put(liar)
    assert "zeros.bin" in e.value.message
    assert leftovers(root) == []


def test_extract_counts_actual_bytes(tmp_path: Path) -> None:
    zip_path = write_zip(tmp_path / "a.zip", [("a.bin", bytes(3000)), ("b.bin", bytes(3000))])
    dest = tmp_path / "out"
    dest.mkdir()
    with zipfile.ZipFile(zip_path) as zf:
        entries = check_entries(zf, max_unpacked_bytes=10_000)
        with pytest.raises(InvalidParameterValue) as e:
            extract(zf, entries, dest, max_unpacked_bytes=5000)
    assert "more than 4.9 KB" in e.value.message
    assert "'b.bin'" in e.value.message


def test_the_entry_count_is_read_from_the_end_record(tmp_path: Path) -> None:
    small = write_zip(tmp_path / "small.zip", [(f"f{i}", b"") for i in range(3)])
    with small.open("rb") as fp:
        assert declared_entries(fp) == 3
    # Past 65,535 entries the count lives in the zip64 end record.
    big = write_zip(tmp_path / "big.zip", [(f"{i}", b"") for i in range(0x10000 + 5)])
    with big.open("rb") as fp:
        assert declared_entries(fp) == 0x10000 + 5
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip at all" * 100)
    with junk.open("rb") as fp:
        assert declared_entries(fp) is None


def test_too_many_entries_are_refused_before_they_are_read(root: Path, tmp_path: Path) -> None:
    many = write_zip(
        tmp_path / "many.zip", [("app.py", b"")] + [(f"e/{i}", b"") for i in range(50)]
    )
    with pytest.raises(InvalidParameterValue) as e:
        make_store(root, max_entries=20).put(many)
    assert e.value.message.startswith("code zip has 51 entries; the limit is 20")
    assert leftovers(root) == []


def test_entries_deeper_than_the_limit_are_refused(root: Path, tmp_path: Path) -> None:
    ok = "/".join(["d"] * (MAX_DEPTH - 1)) + "/x.py"
    make_store(root).put(write_zip(tmp_path / "ok.zip", [(ok, b"")]))
    deep = "/".join(["d"] * MAX_DEPTH) + "/x.py"
    with pytest.raises(InvalidParameterValue) as e:
        make_store(root).put(write_zip(tmp_path / "deep.zip", [(deep, b"")]))
    assert f"is {MAX_DEPTH + 1} levels deep; the limit is {MAX_DEPTH}" in e.value.message


def test_collect_removes_what_is_not_kept_and_nothing_else(root: Path, tmp_path: Path) -> None:
    store = make_store(root)
    kept = store.put(write_zip(tmp_path / "a.zip", HELLO))
    gone = store.put(write_zip(tmp_path / "b.zip", [*HELLO, ("extra.py", b"x = 1\n")]))
    count, freed = store.collect({kept})
    assert count == 1 and freed > 0
    assert store.path(kept).is_dir() and (root / "blobs/sha256" / kept).is_file()
    assert not store.path(gone).exists() and not (root / "blobs/sha256" / gone).exists()
    assert leftovers(root) == [f"code/{kept}", f"blobs/sha256/{kept}"]
    # Put again after its collection: unpacked afresh.
    assert store.put(write_zip(tmp_path / "b.zip", [*HELLO, ("extra.py", b"x = 1\n")])) == gone
    assert (store.path(gone) / "extra.py").is_file()


def test_a_put_over_the_storage_limit_is_refused_and_leaves_nothing(
    root: Path, tmp_path: Path
) -> None:
    store = make_store(root, max_storage_bytes=3 * MB)
    first = store.put(write_zip(tmp_path / "a.zip", [("app.py", b""), ("a.bin", os.urandom(MB))]))
    assert 2 * MB <= store.usage() < 3 * MB  # the zip and its tree
    with pytest.raises(CodeStorageExceeded) as e:
        store.put(write_zip(tmp_path / "b.zip", [("app.py", b""), ("b.bin", os.urandom(MB))]))
    assert "code storage is full" in e.value.message
    assert leftovers(root) == [f"code/{first}", f"blobs/sha256/{first}"]
    # Once the first is collected there is room again.
    store.collect(set())
    store.put(write_zip(tmp_path / "b.zip", [("app.py", b""), ("b.bin", os.urandom(MB))]))


def test_clear_tmp_removes_a_crashed_deploys_leftovers(root: Path, tmp_path: Path) -> None:
    store = make_store(root)
    kept = store.put(write_zip(tmp_path / "a.zip", HELLO))
    half = root / "tmp" / "code-0123456789ab-x" / "tree"
    half.mkdir(parents=True)
    (half / "app.py").write_text("half")
    os.chmod(half, 0o555)
    store.clear_tmp()
    assert leftovers(root) == [f"code/{kept}", f"blobs/sha256/{kept}"]


def test_human_size() -> None:
    assert human_size(12) == "12 bytes"
    assert human_size(1536) == "1.5 KB"
    assert human_size(50 * MB) == "50 MB"
    assert human_size(3 << 30) == "3 GB"


# --- package_directory -----------------------------------------------------------------


def names(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.namelist()


@pytest.fixture
def function_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fn"
    files = {
        "nimbus.yaml": "name: fn\n",
        "app.py": "def handler(e, c):\n    return 1\n",
        "lib/util.py": "X = 1\n",
        "lib/__pycache__/util.cpython-311.pyc": "junk",
        "__pycache__/app.cpython-311.pyc": "junk",
        "stale.pyc": "junk",
        ".DS_Store": "junk",
        "lib/.DS_Store": "junk",
        ".git/config": "junk",
        ".venv/bin/python": "junk",
        "venv/lib/x.py": "junk",
        "node_modules/x/index.js": "junk",
        ".mypy_cache/x": "junk",
        ".pytest_cache/x": "junk",
        ".env": "KEY=value\n",
    }
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    run = d / "run.sh"
    run.write_text("#!/bin/sh\n")
    run.chmod(0o755)
    return d


def test_package_directory_contents_and_exclusions(function_dir: Path) -> None:
    data = package_directory(function_dir)
    assert names(data) == [".env", "app.py", "lib/util.py", "nimbus.yaml", "run.sh"]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for zi in zf.infolist():
            assert zi.date_time == (1980, 1, 1, 0, 0, 0)
            assert zi.compress_type == zipfile.ZIP_DEFLATED
            mode = zi.external_attr >> 16
            assert stat.S_ISREG(mode)
            assert stat.S_IMODE(mode) == (0o755 if zi.filename == "run.sh" else 0o644)
        assert zf.read("lib/util.py") == b"X = 1\n"


def test_package_directory_is_deterministic(function_dir: Path) -> None:
    first = package_directory(function_dir)
    os.utime(function_dir / "app.py", (1_000_000_000, 1_000_000_000))
    assert package_directory(function_dir) == first
    (function_dir / "app.py").write_text("changed = True\n")
    assert package_directory(function_dir) != first


def test_package_directory_follows_links_inside(function_dir: Path) -> None:
    (function_dir / "util.py").symlink_to("lib/util.py")
    (function_dir / "vendored").symlink_to(function_dir / "lib")
    data = package_directory(function_dir)
    assert "util.py" in names(data)
    assert "vendored/util.py" in names(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.read("util.py") == b"X = 1\n"


def test_package_directory_refuses_links_outside(function_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (function_dir / "lib" / "secret.txt").symlink_to(outside)
    with pytest.raises(InvalidParameterValue, match=r"symlink 'lib/secret.txt' points outside"):
        package_directory(function_dir)


def test_package_directory_refuses_loops_and_broken_links(function_dir: Path) -> None:
    loop = function_dir / "lib" / "again"
    loop.symlink_to(function_dir)
    with pytest.raises(InvalidParameterValue, match=r"symlink 'lib/again' makes a loop"):
        package_directory(function_dir)
    loop.unlink()
    (function_dir / "gone.py").symlink_to(function_dir / "missing.py")
    with pytest.raises(InvalidParameterValue, match=r"symlink 'gone.py' is broken"):
        package_directory(function_dir)


def test_package_directory_round_trips_through_the_store(
    function_dir: Path, root: Path, tmp_path: Path
) -> None:
    zip_path = tmp_path / "fn.zip"
    zip_path.write_bytes(package_directory(function_dir))
    store = make_store(root)
    sha = store.put(zip_path)
    store.check_handler(sha, "app.handler")
    assert stat.S_IMODE((store.path(sha) / "run.sh").stat().st_mode) == 0o555


def test_package_directory_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterValue, match="is not a directory"):
        package_directory(tmp_path / "missing")


# --- requirements ----------------------------------------------------------------------


def test_has_requirements() -> None:
    assert not has_requirements(b"")
    assert not has_requirements(b"\n  \n# just a comment\n   # indented\n")
    assert has_requirements(b"# deps\nrequests==2.32.3\n")


def test_key_ignores_formatting_but_not_runtime(tmp_path: Path) -> None:
    key = LayerStore(tmp_path, HostBuilder(sys.executable)).key
    a = key(b"requests==2.32.3\nurllib3\n", "python3.11")
    b = key(b"\xef\xbb\xbf# deps\r\n\r\nrequests==2.32.3   # pinned\r\nurl\\\nlib3\n", "python3.11")
    assert a == b
    assert len(a) == 64
    assert key(b"requests==2.32.3\nurllib3\n", "python3.12") != a
    assert key(b"requests==2.32.4\nurllib3\n", "python3.11") != a


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("-e .", "--editable is not allowed"),
        ("--editable=git+https://x/y.git", "--editable is not allowed"),
        ("-r other.txt", "--requirement is not allowed"),
        ("--requirement=other.txt", "--requirement is not allowed"),
        ("-c constraints.txt", "--constraint is not allowed"),
        ("--index-url https://evil.example/simple", "--index-url is not allowed"),
        ("-ihttps://evil.example/simple", "--index-url is not allowed"),
        ("--extra-index-url https://evil.example/simple", "--extra-index-url is not allowed"),
        ("--find-links /srv/wheels", "--find-links is not allowed"),
        ("-f https://evil.example/", "--find-links is not allowed"),
        ("--trusted-host evil.example", "--trusted-host is not allowed"),
        ("/etc/passwd", "local paths"),
        ("./mypkg", "local paths"),
        ("../../secret", "local paths"),
        ("pkg @ file:///srv/pkg.whl", "local paths"),
        ("git+file:///srv/repo#egg=pkg", "version-control"),
        ("https://example.com/${HOME}/x.whl", "${VARIABLE} references are not allowed"),
        # pip's abbreviations of options: refused as what they are, or as unknown.
        ("--requirem=/etc/shadow", "the pip option --requirem is not allowed"),
        ("--constr /etc/shadow", "the pip option --constr is not allowed"),
        ("--index https://evil.example/simple", "the pip option --index is not allowed"),
        ("--no-index", "the pip option --no-index is not allowed"),
        ("--global-option=--x", "the pip option --global-option is not allowed"),
        ("pkg --install-option=--prefix=/", "only --hash=<algorithm>:<digest> is allowed"),
        ("pkg --config-settings=x=y", "only --hash=<algorithm>:<digest> is allowed"),
        ("--only-binary", "takes :all:, :none: or package names"),
        ("--pre=yes", "takes no value"),
        ("git+https://github.com/psf/requests@v2.32.3#egg=requests", "version-control"),
        ("requests @ git+https://github.com/psf/requests", "version-control"),
        ("https://example.com/pkg-1.0-py3-none-any.whl", "as 'name @ <url>'"),
        ("pkg @ http://127.0.0.1:8080/pkg.whl", "public address"),
        ("pkg @ http://[::ffff:127.0.0.1]/pkg.whl", "public address"),
        ("pkg @ http://10.0.0.1/pkg.whl", "public address"),
        ("pkg @ http://localhost/pkg.whl", "the node"),
        ("pkg @ http://169.254.169.254/pkg.whl", "public address"),
        ("pkg===", "not a valid requirement"),
    ],
)
def test_requirements_refused(line: str, reason: str) -> None:
    with pytest.raises(InvalidParameterValue) as e:
        check_requirements(f"requests\n# a comment\n{line}\n".encode())
    assert e.value.message.startswith(f"requirements.txt line 3 ({line!r}): ")
    assert reason in e.value.message


@pytest.mark.parametrize(
    "line",
    [
        "requests==2.32.3",
        "requests[socks]>=2; python_version >= '3.8'",
        "pkg @ https://example.com/pkg-1.0-py3-none-any.whl",
        "--pre",
        "--prefer-binary",
        "--only-binary :all:",
        "--only-binary=numpy,scipy",
        "--no-binary :none:",
        "numpy --hash=sha256:0123",
        "numpy==2.0 --hash=sha256:0123 --hash=sha256:abcd",
    ],
)
def test_requirements_allowed(line: str) -> None:
    check_requirements(line.encode() + b"\n")


# --- LayerStore ------------------------------------------------------------------------


@pytest.fixture
def pip_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Record every subprocess LayerStore starts (and still start it)."""
    runs: list[tuple[str, ...]] = []
    real = asyncio.create_subprocess_exec

    async def spawn(*args: str, **kwargs: Any) -> asyncio.subprocess.Process:
        runs.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
    return runs


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """pip sees only a local wheel directory; no index, no cache, no config files."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    return wheels


def build_wheel(directory: Path, name: str, version: str, module: str) -> Path:
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": module.encode(),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: nimbus-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def test_ensure_reuses_an_existing_layer(root: Path, pip_runs: list[tuple[str, ...]]) -> None:
    store = LayerStore(root, HostBuilder(sys.executable, environ=os.environ))
    requirements = b"somepkg==1.0\n"
    key = store.key(requirements, "python3.11")
    store.path(key).mkdir(parents=True)
    assert asyncio.run(store.ensure(requirements, "python3.11")) == key
    assert pip_runs == []


def test_ensure_refuses_bad_lines_before_running_pip(
    root: Path, pip_runs: list[tuple[str, ...]]
) -> None:
    store = LayerStore(root, HostBuilder(sys.executable, environ=os.environ))
    with pytest.raises(InvalidParameterValue, match="line 1"):
        asyncio.run(store.ensure(b"--index-url https://evil.example/simple\n", "python3.11"))
    assert pip_runs == []


def test_ensure_reports_pips_error(
    root: Path, offline_pip: Path, pip_runs: list[tuple[str, ...]]
) -> None:
    store = LayerStore(root, HostBuilder(sys.executable, environ=os.environ))
    with pytest.raises(DependencyInstallError) as e:
        asyncio.run(store.ensure(b"nimbus-no-such-package-xyz==1.0\n", "python3.11"))
    message = e.value.message
    assert message.startswith("installing requirements.txt failed:\n")
    assert "No matching distribution found for nimbus-no-such-package-xyz==1.0" in message
    assert e.value.code == "InvalidParameterValue"
    assert len(pip_runs) == 1
    assert pip_runs[0][1:6] == ("-I", "-m", "pip", "install", "--disable-pip-version-check")
    assert not (root / "layers").exists() or list((root / "layers").iterdir()) == []
    assert list((root / "tmp").iterdir()) == []


def test_ensure_installs_once_and_caches(
    root: Path, offline_pip: Path, pip_runs: list[tuple[str, ...]]
) -> None:
    build_wheel(offline_pip, "nimbus_testpkg", "1.0", "ANSWER = 42\n")
    store = LayerStore(root, HostBuilder(sys.executable, environ=os.environ))
    requirements = b"# test dependency\nnimbus_testpkg==1.0\n"

    async def deploy_three_at_once() -> list[str]:
        return list(
            await asyncio.gather(*(store.ensure(requirements, "python3.11") for _ in "abc"))
        )

    keys = asyncio.run(deploy_three_at_once())
    assert keys == [store.key(requirements, "python3.11")] * 3
    assert len(pip_runs) == 1

    layer = store.path(keys[0])
    assert layer == root / "layers" / keys[0]
    module = layer / "nimbus_testpkg.py"
    assert module.read_text() == "ANSWER = 42\n"
    assert (layer / "nimbus_testpkg-1.0.dist-info" / "METADATA").is_file()
    assert stat.S_IMODE(module.stat().st_mode) == 0o444
    assert stat.S_IMODE(layer.stat().st_mode) == 0o555
    assert list((root / "tmp").iterdir()) == []

    mtime = layer.stat().st_mtime_ns
    again = LayerStore(
        root, HostBuilder(sys.executable, environ=os.environ)
    )  # a restarted server finds it too
    assert asyncio.run(again.ensure(requirements, "python3.11")) == keys[0]
    assert len(pip_runs) == 1
    assert layer.stat().st_mtime_ns == mtime


def test_builds_get_the_operators_pip_settings_and_nothing_else() -> None:
    environ = {
        "PIP_INDEX_URL": "https://pypi.example/simple",
        "PIP_NO_INDEX": "",
        "PIP_CONFIG_FILE": "/etc/secret.conf",
        "AWS_SECRET_ACCESS_KEY": "shh",
        "NIMBUS_ADMIN_KEY": "shh",
    }
    assert pip_environment(environ) == {"PIP_INDEX_URL": "https://pypi.example/simple"}


def test_the_key_names_the_platform_built_on(root: Path) -> None:
    builder = HostBuilder(sys.executable)
    one = LayerStore(root, builder, platform="base-a").key(b"x==1\n", "python3.11")
    two = LayerStore(root, builder, platform="base-b").key(b"x==1\n", "python3.11")
    assert one != two
    same = LayerStore(root, builder, platform="base-a").key(b"# c\nx==1\n\n", "python3.11")
    assert same == one


def test_ensure_without_requirements_makes_an_empty_layer(
    root: Path, pip_runs: list[tuple[str, ...]]
) -> None:
    store = LayerStore(root, HostBuilder(sys.executable, environ=os.environ))
    key = asyncio.run(store.ensure(b"# nothing\n", "python3.11"))
    assert list(store.path(key).iterdir()) == []
    assert pip_runs == []
