"""The cgroup driver ``detect()`` picks, against the real kernel.

Real child processes join real cgroups and hit real limits: the OOM killer,
the pids cap, a kill of a whole forking tree, the freezer (and a kill of a
frozen tree). Every test uses a node id of
its own, so parallel workers never share a base, and checks that nothing is
left under the base afterwards. Only processes these tests started (and
their descendants, inside their cgroups) are ever signalled.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nimbus.executor.sandbox.cgroups import (
    CgroupDriver,
    CgroupUnavailable,
    CgroupV1,
    CgroupV2,
    Limits,
    detect,
)
from nimbus.executor.sandbox.cgroups.auto import parse_mountinfo, parse_self_cgroup
from nimbus.executor.sandbox.cgroups.base import TreeDriver, ensure_dir

MB = 1024 * 1024
ROOT = os.geteuid() == 0

pytestmark = pytest.mark.skipif(not ROOT, reason="creating cgroups needs root")

# Every child waits for a line on stdin, so it runs its test code only once
# the parent has put it into its cgroup.
GATE = "import os, signal, sys, time\nsys.stdin.readline()\n"


def node_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def bases(driver: CgroupDriver) -> list[str]:
    assert isinstance(driver, TreeDriver)
    return driver.bases


class Children:
    """Children started into cgroups; whatever is still alive at the end is
    killed and reaped (they are ours)."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, code: str, procs_files: list[str], *args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", GATE + code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.started.append(p)
        for f in procs_files:
            Path(f).write_text(str(p.pid))
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
        return p

    def close(self) -> None:
        for p in self.started:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    yield c
    c.close()


@pytest.fixture
def driver() -> Iterator[CgroupDriver]:
    try:
        d = detect(node_id())
    except CgroupUnavailable as e:
        pytest.skip(f"no usable cgroups here: {e}")
    d.prepare()
    assert all(os.path.isdir(b) for b in bases(d))
    yield d
    d.cleanup()
    # The base(s), and v1's empty cgroup held frozen while freezing is in use.
    left = [p for b in bases(d) for p in (b, f"{b}-frozen") if os.path.exists(p)]
    assert not left, f"cleanup left {left}"


def removed(driver: CgroupDriver, name: str) -> bool:
    return wait_for(lambda: driver.remove(name), timeout=5)


def test_oom_kills_a_process_over_its_memory_limit(
    driver: CgroupDriver, children: Children
) -> None:
    limits = Limits.for_memory_mb(64)
    procs_files = driver.create("fn-oom-1", limits)
    p = children.start(
        "a = []\n"
        "for _ in range(200):\n"
        "    a.append(b'x' * (1 << 20))  # written, so really resident\n"
        "print('survived', flush=True)\n",
        procs_files,
    )
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert p.stdout is not None and p.stdout.read() == b""
    assert driver.oom_killed("fn-oom-1")
    peak = driver.memory_peak("fn-oom-1")
    assert peak is not None
    # Up to the limit, but not beyond (a page or so of slack for forced charges).
    assert 0.75 * limits.memory_bytes <= peak <= limits.memory_bytes + MB
    if isinstance(driver, CgroupV1):
        (mem,) = [b for b in driver.bases if os.path.exists(f"{b}/fn-oom-1/memory.oom_control")]
        oom_control = Path(mem, "fn-oom-1/memory.oom_control").read_text().splitlines()
        assert "oom_kill 1" in oom_control, oom_control
        assert Path(mem, "fn-oom-1/memory.limit_in_bytes").read_text() == f"{64 * MB}\n"
    assert wait_for(lambda: driver.procs("fn-oom-1") == [])
    assert removed(driver, "fn-oom-1")


def test_a_cgroup_under_its_limit_is_not_oom_killed(
    driver: CgroupDriver, children: Children
) -> None:
    procs_files = driver.create("fn-fits-1", Limits.for_memory_mb(128))
    p = children.start("a = b'x' * (16 << 20)\nprint('ok', flush=True)\n", procs_files)
    assert p.wait(timeout=60) == 0
    assert not driver.oom_killed("fn-fits-1")
    peak = driver.memory_peak("fn-fits-1")
    assert peak is not None and 16 * MB <= peak < 128 * MB
    assert removed(driver, "fn-fits-1")


def test_kill_takes_a_whole_forking_tree(driver: CgroupDriver, children: Children) -> None:
    procs_files = driver.create("fn-forks-1", Limits.for_memory_mb(128))
    # Five children, each in a new session, each double-forking a grandchild
    # that ignores SIGTERM and is orphaned (no longer our descendant by ppid).
    p = children.start(
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "for _ in range(5):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(600)\n"
        "        os._exit(0)\n"
        "print('forked', flush=True)\n"
        "time.sleep(600)\n",
        procs_files,
    )
    assert p.stdout is not None and p.stdout.readline() == b"forked\n"
    assert wait_for(lambda: len(driver.procs("fn-forks-1")) == 6), driver.procs("fn-forks-1")
    assert p.pid in driver.procs("fn-forks-1")

    driver.kill("fn-forks-1")
    assert wait_for(lambda: driver.procs("fn-forks-1") == []), driver.procs("fn-forks-1")
    assert p.wait(timeout=10) == -signal.SIGKILL
    assert removed(driver, "fn-forks-1")
    assert driver.procs("fn-forks-1") == []
    assert driver.remove("fn-forks-1") is True  # gone stays gone


# A process and its child each count up in their own slot of a file: the test sees
# whether they run without any signal or pipe between them and it.
TICKER = (
    "import struct\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "slot = 0 if os.fork() else 8\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    os.pwrite(fd, struct.pack('Q', n), slot)\n"
)


def ticks(path: Path) -> tuple[int, int]:
    first, second = struct.unpack("QQ", path.read_bytes()[:16])
    return first, second


def start_ticker(children: Children, path: Path, procs_files: list[str]) -> None:
    path.write_bytes(bytes(16))
    children.start(TICKER, procs_files, str(path))


def test_freeze_stops_every_process_until_thawed(
    driver: CgroupDriver, children: Children, tmp_path: Path
) -> None:
    if not driver.freezer:
        pytest.skip("no cgroup freezer on this host")
    name = "fn-freeze-1"
    counter = tmp_path / "ticks"
    start_ticker(children, counter, driver.create(name, Limits.for_memory_mb(64)))
    assert wait_for(lambda: min(ticks(counter)) > 0)  # both run
    assert wait_for(lambda: len(driver.procs(name)) == 2)

    driver.freeze(name)
    assert wait_for(lambda: driver.frozen(name), timeout=5)
    stopped = ticks(counter)
    # Frozen: for a third of a second, neither process moves at all.
    assert not wait_for(lambda: ticks(counter) != stopped, timeout=0.3)
    assert len(driver.procs(name)) == 2  # still there, only stopped

    driver.thaw(name)
    assert not driver.frozen(name)
    assert wait_for(lambda: all(a > b for a, b in zip(ticks(counter), stopped, strict=True)))
    driver.kill(name)
    assert wait_for(lambda: driver.procs(name) == [])
    assert removed(driver, name)


def test_kill_takes_a_frozen_tree(driver: CgroupDriver, children: Children) -> None:
    # On cgroup v1 a frozen process does not act on SIGKILL until it is thawed.
    if not driver.freezer:
        pytest.skip("no cgroup freezer on this host")
    name = "fn-frozen-kill-1"
    p = children.start(
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        time.sleep(600)\n"
        "print('forked', flush=True)\n"
        "time.sleep(600)\n",
        driver.create(name, Limits.for_memory_mb(64)),
    )
    assert p.stdout is not None and p.stdout.readline() == b"forked\n"
    assert wait_for(lambda: len(driver.procs(name)) == 4)
    driver.freeze(name)
    assert wait_for(lambda: driver.frozen(name), timeout=5)

    driver.kill(name)
    assert p.wait(timeout=10) == -signal.SIGKILL
    assert wait_for(lambda: driver.procs(name) == []), driver.procs(name)
    assert removed(driver, name)


def test_pids_max_caps_forks(driver: CgroupDriver, children: Children) -> None:
    procs_files = driver.create("fn-pids-1", Limits.for_memory_mb(128, pids_max=10))
    # Children block on a pipe whose write end dies with their parent.
    p = children.start(
        "r, w = os.pipe()\n"
        "ok = failed = 0\n"
        "for _ in range(50):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        failed += 1\n"
        "        continue\n"
        "    if pid == 0:\n"
        "        os.close(w)\n"
        "        os.read(r, 1)\n"
        "        os._exit(0)\n"
        "    ok += 1\n"
        "print(ok, failed, len(os.listdir('/proc/self/task')), flush=True)\n",
        procs_files,
    )
    assert p.stdout is not None
    ok, failed, threads = map(int, p.stdout.readline().split())
    assert ok + failed == 50
    assert failed > 0
    assert ok + threads <= 10
    assert p.wait(timeout=10) == 0
    driver.kill("fn-pids-1")
    assert removed(driver, "fn-pids-1")


def test_create_is_idempotent_and_can_raise_and_lower_the_limit(driver: CgroupDriver) -> None:
    first = driver.create("fn-again-1", Limits.for_memory_mb(64))
    assert driver.create("fn-again-1", Limits.for_memory_mb(256)) == first  # memsw first
    assert driver.create("fn-again-1", Limits.for_memory_mb(32)) == first  # limit first
    assert all(os.path.isfile(f) for f in first)
    if isinstance(driver, CgroupV1):
        mem = Path(first[0]).parent
        assert (mem / "memory.limit_in_bytes").read_text() == f"{32 * MB}\n"
        memsw = mem / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            assert memsw.read_text() == f"{32 * MB}\n"
    assert driver.procs("fn-again-1") == []
    assert driver.remove("fn-again-1") is True
    assert not any(os.path.exists(os.path.dirname(f)) for f in first)


def test_cleanup_kills_and_removes_everything(children: Children) -> None:
    try:
        d = detect(node_id())
    except CgroupUnavailable as e:
        pytest.skip(f"no usable cgroups here: {e}")
    d.prepare()
    started = [
        children.start("time.sleep(600)\n", d.create(name, Limits.for_memory_mb(64)))
        for name in ("fn-a-1", "fn-b-1")
    ]
    assert wait_for(lambda: all(d.procs(n) for n in ("fn-a-1", "fn-b-1")))
    d.cleanup()
    assert [p.wait(timeout=10) for p in started] == [-signal.SIGKILL] * 2
    assert not any(os.path.exists(b) for b in bases(d))


def test_prepare_clears_what_a_previous_run_left(children: Children) -> None:
    node = node_id()
    try:
        before = detect(node)
    except CgroupUnavailable as e:
        pytest.skip(f"no usable cgroups here: {e}")
    before.prepare()
    p = children.start("time.sleep(600)\n", before.create("fn-left-1", Limits.for_memory_mb(64)))
    assert wait_for(lambda: before.procs("fn-left-1") == [p.pid])

    after = detect(node)  # as if the server had crashed and started again
    after.prepare()
    assert p.wait(timeout=10) == -signal.SIGKILL
    assert bases(after) == bases(before)
    assert not any(_subdirs(b) for b in bases(after))
    after.cleanup()
    assert not any(os.path.exists(b) for b in bases(after))


def _subdirs(path: str) -> list[str]:
    return [e.name for e in os.scandir(path) if e.is_dir()]


# --- cgroup v2 mechanics on a hybrid host's controller-less cgroup2 -------


def _unified() -> str | None:
    """This process's cgroup in a cgroup2 mount, if there is one."""
    try:
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        path = parse_self_cgroup(Path("/proc/self/cgroup").read_text()).get("")
    except OSError:
        return None
    for m in mounts:
        if m.fstype == "cgroup2" and m.root == "/" and path is not None:
            own = os.path.join(m.point, path.strip("/"))
            if os.path.isdir(own):
                return own
    return None


UNIFIED = _unified()


@pytest.mark.skipif(UNIFIED is None, reason="no cgroup2 mount")
def test_v2_kill_and_remove_on_a_real_cgroup2(children: Children) -> None:
    # Without controllers there are no limits to test, but joining, cgroup.kill,
    # procs and rmdir are the real v2 ones.
    assert UNIFIED is not None
    driver = CgroupV2(node_id(), UNIFIED)
    available = Path(UNIFIED, "cgroup.controllers").read_text().split()
    if not {"memory", "cpu", "pids"} <= set(available):
        with pytest.raises(CgroupUnavailable, match="controller is not available"):
            driver.prepare()
        assert not os.path.exists(driver.base)
    ensure_dir(driver.base)
    try:
        inst = os.path.join(driver.base, "fn-v2-1")
        ensure_dir(inst)
        p = children.start(
            "for _ in range(3):\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(600)\n"
            "print('forked', flush=True)\n"
            "time.sleep(600)\n",
            [os.path.join(inst, "cgroup.procs")],
        )
        assert p.stdout is not None and p.stdout.readline() == b"forked\n"
        assert wait_for(lambda: len(driver.procs("fn-v2-1")) == 4)
        assert driver.oom_killed("fn-v2-1") is False
        driver.kill("fn-v2-1")
        assert p.wait(timeout=10) == -signal.SIGKILL
        assert wait_for(lambda: driver.procs("fn-v2-1") == [])
        assert removed(driver, "fn-v2-1")
    finally:
        driver.cleanup()
    assert not os.path.exists(driver.base)


@pytest.mark.skipif(UNIFIED is None, reason="no cgroup2 mount")
def test_v2_freeze_thaw_and_kill_on_a_real_cgroup2(children: Children, tmp_path: Path) -> None:
    assert UNIFIED is not None
    driver = CgroupV2(node_id(), UNIFIED)
    ensure_dir(driver.base)
    try:
        if not driver.freezer:
            pytest.skip("this kernel's cgroup v2 has no cgroup.freeze (Linux < 5.2)")
        name = "fn-v2-freeze-1"
        inst = os.path.join(driver.base, name)
        ensure_dir(inst)
        counter = tmp_path / "ticks"
        start_ticker(children, counter, [os.path.join(inst, "cgroup.procs")])
        assert wait_for(lambda: min(ticks(counter)) > 0)

        driver.freeze(name)
        assert wait_for(lambda: driver.frozen(name), timeout=5)
        stopped = ticks(counter)
        assert not wait_for(lambda: ticks(counter) != stopped, timeout=0.3)
        driver.thaw(name)
        assert wait_for(lambda: not driver.frozen(name))
        assert wait_for(lambda: all(a > b for a, b in zip(ticks(counter), stopped, strict=True)))

        driver.freeze(name)
        assert wait_for(lambda: driver.frozen(name), timeout=5)
        driver.kill(name)  # v2 lets SIGKILL through the freezer: no thaw needed
        assert wait_for(lambda: driver.procs(name) == [])
        assert children.started[-1].wait(timeout=10) == -signal.SIGKILL
        assert removed(driver, name)
    finally:
        driver.cleanup()
    assert not os.path.exists(driver.base)


def test_detect_on_this_host() -> None:
    try:
        d = detect(node_id())
    except CgroupUnavailable as e:
        pytest.skip(f"no usable cgroups here: {e}")
    assert d.version in (1, 2)
    assert not any(os.path.exists(b) for b in bases(d))  # detect() creates nothing
    if UNIFIED is not None and UNIFIED.startswith("/sys/fs/cgroup/unified"):
        # A hybrid host: its cgroup2 has no controllers, so asking for it there gives v1.
        assert isinstance(detect(node_id(), root="/sys/fs/cgroup/unified"), CgroupV1)
