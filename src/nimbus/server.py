"""The composition root: builds every part, wires them, runs them.

:class:`Nimbus` owns the lifecycle (open stores, load functions, start the
autoscaler; on shutdown stop accepting, let in-flight invocations finish,
kill every instance). :func:`serve` runs it under uvicorn (uvloop + httptools,
with :mod:`nimbus.listener`'s limits) for ``nimbus up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI

from nimbus.api import build_api
from nimbus.api.bodycap import capped
from nimbus.api.keys import keys_router
from nimbus.api.scopes import PUBLIC, check_routes
from nimbus.api.secrets import secrets_router
from nimbus.api.triggers import triggers_router
from nimbus.asyncinvoke import AsyncInvoker
from nimbus.auth.crypto import load_node_key
from nimbus.auth.edge import PRINCIPAL, Edge
from nimbus.auth.keys import DEFAULT_TENANT, KeyRing, SqliteKeyStore
from nimbus.auth.secrets import Secrets, SqliteSecretStore
from nimbus.config import Settings, is_loopback
from nimbus.errors import (
    InvalidParameterValue,
    NimbusError,
    ServiceException,
    Unauthorized,
    headers_of,
)
from nimbus.executor.core import Executor, Launcher
from nimbus.executor.sandbox.baseroot import BaseRoot
from nimbus.functions import Functions, read_spec_file
from nimbus.gateway import Gateway
from nimbus.gateway.app import JSON, PREFIX, function_host, send_response
from nimbus.gateway.asyncapp import ASYNC_PREFIX, AsyncGateway, is_event_invoke
from nimbus.invoke import Invoker
from nimbus.models import Account, FunctionSpec, Version
from nimbus.observability.logs import LogStore
from nimbus.observability.metrics import Metrics
from nimbus.outbound import OutboundPolicy, check_url
from nimbus.packaging import CodeStore, LayerStore, package_directory
from nimbus.packaging.builder import Builder
from nimbus.packaging.zips import human_size
from nimbus.queue import SqliteQueue
from nimbus.runtimes.registry import available_runtimes
from nimbus.scheduling import Scheduler
from nimbus.store import SqliteStore
from nimbus.triggers.events import EventTriggers
from nimbus.triggers.runner import ScheduleRunner
from nimbus.triggers.specs import check_watch_paths

log = logging.getLogger("nimbus")


class Nimbus:
    """One node: control plane and data plane in one asyncio process."""

    def __init__(self, settings: Settings, *, isolation: Isolation | None = None) -> None:
        self.settings = settings
        data = settings.data_dir
        runtimes = available_runtimes()
        account = Account(settings.region, settings.account_id)
        data.mkdir(parents=True, exist_ok=True)
        node_key = load_node_key(data / "node.key")
        if settings.insecure_no_auth:
            self.keys: KeyRing | None = None
        else:
            self.keys = KeyRing(SqliteKeyStore(data / "keys.db"), node_key)
        self.secrets = Secrets(SqliteSecretStore(data / "secrets.db"), node_key)
        self.edge = Edge(self.keys)
        self.admin_key_path: Path | None = None
        # Read now, so that a key that cannot be read stops `nimbus up` with one line.
        self._admin_secret = self._admin_key() if self.keys is not None else ""
        self.outbound = OutboundPolicy.parse(settings.outbound_allow)
        # The largest body a control-plane route takes (a code zip, or a sync invoke's
        # event), plus room for a multipart upload's other fields.
        self._collector: asyncio.Task[None] | None = None
        self._api_body_limit = max(settings.max_zip_bytes, settings.max_sync_payload) + (1 << 20)
        self._api_body_what = (
            f"what the API takes (code zips up to {human_size(settings.max_zip_bytes)}, "
            f"events up to {human_size(settings.max_sync_payload)})"
        )
        if isolation is None:
            isolation = build_isolation(settings)
        launcher = isolation.launcher
        self.store = SqliteStore(data / "nimbus.db")
        self.logs = LogStore(
            data / "logs.db", max_records_per_function=settings.max_log_records_per_function
        )
        self.code = CodeStore(
            data,
            max_zip_bytes=settings.max_zip_bytes,
            max_unpacked_bytes=settings.max_unpacked_bytes,
            max_entries=settings.max_zip_entries,
            max_storage_bytes=settings.max_code_storage_bytes,
            python=next(iter(runtimes.values())).executable,
        )
        self.layers = LayerStore(
            data, isolation.builder, platform=isolation.platform, outbound=self.outbound
        )
        self.executor = Executor(
            launcher,
            runtimes,
            self.code.path,
            self.layers.path,
            self.logs.emit,
            max_log_bytes=settings.max_log_bytes_per_invocation,
            max_result=settings.max_sync_payload,
            account=account,
            secret_env=self._secret_env,
        )
        self.scheduler = Scheduler(
            self.executor,
            max_instances=settings.max_instances,
            queue_depth=settings.queue_depth,
            queue_timeout=settings.queue_timeout,
        )
        self.functions = Functions(
            self.store,
            self.code,
            self.layers,
            self.scheduler,
            self.logs,
            frozenset(runtimes),
            on_delete=self._on_delete,
            check=self._check_spec,
            verify=self._verify,
        )
        self.metrics = Metrics(self._instance_counts)
        self.invoker = Invoker(
            self.functions,
            self.scheduler,
            self.logs,
            self.metrics,
            max_payload=settings.max_sync_payload,
        )
        self.gateway = Gateway(self.invoker, authorize=self._authorize)
        self._host_suffix = b"." + settings.function_domain.encode("ascii")
        self.async_invoker = AsyncInvoker(
            SqliteQueue(data / "queue.db"),
            self.functions,
            self.invoker,
            self.logs,
            max_payload=settings.max_async_payload,
            max_concurrency=settings.async_concurrency,
            retention=settings.async_retention,
            queue_timeout=settings.queue_timeout,
            grace=settings.shutdown_grace,
            account=account,
            outbound=self.outbound,
        )
        self.async_gateway = AsyncGateway(self.async_invoker, authorize=self._authorize)
        self.schedules = ScheduleRunner(
            self.functions, self.async_invoker, self.store, account=account
        )
        self.events = EventTriggers(
            self.functions,
            self.invoker,
            self.async_invoker.dead_letter_event,
            account=account,
            urls={
                "nats": settings.nats_url,
                "redis": settings.redis_url,
                "mqtt": settings.mqtt_url,
                "amqp": settings.amqp_url,
            },
            grace=settings.shutdown_grace,
        )
        self.api = build_api(
            self.functions,
            self.invoker,
            self.scheduler,
            self.logs,
            self.metrics,
            tmp_dir=data / "tmp",
            max_zip_bytes=settings.max_zip_bytes,
            lifespan=self._lifespan,
            zygote_up=self.executor.zygote_up,
            function_zygote_up=self.executor.function_zygote_up,
            async_invoker=self.async_invoker,
            function_domain=settings.function_domain,
        )
        self.api.include_router(triggers_router(self.functions, self.schedules, self.events))
        self.api.include_router(
            secrets_router(self.secrets, self.users_of_secret, self.secret_changed)
        )
        if self.keys is not None:
            self.api.include_router(keys_router(self.keys))
        check_routes(self.api)  # a route without a scope is a bug: refuse to start

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI entry point: a function's own host and the gateway's prefix go straight
        to the gateway, the rest to the API."""
        if scope["type"] == "http" and (name := function_host(scope, self._host_suffix)):
            await self.gateway.serve(scope, receive, send, name, scope["path"] or "/")
        elif scope["type"] == "http" and scope["path"].startswith(PREFIX):
            await self.gateway(scope, receive, send)
        elif scope["type"] == "http" and scope["path"].startswith(ASYNC_PREFIX):
            await self.async_gateway(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] not in PUBLIC:
            # The control plane: no route without a valid key (each checks its scope).
            principal = self.edge.principal(scope["headers"])
            if principal is None:
                error = Unauthorized(
                    "this needs an API key: send 'Authorization: Bearer <key>' (the CLI "
                    "reads NIMBUS_API_KEY); the admin key is in the data dir's admin.key"
                )
                headers = [JSON, *((k.encode(), v.encode()) for k, v in headers_of(error).items())]
                await send_response(send, 401, headers, orjson.dumps(error.to_wire()))
                return
            scope[PRINCIPAL] = principal
            if is_event_invoke(scope):
                await self.async_gateway.invoke_event(scope, receive, send)
            else:
                await capped(
                    self.api, scope, receive, send, self._api_body_limit, self._api_body_what
                )
        else:
            await self.api(scope, receive, send)

    def _authorize(self, name: str, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """A gateway request to ``name``: with ``auth: key``, a key of the invoke scope."""
        if self.functions.current(name).spec.auth == "key":
            self.edge.require(headers, "invoke")

    def _check_spec(self, spec: FunctionSpec) -> None:
        """What this node allows beyond the spec's own rules: file triggers under the
        allowed roots, destination URLs that reach public addresses."""
        check_watch_paths(spec.triggers, self.settings.watch_roots, self.settings.data_dir)
        missing = self.secrets.missing(DEFAULT_TENANT, spec.secrets.values())
        if missing:
            raise InvalidParameterValue(
                f"secrets: {', '.join(repr(m) for m in missing)} "
                f"{'does' if len(missing) == 1 else 'do'} not exist; create "
                f"{'it' if len(missing) == 1 else 'them'} first with 'nimbus secrets set NAME'"
            )
        for field in ("on_success", "on_failure", "dead_letter"):
            target = getattr(spec.async_, field)
            if target is not None and not target.startswith("function:"):
                check_url(target, f"async.{field}", self.outbound)

    def _secret_env(self, version: Version) -> dict[str, str]:
        """The variables an instance of ``version`` gets from secrets, read at its start."""
        return self.secrets.resolve(DEFAULT_TENANT, version.spec.secrets)

    def users_of_secret(self, name: str) -> list[str]:
        """Functions whose current version reads secret ``name``."""
        return sorted(
            r.name for r in self.functions.all() if name in r.current.spec.secrets.values()
        )

    async def secret_changed(self, name: str) -> list[str]:
        """A secret's value changed: the functions using it replace their instances (idle
        ones and zygotes now, busy ones when they finish), so every later start reads it."""
        users = self.users_of_secret(name)
        for function in users:
            await self.executor.restart(function)
            self.scheduler.drain(function)
        return users

    async def _verify(self, version: Version) -> bytes | None:
        """A deploy's verdict: the error of the version's init, or None."""
        failed = await self.executor.check_init(version)
        return failed.body if failed is not None else None

    async def _on_delete(self, name: str) -> None:
        """A function was deleted: its launcher state, its queued invocations and the
        code no other version uses go."""
        await self.executor.forget(name)
        await self.async_invoker.delete_function(name)
        await self.functions.collect_garbage()

    def _instance_counts(self) -> Iterable[tuple[str, str, int]]:
        for record in self.functions.all():
            c = self.scheduler.counts(record.name)
            yield record.name, "idle", c.idle
            yield record.name, "busy", c.busy
            yield record.name, "starting", c.starting

    async def start(self) -> None:
        data = self.settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        # Functions' environments, logs and invocations are in here: no other local user
        # reads them. (Sandboxes see only what is bound into them, whatever this says.)
        data.chmod(0o700)
        await self.executor.open()
        if self.keys is not None:
            await self.keys.open()
            await self.keys.bootstrap_admin(self._admin_secret)
        await self.secrets.open()
        await self.store.open()
        await self.logs.open()
        await self.functions.load()
        self.code.clear_tmp()  # a crash's leftovers: nothing is in progress yet
        await self.functions.collect_garbage()
        self._collector = asyncio.get_running_loop().create_task(self._collect_every(600.0))
        self.scheduler.start()
        await self.async_invoker.start()
        for db in data.glob("*.db*"):  # SQLite gives its -wal and -shm the db's mode
            db.chmod(0o600)
        await self.schedules.start()
        await self.events.start()

    def _admin_key(self) -> str:
        """``NIMBUS_ADMIN_KEY``, else ``--admin-key-file``'s, else the data dir's
        ``admin.key`` (made, 0600, the first time)."""
        settings = self.settings
        if settings.admin_key:
            return settings.admin_key.strip()
        path = Path(settings.admin_key_file) if settings.admin_key_file else None
        if path is None:
            path = settings.data_dir / "admin.key"
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write("nmb_" + secrets.token_urlsafe(32) + "\n")
        self.admin_key_path = path
        try:
            key = path.read_text().strip()
        except OSError as e:
            raise ServiceException(f"cannot read the admin key from {path}: {e.strerror}") from e
        if len(key) < 16:
            raise ServiceException(f"the admin key in {path} is too short (16 characters at least)")
        return key

    async def _collect_every(self, seconds: float) -> None:
        """Collect unused code now and then (what a deleted function's last instances
        still held when it was deleted, say)."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.functions.collect_garbage()
            except Exception:  # a full disk, a permission: the next round may do better
                log.exception("collecting unused code failed")

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        await self.events.close()
        if self.keys is not None:
            await self.keys.close()
        await self.schedules.close()
        await self.async_invoker.close()
        await self.scheduler.close()
        await self.executor.close()
        await self.logs.close()
        await self.store.close()
        await self.secrets.close()

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def deploy_directory(self, directory: Path) -> tuple[str, int, bool]:
        """Deploy a function directory in-process (``nimbus up --deploy``)."""
        spec = read_spec_file(directory)
        data = await asyncio.to_thread(package_directory, directory)
        tmp = self.settings.data_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="deploy-", suffix=".zip", dir=tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            record, changed = await self.functions.deploy(spec, Path(name))
        finally:
            Path(name).unlink(missing_ok=True)
        return record.name, record.current.number, changed


class SandboxUnavailable(NimbusError):
    """The sandbox cannot work here; the message says why and names the way out."""


@dataclass(frozen=True, slots=True)
class Isolation:
    """How this node runs code it was given: instances, and dependency builds."""

    launcher: Launcher
    builder: Builder
    #: What dependency layers are built against: the base root's digest ("host" when
    #: builds run on the host).
    platform: str


def build_isolation(settings: Settings) -> Isolation:
    """Instances and builds for this node: sandboxed unless ``--insecure-no-sandbox``.

    Runs once, before the event loop serves anything (it forks a probe, and builds
    the base root filesystem the first time on a machine). Raises
    :class:`SandboxUnavailable` with one line a person can act on.
    """
    import hashlib

    from nimbus.executor.zygote.client import Sandbox, Zygote, ZygoteLauncher
    from nimbus.packaging.builder import HostBuilder, SandboxBuilder
    from nimbus.runtimes.registry import host_python

    python = host_python()
    marker = str(settings.data_dir)
    environ = dict(os.environ)
    if settings.insecure_no_sandbox:
        log.warning(
            "--insecure-no-sandbox: instances run as plain processes, without namespaces, "
            "cgroups, seccomp or their own uid (so nothing freezes them between invocations), "
            "and dependencies are built on the host; never run untrusted code like this"
        )
        zygote = Zygote(
            python, seccomp_path=None, node_marker=marker, pool_size=settings.sandbox_pool
        )
        return Isolation(ZygoteLauncher(zygote, None), HostBuilder(python, environ=environ), "host")

    from nimbus.executor.sandbox.cgroups import CgroupUnavailable, NodeLimits, detect
    from nimbus.executor.sandbox.network import EgressNetworks
    from nimbus.executor.sandbox.rootfs import build_rootfs
    from nimbus.executor.sandbox.seccomp import ZYGOTE_ALLOWED, compile_filter

    way_out = "; pass --insecure-no-sandbox to run instances unsandboxed (unsafe)"
    if os.geteuid() != 0:
        raise SandboxUnavailable(
            f"cannot sandbox instances: Nimbus must run as root (it runs as uid {os.geteuid()})"
            + way_out
        )
    problem = _probe_namespaces()
    if problem:
        raise SandboxUnavailable(f"cannot sandbox instances: {problem}" + way_out)
    node_id = hashlib.sha256(marker.encode()).hexdigest()[:12]
    try:
        cgroups = detect(node_id)
        cgroups.prepare()
        cgroups.limit_node(
            NodeLimits(
                memory_bytes=settings.node_memory_bytes,
                pids_max=settings.node_pids_max,
                cpus=settings.node_cpus,
            )
        )
    except (CgroupUnavailable, OSError) as e:
        raise SandboxUnavailable(f"cannot sandbox instances: {e}" + way_out) from None
    base = settings.data_dir / "sandbox"
    base.mkdir(parents=True, exist_ok=True)
    try:
        base_root = ensure_base(settings)
        rootfs = build_rootfs(base, python, base_root.path)
    except ServiceException as e:
        raise SandboxUnavailable(f"cannot sandbox instances: {e.message}" + way_out) from None
    seccomp_path = base / "seccomp.bpf"
    for path, program in (
        (seccomp_path, compile_filter()),
        (base / "seccomp-zygote.bpf", compile_filter(allow=ZYGOTE_ALLOWED)),
    ):
        if not path.exists() or path.read_bytes() != program:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(program)
            tmp.replace(path)
    egress = EgressNetworks(node_id)
    sandbox = Sandbox(
        rootfs=rootfs,
        cgroups=cgroups,
        seccomp_path=seccomp_path,
        egress=egress,
        pool_size=settings.sandbox_pool,
        function_zygotes=settings.function_zygotes,
        freeze_idle=settings.freeze_idle,
    )
    zygote = Zygote(
        python,
        seccomp_path=seccomp_path,
        node_marker=marker,
        node_id=node_id,
        pool_size=settings.sandbox_pool,
        root={
            "rootfs": str(rootfs.path),
            "base": str(rootfs.base),
            "prefix": str(rootfs.python_prefix),
            "hidden": [str(p) for p in rootfs.hidden],
            "nofile": sandbox.nofile,
        },
    )
    allow = tuple(str(n) for n in OutboundPolicy.parse(settings.outbound_allow).networks)
    builder = SandboxBuilder(
        rootfs, cgroups, egress, seccomp_path, python, environ=environ, allow=allow
    )
    return Isolation(ZygoteLauncher(zygote, sandbox), builder, base_root.digest or "base")


def ensure_base(settings: Settings) -> BaseRoot:
    """The base root filesystem instances run on: ``--base-root`` as given, else built
    (once per machine) under the cache directory."""
    from nimbus.executor.sandbox.baseroot import (
        Recipe,
        default_suite,
        describe_tree,
        ensure_base_root,
    )

    if settings.base_root:
        return describe_tree(Path(settings.base_root))
    recipe = Recipe(suite=settings.base_suite or default_suite(), mirror=settings.base_mirror)
    return ensure_base_root(settings.cache_dir, recipe, progress=log.info)


def _probe_namespaces() -> str | None:
    """Fork a child that tries to unshare every namespace an instance needs."""
    from nimbus.executor.sandbox import enter, linux

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            linux.unshare(enter.NAMESPACES | linux.CLONE_NEWNET)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return (
            "this kernel or container does not allow new mount, pid, ipc, uts and network "
            "namespaces"
        )
    return None


def serve(settings: Settings, *, deploy: Sequence[Path] = ()) -> None:
    """Run a node until SIGTERM/SIGINT (blocking): ``nimbus up``."""
    import uvicorn

    from nimbus.listener import Limits, connection_cap, protocol_class

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # a line per change otherwise
    # A traceback per reconnect attempt; the trigger's state and warning already say it.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    try:
        node = Nimbus(settings)
    except NimbusError as e:  # cannot sandbox, an unreadable key, …: one line
        print(f"nimbus up: {e.message}", file=sys.stderr)
        raise SystemExit(1) from None

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[Any] | None = None) -> None:
            await super().startup(sockets)
            if self.should_exit:
                return
            scheme = "https" if settings.tls_cert else "http"
            base = (
                f"{scheme}://{settings.host}:{self.servers[0].sockets[0].getsockname()[1]}"
                if self.servers
                else ""
            )
            print(f"Nimbus is up on {base} (data in {settings.data_dir})", flush=True)
            if node.keys is None:
                print("  authentication is off (--insecure-no-auth)", flush=True)
            elif node.admin_key_path is not None:
                path = node.admin_key_path
                print(f"  admin key: {path}  (export NIMBUS_API_KEY=$(cat {path}))", flush=True)
            if not is_loopback(settings.host) and not settings.tls_cert:
                log.warning(
                    "listening on %s without TLS: API keys cross the network in clear; use "
                    "--tls-cert/--tls-key or a TLS-terminating proxy (docs/security.md)",
                    settings.host,
                )
            for directory in deploy:
                try:
                    fname, number, changed = await node.deploy_directory(directory)
                except NimbusError as e:
                    print(
                        f"  could not deploy {directory}: {e.message}", file=sys.stderr, flush=True
                    )
                    continue
                state = "deployed" if changed else "unchanged"
                print(
                    f"  {fname} (version {number}, {state}):  curl {base}/function/{fname}",
                    flush=True,
                )

    limits = Limits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        max_connections=connection_cap(settings.max_connections),
        max_connections_per_client=settings.max_connections_per_client,
    )
    config = uvicorn.Config(
        node,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol_class(limits),
        lifespan="on",
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace),
        server_header=False,
        ssl_certfile=settings.tls_cert or None,
        ssl_keyfile=settings.tls_key or None,
    )
    server = _Server(config)
    server.run()
    if server.should_exit and not server.started:
        raise SystemExit(1)
