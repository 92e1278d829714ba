"""Starts, talks to and kills instances. Never blocks the event loop.

The :class:`Executor` turns a :class:`~nimbus.models.Version` into a running,
initialised :class:`Instance`: it makes the instance's socket and output pipe,
asks its :class:`Launcher` for a process, and waits for the runtime's ``READY``.
Which launcher (plain process, sandbox, zygote fork) is the composition root's
choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import NamedTuple, Protocol

import orjson

from nimbus.executor.instance import Instance, State, describe_exit, error_body, expire
from nimbus.executor.launcher import (
    InstanceProcess,
    Launcher,
    LaunchError,
    LaunchPlan,
    ProcessLauncher,
)
from nimbus.executor.output import OutputContext, OutputReader
from nimbus.executor.platformlog import PlatformLog
from nimbus.executor.protocol import (
    INIT_ERROR,
    READY,
    SPEC,
    Channel,
    InstanceGone,
    encode_frame,
)
from nimbus.models import Account, Version
from nimbus.runtimes.python.bootstrap import RESTORED, UNFORKABLE
from nimbus.runtimes.registry import PythonRuntime

__all__ = [
    "Executor",
    "InitFailed",
    "Instance",
    "InstanceProcess",
    "LaunchError",
    "LaunchPlan",
    "Launcher",
    "ProcessLauncher",
    "State",
]


class LogEmit(Protocol):
    """``emit(function, version, instance_id, request_id, message, platform=False)``."""

    def __call__(
        self,
        function: str,
        version: int,
        instance: str,
        request_id: str,
        message: str,
        platform: bool = False,
    ) -> None: ...


class Launched(NamedTuple):
    """An instance process just launched: what :meth:`Executor.launch` returns."""

    instance_id: str
    token: str
    #: The executor's end of the instance's socket.
    sock: socket.socket
    #: The read end of its output pipe.
    output_fd: int
    process: InstanceProcess


class Unforkable(Exception):
    """The version's init cannot be shared by forks: it runs without a function zygote."""


class InitFailed(Exception):
    """The instance could not initialise; ``body`` is Lambda's error JSON."""

    def __init__(self, body: bytes, init_ms: float, error_type: str) -> None:
        super().__init__(error_type)
        self.body = body
        self.init_ms = init_ms
        self.error_type = error_type


class Executor:
    def __init__(
        self,
        launcher: Launcher,
        runtimes: dict[str, PythonRuntime],
        code_path: Callable[[str], Path],
        layer_path: Callable[[str], Path],
        emit: LogEmit,
        *,
        max_log_bytes: int,
        max_result: int = 6 * 1024 * 1024,
        account: Account | None = None,
        secret_env: Callable[[Version], Mapping[str, str]] | None = None,
    ) -> None:
        self._launcher = launcher
        self._secret_env = secret_env
        self._account = account or Account()
        self._runtimes = runtimes
        self._code_path = code_path
        self._layer_path = layer_path
        self._emit = emit
        self._max_log_bytes = max_log_bytes
        self._max_result = max_result
        self._reaping: set[asyncio.Task[None]] = set()
        self._zygotes: dict[tuple[str, int], FunctionZygote] = {}
        #: Versions whose init left what a fork cannot share: no function zygote.
        self._unforkable: set[tuple[str, int]] = set()
        self._zygote_locks: dict[tuple[str, int], asyncio.Lock] = {}

    async def start(self, version: Version) -> Instance:
        """Start and initialise one instance; raise :class:`InitFailed` if its init fails.

        With function zygotes, the instance is a fork of its version's zygote (started
        first if there is none: the function's init runs there, once)."""
        if not self.function_zygotes or (version.name, version.number) in self._unforkable:
            return await self._start(version)
        try:
            zygote, made = await self._zygote_for(version)
        except Unforkable:
            return await self._start(version)
        zygote.hold()  # counted from now: the zygote must not stop while it forks this one
        try:
            instance = await self._start(version, zygote_of=zygote)
        except BaseException:
            zygote.release()
            raise
        zygote.attach(instance)
        init_ms = zygote.instance.init_ms
        if made and init_ms is not None:
            instance.ran_init(init_ms)  # the init ran for this request: it waited for it
        return instance

    async def launch(
        self,
        version: Version,
        *,
        zygote_of: FunctionZygote | None = None,
        as_zygote: bool = False,
    ) -> Launched:
        """Start an instance process (its socket, output pipe and SPEC frame made), not
        waiting for its init; :class:`InitFailed` if the launcher cannot start it."""
        spec = version.spec
        runtime = self._runtimes[spec.runtime]
        instance_id = secrets.token_hex(6)
        token = secrets.token_hex(8)
        code_dir = self._code_path(version.code_sha256)
        layer_dir = self._layer_path(version.layer_sha256) if version.layer_sha256 else None
        task_root = self._launcher.task_root(code_dir)
        layer_root = self._launcher.layer_root(layer_dir) if layer_dir is not None else None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        read_fd, write_fd = os.pipe()
        env = runtime.environment(
            version,
            task_root,
            layer_root,
            instance_id,
            account=self._account,
            sandboxed=self._launcher.sandboxed,
            initialization="snap-start" if as_zygote or zygote_of else "on-demand",
        )
        if spec.secrets and self._secret_env is not None:
            env.update(self._secret_env(version))  # read now: a changed value is seen
        if self._launcher.spec_over_socket:
            # Waits in the socket's buffer (a few KB at most) until the instance reads it.
            parent.sendall(
                encode_frame(SPEC, bytes(16), 0.0, 0, orjson.dumps({"env": env, "token": token}))
            )
        try:
            plan = LaunchPlan(
                instance_id=f"{spec.name}-{'zygote-' if as_zygote else ''}{instance_id}",
                function=spec.name,
                argv=runtime.argv(child.fileno(), token),
                env=env,
                code_dir=code_dir,
                layer_dir=layer_dir,
                sock_fd=child.fileno(),
                output_fd=write_fd,
                token=token,
                uid=version.uid,
                memory_mb=spec.memory,
                tmp_mb=spec.ephemeral_storage,
                network=spec.network,
                mounts=tuple(
                    (t["path"], t["mount"])
                    for t in spec.triggers
                    if t["type"] == "files" and t.get("mount")
                ),
                zygote=as_zygote,
                zygote_of=zygote_of.launch_id if zygote_of is not None else "",
            )
            process = await self._launcher.launch(plan)
        except LaunchError as e:
            parent.close()
            os.close(read_fd)
            self._emit(spec.name, version.number, instance_id, "", f"[nimbus] {e}", True)
            raise InitFailed(
                error_body("Sandbox.SetupError", str(e)), 0.0, "Sandbox.SetupError"
            ) from None
        except BaseException:
            parent.close()
            os.close(read_fd)
            raise
        finally:
            child.close()
            os.close(write_fd)
        return Launched(instance_id, token, parent, read_fd, process)

    async def _start(
        self,
        version: Version,
        *,
        zygote_of: FunctionZygote | None = None,
        as_zygote: bool = False,
    ) -> Instance:
        spec = version.spec
        launched = await self.launch(version, zygote_of=zygote_of, as_zygote=as_zygote)
        instance_id, token, parent, read_fd, process = launched

        loop = asyncio.get_running_loop()
        emit = partial(self._emit, spec.name, version.number, instance_id)
        platform = PlatformLog(spec, version.number)
        output = OutputReader(emit, token.encode(), self._max_log_bytes)
        # Open the init's context before reading: a forked instance can finish its init
        # (and write its sentinel) before the pipe is even connected.
        init_ctx = output.open("")
        await loop.connect_read_pipe(lambda: output, os.fdopen(read_fd, "rb", buffering=0))
        _, channel = await loop.create_unix_connection(
            partial(Channel, self._max_result), sock=parent
        )
        ready = channel.next_frame()
        timer = loop.call_later(spec.timeout, expire, ready)
        try:
            frame = await ready
        except TimeoutError:
            self._discard(process, channel)
            message = f"Init timed out after {spec.timeout:.2f} seconds"
            self._init_failed(output, init_ctx, platform, spec.timeout * 1000, "Sandbox.Timedout")
            raise InitFailed(
                error_body("Sandbox.Timedout", message), spec.timeout * 1000, "Sandbox.Timedout"
            ) from None
        except InstanceGone:
            returncode = await _wait(process)
            message = describe_exit(returncode)
            emit("", message, True)
            self._init_failed(output, init_ctx, platform, 0.0, "Runtime.ExitError")
            raise InitFailed(
                error_body("Runtime.ExitError", message), 0.0, "Runtime.ExitError"
            ) from None
        except BaseException:
            process.kill()
            channel.close()
            raise
        finally:
            timer.cancel()
        init_ms = frame.seconds * 1000.0
        if frame.quiet:
            output.close_quietly(init_ctx, [])
        if frame.kind == INIT_ERROR:
            self._discard(process, channel)
            error_type = _error_type(frame.body)
            if error_type == UNFORKABLE:
                reason = orjson.loads(frame.body).get("errorMessage", "")
                output.finish(
                    init_ctx,
                    [
                        f"[nimbus] no function zygote for version {version.number}: {reason}; "
                        "each instance of it runs the init itself"
                    ],
                )
                raise InitFailed(frame.body, init_ms, error_type)
            self._init_failed(output, init_ctx, platform, init_ms, error_type)
            raise InitFailed(frame.body, init_ms, error_type)
        if frame.kind != READY:
            self._discard(process, channel)
            raise InitFailed(
                error_body("Runtime.InvalidResponse", "unexpected frame during init"),
                init_ms,
                "Runtime.InvalidResponse",
            )
        restored = frame.number == RESTORED
        return Instance(
            instance_id,
            version,
            process,
            channel,
            output,
            emit,
            None if restored else init_ms,
            restore_ms=init_ms if restored else None,
            platform=platform,
            arn=self._account.function_arn(spec.name),
        )

    # -- function zygotes ----------------------------------------------------------------
    @property
    def function_zygotes(self) -> bool:
        """Whether instances are forked from per-version function zygotes."""
        return bool(getattr(self._launcher, "function_zygotes", False))

    async def _zygote_for(self, version: Version) -> tuple[FunctionZygote, bool]:
        """The version's zygote, started (its init run) if it is not up; whether this
        call started it."""
        key = (version.name, version.number)
        async with self._zygote_locks.setdefault(key, asyncio.Lock()):
            zygote = self._zygotes.get(key)
            if zygote is not None and zygote.alive:
                return zygote, False
            if key in self._unforkable:
                raise Unforkable()
            try:
                instance = await self._start(version, as_zygote=True)
            except InitFailed as e:
                if e.error_type == UNFORKABLE:
                    self._unforkable.add(key)
                    raise Unforkable() from None
                raise
            launch_id = f"{version.name}-zygote-{instance.id}"
            zygote = FunctionZygote(launch_id, instance, self._stop_zygote)
            self._zygotes[key] = zygote
            if instance.init_ms is not None:
                line = instance.platform.init_report(instance.init_ms, "zygote", kind="snap-start")
                if line is not None:
                    instance.emit_line(line)
            return zygote, True

    async def check_init(self, version: Version) -> InitFailed | None:
        """Run ``version``'s init before it is published (its deploy-time verdict): the
        init error its first request would get, or None.

        With function zygotes this starts the version's zygote (as Lambda SnapStart
        initialises at publish), which then stays for its first request, the
        ``zygote_keep_warm`` it is allowed. Without, one instance runs the init and
        stops."""
        if self.function_zygotes and (version.name, version.number) not in self._unforkable:
            try:
                zygote, _ = await self._zygote_for(version)
            except Unforkable:
                return None  # its init succeeded; only a fork cannot share it
            except InitFailed as e:
                return e
            if version.spec.scaling.zygote_keep_warm <= 0:
                self._stop_zygote(zygote)
            else:
                zygote.idle_if_unused()
            return None
        try:
            instance = await self._start(version)
        except InitFailed as e:
            return e
        await instance.stop()
        return None

    def prepare(self, version: Version) -> None:
        """A version was just published: the other versions' zygotes retire (each stops
        once its last instance does), and this one's starts if it is not up (as Lambda
        SnapStart initialises at publish), so that even its first request is a fork.
        Not when its zygote would stop at once (``zygote_keep_warm: 0``)."""
        for key, old in list(self._zygotes.items()):
            if key[0] == version.name and key[1] != version.number:
                old.retire()
        if not self.function_zygotes or version.spec.scaling.zygote_keep_warm <= 0:
            return

        async def prewarm() -> None:
            # An init error is in the function's logs, and retried on use.
            with contextlib.suppress(InitFailed, Unforkable):
                (await self._zygote_for(version))[0].idle_if_unused()

        task = asyncio.get_running_loop().create_task(prewarm())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    def _stop_zygote(self, zygote: FunctionZygote) -> None:
        for key, known in list(self._zygotes.items()):
            if known is zygote:
                del self._zygotes[key]  # its lock stays: a start may be holding it
        self._discard(zygote.instance.process, zygote.instance._channel)

    def function_zygote_up(self, name: str) -> bool:
        """Whether a function zygote of ``name`` (any version) is running."""
        return any(key[0] == name and z.alive for key, z in self._zygotes.items())

    async def open(self) -> None:
        """Start the launcher (the zygote, when there is one)."""
        start = getattr(self._launcher, "start", None)
        if start is not None:
            await start()

    def _discard(self, process: InstanceProcess, channel: Channel) -> None:
        """Kill an instance that never became ready, and clean up after it in the background."""
        process.kill()
        channel.close()

        async def reap() -> None:
            await _wait(process)
            await process.cleanup()

        task = asyncio.get_running_loop().create_task(reap())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    def zygote_up(self) -> bool:
        """Whether the runtime's zygote is running (False for exec'd instances)."""
        zygote = getattr(self._launcher, "zygote", None)
        return bool(zygote is not None and zygote.alive)

    async def restart(self, function: str) -> None:
        """Stop ``function``'s zygotes, so that the next instance starts afresh (its
        environment read again)."""
        for key, zygote in list(self._zygotes.items()):
            if key[0] == function:
                self._stop_zygote(zygote)

    async def forget(self, function: str) -> None:
        """A function was deleted: its zygotes stop, and the launcher drops what it kept."""
        await self.restart(function)
        forget = getattr(self._launcher, "forget", None)
        if forget is not None:
            await forget(function)

    async def close(self) -> None:
        """Stop the function zygotes, wait for background clean-ups, close the launcher."""
        for zygote in list(self._zygotes.values()):
            self._stop_zygote(zygote)
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)
        await self._launcher.close()

    @staticmethod
    def _init_failed(
        output: OutputReader,
        ctx: OutputContext,
        platform: PlatformLog,
        init_ms: float,
        error_type: str,
    ) -> None:
        line = platform.init_report(init_ms, "init", error_type)
        output.finish(ctx, [line] if line is not None else [])


def _error_type(body: bytes) -> str:
    import orjson

    try:
        value = orjson.loads(body).get("errorType", "Runtime.Unknown")
        return str(value)
    except (orjson.JSONDecodeError, AttributeError):
        return "Runtime.Unknown"


async def _wait(process: InstanceProcess) -> int | None:
    try:
        return await asyncio.wait_for(process.wait(), 2.0)
    except TimeoutError:
        process.kill()
        return process.returncode


class FunctionZygote:
    """A version's function zygote (started like an instance, serving forks instead of
    invocations) and the instances forked from it.

    It stops ``scaling.zygote_keep_warm`` seconds after its last instance did (at once
    when it was retired by a newer version, or when that is 0); a new instance in
    between keeps it.
    """

    def __init__(
        self, launch_id: str, instance: Instance, stop: Callable[[FunctionZygote], None]
    ) -> None:
        self.launch_id = launch_id
        self.instance = instance
        self._stop = stop
        self.live = 0
        self.retired = False
        self._idle: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return self.instance.process.returncode is None and self.instance.alive

    def idle_if_unused(self) -> None:
        """Started ahead of any instance: count its keep-warm time from now."""
        if self.live == 0 and self._idle is None and not self.retired:
            keep_warm = self.instance.version.spec.scaling.zygote_keep_warm
            self._idle = asyncio.get_running_loop().call_later(keep_warm, self._stop, self)

    def hold(self) -> None:
        """An instance is being forked: count it from now."""
        self.live += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def attach(self, instance: Instance) -> None:
        """The held instance started: count it until its process ends."""
        waiting = asyncio.ensure_future(instance.process.wait())
        waiting.add_done_callback(lambda _: self.release())

    def release(self) -> None:
        self.live -= 1
        if self.live > 0:
            return
        keep_warm = self.instance.version.spec.scaling.zygote_keep_warm
        if self.retired or keep_warm <= 0:
            self._stop(self)
        else:
            loop = asyncio.get_running_loop()
            self._idle = loop.call_later(keep_warm, self._stop, self)

    def retire(self) -> None:
        self.retired = True
        if self.live == 0:
            if self._idle is not None:
                self._idle.cancel()
            self._stop(self)
