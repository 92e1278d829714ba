"""Pick the cgroup driver this host supports: v2 if usable, else v1.

v2 is usable when ``root`` is a cgroup2 mount and this process's cgroup there
offers the memory, cpu and pids controllers. v1 is usable when a cgroup v1
hierarchy with each of those controllers is mounted (found via mountinfo;
controllers may be co-mounted, e.g. ``cpu,cpuacct``) and this process's
cgroup in it is visible; the freezer hierarchy is used too when it is mounted
and writable (it freezes idle instances), never required. Hybrid hosts (v1
controllers plus an empty cgroup2 at ``/sys/fs/cgroup/unified``) get v1.

Standard library only: this module is imported inside the zygote.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from nimbus.executor.sandbox.cgroups import v1, v2
from nimbus.executor.sandbox.cgroups.base import CgroupDriver, CgroupUnavailable, check_node_id

__all__ = ["detect"]

_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class _Mount:
    root: str  # the path inside the filesystem that is mounted
    point: str
    fstype: str
    options: tuple[str, ...]  # super options: a v1 hierarchy's controllers are here


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[_Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        # id parent major:minor root point options [optional...] - fstype source super
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        mounts.append(
            _Mount(
                root=_unescape(fields[3]),
                point=_unescape(fields[4]),
                fstype=fields[sep + 1],
                options=tuple(fields[sep + 3].split(",")),
            )
        )
    return mounts


def parse_self_cgroup(text: str) -> dict[str, str]:
    """Controller -> cgroup path; the v2 entry (``0::/path``) is under ``""``."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for c in controllers.split(","):
            if c:
                paths[c] = path
    return paths


def _resolve(mount: _Mount, path: str) -> str | None:
    """Where cgroup ``path`` is in the filesystem, seen through ``mount``."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None  # this mount shows only another part of the hierarchy
    rest = path[len(root) :].strip("/")
    return os.path.join(mount.point, rest) if rest else mount.point


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _writable(path: str) -> str | None:
    if os.access(path, os.W_OK):
        return None
    return f"no write access to {path} (run as root or in a delegated cgroup)"


def _try_v2(
    node_id: str, root: str, mounts: list[_Mount], cgroups: dict[str, str]
) -> CgroupDriver | str:
    root = os.path.normpath(root)
    at_root = [m for m in mounts if os.path.normpath(m.point) == root]
    if not at_root or at_root[-1].fstype != "cgroup2":  # the last mount is the visible one
        return f"{root} is not a cgroup2 mount"
    mount = at_root[-1]
    path = cgroups.get("")
    if path is None:
        return "this process has no cgroup v2 entry in /proc/self/cgroup"
    own = _resolve(mount, path)
    if own is None or not os.path.isdir(own):
        return f"this process's cgroup {path} is not visible under {root}"
    if os.path.basename(own) == f"nimbus-{node_id}-server":
        # An earlier prepare() of this process moved it out of its own cgroup.
        own = os.path.dirname(own)
    available = set((_read(os.path.join(own, "cgroup.controllers")) or "").split())
    missing = [c for c in v2.CONTROLLERS if c not in available]
    if missing:
        return (
            f"the cgroup v2 controller(s) {', '.join(missing)} are not available in {own}; "
            + v2.DELEGATE_HINT
        )
    denied = _writable(own)
    if denied:
        return denied
    return v2.CgroupV2(node_id, own)


def _try_v1(node_id: str, mounts: list[_Mount], cgroups: dict[str, str]) -> CgroupDriver | str:
    own: dict[str, str] = {}
    for controller in v1.CONTROLLERS:
        hierarchies = [m for m in mounts if m.fstype == "cgroup" and controller in m.options]
        if not hierarchies:
            return f"no cgroup v1 hierarchy with the {controller} controller is mounted"
        path = cgroups.get(controller)
        if path is None:
            return f"this process has no cgroup v1 {controller} entry in /proc/self/cgroup"
        found = [d for m in hierarchies if (d := _resolve(m, path)) and os.path.isdir(d)]
        if not found:
            points = ", ".join(m.point for m in hierarchies)
            return (
                f"this process's cgroup v1 {controller} cgroup {path} is not visible under {points}"
            )
        denied = _writable(found[0])
        if denied:
            return denied
        own[controller] = found[0]
    for controller in v1.OPTIONAL:
        # Used when it is there and ours; without it instances are simply not frozen.
        path = cgroups.get(controller)
        hierarchies = [m for m in mounts if m.fstype == "cgroup" and controller in m.options]
        found = [d for m in hierarchies if path and (d := _resolve(m, path)) and os.path.isdir(d)]
        if found and _writable(found[0]) is None:
            own[controller] = found[0]
    return v1.CgroupV1(node_id, own)


def detect(
    node_id: str,
    *,
    root: str = "/sys/fs/cgroup",
    self_cgroup: str = "/proc/self/cgroup",
    mountinfo: str = "/proc/self/mountinfo",
) -> CgroupDriver:
    """The driver for this host, its base cgroup(s) named ``nimbus-<node_id>``
    under this process's own cgroup(s). Call ``prepare()`` on it before use.

    Raises :class:`CgroupUnavailable` with a one-line reason when neither
    cgroup v2 nor cgroup v1 is usable.
    """
    check_node_id(node_id)
    cgroup_text = _read(self_cgroup)
    mount_text = _read(mountinfo)
    if cgroup_text is None or mount_text is None:
        missing = self_cgroup if cgroup_text is None else mountinfo
        raise CgroupUnavailable(f"cannot read {missing}: cgroups need Linux with /proc mounted")
    mounts = parse_mountinfo(mount_text)
    cgroups = parse_self_cgroup(cgroup_text)
    v2_result = _try_v2(node_id, root, mounts, cgroups)
    if not isinstance(v2_result, str):
        return v2_result
    v1_result = _try_v1(node_id, mounts, cgroups)
    if not isinstance(v1_result, str):
        return v1_result
    raise CgroupUnavailable(f"no usable cgroups: {v2_result}, and {v1_result}")
