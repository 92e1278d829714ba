"""Pure data shared by the parts of Nimbus: function specs, versions, results.

``FunctionSpec`` is what a user writes in ``nimbus.yaml``; it is validated here,
once, with messages a person understands (see :func:`parse_spec`). Everything
else is a frozen dataclass with no behaviour beyond small derived values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from nimbus.errors import InvalidParameterValue

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
#: ``module.function``; the module may be dotted or in a directory (``dir/app.handler``).
HANDLER_RE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*([./][A-Za-z_][A-Za-z0-9_]*)*\.[A-Za-z_][A-Za-z0-9_]*$"
)
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: Environment variables the platform sets itself; a spec may not override them.
RESERVED_ENV = frozenset(
    {
        "_HANDLER",
        "LAMBDA_TASK_ROOT",
        "LAMBDA_RUNTIME_DIR",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_EXECUTION_ENV",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "_X_AMZN_TRACE_ID",
        "NIMBUS_FUNCTION_NAME",
    }
)

MIN_MEMORY_MB = 128
MAX_MEMORY_MB = 10240
MAX_TIMEOUT_S = 900
MAX_ENVIRONMENT_BYTES = 4096


class ScalingSpec(BaseModel):
    """How many instances a function may have, and how long an idle one lives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: int = Field(default=0, ge=0, le=1000)
    max: int = Field(default=10, ge=1, le=1000)
    concurrency: int = Field(default=1, ge=1, le=1000)
    keep_warm: float = Field(default=300, ge=0, le=86400)
    #: Seconds a version's function zygote outlives its last instance (0: it stops
    #: with it); a new instance within that time is a fork, without the init.
    zygote_keep_warm: float = Field(default=600, ge=0, le=86400)


DESTINATION_RE = re.compile(r"^(function:[a-z][a-z0-9-]{0,62}|https?://\S+)$")


class AsyncSpec(BaseModel):
    """How asynchronous invocations of a function are retried and where results go
    (``async:`` in ``nimbus.yaml``; Lambda's EventInvokeConfig)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Retries after a *function* error (its exception, timeout, crash, init failure).
    max_retries: int = Field(default=2, ge=0, le=2)
    #: Seconds an event may wait (throttled, retrying) before it is given up.
    max_event_age: float = Field(default=21600, ge=60, le=21600)
    #: Backoff between attempts: base * factor^(attempt-1), capped, ±10 % jitter.
    backoff_base: float = Field(default=1.0, ge=0.01, le=300)
    backoff_factor: float = Field(default=2.0, ge=1, le=10)
    backoff_max: float = Field(default=300, ge=0.01, le=3600)
    #: Instances async work may occupy at once (None: half of scaling.max, at least 1),
    #: so a burst of events cannot starve synchronous callers.
    max_concurrency: int | None = Field(default=None, ge=1, le=1000)
    #: Destinations: "function:<name>" or an http(s) URL.
    on_success: str | None = None
    on_failure: str | None = None
    dead_letter: str | None = None

    @field_validator("on_success", "on_failure", "dead_letter")
    @classmethod
    def _destination(cls, v: str | None) -> str | None:
        if v is not None and not DESTINATION_RE.fullmatch(v):
            raise ValueError("must be 'function:<name>' or an http(s) URL")
        return v


LogLevel = Literal["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"]


class LoggingSpec(BaseModel):
    """Lambda's LoggingConfig (``logging:`` in ``nimbus.yaml``): the format of the
    runtime's and the platform's log lines, and the levels that pass."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``Text``: Lambda's tab-separated lines; ``JSON``: one JSON object per record.
    format: Literal["Text", "JSON"] = "Text"
    #: The function's own records that pass (the root logger's level, as
    #: ``AWS_LAMBDA_LOG_LEVEL``); None: Python's default.
    application_level: LogLevel | None = None
    #: The platform's records that pass: ``WARN`` hides START, END and REPORT.
    system_level: Literal["DEBUG", "INFO", "WARN"] | None = None


class FunctionSpec(BaseModel):
    """A function's configuration, as in ``nimbus.yaml``. Immutable once part of a version."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True
    )

    name: str
    runtime: str = "python3.11"
    handler: str = "app.handler"
    memory: int = 128
    timeout: float = 30
    environment: dict[str, str] = Field(default_factory=dict)
    #: Variables whose values are secrets (``nimbus secrets set``): ``{VARIABLE: secret
    #: name}``. Only the function's instances ever see the values.
    secrets: dict[str, str] = Field(default_factory=dict)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    network: Literal["none", "egress"] = "none"
    #: Who may call the function through the gateway: anyone (``none``, as a Lambda
    #: function URL with AuthType NONE) or only with an API key of the invoke scope
    #: (``key``, as AuthType AWS_IAM). The control plane always needs a key.
    auth: Literal["none", "key"] = "none"
    #: Size of the instance's private /tmp, MB (Lambda's ephemeral storage).
    ephemeral_storage: int = Field(default=512, ge=512, le=10240)
    #: Asynchronous invocation settings (``async:`` in YAML).
    async_: AsyncSpec = Field(default_factory=AsyncSpec, alias="async")
    #: Log format and levels (Lambda's LoggingConfig).
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    #: Event sources: ``{type: schedule|nats|redis|mqtt|amqp|files, ...}`` (nimbus.triggers).
    triggers: tuple[dict[str, Any], ...] = ()
    description: str = Field(default="", max_length=256)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                "must start with a lowercase letter and contain only lowercase letters, "
                "digits and '-', at most 63 characters"
            )
        return v

    @field_validator("handler")
    @classmethod
    def _handler(cls, v: str) -> str:
        if not HANDLER_RE.fullmatch(v):
            raise ValueError("must be 'module.function', e.g. 'app.handler'")
        return v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: int) -> int:
        if not MIN_MEMORY_MB <= v <= MAX_MEMORY_MB:
            raise ValueError(f"must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB} MB")
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float) -> float:
        if not 1 <= v <= MAX_TIMEOUT_S:
            raise ValueError(f"must be between 1 and {MAX_TIMEOUT_S} seconds")
        return v

    @field_validator("environment")
    @classmethod
    def _environment(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not ENV_KEY_RE.fullmatch(key):
                raise ValueError(f"{key!r} is not a valid variable name")
            if key in RESERVED_ENV or key.startswith("AWS_LAMBDA_"):
                raise ValueError(f"{key!r} is set by Nimbus and cannot be overridden")
        size = sum(len(k.encode()) + len(str(x).encode()) for k, x in v.items())
        if size > MAX_ENVIRONMENT_BYTES:
            raise ValueError(
                f"variables take {size} bytes; the limit is {MAX_ENVIRONMENT_BYTES} (as on Lambda)"
            )
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: dict[str, str]) -> dict[str, str]:
        from nimbus.auth.secrets import SECRET_NAME_RE

        for key, name in v.items():
            if not ENV_KEY_RE.fullmatch(key):
                raise ValueError(f"{key!r} is not a valid variable name")
            if key in RESERVED_ENV or key.startswith("AWS_LAMBDA_"):
                raise ValueError(f"{key!r} is set by Nimbus and cannot be overridden")
            if not isinstance(name, str) or not SECRET_NAME_RE.fullmatch(name):
                raise ValueError(
                    f"{key}: {name!r} is not a secret name (letters, digits, '.', '_', '-')"
                )
        return v

    @model_validator(mode="after")
    def _secrets_apart_from_environment(self) -> FunctionSpec:
        both = sorted(set(self.secrets) & set(self.environment))
        if both:
            raise ValueError(
                f"{', '.join(both)} is set in both 'environment' and 'secrets'; keep one"
            )
        return self

    @field_validator("triggers")
    @classmethod
    def _triggers(cls, v: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        from nimbus.triggers.schedule import parse_schedule
        from nimbus.triggers.specs import EVENT_TYPES, normalized, parse_event_trigger

        names: set[str] = set()
        out = []
        for index, raw in enumerate(v):
            kind = raw.get("type") if isinstance(raw, dict) else None
            if kind not in ("schedule", *EVENT_TYPES):
                raise ValueError(
                    f"triggers[{index}].type: unknown trigger type {kind!r} "
                    f"(supported: schedule, {', '.join(EVENT_TYPES)})"
                )
            try:
                if kind == "schedule":
                    fields = {k: x for k, x in raw.items() if k != "type"}
                    spec = parse_schedule(fields, index=index)
                    name = spec.name or f"schedule-{index}"
                    trigger = {"type": "schedule", **spec.as_dict(), "name": name}
                else:
                    trigger = normalized(parse_event_trigger(raw, index=index), f"{kind}-{index}")
                    name = trigger["name"]
            except InvalidParameterValue as e:
                raise ValueError(e.message) from None
            if name in names:
                raise ValueError(f"triggers[{index}].name: {name!r} is used twice")
            names.add(name)
            out.append(trigger)
        return tuple(out)

    @property
    def handler_module(self) -> str:
        return self.handler.rsplit(".", 1)[0]

    @property
    def handler_function(self) -> str:
        return self.handler.rsplit(".", 1)[1]


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "spec"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        if e["type"] == "missing":
            msg = "is required"
        got = e.get("input")
        suffix = (
            f" (got {got!r})"
            if e["type"] not in ("missing", "extra_forbidden")
            and not isinstance(got, dict | list | tuple)
            else ""
        )
        if msg.startswith(f"{where}["):  # the message names its own place (triggers[0]...)
            parts.append(f"{msg}{suffix}")
        else:
            parts.append(f"{where}: {msg}{suffix}")
    return "invalid function spec: " + "; ".join(parts)


def parse_spec(data: Any, *, known_runtimes: frozenset[str] | None = None) -> FunctionSpec:
    """Validate a spec mapping, raising ``InvalidParameterValue`` with every problem named."""
    if not isinstance(data, dict):
        raise InvalidParameterValue("invalid function spec: expected a mapping of fields")
    try:
        spec = FunctionSpec.model_validate(data)
    except ValidationError as e:
        raise InvalidParameterValue(_describe(e)) from None
    if known_runtimes is not None and spec.runtime not in known_runtimes:
        raise InvalidParameterValue(
            f"invalid function spec: runtime: unknown runtime {spec.runtime!r}; "
            f"available: {', '.join(sorted(known_runtimes))}"
        )
    if spec.scaling.min > spec.scaling.max:
        raise InvalidParameterValue(
            "invalid function spec: scaling.min must not exceed scaling.max"
        )
    levels = spec.logging.application_level or spec.logging.system_level
    if levels and spec.logging.format != "JSON":
        raise InvalidParameterValue(
            "invalid function spec: logging: application_level and system_level need "
            "format: JSON (as on Lambda)"
        )
    if spec.scaling.concurrency != 1:
        raise InvalidParameterValue(
            "invalid function spec: scaling.concurrency: python runtimes serve one "
            "invocation at a time per instance; it must be 1"
        )
    return spec


@dataclass(frozen=True, slots=True)
class Account:
    """Where this node says functions live: the region (``AWS_REGION``) and account of
    their ARNs."""

    region: str = "us-east-1"
    account_id: str = "000000000000"

    def function_arn(self, name: str, qualifier: str | int | None = None) -> str:
        arn = f"arn:aws:lambda:{self.region}:{self.account_id}:function:{name}"
        return f"{arn}:{qualifier}" if qualifier is not None else arn


@dataclass(frozen=True, slots=True)
class InvokeContext:
    """What an invocation carries besides its event (Lambda's Runtime API headers)."""

    #: ``Root=1-…;Parent=…;Sampled=…`` (``X-Amzn-Trace-Id``); None: Nimbus makes one.
    trace_id: str | None = None
    #: The client context (mobile SDKs' ``X-Amz-Client-Context``), decoded.
    client_context: dict[str, Any] | None = None
    #: The Cognito identity, when the caller has one.
    identity: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Version:
    """One immutable published version of a function: a spec plus content-addressed code."""

    spec: FunctionSpec
    number: int
    code_sha256: str
    layer_sha256: str | None
    created_at: float
    #: The function's own sandbox uid/gid: the same for all its versions, never another's.
    uid: int = 0

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True, slots=True)
class FunctionRecord:
    """A function and its current (latest) version."""

    name: str
    created_at: float
    current: Version


@dataclass(frozen=True, slots=True)
class TriggerState:
    """What is remembered of one schedule trigger across restarts (the ``trigger_state`` table)."""

    function: str
    #: The trigger's name (unique within its function).
    name: str
    #: When the trigger (with this schedule) first appeared: rate() periods count from here.
    created_at: float
    #: The last scheduled time dealt with (fired, skipped or missed); None: never.
    last_fire: float | None
    #: The schedule and time zone this state was computed for; when they change, the
    #: trigger starts afresh (new ``created_at``, no ``last_fire``).
    fingerprint: str = ""


ErrorKind = Literal["Unhandled", "Timeout", "Crash", "Init", "OutOfMemory"]


@dataclass(slots=True)
class InvokeResult:
    """The outcome of one invocation, successful or not.

    ``body`` is the JSON the handler returned, or Lambda's error JSON
    (``errorMessage``, ``errorType``, ``stackTrace``) when ``error`` is set.
    """

    request_id: str
    body: bytes
    error: ErrorKind | None = None
    duration_ms: float = 0.0
    max_memory_mb: int = 0
    init_ms: float | None = None
    #: A fork of an initialised function zygote (SnapStart's restore): how long its
    #: after-restore hooks took, reported instead of an init.
    restore_ms: float | None = None
    cold: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def billed_ms(self) -> int:
        import math

        return max(1, math.ceil(self.duration_ms))
