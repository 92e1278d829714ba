"""``nimbus up``: run the Nimbus server in the foreground.

Thin on purpose: options become :class:`nimbus.config.Settings` (every option
also reads its ``NIMBUS_<NAME>`` variable) and :func:`nimbus.server.serve` does
the rest.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Annotated

import typer

from nimbus.cli.common import CliError


def up(
    host: Annotated[
        str | None,
        typer.Option(envvar="NIMBUS_HOST", help="Address to listen on.", show_default="127.0.0.1"),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(envvar="NIMBUS_PORT", help="Port to listen on.", show_default="8080"),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="NIMBUS_DATA_DIR",
            help="Where functions, code and logs are kept.",
            show_default="$XDG_DATA_HOME/nimbus",
        ),
    ] = None,
    max_instances: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_MAX_INSTANCES",
            help="Instances running at once on this node, over all functions.",
            show_default="256",
        ),
    ] = None,
    queue_depth: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_QUEUE_DEPTH",
            help="Requests that may wait for an instance, per function, before 429.",
            show_default="100",
        ),
    ] = None,
    queue_timeout: Annotated[
        float | None,
        typer.Option(
            envvar="NIMBUS_QUEUE_TIMEOUT",
            help="Seconds a request waits for an instance before 429.",
            show_default="10",
        ),
    ] = None,
    shutdown_grace: Annotated[
        float | None,
        typer.Option(
            envvar="NIMBUS_SHUTDOWN_GRACE",
            help="Seconds in-flight invocations get to finish on shutdown.",
            show_default="30",
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            envvar="NIMBUS_LOG_LEVEL",
            help="debug, info, warning or error.",
            show_default="info",
        ),
    ] = None,
    sandbox_pool: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_SANDBOX_POOL",
            help="Instance shells kept ready ahead of cold starts.",
            show_default="2",
        ),
    ] = None,
    max_async_concurrency: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_MAX_ASYNC_CONCURRENCY",
            help="Asynchronous invocations running at once on this node (0: half of "
            "--max-instances).",
            show_default="0",
        ),
    ] = None,
    async_retention: Annotated[
        float | None,
        typer.Option(
            envvar="NIMBUS_ASYNC_RETENTION",
            help="Seconds finished asynchronous invocations (and idempotency keys) are kept.",
            show_default="86400",
        ),
    ] = None,
    insecure_no_sandbox: Annotated[
        bool,
        typer.Option(
            "--insecure-no-sandbox",
            envvar="NIMBUS_INSECURE_NO_SANDBOX",
            help="Run instances as plain processes: no namespaces, cgroups, seccomp or own uid.",
        ),
    ] = False,
    function_zygotes: Annotated[
        bool | None,
        typer.Option(
            "--function-zygotes/--no-function-zygotes",
            envvar="NIMBUS_FUNCTION_ZYGOTES",
            help="Fork instances from per-version function zygotes (init once, fork many).",
            show_default="on",
        ),
    ] = None,
    freeze_idle: Annotated[
        bool | None,
        typer.Option(
            "--freeze-idle/--no-freeze-idle",
            envvar="NIMBUS_FREEZE_IDLE",
            help="Freeze idle instances (their cgroup) between invocations, as Lambda does.",
            show_default="on",
        ),
    ] = None,
    nats: Annotated[
        str | None,
        typer.Option(
            "--nats",
            envvar="NIMBUS_NATS_URL",
            help="NATS server for nats triggers that name no url.",
            show_default="nats://127.0.0.1:4222",
        ),
    ] = None,
    redis: Annotated[
        str | None,
        typer.Option(
            "--redis",
            envvar="NIMBUS_REDIS_URL",
            help="Redis server for redis triggers that name no url.",
            show_default="redis://127.0.0.1:6379/0",
        ),
    ] = None,
    mqtt: Annotated[
        str | None,
        typer.Option(
            "--mqtt",
            envvar="NIMBUS_MQTT_URL",
            help="MQTT broker for mqtt triggers that name no url.",
            show_default="mqtt://127.0.0.1:1883",
        ),
    ] = None,
    amqp: Annotated[
        str | None,
        typer.Option(
            "--amqp",
            envvar="NIMBUS_AMQP_URL",
            help="AMQP broker (RabbitMQ) for amqp triggers that name no url.",
            show_default="amqp://guest:guest@127.0.0.1:5672/",
        ),
    ] = None,
    files_roots: Annotated[
        str | None,
        typer.Option(
            "--files-roots",
            envvar="NIMBUS_FILES_ROOTS",
            help="':'-separated directories under which file triggers may watch and mount.",
            show_default="/srv:/mnt:/media:/home:/data:/tmp:/var/tmp",
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="NIMBUS_CACHE_DIR",
            help="Shared by every node of this machine: the sandbox's base root filesystem.",
            show_default="/var/cache/nimbus (root), else $XDG_CACHE_HOME/nimbus",
        ),
    ] = None,
    base_root: Annotated[
        str | None,
        typer.Option(
            envvar="NIMBUS_BASE_ROOT",
            help="A prepared root filesystem for instances, instead of building one.",
            metavar="DIR",
        ),
    ] = None,
    base_suite: Annotated[
        str | None,
        typer.Option(
            envvar="NIMBUS_BASE_SUITE",
            help="The Debian suite the base root filesystem is built from.",
            show_default="the host's Debian codename, else bookworm",
        ),
    ] = None,
    base_mirror: Annotated[
        str | None,
        typer.Option(
            envvar="NIMBUS_BASE_MIRROR",
            help="The Debian mirror the base root filesystem is built from.",
            show_default="http://deb.debian.org/debian",
        ),
    ] = None,
    region: Annotated[
        str | None,
        typer.Option(
            envvar="NIMBUS_REGION",
            help="The region functions see (AWS_REGION) and ARNs carry.",
            show_default="us-east-1",
        ),
    ] = None,
    account_id: Annotated[
        str | None,
        typer.Option(
            envvar="NIMBUS_ACCOUNT_ID",
            help="The 12-digit account id ARNs carry.",
            show_default="000000000000",
        ),
    ] = None,
    function_domain: Annotated[
        str | None,
        typer.Option(
            envvar="NIMBUS_FUNCTION_DOMAIN",
            help="Each function is also served at the root of <name>.<domain>.",
            show_default="localhost",
        ),
    ] = None,
    admin_key_file: Annotated[
        str | None,
        typer.Option(
            envvar="NIMBUS_ADMIN_KEY_FILE",
            help="A file with the bootstrap admin key (NIMBUS_ADMIN_KEY gives it directly); "
            "default: made at first start in the data dir's admin.key.",
        ),
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            envvar="NIMBUS_INSECURE_NO_AUTH",
            help="Serve the control plane without API keys (loopback addresses only).",
        ),
    ] = False,
    tls_cert: Annotated[
        str | None,
        typer.Option(envvar="NIMBUS_TLS_CERT", help="TLS certificate chain (PEM) to serve HTTPS."),
    ] = None,
    tls_key: Annotated[
        str | None,
        typer.Option(envvar="NIMBUS_TLS_KEY", help="The TLS certificate's private key (PEM)."),
    ] = None,
    outbound_allow: Annotated[
        str | None,
        typer.Option(
            envvar="NIMBUS_OUTBOUND_ALLOW",
            help="Networks and hosts callbacks and URL destinations may reach besides public "
            "addresses (comma separated).",
            show_default="none",
        ),
    ] = None,
    max_zip_entries: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_MAX_ZIP_ENTRIES",
            help="Entries a code zip may hold.",
            show_default="50000",
        ),
    ] = None,
    node_memory_mb: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_NODE_MEMORY_MB",
            help="Memory all instances may use together, MB (0: 90 % of the machine's).",
            show_default="0",
        ),
    ] = None,
    node_pids_max: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_NODE_PIDS_MAX",
            help="Processes all instances may have together (0: no limit).",
            show_default="16384",
        ),
    ] = None,
    node_cpus: Annotated[
        float | None,
        typer.Option(
            envvar="NIMBUS_NODE_CPUS",
            help="CPUs all instances may use together, a hard quota (0: no quota).",
            show_default="0",
        ),
    ] = None,
    max_code_storage_bytes: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_MAX_CODE_STORAGE_BYTES",
            help="What code and dependency layers may take together (0: no limit).",
            show_default="75 GiB",
        ),
    ] = None,
    max_header_bytes: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_MAX_HEADER_BYTES",
            help="Bytes of request line and headers, else 431.",
            show_default="65536",
        ),
    ] = None,
    max_headers: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_MAX_HEADERS",
            help="Header fields a request may have, else 431.",
            show_default="100",
        ),
    ] = None,
    header_timeout: Annotated[
        float | None,
        typer.Option(
            envvar="NIMBUS_HEADER_TIMEOUT",
            help="Seconds a request's headers may take to arrive, else 408.",
            show_default="10",
        ),
    ] = None,
    body_timeout: Annotated[
        float | None,
        typer.Option(
            envvar="NIMBUS_BODY_TIMEOUT",
            help="Seconds a request body may pause, else 408.",
            show_default="30",
        ),
    ] = None,
    max_connections: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_MAX_CONNECTIONS",
            help="Connections open at once (0: from the open-files limit).",
            show_default="0",
        ),
    ] = None,
    max_connections_per_client: Annotated[
        int | None,
        typer.Option(
            envvar="NIMBUS_MAX_CONNECTIONS_PER_CLIENT",
            help="Connections open at once from one address.",
            show_default="512",
        ),
    ] = None,
    deploy: Annotated[
        list[Path] | None,
        typer.Option(
            "--deploy",
            envvar="NIMBUS_DEPLOY",
            help="A function directory to deploy at startup (repeatable).",
            metavar="DIR",
            exists=True,
            file_okay=False,
            dir_okay=True,
        ),
    ] = None,
) -> None:
    """Start Nimbus in the foreground (Ctrl-C stops it)."""
    from nimbus.config import Settings

    settings = Settings.from_env(
        os.environ,
        host=host,
        port=port,
        data_dir=data_dir,
        max_instances=max_instances,
        queue_depth=queue_depth,
        queue_timeout=queue_timeout,
        shutdown_grace=shutdown_grace,
        log_level=log_level,
        insecure_no_sandbox=insecure_no_sandbox or None,
        sandbox_pool=sandbox_pool,
        max_async_concurrency=max_async_concurrency,
        async_retention=async_retention,
        function_zygotes=function_zygotes,
        freeze_idle=freeze_idle,
        nats_url=nats,
        redis_url=redis,
        mqtt_url=mqtt,
        amqp_url=amqp,
        files_roots=files_roots,
        cache_dir=cache_dir,
        base_root=base_root,
        base_suite=base_suite,
        base_mirror=base_mirror,
        region=region,
        account_id=account_id,
        function_domain=function_domain,
        outbound_allow=outbound_allow,
        admin_key_file=admin_key_file,
        insecure_no_auth=insecure_no_auth or None,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_zip_entries=max_zip_entries,
        max_header_bytes=max_header_bytes,
        max_code_storage_bytes=max_code_storage_bytes,
        node_memory_mb=node_memory_mb,
        node_pids_max=node_pids_max,
        node_cpus=node_cpus,
        max_headers=max_headers,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
    )
    from nimbus.server import serve

    try:
        serve(settings, deploy=list(deploy or ()))
    except OSError as e:
        # The usual ones are the user's to fix: the port is taken, or privileged.
        if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) or (
            e.errno == errno.EACCES and e.filename is None
        ):
            where = f"{settings.host}:{settings.port}"
            raise CliError(f"cannot listen on {where}: {e.strerror}") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC) and e.filename:
            raise CliError(f"cannot start Nimbus: {e.filename}: {e.strerror}") from None
        raise
