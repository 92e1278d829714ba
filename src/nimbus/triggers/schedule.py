"""Schedule triggers: validate a ``triggers:`` entry of type ``schedule``, and decide when it fires.

Everything here is pure (STYLE §3): the time is an argument, nothing reads a
clock, sleeps or stores anything. The trigger loop calls :func:`decide` with
the persisted last fire time and ``now``, asks :func:`overlap_action` what to
do about runs still going, sends :func:`scheduled_event` through the async path
with an idempotency key made of the trigger and the scheduled time, and only
then persists ``Tick.last_fire``: a crash in between re-submits the same key,
which the queue drops, so a restart neither loses nor doubles a fire.

The choices this module makes, in one place:

**Schedule expressions.**

- ``rate(N unit)``, EventBridge's form: ``N`` a positive whole number, ``unit``
  one of ``minute(s)``, ``hour(s)``, ``day(s)``; singular with 1, plural
  otherwise (``rate(1 minute)``, ``rate(5 minutes)``), as EventBridge requires.
  Nimbus also accepts ``second(s)`` (EventBridge does not) so short periods can
  be tested. A rate is a fixed duration: a day is 86,400 s whatever the clocks
  do, and ``timezone`` is ignored (EventBridge Scheduler does the same).
- Cron: exactly five fields, ``minute hour day-of-month month day-of-week``,
  Vixie-cron semantics: names (``JAN``, ``MON-FRI``), ``*``, ``,``, ``-``,
  ``/``; day-of-week 0-7 with 0 and 7 both Sunday; when both day fields are
  restricted a day matching *either* fires. The extensions croniter reads are
  kept: ``?`` in a day field (same as ``*``), ``L`` (last day of the month),
  ``15W`` (nearest weekday), ``2#3`` (third Tuesday), ``L5`` (last Friday).
  ``H``/``R`` (hashed/random) are refused: a schedule must be deterministic.
  The macros ``@hourly``, ``@daily``/``@midnight``, ``@weekly``, ``@monthly``,
  ``@yearly``/``@annually`` are accepted. Six or seven fields (seconds, years)
  are refused. An expression that can never fire (``0 0 30 2 *``) is refused.
- EventBridge's ``cron(min hour dom month dow year)`` is accepted and
  translated: the year must be ``*``; one of the day fields must be ``?``, as
  EventBridge requires; day-of-week numbers are EventBridge's 1-7 = SUN-SAT
  (shifted to cron's 0-6), and ``6L`` (last Friday) becomes ``L5``.

**Time zones and DST.** Cron fields are read as wall-clock time in
``timezone`` (an IANA name, read with :mod:`zoneinfo`). croniter only matches
naive wall times here; this module maps them to instants, so the rule does not
depend on croniter's own DST handling. The rule is EventBridge Scheduler's:

- a wall time that does not exist (spring forward: 02:30 on the day clocks jump
  from 02:00 to 03:00) is **skipped** — that day has no 02:30 run;
- a wall time that happens twice (fall back) fires **once**, at its first
  occurrence. A consequence worth knowing: ``*/15 * * * *`` in such a zone has
  no runs during the repeated hour; use ``rate()`` or ``UTC`` for intervals.

**Anchoring.** ``rate()`` fires at ``anchor + k * period``. :func:`next_fire`
takes ``anchor`` (default 0.0, the epoch); :func:`decide` anchors to the
trigger's ``created_at`` unless told otherwise, as EventBridge does, so the
first run is one period after creation and triggers created at different times
do not all fire at once.

**Catch-up and grace.** A due time is *current* if ``now`` is at most
``grace`` seconds past it (:data:`DEFAULT_GRACE`, 60 s — the same precision
EventBridge Scheduler promises); otherwise it was *missed*. Because the latest
due time is always less than one period before ``now``, "60 s or one period,
whichever is smaller" is the same as 60 s. ``catch_up: none`` fires the latest
due time only if it is current and never runs missed ones; ``catch_up: once``
fires one run for the latest due time however late, and reports how many
earlier ones it stands for in :attr:`Fire.missed`.

**The event** is an EventBridge "Scheduled Event" with ``source: aws.events``,
so Lambda code that checks the source works unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import (  # type: ignore[import-untyped]
    CroniterBadDateError,
    CroniterError,
    croniter,
)

from nimbus.errors import InvalidParameterValue
from nimbus.models import Account

Overlap = Literal["allow", "forbid", "replace"]
CatchUp = Literal["none", "once"]
OverlapAction = Literal["fire", "skip", "replace"]

#: How late (seconds) a due time may be found and still count as current, not missed.
DEFAULT_GRACE = 60.0
#: Counting missed cron times walks them one by one; past this many, ``missed`` says this many.
MISSED_COUNT_LIMIT = 1000
#: The largest payload a trigger may carry, as JSON: EventBridge's event size limit.
MAX_PAYLOAD_BYTES = 256 * 1024
#: The longest ``rate()`` period: 100 years of seconds.
MAX_RATE_SECONDS = 100 * 365 * 86400

EVENT_SOURCE = "aws.events"

_FIELDS = ("type", "schedule", "timezone", "payload", "overlap", "catch_up", "name")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """One validated ``triggers:`` entry of type schedule; made by :func:`parse_schedule`."""

    #: ``"*/5 * * * *"``, ``"cron(0 12 * * ? *)"`` or ``"rate(5 minutes)"``, as the user wrote it.
    schedule: str
    #: IANA time zone the cron fields are read in; ``rate()`` ignores it.
    timezone: str = "UTC"
    #: JSON value sent as the event's ``detail`` (``{}`` when None).
    payload: Any = None
    overlap: Overlap = "allow"
    catch_up: CatchUp = "none"
    #: The trigger's id; empty until the platform assigns one.
    name: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The spec as a ``triggers:`` entry; :func:`parse_schedule` reads it back unchanged."""
        return {
            "type": "schedule",
            "schedule": self.schedule,
            "timezone": self.timezone,
            "payload": copy.deepcopy(self.payload),
            "overlap": self.overlap,
            "catch_up": self.catch_up,
            "name": self.name,
        }


@dataclass(frozen=True, slots=True)
class Fire:
    """One run to start now."""

    #: The nominal fire time (epoch seconds), which the event's ``time`` shows.
    scheduled_for: float
    #: How many earlier due times this run stands for, which were not run
    #: (capped at :data:`MISSED_COUNT_LIMIT` for cron schedules).
    missed: int


@dataclass(frozen=True, slots=True)
class Tick:
    """What the trigger loop should do now."""

    #: Runs to start: none or one.
    fires: tuple[Fire, ...]
    #: When to call :func:`decide` again (epoch seconds; always after ``now``).
    next_at: float
    #: The last scheduled time dealt with, to persist once its fire is submitted. Unchanged
    #: (possibly None: never fired) when nothing was due.
    last_fire: float | None
    #: Due times passed over without a run of their own in this tick: those
    #: before the one fired, or all of them when a missed time is not caught up.
    skipped: int = 0


# -- parsing -----------------------------------------------------------------------


class _Invalid(ValueError):
    """A problem with one field; the caller adds where it is."""


@dataclass(frozen=True, slots=True)
class _Rate:
    seconds: int


@dataclass(frozen=True, slots=True)
class _Cron:
    #: The five-field expression croniter is given (macros expanded, cron() translated).
    expr: str


_RATE_RE = re.compile(r"^rate\s*\(\s*(\S+)\s+(\S+?)\s*\)$", re.IGNORECASE)
_RATE_START_RE = re.compile(r"^rate\s*\(", re.IGNORECASE)
_CRON_FORM_RE = re.compile(r"^cron\s*\((.*)\)$", re.IGNORECASE | re.DOTALL)
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_UNITS_HELP = "second(s), minute(s), hour(s), day(s)"
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_FIELD_HELP = (
    "0-59",
    "0-23",
    "1-31, L, nW",
    "1-12 or JAN-DEC",
    "0-7 or SUN-SAT, n#k, Ln",
)
_FIVE_FIELDS = "expected 5 fields: minute hour day-of-month month day-of-week"
_MONTHS = {
    m: i
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_EQUAL_RANGE_RE = re.compile(r"^([0-9a-z]+)-([0-9a-z]+)(/\d+)?$", re.IGNORECASE)
_HASHED_RE = re.compile(r"^[hr](\(|/|$)", re.IGNORECASE)


def _parse_rate(text: str) -> _Rate:
    m = _RATE_RE.match(text)
    usage = (
        f"rate() needs a positive whole number and a unit ({_UNITS_HELP}), "
        f"e.g. 'rate(5 minutes)'; got {text!r}"
    )
    if m is None or not re.fullmatch(r"[0-9]+", m.group(1)) or int(m.group(1)) < 1:
        raise _Invalid(usage)
    value, unit = int(m.group(1)), m.group(2).lower()
    singular = unit.removesuffix("s")
    if singular not in _UNIT_SECONDS:
        raise _Invalid(f"unknown unit {m.group(2)!r} in {text!r}; units: {_UNITS_HELP}")
    if value == 1 and unit != singular:
        raise _Invalid(f"{text!r}: use the singular unit with 1, i.e. 'rate(1 {singular})'")
    if value != 1 and unit == singular:
        raise _Invalid(
            f"{text!r}: use the plural unit for values other than 1, "
            f"i.e. 'rate({value} {singular}s)'"
        )
    seconds = value * _UNIT_SECONDS[singular]
    if seconds > MAX_RATE_SECONDS:
        raise _Invalid(f"{text!r}: the period must be at most 100 years")
    return _Rate(seconds)


def _field_value(index: int, token: str) -> int | None:
    """A single field value as a number (names resolved), or None if it is not one."""
    token = token.lower()
    if token.isdigit():
        return int(token)
    names = _MONTHS if index == 3 else _DAYS if index == 4 else {}
    return names.get(token)


def _normalize_field(index: int, text: str) -> str:
    """Rewrite equal ranges (``1-1``, ``MON-MON/2``) to the single value they mean.

    croniter reads an equal range as the *whole* cycle ("Jan-Jan" = every month);
    cron and EventBridge read it as that one value.
    """
    parts = []
    for part in text.split(","):
        m = _EQUAL_RANGE_RE.match(part)
        if m is not None:
            low, high = _field_value(index, m.group(1)), _field_value(index, m.group(2))
            if low is not None and low == high:
                part = m.group(1)
        parts.append(part)
    return ",".join(parts)


def _check_cron(expr: str, shown: str) -> _Cron:
    """Validate a five-field expression; ``shown`` is what the user wrote, for messages."""
    fields = expr.split()
    if len(fields) != 5:
        hint = ""
        if len(fields) == 6:
            hint = (
                "; seconds are not supported, and EventBridge's 6-field form is "
                "written cron(minute hour day-of-month month day-of-week year)"
            )
        elif len(fields) == 7:
            hint = "; seconds and years are not supported"
        raise _Invalid(f"invalid cron expression {shown!r} ({_FIVE_FIELDS}{hint})")
    fields = [_normalize_field(i, f) for i, f in enumerate(fields)]
    for i, field in enumerate(fields):
        if any(_HASHED_RE.match(part) for part in field.split(",")):
            raise _Invalid(
                f"invalid cron expression {shown!r}: {_FIELD_NAMES[i]} field {field!r}: "
                "hashed (H) and random (R) values are not supported"
            )
        probe = ["*"] * 5
        probe[i] = field
        try:
            croniter.expand(" ".join(probe))
        except (CroniterError, TypeError, ValueError):
            raise _Invalid(
                f"invalid cron expression {shown!r}: {_FIELD_NAMES[i]} field {field!r} "
                f"is not valid (allowed: {_FIELD_HELP[i]}, with * , - /)"
            ) from None
    normalized = " ".join(fields)
    try:
        croniter.expand(normalized, strict=True)
    except (CroniterError, TypeError, ValueError) as e:
        # croniter's words, without its echo of the expression and its debug dump.
        reason = re.sub(r"^\[.*?\] is not acceptable[.,]?\s*", "", str(e)).split("  Cron:")[0]
        raise _Invalid(f"invalid cron expression {shown!r}: {reason}") from None
    try:
        next(_cron_after(normalized, UTC, 946684800.0))  # from 2000-01-01: does it ever fire?
    except CroniterBadDateError:
        raise _Invalid(f"cron expression {shown!r} never fires") from None
    return _Cron(normalized)


def _eventbridge_dow(field: str, shown: str) -> str:
    """EventBridge's day-of-week (1-7 = SUN-SAT, ``6L``) in cron's terms (0-6, ``L5``)."""

    def day(m: re.Match[str]) -> str:
        n = int(m.group(0))
        if not 1 <= n <= 7:
            raise _Invalid(
                f"invalid cron expression {shown!r}: in cron(), day-of-week numbers are "
                f"1-7 (SUN-SAT); got {n}"
            )
        return str(n - 1)

    last = re.fullmatch(r"(\d)L", field, re.IGNORECASE)
    if last is not None:
        return "L" + re.sub(r"\d+", day, last.group(1))
    # Numbers after '/' (steps) and '#' (nth) are counts, not days.
    return re.sub(r"(?<![/#\d])\d+", day, field)


def _parse_eventbridge(inner: str, shown: str) -> _Cron:
    fields = inner.split()
    if len(fields) != 6:
        raise _Invalid(
            f"invalid cron expression {shown!r} (cron() takes 6 fields: minute hour "
            "day-of-month month day-of-week year; or write the 5-field form without cron())"
        )
    minute, hour, dom, month, dow, year = fields
    if year not in ("*", "?"):
        raise _Invalid(
            f"invalid cron expression {shown!r}: the year field must be '*' "
            "(schedules limited to some years are not supported)"
        )
    if (dom == "?") == (dow == "?"):
        raise _Invalid(
            f"invalid cron expression {shown!r}: in cron(), exactly one of day-of-month "
            "and day-of-week must be '?'"
        )
    dom = "*" if dom == "?" else dom
    dow = "*" if dow == "?" else _eventbridge_dow(dow, shown)
    return _check_cron(" ".join((minute, hour, dom, month, dow)), shown)


@lru_cache(maxsize=1024)
def _compile(schedule: str) -> _Rate | _Cron:
    text = schedule.strip()
    if not text:
        raise _Invalid("must not be empty; e.g. '*/5 * * * *' or 'rate(5 minutes)'")
    lowered = text.lower()
    if _RATE_START_RE.match(text):
        return _parse_rate(text)
    form = _CRON_FORM_RE.match(text)
    if form is not None:
        return _parse_eventbridge(form.group(1), text)
    if text.startswith("@"):
        if lowered not in _MACROS:
            raise _Invalid(f"unknown macro {text!r}; known: {', '.join(_MACROS)}")
        return _check_cron(_MACROS[lowered], text)
    return _check_cron(text, text)


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise _Invalid(f"unknown time zone {name!r} (an IANA name, e.g. 'Europe/Paris')") from None


def _one_of(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise _Invalid(f"must be one of {options} (got {value!r})")
    return str(value)


def _payload(value: Any) -> Any:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _Invalid(
            f"must be JSON (objects, arrays, strings, numbers, booleans, null): {e}; "
            "quote dates and times in YAML"
        ) from None
    if len(text.encode()) > MAX_PAYLOAD_BYTES:
        raise _Invalid(f"must be at most {MAX_PAYLOAD_BYTES} bytes as JSON")
    return json.loads(text)  # a private copy, normalized (tuples are lists)


def parse_schedule(data: Mapping[str, Any], *, index: int | None = None) -> ScheduleSpec:
    """Validate one ``triggers:`` entry of type schedule.

    Raises :class:`~nimbus.errors.InvalidParameterValue` naming the field and the
    problem, prefixed ``triggers[<index>].`` (or ``trigger.`` without an index).
    """
    where = f"triggers[{index}]" if index is not None else "trigger"
    if not isinstance(data, Mapping):
        raise InvalidParameterValue(f"{where}: expected a mapping of fields")
    for key in data:
        if key not in _FIELDS:
            raise InvalidParameterValue(
                f"{where}.{key}: unknown field (known: {', '.join(_FIELDS)})"
            )

    def check(field: str, fn: Callable[[Any], Any], value: Any) -> Any:
        try:
            return fn(value)
        except _Invalid as e:
            raise InvalidParameterValue(f"{where}.{field}: {e}") from None

    if "type" in data and data["type"] != "schedule":
        raise InvalidParameterValue(f"{where}.type: expected 'schedule' (got {data['type']!r})")
    schedule = data.get("schedule")
    if schedule is None:
        raise InvalidParameterValue(f"{where}.schedule: is required")
    if not isinstance(schedule, str):
        raise InvalidParameterValue(f"{where}.schedule: must be a string (got {schedule!r})")
    schedule = schedule.strip()
    check("schedule", _compile, schedule)
    timezone = data.get("timezone", "UTC")
    if not isinstance(timezone, str):
        raise InvalidParameterValue(f"{where}.timezone: must be a string (got {timezone!r})")
    check("timezone", _zone, timezone)
    name = data.get("name", "")
    if name is None:
        name = ""
    if not isinstance(name, str) or (name and not _NAME_RE.fullmatch(name)):
        raise InvalidParameterValue(
            f"{where}.name: must be 1-64 letters, digits, '.', '_' or '-', starting with "
            f"a letter or digit (got {name!r})"
        )
    overlap = data.get("overlap", "allow")
    catch_up = data.get("catch_up", "none")
    return ScheduleSpec(
        schedule=schedule,
        timezone=timezone,
        payload=check("payload", _payload, data.get("payload")),
        overlap=check("overlap", lambda v: _one_of(v, get_args(Overlap)), overlap),
        catch_up=check("catch_up", lambda v: _one_of(v, get_args(CatchUp)), catch_up),
        name=name,
    )


def _compiled(spec: ScheduleSpec) -> tuple[_Rate | _Cron, ZoneInfo]:
    """The parsed schedule and zone; a spec built without :func:`parse_schedule` may be bad."""
    try:
        schedule = _compile(spec.schedule)
    except _Invalid as e:
        raise InvalidParameterValue(f"schedule: {e}") from None
    try:
        return schedule, _zone(spec.timezone)
    except _Invalid as e:
        raise InvalidParameterValue(f"timezone: {e}") from None


# -- when it fires -------------------------------------------------------------------


def _instant(wall: datetime, tz: tzinfo) -> float | None:
    """A naive wall time's instant in ``tz``: its first occurrence; None if it does not exist."""
    aware = wall.replace(tzinfo=tz, fold=0)
    if aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != wall:
        return None  # in a spring-forward gap
    return aware.timestamp()


def _cron_after(expr: str, tz: tzinfo, after: float) -> Iterator[float]:
    """Fire instants strictly after ``after``, in order.

    croniter walks naive wall times; mapped by :func:`_instant` (gaps dropped,
    repeated times taken at their first occurrence) they are strictly
    increasing, so the first one past ``after`` is the next fire. Starting a
    second early makes float rounding harmless: anything not past ``after`` is
    passed over.
    """
    start = datetime.fromtimestamp(math.floor(after), tz).replace(tzinfo=None)
    walls = croniter(expr, start - timedelta(seconds=1))
    while True:
        wall: datetime = walls.get_next(datetime)
        t = _instant(wall, tz)
        if t is not None and t > after:
            yield t


def _cron_latest(expr: str, tz: tzinfo, at: float) -> float:
    """The last fire instant at or before ``at``."""
    local = datetime.fromtimestamp(at, tz)
    start = local.replace(tzinfo=None)
    if local.fold:
        # ``at`` is in the second pass of a repeated hour: every wall time of
        # that hour already happened (and fired) in the first pass, so look back
        # from the end of the hour.
        first_pass = local.replace(fold=0).utcoffset() or timedelta()
        start += first_pass - (local.utcoffset() or timedelta())
    walls = croniter(expr, start + timedelta(minutes=1))
    while True:
        wall: datetime = walls.get_prev(datetime)
        t = _instant(wall, tz)
        if t is not None and t <= at:
            return t


def _rate_index(period: int, anchor: float, at: float) -> int:
    """The largest k with ``anchor + k * period <= at``."""
    k = math.floor((at - anchor) / period)
    while anchor + k * period > at:
        k -= 1
    while anchor + (k + 1) * period <= at:
        k += 1
    return k


def next_fire(spec: ScheduleSpec, after: float, *, anchor: float = 0.0) -> float:
    """The first fire time strictly after ``after`` (epoch seconds).

    ``rate()`` fires at ``anchor + k * period`` for whole ``k``; cron fires at
    the expression's wall times in ``spec.timezone``, nonexistent ones skipped
    and repeated ones taken once (see the module docstring).
    """
    schedule, tz = _compiled(spec)
    if isinstance(schedule, _Rate):
        return anchor + (_rate_index(schedule.seconds, anchor, after) + 1) * schedule.seconds
    return next(_cron_after(schedule.expr, tz, after))


def decide(
    spec: ScheduleSpec,
    *,
    last_fire: float | None,
    created_at: float,
    now: float,
    anchor: float | None = None,
    grace: float = DEFAULT_GRACE,
) -> Tick:
    """What one schedule trigger should do at ``now``. Pure.

    ``last_fire`` is the persisted last scheduled time dealt with (None: never;
    due times are then counted from ``created_at``). ``anchor`` is the origin
    of ``rate()`` periods, ``created_at`` by default.

    - Nothing due (the next time is after ``now``): no fire; look again then.
    - Due times up to ``now``: the latest of them fires if it is current (at
      most ``grace`` late) or ``catch_up`` is ``once``, with ``missed`` = the
      earlier ones; otherwise nothing fires. Either way ``last_fire`` moves to
      the latest due time; persisted after the (idempotent) submit, no scheduled
      time ever fires twice, across restarts and a clock that steps back.
    """
    schedule, tz = _compiled(spec)
    start = last_fire if last_fire is not None else created_at
    if isinstance(schedule, _Rate):
        origin = created_at if anchor is None else anchor
        period = schedule.seconds
        k_first = _rate_index(period, origin, start) + 1
        first = origin + k_first * period
        if first > now:
            return Tick(fires=(), next_at=first, last_fire=last_fire)
        k_latest = _rate_index(period, origin, now)
        latest = origin + k_latest * period
        earlier = k_latest - k_first
        next_at = origin + (k_latest + 1) * period
    else:
        times = _cron_after(schedule.expr, tz, start)
        first = next(times)
        if first > now:
            return Tick(fires=(), next_at=first, last_fire=last_fire)
        latest, earlier = first, 0
        next_at = next(times)
        while next_at <= now:
            if earlier + 1 >= MISSED_COUNT_LIMIT:
                # Long downtime on a frequent schedule: stop counting, jump to the end.
                latest, earlier = _cron_latest(schedule.expr, tz, now), MISSED_COUNT_LIMIT
                next_at = next(_cron_after(schedule.expr, tz, latest))
                break
            latest, earlier = next_at, earlier + 1
            next_at = next(times)
    if spec.catch_up == "once" or now - latest <= grace:
        return Tick(
            fires=(Fire(scheduled_for=latest, missed=earlier),),
            next_at=next_at,
            last_fire=latest,
            skipped=earlier,
        )
    return Tick(fires=(), next_at=next_at, last_fire=latest, skipped=earlier + 1)


def overlap_action(spec: ScheduleSpec, *, running: int) -> OverlapAction:
    """What to do with a due run while ``running`` earlier runs of this trigger are going.

    ``allow`` fires regardless; ``forbid`` skips while any run is going;
    ``replace`` tells the caller to cancel (or abandon) the running ones, then fire.
    """
    if running <= 0 or spec.overlap == "allow":
        return "fire"
    return "skip" if spec.overlap == "forbid" else "replace"


def scheduled_event(
    spec: ScheduleSpec,
    *,
    trigger_arn_name: str,
    function: str,
    fire: Fire,
    event_id: str,
    account: Account | None = None,
) -> dict[str, Any]:
    """The EventBridge "Scheduled Event" a run receives; ``time`` is the nominal fire time."""
    when = datetime.fromtimestamp(math.floor(fire.scheduled_for), UTC)
    region, account_id = (account or Account()).region, (account or Account()).account_id
    return {
        "version": "0",
        "id": event_id,
        "detail-type": "Scheduled Event",
        "source": EVENT_SOURCE,
        "account": account_id,
        "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [f"arn:aws:events:{region}:{account_id}:rule/{function}-{trigger_arn_name}"],
        "detail": copy.deepcopy(spec.payload) if spec.payload is not None else {},
    }
