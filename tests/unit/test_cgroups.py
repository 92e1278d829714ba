"""The cgroup drivers' logic on fake trees of plain files.

A fake tree has the interface files as regular files, so it cannot refuse a
write or remove a directory the way cgroupfs does; where that matters the
tests pass the drivers an ``rmdir``/``kill`` that behave like the kernel.
The real thing is tested in ``tests/sandbox/test_cgroups_real.py``.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from nimbus.executor.sandbox.cgroups import (
    CgroupDriver,
    CgroupUnavailable,
    CgroupV1,
    CgroupV2,
    Limits,
    NodeLimits,
    detect,
)
from nimbus.executor.sandbox.cgroups import base as base_module
from nimbus.executor.sandbox.cgroups import v2 as v2_module
from nimbus.executor.sandbox.cgroups.auto import parse_mountinfo, parse_self_cgroup

MB = 1024 * 1024
FAKE_PIDS = range(900_001, 900_100)  # never signalled: the tests' kill is fake


def files(d: Path, **contents: str) -> Path:
    """Make directory ``d`` with the given interface files (dots as ``__``)."""
    d.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        (d / name.replace("__", ".")).write_text(text)
    return d


def mountline(n: int, point: Path | str, fstype: str, options: str, root: str = "/") -> str:
    return f"{n} 1 0:{n} {root} {point} rw,relatime shared:{n} - {fstype} {fstype} {options}\n"


# --- fake hosts -----------------------------------------------------------


class V1Host:
    """memory, cpu (co-mounted with cpuacct) and pids hierarchies, plus an
    empty cgroup2 at ``unified`` as on hybrid hosts (and this CI machine);
    with ``freezer``, the freezer hierarchy too (our cgroup there is its root)."""

    def __init__(self, tmp: Path, *, memsw: bool = True, freezer: bool = False) -> None:
        self.root = tmp / "sys/fs/cgroup"
        self.root.mkdir(parents=True)
        self.own = {
            "memory": files(self.root / "memory/user/app", cgroup__procs=""),
            "cpu": files(self.root / "cpu,cpuacct", cgroup__procs=""),
            "pids": files(self.root / "pids/user/app", cgroup__procs=""),
        }
        if freezer:
            self.own["freezer"] = files(self.root / "freezer", cgroup__procs="")
        files(self.root / "unified", cgroup__controllers="", cgroup__subtree_control="")
        self.memsw = memsw
        self.self_cgroup = tmp / "self_cgroup"
        self.self_cgroup.write_text(
            "9:name=systemd:/user/app\n"
            "8:pids:/user/app\n"
            "4:memory:/user/app\n"
            "2:cpu,cpuacct:/\n"
            "0::/user/app\n"
        )
        self.mountinfo = tmp / "mountinfo"
        self.mountinfo.write_text(
            mountline(20, "/", "ext4", "rw")
            + mountline(31, self.root, "tmpfs", "rw,mode=755")
            + mountline(32, self.root / "cpu,cpuacct", "cgroup", "rw,cpu,cpuacct")
            + mountline(35, self.root / "memory", "cgroup", "rw,memory")
            + mountline(39, self.root / "pids", "cgroup", "rw,pids")
            + mountline(41, self.root / "unified", "cgroup2", "rw")
            + (mountline(42, self.root / "freezer", "cgroup", "rw,freezer") if freezer else "")
        )
        if freezer:
            self.self_cgroup.write_text(self.self_cgroup.read_text() + "6:freezer:/\n")

    def detect(self, node_id: str = "n1") -> CgroupDriver:
        return detect(
            node_id,
            root=str(self.root),
            self_cgroup=str(self.self_cgroup),
            mountinfo=str(self.mountinfo),
        )

    def instance(self, name: str, *, memsw: bool | None = None) -> dict[str, Path]:
        """Make an instance's directories the way the kernel would: with files in them."""
        memsw = self.memsw if memsw is None else memsw
        mem = files(
            self.own["memory"] / "nimbus-n1" / name,
            cgroup__procs="",
            memory__limit_in_bytes="9223372036854771712\n",
            memory__max_usage_in_bytes="0\n",
            memory__oom_control="oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        )
        if memsw:
            (mem / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")
        dirs = {
            "memory": mem,
            "cpu": files(
                self.own["cpu"] / "nimbus-n1" / name, cgroup__procs="", cpu__shares="1024\n"
            ),
            "pids": files(
                self.own["pids"] / "nimbus-n1" / name, cgroup__procs="", pids__max="max\n"
            ),
        }
        if "freezer" in self.own:
            dirs["freezer"] = files(
                self.own["freezer"] / "nimbus-n1" / name,
                cgroup__procs="",
                freezer__state="THAWED\n",
            )
        return dirs


class V2Host:
    def __init__(self, tmp: Path, *, controllers: str = "cpu memory pids") -> None:
        self.root = files(tmp / "sys/fs/cgroup", cgroup__controllers="cpuset cpu io memory pids")
        self.own = files(
            self.root / "system.slice/nimbus.service",
            cgroup__controllers=controllers,
            cgroup__subtree_control="",
            cgroup__procs="900050\n",
        )
        self.self_cgroup = tmp / "self_cgroup"
        self.self_cgroup.write_text("0::/system.slice/nimbus.service\n")
        self.mountinfo = tmp / "mountinfo"
        self.mountinfo.write_text(
            mountline(20, "/", "ext4", "rw")
            + mountline(30, self.root, "cgroup2", "rw,nsdelegate,memory_recursiveprot")
        )

    def detect(self, node_id: str = "n1") -> CgroupDriver:
        return detect(
            node_id,
            root=str(self.root),
            self_cgroup=str(self.self_cgroup),
            mountinfo=str(self.mountinfo),
        )

    def instance(self, name: str, *, swap: bool = True, kill_file: bool = True) -> Path:
        d = files(
            self.own / "nimbus-n1" / name,
            cgroup__procs="",
            memory__max="max\n",
            memory__events="low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
            memory__peak="0\n",
        )
        if swap:
            (d / "memory.swap.max").write_text("max\n")
        if kill_file:
            (d / "cgroup.kill").write_text("")
        return d


class FakeKernel:
    """``rmdir`` and ``kill`` that act on a fake tree like cgroupfs would:
    rmdir refuses (EBUSY) while a cgroup has processes or children; a killed
    pid leaves every ``cgroup.procs``; ``forks`` maps a pid to a child that
    appears in its cgroup at the moment it is killed (a fork race)."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.killed: list[int] = []
        self.forks: dict[int, int] = {}

    def rmdir(self, path: str) -> None:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        procs = p / "cgroup.procs"
        busy = any(c.is_dir() for c in p.iterdir()) or (
            procs.exists() and procs.read_text().strip()
        )
        if busy:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        shutil.rmtree(p)

    def kill(self, pid: int, sig: int) -> None:
        assert pid in FAKE_PIDS, f"the fake kernel refuses to signal a real pid {pid}"
        self.killed.append(pid)
        for procs in self.tree.rglob("cgroup.procs"):
            pids = procs.read_text().split()
            if str(pid) in pids:
                pids.remove(str(pid))
                if pid in self.forks:
                    pids.append(str(self.forks.pop(pid)))
                procs.write_text("".join(f"{p}\n" for p in pids))


class FreezingKernel(FakeKernel):
    """A :class:`FakeKernel` with cgroup v1's freezer: a process in a cgroup whose
    ``freezer.state`` is FROZEN keeps a SIGKILL pending (and stays listed) until it is
    thawed (here: seen thawed at the next signal); ``events`` records each signal and
    whether its target was frozen."""

    def __init__(self, tree: Path) -> None:
        super().__init__(tree)
        self.pending: set[int] = set()
        self.events: list[str] = []

    def _frozen(self, pid: int) -> bool:
        for state in self.tree.rglob("freezer.state"):
            procs = state.parent / "cgroup.procs"
            frozen = state.read_text().strip() == "FROZEN"
            if frozen and procs.exists() and str(pid) in procs.read_text().split():
                return True
        return False

    def kill(self, pid: int, sig: int) -> None:
        for waiting in sorted(self.pending):
            if not self._frozen(waiting):  # thawed since: its SIGKILL acts
                self.pending.discard(waiting)
                super().kill(waiting, sig)
        if self._frozen(pid):
            self.events.append(f"kill {pid} frozen")
            self.pending.add(pid)
            return
        self.events.append(f"kill {pid}")
        super().kill(pid, sig)


# --- detect ---------------------------------------------------------------


def test_detect_picks_v2_on_a_cgroup2_host(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    driver = host.detect("node-a")
    assert isinstance(driver, CgroupV2)
    assert driver.version == 2
    assert driver.base == str(host.own / "nimbus-node-a")
    assert driver.server_leaf == str(host.own / "nimbus-node-a-server")


def test_detect_v2_after_prepare_moved_this_process(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    files(host.own / "nimbus-n1-server", cgroup__controllers="cpu memory pids")
    host.self_cgroup.write_text("0::/system.slice/nimbus.service/nimbus-n1-server\n")
    driver = host.detect("n1")
    assert isinstance(driver, CgroupV2)
    assert driver.own == str(host.own)  # not nested one level deeper each time


def test_detect_picks_v1_on_a_hybrid_host(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    driver = host.detect("node-a")
    assert isinstance(driver, CgroupV1)
    assert driver.version == 1
    assert driver.bases == [
        str(host.own["memory"] / "nimbus-node-a"),
        str(host.own["cpu"] / "nimbus-node-a"),
        str(host.own["pids"] / "nimbus-node-a"),
    ]


def test_detect_v1_uses_the_freezer_hierarchy_when_it_is_mounted(tmp_path: Path) -> None:
    without = V1Host(tmp_path / "a").detect()
    assert isinstance(without, CgroupV1)
    assert without.freezer is False
    host = V1Host(tmp_path / "b", freezer=True)
    driver = host.detect()
    assert isinstance(driver, CgroupV1)
    assert driver.freezer is True
    assert driver.bases[-1] == str(host.own["freezer"] / "nimbus-n1")


def test_detect_v1_when_root_is_cgroup2_without_controllers(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    # Make `root` itself an empty cgroup2 mounted on top: v2 unusable, v1 still fine.
    files(host.root, cgroup__controllers="")
    host.mountinfo.write_text(
        host.mountinfo.read_text() + mountline(50, host.root, "cgroup2", "rw")
    )
    assert isinstance(host.detect(), CgroupV1)


def test_detect_v2_missing_controllers_and_no_v1(tmp_path: Path) -> None:
    host = V2Host(tmp_path, controllers="cpu memory")
    with pytest.raises(CgroupUnavailable) as e:
        host.detect()
    reason = str(e.value)
    assert "\n" not in reason
    assert "pids are not available in" in reason
    assert "Delegate=yes" in reason
    assert "no cgroup v1 hierarchy with the memory controller" in reason


def test_detect_nothing_mounted(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_text(mountline(20, "/", "ext4", "rw"))
    (tmp_path / "self_cgroup").write_text("0::/\n")
    with pytest.raises(CgroupUnavailable) as e:
        detect(
            "n1",
            root=str(tmp_path / "nope"),
            self_cgroup=str(tmp_path / "self_cgroup"),
            mountinfo=str(tmp_path / "mountinfo"),
        )
    assert str(e.value) == (
        f"no usable cgroups: {tmp_path / 'nope'} is not a cgroup2 mount, "
        "and no cgroup v1 hierarchy with the memory controller is mounted"
    )


def test_detect_without_proc(tmp_path: Path) -> None:
    with pytest.raises(CgroupUnavailable, match=r"cannot read .*self_cgroup"):
        detect("n1", self_cgroup=str(tmp_path / "self_cgroup"), mountinfo=str(tmp_path / "m"))


def test_detect_v1_controller_missing_from_self_cgroup(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    host.self_cgroup.write_text("4:memory:/user/app\n2:cpu,cpuacct:/\n0::/user/app\n")
    with pytest.raises(CgroupUnavailable, match="no cgroup v1 pids entry in /proc/self/cgroup"):
        host.detect()


def test_detect_v1_cgroup_not_visible_through_the_mount(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    # A container sees only /docker/abc of the memory hierarchy, but we live elsewhere.
    text = host.mountinfo.read_text().replace(
        mountline(35, host.root / "memory", "cgroup", "rw,memory"),
        mountline(35, host.root / "memory", "cgroup", "rw,memory", root="/docker/abc"),
    )
    host.mountinfo.write_text(text)
    with pytest.raises(CgroupUnavailable, match=r"memory cgroup /user/app is not visible under"):
        host.detect()


def test_detect_follows_a_mount_of_part_of_the_hierarchy(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    # The memory hierarchy's /user is mounted at memory/: /user/app is memory/app.
    files(host.root / "memory/app", cgroup__procs="")
    text = host.mountinfo.read_text().replace(
        mountline(35, host.root / "memory", "cgroup", "rw,memory"),
        mountline(35, host.root / "memory", "cgroup", "rw,memory", root="/user"),
    )
    host.mountinfo.write_text(text)
    driver = host.detect()
    assert isinstance(driver, CgroupV1)
    assert driver.bases[0] == str(host.root / "memory/app/nimbus-n1")


def test_detect_rejects_a_bad_node_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid node id"):
        V2Host(tmp_path).detect("../etc")


def test_parse_mountinfo_unescapes_and_reads_super_options() -> None:
    (m,) = parse_mountinfo(
        r"32 31 0:29 / /sys/fs/my\040cgroups/cpu rw,relatime shared:9 master:1 - cgroup cgroup "
        "rw,cpu,cpuacct\n"
    )
    assert m.point == "/sys/fs/my cgroups/cpu"
    assert m.fstype == "cgroup"
    assert "cpu" in m.options and "cpuacct" in m.options
    assert m.root == "/"


def test_parse_self_cgroup_splits_comounted_controllers() -> None:
    paths = parse_self_cgroup("2:cpu,cpuacct:/a\n4:memory:/b:c\n0::/d\n")
    assert paths == {"cpu": "/a", "cpuacct": "/a", "memory": "/b:c", "": "/d"}


# --- limits ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory_mb", "shares", "weight"),
    [(128, 74, 7), (1769, 1024, 100), (3538, 2048, 200), (1, 2, 1), (1_000_000, 262144, 10000)],
)
def test_cpu_share_follows_memory(tmp_path: Path, memory_mb: int, shares: int, weight: int) -> None:
    v1 = V1Host(tmp_path / "v1")
    v1.instance("fn-a")
    d1 = v1.detect()
    assert isinstance(d1, CgroupV1)
    d1.create("fn-a", Limits.for_memory_mb(memory_mb))
    assert (v1.own["cpu"] / "nimbus-n1/fn-a/cpu.shares").read_text() == str(shares)

    v2 = V2Host(tmp_path / "v2")
    d2 = v2.detect()
    assert isinstance(d2, CgroupV2)
    v2.instance("fn-a")
    d2.create("fn-a", Limits.for_memory_mb(memory_mb))
    assert (v2.own / "nimbus-n1/fn-a/cpu.weight").read_text() == str(weight)


def test_limits_are_validated() -> None:
    assert Limits.for_memory_mb(128) == Limits(128 * MB, 128 / 1769, 1024)
    with pytest.raises(ValueError, match="memory_bytes"):
        Limits(0, 1.0)
    with pytest.raises(ValueError, match="cpu_weight"):
        Limits(MB, 0.0)
    with pytest.raises(ValueError, match="pids_max"):
        Limits(MB, 1.0, 0)


# --- v1 -------------------------------------------------------------------


def test_v1_create_writes_every_limit(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    dirs = host.instance("fn-hello-1a2b")
    driver = host.detect()
    assert isinstance(driver, CgroupV1)
    procs = driver.create("fn-hello-1a2b", Limits(256 * MB, 256 / 1769, pids_max=64))
    assert procs == [str(dirs[c] / "cgroup.procs") for c in ("memory", "cpu", "pids")]
    assert (dirs["memory"] / "memory.limit_in_bytes").read_text() == str(256 * MB)
    assert (dirs["memory"] / "memory.memsw.limit_in_bytes").read_text() == str(256 * MB)
    assert (dirs["cpu"] / "cpu.shares").read_text() == "148"
    assert (dirs["pids"] / "pids.max").read_text() == "64"


def test_v1_create_makes_directories_and_skips_memsw_without_swap_accounting(
    tmp_path: Path,
) -> None:
    host = V1Host(tmp_path, memsw=False)
    driver = host.detect()
    assert isinstance(driver, CgroupV1)
    driver.prepare()
    driver.create("fn-a", Limits(64 * MB, 0.5))
    mem = host.own["memory"] / "nimbus-n1/fn-a"
    assert (mem / "memory.limit_in_bytes").read_text() == str(64 * MB)
    assert not (mem / "memory.memsw.limit_in_bytes").exists()
    assert (host.own["pids"] / "nimbus-n1/fn-a/pids.max").read_text() == "1024"


def test_v1_limit_node_caps_the_base(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    driver = host.detect()
    assert isinstance(driver, CgroupV1)
    driver.prepare()
    driver.limit_node(NodeLimits(memory_bytes=4096 * MB, pids_max=500, cpus=1.5))
    assert (host.own["memory"] / "nimbus-n1/memory.limit_in_bytes").read_text() == str(4096 * MB)
    assert (host.own["pids"] / "nimbus-n1/pids.max").read_text() == "500"
    assert (host.own["cpu"] / "nimbus-n1/cpu.cfs_period_us").read_text() == "100000"
    assert (host.own["cpu"] / "nimbus-n1/cpu.cfs_quota_us").read_text() == "150000"
    driver.limit_node(NodeLimits())  # zeros: unlimited
    assert (host.own["memory"] / "nimbus-n1/memory.limit_in_bytes").read_text() == "-1"
    assert (host.own["pids"] / "nimbus-n1/pids.max").read_text() == "max"
    assert (host.own["cpu"] / "nimbus-n1/cpu.cfs_quota_us").read_text() == "-1"


def test_v1_comounted_memory_and_cpu_share_one_directory(tmp_path: Path) -> None:
    own = files(tmp_path / "memory,cpu/app", cgroup__procs="")
    pids = files(tmp_path / "pids/app", cgroup__procs="")
    driver = CgroupV1("n1", {"memory": str(own), "cpu": str(own), "pids": str(pids)})
    driver.prepare()
    procs = driver.create("fn-a", Limits(64 * MB, 1.0))
    assert procs == [
        str(own / "nimbus-n1/fn-a/cgroup.procs"),
        str(pids / "nimbus-n1/fn-a/cgroup.procs"),
    ]
    assert (own / "nimbus-n1/fn-a/cpu.shares").read_text() == "1024"
    assert (own / "nimbus-n1/fn-a/memory.limit_in_bytes").read_text() == str(64 * MB)


@pytest.mark.parametrize(
    ("oom_control", "expected"),
    [
        ("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n", False),
        ("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", True),
        ("oom_kill_disable 0\nunder_oom 1\n", False),  # before Linux 4.13: no counter
    ],
)
def test_v1_oom_killed(tmp_path: Path, oom_control: str, expected: bool) -> None:
    host = V1Host(tmp_path)
    dirs = host.instance("fn-a")
    (dirs["memory"] / "memory.oom_control").write_text(oom_control)
    driver = host.detect()
    assert driver.oom_killed("fn-a") is expected


def test_v1_memory_peak_and_procs(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    dirs = host.instance("fn-a")
    (dirs["memory"] / "memory.max_usage_in_bytes").write_text("67108864\n")
    (dirs["memory"] / "cgroup.procs").write_text("900003\n900001\n")
    (dirs["pids"] / "cgroup.procs").write_text("900001\n900002\n")
    driver = host.detect()
    assert isinstance(driver, CgroupV1)
    assert driver.memory_peak("fn-a") == 64 * MB
    assert driver.procs("fn-a") == [900001, 900002, 900003]
    assert driver.memory_peak("fn-gone") is None
    assert driver.oom_killed("fn-gone") is False
    assert driver.procs("fn-gone") == []


def test_v1_kill_repeats_until_forks_are_caught(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    dirs = host.instance("fn-a")
    for c in dirs.values():
        (c / "cgroup.procs").write_text("900001\n900002\n")
    kernel = FakeKernel(tmp_path)
    kernel.forks = {900001: 900003}  # 900001 forks as it is being killed
    driver = CgroupV1("n1", {c: str(p) for c, p in host.own.items()}, kill=kernel.kill)
    driver.kill("fn-a")
    assert sorted(kernel.killed) == [900001, 900002, 900003]
    assert driver.procs("fn-a") == []


def test_v1_remove(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    dirs = host.instance("fn-a")
    (dirs["pids"] / "cgroup.procs").write_text("900001\n")
    kernel = FakeKernel(tmp_path)
    driver = CgroupV1("n1", {c: str(p) for c, p in host.own.items()}, rmdir=kernel.rmdir)
    assert driver.remove("fn-a") is False  # busy in pids
    assert not dirs["memory"].exists()  # but the others went
    assert dirs["pids"].exists()
    (dirs["pids"] / "cgroup.procs").write_text("")
    assert driver.remove("fn-a") is True
    assert driver.remove("fn-a") is True  # missing counts as gone
    assert driver.remove("never-made") is True


def test_v1_remove_without_fakes_on_missing_dirs(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    driver = host.detect()
    assert driver.remove("fn-never") is True


def test_v1_prepare_clears_leftovers_and_cleanup_removes_the_base(tmp_path: Path) -> None:
    host = V1Host(tmp_path)
    old = host.instance("fn-old")
    (old["memory"] / "cgroup.procs").write_text("900007\n")
    kernel = FakeKernel(tmp_path)
    driver = CgroupV1(
        "n1", {c: str(p) for c, p in host.own.items()}, rmdir=kernel.rmdir, kill=kernel.kill
    )
    driver.prepare()
    assert kernel.killed == [900007]
    assert driver.instances() == []
    assert all(os.path.isdir(b) for b in driver.bases)

    for name in ("fn-a", "fn-b"):
        host.instance(name)
    (host.own["cpu"] / "nimbus-n1/fn-b/cgroup.procs").write_text("900008\n")
    driver.cleanup()
    assert 900008 in kernel.killed
    assert not any(os.path.exists(b) for b in driver.bases)
    assert all(p.is_dir() for p in host.own.values())  # our own cgroups stay


def test_names_are_checked(tmp_path: Path) -> None:
    driver = V1Host(tmp_path).detect()
    for bad in ("../x", "", ".hidden", "a/b", "a b"):
        with pytest.raises(ValueError, match="invalid cgroup name"):
            driver.create(bad, Limits(MB, 1.0))


def test_v1_create_makes_the_freezer_cgroup_and_freeze_thaw_write_its_state(
    tmp_path: Path,
) -> None:
    host = V1Host(tmp_path, freezer=True)
    kernel = FakeKernel(tmp_path)
    driver = CgroupV1("n1", {c: str(p) for c, p in host.own.items()}, rmdir=kernel.rmdir)
    driver.prepare()
    procs = driver.create("fn-a", Limits(64 * MB, 1.0))
    freezer = host.own["freezer"] / "nimbus-n1/fn-a"
    assert procs[-1] == str(freezer / "cgroup.procs")  # the instance joins it too
    (freezer / "freezer.state").write_text("THAWED\n")  # as the kernel makes it
    assert driver.frozen("fn-a") is False

    driver.freeze("fn-a")
    assert (freezer / "freezer.state").read_text().strip() == "FROZEN"
    assert driver.frozen("fn-a") is True
    # The node holds one empty cgroup frozen (the kernel's freezer stays switched on).
    held = host.own["freezer"] / "nimbus-n1-frozen"
    assert (held / "freezer.state").read_text() == "FROZEN"
    fds = dict(driver._freezer_fds)
    assert list(fds) == ["fn-a"]  # kept open: the next write is one syscall

    driver.thaw("fn-a")
    assert (freezer / "freezer.state").read_text().strip() == "THAWED"
    assert driver.frozen("fn-a") is False
    assert (held / "freezer.state").read_text() == "FROZEN"

    driver.cleanup()
    assert driver._freezer_fds == {}
    with pytest.raises(OSError):
        os.fstat(fds["fn-a"])  # closed
    assert not held.exists()
    assert not (host.own["freezer"] / "nimbus-n1").exists()


def test_v1_freeze_of_a_gone_cgroup_or_without_freezer_does_nothing(tmp_path: Path) -> None:
    host = V1Host(tmp_path / "a", freezer=True)
    driver = host.detect()
    driver.prepare()
    driver.freeze("fn-gone")
    driver.thaw("fn-gone")
    assert driver.frozen("fn-gone") is False
    assert not (host.own["freezer"] / "nimbus-n1/fn-gone").exists()

    plain = V1Host(tmp_path / "b")
    dirs = plain.instance("fn-a")
    driver = plain.detect()
    assert driver.freezer is False
    driver.freeze("fn-a")
    driver.thaw("fn-a")
    assert driver.frozen("fn-a") is False
    assert not list((tmp_path / "b").rglob("freezer.state"))
    assert not any((d / "freezer.state").exists() for d in dirs.values())


def test_v1_kill_of_a_frozen_cgroup_signals_then_thaws(tmp_path: Path) -> None:
    host = V1Host(tmp_path, freezer=True)
    dirs = host.instance("fn-a")
    for d in dirs.values():
        (d / "cgroup.procs").write_text("900001\n900002\n")
    kernel = FreezingKernel(tmp_path)
    driver = CgroupV1(
        "n1", {c: str(p) for c, p in host.own.items()}, rmdir=kernel.rmdir, kill=kernel.kill
    )
    driver.freeze("fn-a")
    assert driver.frozen("fn-a")
    kernel.events.clear()

    driver.kill("fn-a")
    # Both signalled while frozen (so neither could fork), then thawed: they die.
    assert sorted(kernel.events[:2]) == ["kill 900001 frozen", "kill 900002 frozen"]
    assert (dirs["freezer"] / "freezer.state").read_text().strip() == "THAWED"
    assert kernel.pending == set()
    assert driver.procs("fn-a") == []
    assert not driver.frozen("fn-a")
    assert driver.remove("fn-a") is True


def test_v1_kill_without_the_thaw_would_leave_a_frozen_cgroup_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake's own check: frozen processes outlive SIGKILL until thawed.
    host = V1Host(tmp_path, freezer=True)
    dirs = host.instance("fn-a")
    (dirs["freezer"] / "cgroup.procs").write_text("900001\n")
    (dirs["freezer"] / "freezer.state").write_text("FROZEN")
    kernel = FreezingKernel(tmp_path)
    monkeypatch.setattr(base_module.time, "sleep", lambda _s: None)
    base_module.kill_loop([str(dirs["freezer"] / "cgroup.procs")], kernel.kill)
    assert kernel.pending == {900001}
    assert (dirs["freezer"] / "cgroup.procs").read_text().split() == ["900001"]


# --- v2 -------------------------------------------------------------------


def test_v2_create_writes_every_limit(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    d = host.instance("fn-hello-1a2b")
    driver = host.detect()
    assert isinstance(driver, CgroupV2)
    procs = driver.create("fn-hello-1a2b", Limits(512 * MB, 512 / 1769, pids_max=99))
    assert procs == [str(d / "cgroup.procs")]
    assert (d / "memory.max").read_text() == str(512 * MB)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "cpu.weight").read_text() == "29"
    assert (d / "pids.max").read_text() == "99"


def test_v2_limit_node_caps_the_base(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    d = host.instance("fn-a")
    base = d.parent
    driver = host.detect()
    assert isinstance(driver, CgroupV2)
    driver.limit_node(NodeLimits(memory_bytes=2048 * MB, pids_max=300, cpus=0.25))
    assert (base / "memory.max").read_text() == str(2048 * MB)
    assert (base / "pids.max").read_text() == "300"
    assert (base / "cpu.max").read_text() == "25000 100000"
    driver.limit_node(NodeLimits())
    assert (base / "memory.max").read_text() == "max"
    assert (base / "pids.max").read_text() == "max"
    assert (base / "cpu.max").read_text() == "max 100000"


def test_node_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        NodeLimits(pids_max=-1)
    assert NodeLimits(cpus=0.001).cpu_quota_us(100_000) == 1000  # the kernel's minimum


def test_v2_create_without_swap_file(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    d = host.instance("fn-a", swap=False)
    driver = host.detect()
    assert isinstance(driver, CgroupV2)
    driver.create("fn-a", Limits(64 * MB, 1.0))
    assert not (d / "memory.swap.max").exists()
    assert (d / "memory.max").read_text() == str(64 * MB)


def test_v2_oom_killed_and_memory_peak(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    d = host.instance("fn-a")
    driver = host.detect()
    assert isinstance(driver, CgroupV2)
    assert driver.oom_killed("fn-a") is False
    assert driver.memory_peak("fn-a") == 0
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")
    (d / "memory.peak").write_text("67104768\n")
    assert driver.oom_killed("fn-a") is True
    assert driver.memory_peak("fn-a") == 67104768
    (d / "memory.peak").unlink()  # before Linux 5.19
    assert driver.memory_peak("fn-a") is None
    assert driver.oom_killed("fn-gone") is False


def test_v2_kill_uses_cgroup_kill(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    d = host.instance("fn-a")
    (d / "cgroup.procs").write_text("900001\n")
    kernel = FakeKernel(tmp_path)
    driver = CgroupV2("n1", str(host.own), kill=kernel.kill)
    driver.kill("fn-a")
    assert (d / "cgroup.kill").read_text() == "1"
    assert kernel.killed == []


def test_v2_kill_falls_back_to_signals(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    d = host.instance("fn-a", kill_file=False)
    (d / "cgroup.procs").write_text("900001\n900002\n")
    kernel = FakeKernel(tmp_path)
    kernel.forks = {900002: 900005}
    driver = CgroupV2("n1", str(host.own), kill=kernel.kill)
    driver.kill("fn-a")
    assert sorted(kernel.killed) == [900001, 900002, 900005]
    assert driver.procs("fn-a") == []
    driver.kill("fn-gone")  # nothing there: no error


def test_v2_freeze_and_thaw_write_cgroup_freeze(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    d = host.instance("fn-a")
    (d / "cgroup.freeze").write_text("0\n")
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    driver = CgroupV2("n1", str(host.own))
    assert driver.freezer is False  # Linux before 5.2: no cgroup.freeze in the base
    (host.own / "nimbus-n1/cgroup.freeze").write_text("0\n")
    assert driver.freezer is True
    assert driver.frozen("fn-a") is False

    driver.freeze("fn-a")
    assert (d / "cgroup.freeze").read_text().strip() == "1"
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")  # the kernel, once done
    assert driver.frozen("fn-a") is True
    driver.thaw("fn-a")
    assert (d / "cgroup.freeze").read_text().strip() == "0"

    driver.freeze("fn-gone")  # gone (or no freezer): nothing to do, no error
    driver.thaw("fn-gone")
    assert driver.frozen("fn-gone") is False
    assert not (host.own / "nimbus-n1/fn-gone").exists()


def test_v2_kill_of_a_frozen_cgroup_needs_no_thaw(tmp_path: Path) -> None:
    # v2's freezer lets SIGKILL through: cgroup.kill as usual, cgroup.freeze untouched.
    host = V2Host(tmp_path)
    d = host.instance("fn-a")
    (d / "cgroup.freeze").write_text("1")
    driver = CgroupV2("n1", str(host.own))
    driver.kill("fn-a")
    assert (d / "cgroup.kill").read_text() == "1"
    assert (d / "cgroup.freeze").read_text() == "1"


def test_v2_remove(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    d = host.instance("fn-a")
    files(d / "nested", cgroup__procs="")
    (d / "cgroup.procs").write_text("900001\n")
    kernel = FakeKernel(tmp_path)
    driver = CgroupV2("n1", str(host.own), rmdir=kernel.rmdir)
    assert driver.remove("fn-a") is False
    (d / "cgroup.procs").write_text("")
    assert driver.remove("fn-a") is True
    assert not d.exists()
    assert driver.remove("fn-a") is True


def test_v2_prepare_enables_controllers(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    driver = CgroupV2("n1", str(host.own))
    driver.prepare()
    assert (host.own / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (host.own / "nimbus-n1/cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert not (host.own / "nimbus-n1-server").exists()


def test_v2_prepare_enables_only_what_is_missing(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    (host.own / "cgroup.subtree_control").write_text("cpu memory\n")
    files(host.own / "nimbus-n1", cgroup__subtree_control="memory cpu pids\n", cgroup__procs="")
    CgroupV2("n1", str(host.own)).prepare()
    assert (host.own / "cgroup.subtree_control").read_text() == "+pids"
    assert (host.own / "nimbus-n1/cgroup.subtree_control").read_text() == "memory cpu pids\n"


class NoInternalProcesses:
    """``write_text`` that refuses to enable controllers in ``own`` while its
    ``cgroup.procs`` lists a process, as the kernel's rule does."""

    def __init__(self, own: Path) -> None:
        self.own = own
        self.real = base_module.write_text

    def __call__(self, path: str, value: str) -> None:
        p = Path(path)
        busy = bool((self.own / "cgroup.procs").read_text().split())
        if p == self.own / "cgroup.subtree_control" and busy:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        if p.name == "cgroup.procs" and p.parent.parent == self.own:
            # Moving a pid into a child takes it out of `own`.
            left = [x for x in (self.own / "cgroup.procs").read_text().split() if x != value]
            (self.own / "cgroup.procs").write_text("".join(f"{x}\n" for x in left))
        self.real(path, value)


def test_v2_prepare_moves_only_itself_out_of_a_busy_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = V2Host(tmp_path)
    (host.own / "cgroup.procs").write_text(f"{os.getpid()}\n")
    monkeypatch.setattr(v2_module, "write_text", NoInternalProcesses(host.own))
    driver = CgroupV2("n1", str(host.own))
    driver.prepare()
    leaf = host.own / "nimbus-n1-server"
    assert (leaf / "cgroup.procs").read_text() == str(os.getpid())
    assert (host.own / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (host.own / "nimbus-n1/cgroup.subtree_control").read_text() == "+memory +cpu +pids"


def test_v2_prepare_refuses_a_cgroup_shared_with_other_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = V2Host(tmp_path)
    (host.own / "cgroup.procs").write_text(f"{os.getpid()}\n900001\n")  # and a shell, say
    monkeypatch.setattr(v2_module, "write_text", NoInternalProcesses(host.own))
    with pytest.raises(CgroupUnavailable) as e:
        CgroupV2("n1", str(host.own)).prepare()
    reason = str(e.value)
    assert "other processes live in that cgroup" in reason
    assert "systemd-run --scope -p Delegate=yes" in reason
    assert (host.own / "cgroup.procs").read_text().split() == ["900001"]  # never moved
    assert not (host.own / "nimbus-n1").exists()


def test_v2_prepare_clears_leftovers_and_cleanup_removes_the_base(tmp_path: Path) -> None:
    host = V2Host(tmp_path)
    old = host.instance("fn-old", kill_file=False)
    (old / "cgroup.procs").write_text("900009\n")
    kernel = FakeKernel(tmp_path)
    driver = CgroupV2("n1", str(host.own), rmdir=kernel.rmdir, kill=kernel.kill)
    driver.prepare()
    assert kernel.killed == [900009]
    assert driver.instances() == []
    host.instance("fn-a")
    driver.cleanup()
    assert not (host.own / "nimbus-n1").exists()
    assert host.own.is_dir()
