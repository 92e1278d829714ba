"""Server settings: built once, typed and frozen, from an injected mapping.

Every field has a ``NIMBUS_<FIELD>`` environment variable, and ``nimbus up``
exposes each as a ``--flag`` too. Nothing here reads ``os.environ`` by itself:
callers pass the mapping (``Settings.from_env(os.environ)``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from nimbus.errors import InvalidParameterValue

#: What AWS SDKs accept as a region: ``us-east-1``, ``eu-central-2``, ``us-gov-west-1``.
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]")
DOMAIN_RE = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches only this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_DATA_HOME/nimbus``, else ``~/.local/share/nimbus``."""
    xdg = environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path(environ.get("HOME", os.path.expanduser("~"))) / ".local/share"
    return base / "nimbus"


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """Where what a whole machine shares is kept (the base root filesystem):
    ``/var/cache/nimbus`` for root, else ``$XDG_CACHE_HOME/nimbus`` or ``~/.cache/nimbus``."""
    if os.geteuid() == 0:
        return Path("/var/cache/nimbus")
    xdg = environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(environ.get("HOME", os.path.expanduser("~"))) / ".cache"
    return base / "nimbus"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path()
    #: Shared by every node of the machine: the base root filesystem instances run on.
    cache_dir: Path = dataclasses.field(default_factory=lambda: default_cache_dir({}))
    #: A prepared root filesystem to run instances on instead of building one ("": build
    #: a minimal Debian with debootstrap, once per machine, under cache_dir).
    base_root: str = ""
    #: The Debian suite and mirror the base root is built from ("" suite: the host's
    #: Debian codename, else bookworm).
    base_suite: str = ""
    base_mirror: str = "http://deb.debian.org/debian"
    #: The region and account this node reports as (AWS_REGION in functions, ARNs).
    region: str = "us-east-1"
    account_id: str = "000000000000"
    #: Each function is also served at the root of ``<name>.<function_domain>``.
    function_domain: str = "localhost"
    #: Networks and host names callbacks and URL destinations may reach besides public
    #: addresses (comma separated), e.g. ``10.1.0.0/16, hooks.internal``.
    outbound_allow: str = ""
    #: The bootstrap admin key (``NIMBUS_ADMIN_KEY``: no flag, so it is not in ``ps``);
    #: else read from ``admin_key_file``; else made at first start in the data dir.
    admin_key: str = ""
    admin_key_file: str = ""
    #: Serve the control plane without API keys (refused unless bound to loopback).
    insecure_no_auth: bool = False
    #: TLS on the listener: a certificate chain and its private key (PEM files).
    tls_cert: str = ""
    tls_key: str = ""
    #: Instances running at once on this node, over all functions.
    max_instances: int = 256
    #: What every instance of this node may use together: memory (MB; 0: 90 % of the
    #: machine's), processes, and CPUs (a hard quota; 0: no quota).
    node_memory_mb: int = 0
    node_pids_max: int = 16384
    node_cpus: float = 0.0
    #: Requests that may wait for an instance, per function, before 429.
    queue_depth: int = 100
    #: Seconds a request waits in that queue before 429.
    queue_timeout: float = 10.0
    #: Seconds in-flight invocations get to finish on SIGTERM.
    shutdown_grace: float = 30.0
    #: Payload limits, bytes.
    max_sync_payload: int = 6 * 1024 * 1024
    max_async_payload: int = 1024 * 1024
    #: Asynchronous invocations running at once on this node (0: half of max_instances),
    #: so that a burst of events cannot take every instance from synchronous callers.
    max_async_concurrency: int = 0
    #: Seconds finished asynchronous invocations are kept (and idempotency keys honoured).
    async_retention: float = 86400.0
    max_zip_bytes: int = 50 * 1024 * 1024
    max_unpacked_bytes: int = 250 * 1024 * 1024
    max_zip_entries: int = 50_000
    #: What code and dependency layers may take on this node together (0: no limit);
    #: Lambda's default is 75 GB per account.
    max_code_storage_bytes: int = 75 * 1024**3
    #: The listener (nimbus.listener): request line and headers (bytes, fields), seconds
    #: for them to arrive and between body chunks, connections open at once (0: derived
    #: from the open-files limit) and from one client address.
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 0
    max_connections_per_client: int = 512
    #: Captured output kept per invocation (then truncated with a marker), and per function.
    max_log_bytes_per_invocation: int = 10 * 1024 * 1024
    max_log_records_per_function: int = 100_000
    log_level: str = "info"
    #: Run instances as plain processes, without namespaces, cgroups or seccomp.
    insecure_no_sandbox: bool = False
    #: Shells kept ready ahead of cold starts (sandboxed: two processes, a cgroup and
    #: namespaces each; unsandboxed: one forked process).
    sandbox_pool: int = 2
    #: Fork instances from per-version function zygotes, so a function's init runs once
    #: (sandboxed nodes; off: every instance imports its handler itself).
    function_zygotes: bool = True
    #: Freeze an idle instance's cgroup between invocations, as Lambda freezes its
    #: environments: nothing an invocation left running (a thread, a child) runs after
    #: its reply. Sandboxed nodes with a cgroup freezer only (plain processes have none).
    freeze_idle: bool = True
    #: Brokers that message triggers use when they name no ``url`` of their own
    #: (empty: the broker's standard port on 127.0.0.1).
    nats_url: str = ""
    redis_url: str = ""
    mqtt_url: str = ""
    amqp_url: str = ""
    #: Directories under which file triggers may watch (and mount), ':'-separated.
    files_roots: str = "/srv:/mnt:/media:/home:/data:/tmp:/var/tmp"

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Settings from ``NIMBUS_*`` variables; explicit ``overrides`` (not None) win."""
        values: dict[str, Any] = {
            "data_dir": default_data_dir(environ),
            "cache_dir": default_cache_dir(environ),
        }
        for f in fields(cls):
            raw = environ.get(f"NIMBUS_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _convert(f, raw)
        for key, value in overrides.items():
            if value is not None:
                values[key] = value
        values["data_dir"] = Path(values["data_dir"]).expanduser().resolve()
        values["cache_dir"] = Path(values["cache_dir"]).expanduser().resolve()
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidParameterValue(f"port must be between 0 and 65535 (got {self.port})")
        for name in ("max_instances", "queue_depth"):
            if getattr(self, name) < 1 and name == "max_instances":
                raise InvalidParameterValue(f"{name} must be at least 1")
            if getattr(self, name) < 0:
                raise InvalidParameterValue(f"{name} must not be negative")
        for name in ("max_zip_entries", "max_header_bytes", "max_headers"):
            if getattr(self, name) < 1:
                raise InvalidParameterValue(f"{name} must be at least 1")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise InvalidParameterValue(f"{name} must be more than 0 seconds")
        if self.max_connections < 0 or self.max_connections_per_client < 1:
            raise InvalidParameterValue(
                "max_connections must not be negative and max_connections_per_client must be "
                "at least 1"
            )
        if self.node_memory_mb < 0 or self.node_pids_max < 0 or self.node_cpus < 0:
            raise InvalidParameterValue(
                "node_memory_mb, node_pids_max and node_cpus must not be negative"
            )
        if self.max_async_concurrency < 0:
            raise InvalidParameterValue("max_async_concurrency must not be negative")
        if self.async_retention < 0:
            raise InvalidParameterValue("async_retention must not be negative")
        if not REGION_RE.fullmatch(self.region):
            raise InvalidParameterValue(
                f"region must look like an AWS region, e.g. us-east-1 (got {self.region!r})"
            )
        if not re.fullmatch(r"[0-9]{12}", self.account_id):
            raise InvalidParameterValue(f"account_id must be 12 digits (got {self.account_id!r})")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidParameterValue("TLS needs both --tls-cert and --tls-key")
        if self.insecure_no_auth and not is_loopback(self.host):
            raise InvalidParameterValue(
                f"refusing to serve without authentication on {self.host}: "
                "--insecure-no-auth works only on a loopback address (127.0.0.1, ::1)"
            )
        if not DOMAIN_RE.fullmatch(self.function_domain):
            raise InvalidParameterValue(
                f"function_domain must be a DNS name, e.g. localhost (got {self.function_domain!r})"
            )

    @property
    def watch_roots(self) -> tuple[Path, ...]:
        """``files_roots`` as resolved paths."""
        return tuple(Path(p).resolve() for p in self.files_roots.split(":") if p)

    @property
    def node_memory_bytes(self) -> int:
        """``node_memory_mb``, with 0 resolved to 90 % of the machine's memory."""
        if self.node_memory_mb:
            return self.node_memory_mb * 1024 * 1024
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.9)

    @property
    def async_concurrency(self) -> int:
        """``max_async_concurrency``, with 0 resolved to half of ``max_instances``."""
        return self.max_async_concurrency or max(1, self.max_instances // 2)


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError:
        raise InvalidParameterValue(
            f"NIMBUS_{f.name.upper()}={raw!r} is not a valid {kind}"
        ) from None
    return raw
