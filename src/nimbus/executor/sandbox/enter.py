"""Inside the fork chain: enter the sandbox, step by step.

Run by the zygote's children (standard library only). The order matters and
is the whole point of this module:

1. ``join_cgroups`` and ``unshare_namespaces`` in the first child (still in
   the host's pid namespace, so the pid it writes to ``cgroup.procs`` is right);
2. ``loopback_up`` in the second child, pid 1 of the new pid namespace;
3. ``prepare_root`` and ``harden`` in the waiting process under it (``/proc``
   must be mounted from inside the pid namespace) — all before any request;
4. on *go*: ``enter_root`` (the function's code, layer and ``/tmp``, then
   ``pivot_root``) and ``drop_privileges``, last, because every earlier step
   needs root.

An instance forked by a function zygote gets its ``/proc`` and ``/tmp`` from
``mount_instance``, run by the runtime zygote (root, on the host) for it.

Nothing a sandbox can read names a host path: the overlays name their layers as
``/proc/self/fd/N`` (which is all ``/proc/self/mountinfo`` shows of them), the
function's code and layer are overlays too (a bind would show its directory's path
on the host filesystem), the processes' command lines are neutral titles and
their environment is empty (``linux.set_title``), and the host-wide files of
``/proc`` are a view of the sandbox's own (:mod:`.procfs`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterator, Sequence

from nimbus.executor.sandbox import linux, procfs

#: The cgroup namespace makes the sandbox's own cgroup its root: /proc/self/cgroup
#: shows "/", not the host's hierarchy.
NAMESPACES = (
    linux.CLONE_NEWNS
    | linux.CLONE_NEWPID
    | linux.CLONE_NEWIPC
    | linux.CLONE_NEWUTS
    | linux.CLONE_NEWCGROUP
)

#: What /proc/<pid>/cmdline shows of a sandbox's pid 1, and of its other processes
#: (forks of the zygote, whose own command line names Nimbus's paths).
INIT_TITLE = "init"
RUNTIME_TITLE = f"/var/lang/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
#: sys.argv in an instance, as Lambda's runtime has it.
RUNTIME_ARGV = ("/var/runtime/bootstrap.py",)

#: Where, inside the root, the view of /proc is staged until the sandbox is entered
#: (covered by the sandbox's own /tmp then).
STAGING = "/tmp"

#: The devices an instance gets in its /dev: (name, major, minor).
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9))
RO = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV


def join_cgroups(procs_files: Sequence[str]) -> None:
    pid = str(os.getpid())
    for path in procs_files:
        with open(path, "w") as f:
            f.write(pid)


def unshare_namespaces(netns: str | None) -> None:
    """New mount, pid (for our children), ipc and uts namespaces; the network
    namespace is a fresh one, or ``netns`` (a path to a prepared one) when given."""
    if netns is None:
        linux.unshare(NAMESPACES | linux.CLONE_NEWNET)
    else:
        linux.unshare(NAMESPACES)
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(fd, linux.CLONE_NEWNET)
        finally:
            os.close(fd)
    new_clocks()


def new_clocks() -> None:
    """A time namespace for our children, where the kernel has them: their monotonic
    and boot-time clocks start at 0 now, so neither they, ``/proc/uptime``, the boot
    time in ``/proc/stat`` nor process start times tell how long the host has been up
    (the same for every sandbox on it: a way to tell neighbours). Wall-clock time is
    the host's. Must run before the first child is forked."""
    try:
        linux.unshare(linux.CLONE_NEWTIME)
    except OSError:
        return  # a kernel without time namespaces (before 5.6, or not configured)
    offsets = "".join(
        f"{name} {-int(time.clock_gettime(clock))} 0\n"
        for name, clock in (("monotonic", time.CLOCK_MONOTONIC), ("boottime", time.CLOCK_BOOTTIME))
    )
    with open("/proc/self/timens_offsets", "w") as f:
        f.write(offsets)


@contextlib.contextmanager
def _by_fd(*paths: str) -> Iterator[list[str]]:
    """``paths`` opened (``O_PATH``), named ``/proc/self/fd/N``: what an overlay shows
    of its layers is the name it was given, so the host's paths stay out of sight."""
    fds = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        yield [f"/proc/self/fd/{fd}" for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)


def _bind_ro(source: str, target: str) -> None:
    linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
    linux.mount(None, target, None, linux.MS_REMOUNT | linux.MS_BIND | RO)


def bind_verified(source: str, target: str) -> None:
    """Bind ``source`` read-only at ``target`` only as the path was checked: no
    symbolic link anywhere in it (a link swapped in after the deploy's check is
    refused, ``ELOOP``), and the mount made from the descriptor opened, not from the
    path again."""
    fd = linux.open_no_symlinks(source, os.O_PATH | os.O_DIRECTORY)
    try:
        _bind_ro(f"/proc/self/fd/{fd}", target)
    finally:
        os.close(fd)


def _tree_ro(source: str, target: str, empty: str) -> None:
    """``source`` at ``target``, read-only, as an overlay of it (over ``empty``: an
    overlay without an upper directory needs two layers) rather than a bind: a bind's
    entry in /proc/self/mountinfo shows the directory's path on the host filesystem,
    an overlay's only its own root and the names its layers were given. Where an
    overlay cannot be made of ``source`` (a filesystem overlayfs refuses), a bind."""
    try:
        with _by_fd(source, empty) as (top, bottom):
            linux.mount("overlay", target, "overlay", RO, f"lowerdir={top}:{bottom}")
    except OSError:
        _bind_ro(source, target)


def mount_root(rootfs: str, base: str) -> None:
    """The root tree, at ``rootfs``: an overlay of Nimbus's layer (``rootfs`` itself,
    as it was before this mount) over the base root filesystem; read-only, since it
    has no upper directory."""
    with _by_fd(rootfs, base) as (layer, below):
        linux.mount(
            "overlay",
            rootfs,
            "overlay",
            linux.MS_NOSUID | linux.MS_NODEV,
            f"lowerdir={layer}:{below}",
        )


def prepare_root(
    *,
    rootfs: str,
    base: str,
    prefix: str,
    hidden: Sequence[str],
    memory_bytes: int,
    facts: procfs.HostFacts | None = None,
    proc_options: str | None = None,
) -> None:
    """The function-independent half of the root, made in a shell before any request.

    In the shell's own mount namespace: the root tree mounted (:func:`mount_root`, then
    made read-only), the interpreter prefix bound read-only at its own path with its
    ``site-packages`` masked, a ``/dev`` holding only null, zero, full, random
    and urandom, and a fresh ``/proc`` (this process is in the new pid namespace)
    under the sandbox's own view (:mod:`.procfs`, for ``memory_bytes`` until
    :func:`enter_root` knows the function's; ``facts``: the host's, read once).
    """
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    mount_root(rootfs, base)
    _bind_ro(prefix, rootfs + prefix)
    for path in hidden:
        linux.mount("tmpfs", rootfs + path, "tmpfs", RO | linux.MS_NOEXEC, "size=4k,mode=555")
    dev = rootfs + "/dev"
    linux.mount("tmpfs", dev, "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "size=64k,mode=755")
    old_umask = os.umask(0)
    try:
        for name, major, minor in DEVICES:
            os.mknod(f"{dev}/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    finally:
        os.umask(old_umask)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dev}/{name}")
    linux.mount(
        "proc",
        rootfs + "/proc",
        "proc",
        linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
        proc_options,
    )
    staging = rootfs + STAGING
    _mount_staging(staging)
    view = procfs.render(
        memory_bytes, facts or procfs.host_facts(), booted=procfs.boot_time(), now=time.time()
    )
    procfs.mount_view(rootfs + "/proc", staging, view)
    linux.mount(None, rootfs, None, linux.MS_REMOUNT | linux.MS_BIND | RO)


def _mount_staging(path: str) -> None:
    """The tmpfs the view of /proc is written to (root's alone): its files stay, bound
    over /proc, when it is unmounted (:func:`_unmount_staging`)."""
    linux.mount(
        "tmpfs",
        path,
        "tmpfs",
        linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
        "size=1m,mode=700",
    )


def _unmount_staging(path: str) -> None:
    if os.path.ismount(path):
        linux.umount2(path, linux.MNT_DETACH)


def enter_root(
    *,
    rootfs: str,
    code: str,
    layer: str | None,
    tmp_mb: int,
    memory_bytes: int,
    mounts: list[tuple[str, str]] | tuple[()] = (),
) -> None:
    """The function's half, on *go*: its code at ``/var/task`` and its dependency
    layer at ``/opt/python`` (both read-only), a private ``/tmp`` of its size,
    the directories its file triggers mount (read-only, under ``/mnt``: binds, since
    files arrive there while it runs), ``/proc/meminfo`` saying ``memory_bytes``, then
    ``pivot_root`` into the result (prepared by :func:`prepare_root`)."""
    staging = rootfs + STAGING
    empty = staging + "/.empty"
    _tree_ro(code, rootfs + "/var/task", empty)
    if layer:
        _tree_ro(layer, rootfs + "/opt/python", empty)
    procfs.write_meminfo(staging, memory_bytes)
    if mounts:
        # The root is read-only: a small root-owned tmpfs holds the mount points.
        linux.mount(
            "tmpfs", rootfs + "/mnt", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=64k,mode=755"
        )
        for source, inside in mounts:
            target = rootfs + inside
            os.makedirs(target, exist_ok=True)
            bind_verified(source, target)
    pivot_into(rootfs, tmp_mb)


def pivot_into(rootfs: str, tmp_mb: int) -> None:
    """The last steps of every root: a private ``/tmp`` of ``tmp_mb`` MB (in place of
    the staging tmpfs of :func:`prepare_root`), then ``pivot_root`` into ``rootfs``,
    the old root detached."""
    _unmount_staging(rootfs + STAGING)
    linux.mount(
        "tmpfs",
        rootfs + "/tmp",
        "tmpfs",
        linux.MS_NOSUID | linux.MS_NODEV,
        f"size={tmp_mb}m,mode=1777",
    )
    os.chdir(rootfs)
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")


def loopback_up() -> None:
    """Bring ``lo`` up in a fresh network namespace (one ioctl, no netlink)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh22x", b"lo", flags | iff_up))


def harden(*, nofile: int) -> None:
    """What can be given up before the function is known (in a shell, off the
    request's path): the capability bounding and ambient sets (the effective
    set, which the mounts still need, stays until :func:`drop_privileges`),
    ``no_new_privs``, core dumps and the file-descriptor limit."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for cap in range(linux.last_cap() + 1):
        linux.prctl(linux.PR_CAPBSET_DROP, cap)
    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)


def drop_privileges(*, uid: int, gid: int, fsize: int, seccomp_bpf: bytes | None) -> None:
    """Become the function's own unprivileged user, with nothing to regain
    (after :func:`harden`): the file-size limit, then the ids (which clears
    every capability), not-dumpable, and last the seccomp filter."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    linux.prctl(linux.PR_SET_KEEPCAPS, 0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    if seccomp_bpf:
        linux.load_seccomp_bpf(seccomp_bpf)


def mount_instance(
    pid: int,
    *,
    tmp_mb: int,
    memory_bytes: int,
    facts: procfs.HostFacts,
    pidns_option: bool = True,
) -> None:
    """Give the instance whose pid 1 is ``pid`` (forked by a function zygote, waiting in
    namespaces of its own) its ``/proc``, under the sandbox's view, and its ``/tmp``.

    Run by a child of the runtime zygote: root, on the host. The instance cannot do it
    itself: its mount namespace belongs to the function zygote's user namespace, and
    there the kernel lets nobody mount a procfs while every procfs in sight has files
    covered (the view over the zygote's own): a new one would show what they cover. So
    the procfs is made here, where that rule does not apply (``fsmount``: its pid
    namespace the instance's), then moved into the instance's mount namespace. This is
    also why the function zygote may not ``mount`` at all (its seccomp filter): its
    init's code could otherwise mount a procfs without the view.

    ``pidns_option``: name the pid namespace with procfs's ``pidns=`` (Linux 6.18);
    without it, or where the kernel lacks it, the procfs is made by a short-lived
    process inside the instance's pid namespace."""
    pid_ns = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    mnt_ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        view = procfs.render(memory_bytes, facts, booted=procfs.boot_time(pid), now=time.time())
        proc = -1
        if pidns_option:
            with contextlib.suppress(OSError):  # a procfs without pidns= (before Linux 6.18)
                proc = _procfs_of(pid_ns)
        if proc >= 0:
            _attach(proc, mnt_ns, tmp_mb, view)
            return
        # Made from inside the instance's pid namespace instead, by a short-lived process
        # there (so the instance's own pid is not 2 but 3).
        linux.setns(pid_ns, linux.CLONE_NEWPID)
        child = os.fork()
        if child == 0:
            code = 1
            try:
                _attach(_procfs_of(None), mnt_ns, tmp_mb, view)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise OSError(f"could not make the instance's /proc (wait status {status})")
    finally:
        os.close(pid_ns)
        os.close(mnt_ns)


def _procfs_of(pid_ns: int | None) -> int:
    """A new procfs (detached, nosuid, nodev, noexec) of ``pid_ns``, or of our own."""
    fs = linux.fsopen("proc")
    try:
        linux.fsconfig_string(fs, "source", "proc")  # as mount(2) names it
        if pid_ns is not None:
            linux.fsconfig_fd(fs, "pidns", pid_ns)
        linux.fsconfig_create(fs)
        flags = linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV | linux.MOUNT_ATTR_NOEXEC
        return linux.fsmount(fs, flags)
    finally:
        os.close(fs)


def _attach(proc: int, mnt_ns: int, tmp_mb: int, view: dict[str, bytes]) -> None:
    """In the instance's mount namespace: ``proc`` at /proc under ``view``, a /tmp."""
    linux.setns(mnt_ns, linux.CLONE_NEWNS)
    os.chdir("/")
    linux.move_mount(proc, "/proc")
    _mount_staging(STAGING)
    procfs.mount_view("/proc", STAGING, view)
    _unmount_staging(STAGING)
    linux.mount(
        "tmpfs", "/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, f"size={tmp_mb}m,mode=1777"
    )
