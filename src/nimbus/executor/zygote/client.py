"""The server's side of the zygote: start it, ask it to fork instances, hear how they end.

:class:`ZygoteLauncher` is a :class:`~nimbus.executor.launcher.Launcher`: with
a :class:`Sandbox` every instance is forked into its own namespaces, cgroup
and identity; without one, instances are plain forks in their own session
(``--insecure-no-sandbox``), which still skips the interpreter's start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nimbus.executor.launcher import LaunchError, LaunchPlan
from nimbus.executor.sandbox.cgroups import CgroupDriver, Limits
from nimbus.executor.sandbox.network import EgressNetworks, NetworkUnavailable
from nimbus.executor.sandbox.rootfs import Rootfs

log = logging.getLogger("nimbus.zygote")

MAIN = Path(__file__).with_name("main.py")
#: Where the ``nimbus`` package lives, for the zygote's sys.path.
NIMBUS_ROOT = str(Path(__file__).resolve().parents[3])


@dataclass(frozen=True, slots=True)
class Sandbox:
    rootfs: Rootfs
    cgroups: CgroupDriver
    seccomp_path: Path
    egress: EgressNetworks
    nofile: int = 1024
    #: Shells kept ready (cgroup joined, namespaces made) so a cold start skips that work.
    pool_size: int = 2
    #: Fork instances from per-version function zygotes (init once, fork many).
    function_zygotes: bool = True
    #: Freeze an idle instance's cgroup between invocations (when the host has a freezer).
    freeze_idle: bool = True


#: How long a spawn may wait for the zygote to report the instance's pid.
SPAWN_TIMEOUT = 30.0


class Zygote:
    """One zygote process and its control socket."""

    def __init__(
        self,
        python: str,
        *,
        seccomp_path: Path | None,
        node_marker: str,
        node_id: str = "",
        pool_size: int = 0,
        root: dict[str, Any] | None = None,
    ) -> None:
        self._root = root
        self._python = python
        self._seccomp_path = seccomp_path
        self._node_marker = node_marker
        self._node_id = node_id
        self._pool_size = pool_size
        self._sock: socket.socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._spawns: dict[str, asyncio.Future[tuple[int, str]]] = {}
        self._exits: dict[str, asyncio.Future[int]] = {}
        self._pids: dict[str, int] = {}
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self.sandbox_error: str | None = None
        self.alive = False
        self._send_lock = asyncio.Lock()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self._python,
                "-I",
                "-S",
                str(MAIN),
                NIMBUS_ROOT,
                str(theirs.fileno()),
                str(self._seccomp_path or ""),
                self._node_id or "-",
                str(self._pool_size),
                json.dumps(self._root) if self._root is not None else "-",
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env={
                    "PATH": "/usr/local/bin:/usr/bin:/bin",
                    "LANG": "C.UTF-8",
                    "NIMBUS_NODE": self._node_marker,
                },
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)
        self.alive = True
        try:
            hello = await asyncio.wait_for(self._ready, 30)
        except TimeoutError:
            await self.close()
            raise LaunchError("the zygote did not start within 30 s") from None
        self.sandbox_error = hello.get("sandbox_error")

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            self._dispatch(json.loads(data))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("ready"):
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg)
        elif "spawned" in msg:
            ident = msg["spawned"]
            self._pids[ident] = msg["pid"]
            fut = self._spawns.pop(ident, None)
            if fut is not None and not fut.done():
                fut.set_result((msg["pid"], msg.get("cgroup", "")))
        elif "failed" in msg:
            fut = self._spawns.pop(msg["failed"], None)
            if fut is not None and not fut.done():
                fut.set_exception(LaunchError(msg["error"]))
        elif "exit" in msg:
            ident = msg["exit"]
            self._pids.pop(ident, None)
            done = self._exits.pop(ident, None)
            if done is not None and not done.done():
                done.set_result(os.waitstatus_to_exitcode(msg["status"]))

    def _lost(self) -> None:
        """The zygote died (or we closed it): nobody will report exits any more."""
        if not self.alive:
            return
        self.alive = False
        assert self._sock is not None
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        for fut in self._spawns.values():
            if not fut.done():
                fut.set_exception(LaunchError("the zygote exited"))
        self._spawns.clear()
        for ident, pid in list(self._pids.items()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            done = self._exits.pop(ident, None)
            if done is not None and not done.done():
                done.set_result(-signal.SIGKILL)
        for done in self._exits.values():
            if not done.done():
                done.set_result(-signal.SIGKILL)
        self._exits.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(LaunchError("the zygote exited during start-up"))

    async def spawn(
        self, msg: dict[str, Any], fds: list[int]
    ) -> tuple[int, str, asyncio.Future[int]]:
        """Start an instance: its pid, its cgroup's name ("" unsandboxed), a future of its
        exit code."""
        if not self.alive or self._sock is None:
            raise LaunchError("the zygote is not running")
        loop = asyncio.get_running_loop()
        ident = msg["id"]
        spawned: asyncio.Future[tuple[int, str]] = loop.create_future()
        exited: asyncio.Future[int] = loop.create_future()
        self._spawns[ident] = spawned
        self._exits[ident] = exited
        data = json.dumps(msg).encode()
        # One sender at a time: a full socket buffer parks the sender on add_writer, and
        # asyncio keeps one writer callback per fd (a second would silently replace it).
        async with self._send_lock:
            while True:
                try:
                    socket.send_fds(self._sock, [data], fds)
                    break
                except BlockingIOError:
                    writable = loop.create_future()
                    loop.add_writer(self._sock.fileno(), writable.set_result, None)
                    try:
                        await writable
                    finally:
                        loop.remove_writer(self._sock.fileno())
                except OSError as e:
                    self._spawns.pop(ident, None)
                    self._exits.pop(ident, None)
                    raise LaunchError(f"the zygote is not reachable: {e}") from None
        try:
            pid, cgroup = await asyncio.wait_for(spawned, SPAWN_TIMEOUT)
        except TimeoutError:
            self._spawns.pop(ident, None)
            self._exits.pop(ident, None)
            raise LaunchError(
                f"the zygote did not start the instance within {SPAWN_TIMEOUT} s"
            ) from None
        except BaseException:
            self._exits.pop(ident, None)
            raise
        return pid, cgroup, exited

    async def close(self) -> None:
        """Close the control socket: the zygote kills its instances and exits."""
        if self._sock is not None:
            self._lost()
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()


class ZygoteProcess:
    """An instance forked by the zygote (an :class:`InstanceProcess`)."""

    def __init__(
        self,
        pid: int,
        exited: asyncio.Future[int],
        *,
        name: str,
        cgroups: CgroupDriver | None,
        freeze: bool = False,
    ) -> None:
        self._pid = pid
        self._exited = exited
        self._name = name
        self._cgroups = cgroups
        #: Who freezes it (sandboxed, freeze_idle, a freezer on this host), or None.
        self._freezer = cgroups if freeze else None
        self._cleaned = False

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        if self._exited.done():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self._cgroups is not None:
                # pid 1 of the instance's pid namespace: the kernel kills the rest.
                os.kill(self._pid, signal.SIGKILL)
            else:
                os.killpg(self._pid, signal.SIGKILL)
        if self._cgroups is not None:
            with contextlib.suppress(OSError):
                self._cgroups.kill(self._name)  # thaws a frozen one, so that it dies

    def freeze(self) -> None:
        if self._freezer is not None:
            with contextlib.suppress(OSError):
                self._freezer.freeze(self._name)

    def thaw(self) -> None:
        if self._freezer is not None:
            with contextlib.suppress(OSError):
                self._freezer.thaw(self._name)

    def oom_killed(self) -> bool:
        if self._cgroups is None:
            return False
        try:
            return self._cgroups.oom_killed(self._name)
        except OSError:
            return False

    async def cleanup(self) -> None:
        if self._cleaned or self._cgroups is None:
            return
        self._cleaned = True
        delay = 0.005
        for _ in range(60):
            try:
                self._cgroups.kill(self._name)
                if self._cgroups.remove(self._name):
                    return
            except OSError:
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        log.warning("cgroup of %s is still busy; it will be removed at shutdown", self._name)


class ZygoteLauncher:
    """Forks instances from the zygote; sandboxed when given a :class:`Sandbox`."""

    #: Forked instances get their environment and token as the first frame on their socket.
    spec_over_socket = True

    def __init__(self, zygote: Zygote, sandbox: Sandbox | None) -> None:
        self._zygote = zygote
        self.zygote = zygote
        self._sandbox = sandbox
        #: Idle instances are frozen (decided at start, once the cgroups are prepared).
        self._freeze = False

    async def start(self) -> None:
        if self._sandbox is not None:
            await self._sandbox.egress.prepare()
        await self._zygote.start()
        if self._sandbox is not None and self._zygote.sandbox_error:
            raise LaunchError(f"cannot sandbox instances: {self._zygote.sandbox_error}")
        if self._sandbox is not None and self._sandbox.freeze_idle:
            self._freeze = self._sandbox.cgroups.freezer
            if not self._freeze:
                log.warning(
                    "idle instances are not frozen: this host has no cgroup freezer "
                    "(cgroup v1 without a writable freezer hierarchy, or v2 before Linux 5.2)"
                )

    @property
    def sandboxed(self) -> bool:
        return self._sandbox is not None

    def task_root(self, code_dir: Path) -> str:
        return "/var/task" if self._sandbox else str(code_dir)

    def layer_root(self, layer_dir: Path) -> str:
        return "/opt/python" if self._sandbox else str(layer_dir)

    @property
    def function_zygotes(self) -> bool:
        """Instances are forks of per-version function zygotes (sandboxed nodes only)."""
        return self._sandbox is not None and self._sandbox.function_zygotes

    async def launch(self, plan: LaunchPlan) -> ZygoteProcess:
        if not self._zygote.alive:
            await self._zygote.start()  # it died: a new one, once
        if plan.zygote_of:
            return await self._fork(plan)
        box: dict[str, Any] | None = None
        if self._sandbox is not None:
            sb = self._sandbox
            limits = Limits.for_memory_mb(plan.memory_mb)
            box = {
                "rootfs": str(sb.rootfs.path),
                "code": str(plan.code_dir),
                "layer": str(plan.layer_dir) if plan.layer_dir is not None else None,
                "tmp_mb": plan.tmp_mb,
                "uid": plan.uid,
                "hostname": plan.function[:63],
                "memory_bytes": limits.memory_bytes,
                "cpu_weight": limits.cpu_weight,
                "pids_max": limits.pids_max,
                "fsize": plan.tmp_mb * 1024 * 1024,
                "netns": plan.network == "egress",
                "mounts": [list(m) for m in plan.mounts],
            }
        # No environment here: it may hold secrets, and the zygote's memory is inherited
        # by every later fork. The executor sends it on the instance's own socket (SPEC).
        msg = {
            "op": "spawn",
            "id": plan.instance_id,
            "task_root": self.task_root(plan.code_dir),
            "sandbox": box,
            "zygote": plan.zygote,
        }
        fds = [plan.sock_fd, plan.output_fd]
        netns_fd = -1
        if box is not None and box["netns"]:
            assert self._sandbox is not None
            try:
                net = await self._sandbox.egress.ensure(plan.function)
                netns_fd = os.open(net.path, os.O_RDONLY | os.O_CLOEXEC)
            except (NetworkUnavailable, OSError) as e:
                raise LaunchError(f"could not set up egress networking: {e}") from None
            fds.append(netns_fd)
        try:
            pid, cgroup, exited = await self._zygote.spawn(msg, fds)
        finally:
            if netns_fd >= 0:
                os.close(netns_fd)
        cgroups = self._sandbox.cgroups if self._sandbox is not None and cgroup else None
        # A function zygote is never frozen: it forks instances on request.
        freeze = self._freeze and not plan.zygote
        return ZygoteProcess(pid, exited, name=cgroup, cgroups=cgroups, freeze=freeze)

    async def _fork(self, plan: LaunchPlan) -> ZygoteProcess:
        """An instance forked from function zygote ``plan.zygote_of``, in its own pid,
        mount, uts, ipc (and, without egress, network) namespaces and its own cgroup."""
        assert self._sandbox is not None
        limits = Limits.for_memory_mb(plan.memory_mb)
        box = {
            "tmp_mb": plan.tmp_mb,
            "hostname": plan.function[:63],
            "memory_bytes": limits.memory_bytes,
            "cpu_weight": limits.cpu_weight,
            "pids_max": limits.pids_max,
            "netns": plan.network == "egress",
        }
        msg = {"op": "fork", "id": plan.instance_id, "zygote": plan.zygote_of, "sandbox": box}
        pid, cgroup, exited = await self._zygote.spawn(msg, [plan.sock_fd, plan.output_fd])
        return ZygoteProcess(
            pid, exited, name=cgroup, cgroups=self._sandbox.cgroups, freeze=self._freeze
        )

    async def forget(self, function: str) -> None:
        """A function was deleted: drop what was kept for it (its egress namespace)."""
        if self._sandbox is not None:
            await self._sandbox.egress.remove(function)

    async def close(self) -> None:
        await self._zygote.close()
        if self._sandbox is not None:
            await self._sandbox.egress.close()
            with contextlib.suppress(OSError):
                self._sandbox.cgroups.cleanup()
