"""Schedule triggers: parsing, next fire times (UTC and across DST), and the loop's
decisions with a synthetic clock (plain floats; nothing sleeps or reads the clock)."""

from __future__ import annotations

import math
import subprocess
import sys
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from nimbus.errors import InvalidParameterValue
from nimbus.triggers.schedule import (
    DEFAULT_GRACE,
    MISSED_COUNT_LIMIT,
    Fire,
    ScheduleSpec,
    Tick,
    decide,
    next_fire,
    overlap_action,
    parse_schedule,
    scheduled_event,
)

PARIS = "Europe/Paris"
NEW_YORK = "America/New_York"


def at(wall: str, tz: str = "UTC") -> float:
    """Epoch seconds of a wall time in ``tz`` (a repeated wall time: its first occurrence)."""
    return datetime.fromisoformat(wall).replace(tzinfo=ZoneInfo(tz)).timestamp()


def wall(t: float, tz: str) -> str:
    return datetime.fromtimestamp(t, ZoneInfo(tz)).isoformat()


def spec(schedule: str, **fields: Any) -> ScheduleSpec:
    return parse_schedule({"schedule": schedule, **fields})


def error(data: Any, index: int | None = 0) -> str:
    with pytest.raises(InvalidParameterValue) as e:
        parse_schedule(data, index=index)
    assert e.value.code == "InvalidParameterValue"
    return e.value.message


# -- parsing -----------------------------------------------------------------------


def test_defaults() -> None:
    s = parse_schedule({"type": "schedule", "schedule": "  */5 * * * *  "})
    assert s == ScheduleSpec(schedule="*/5 * * * *")
    assert (s.timezone, s.payload, s.overlap, s.catch_up, s.name) == (
        "UTC",
        None,
        "allow",
        "none",
        "",
    )


def test_all_fields_and_round_trip() -> None:
    data = {
        "type": "schedule",
        "schedule": "rate(5 minutes)",
        "timezone": PARIS,
        "payload": {"job": "report", "n": [1, 2]},
        "overlap": "forbid",
        "catch_up": "once",
        "name": "nightly_report-1",
    }
    s = parse_schedule(data)
    assert s.as_dict() == data
    assert parse_schedule(s.as_dict()) == s


@pytest.mark.parametrize(
    "schedule",
    [
        "* * * * *",
        "*/5 * * * *",
        "0 9 * * MON-FRI",
        "0 9 * * 1-5",
        "30 2 1,15 * *",
        "0 0 L * *",
        "0 0 15W * *",
        "0 0 * * 2#3",
        "0 0 * * L5",
        "0 0 ? * 7",
        "0 12 * JAN,jul *",
        "0 0 29 2 *",
        "@hourly",
        "@daily",
        "@YEARLY",
        "cron(0 12 * * ? *)",
        "cron(15 10 ? * MON-FRI *)",
        "cron(0/15 * ? * 2-6 *)",
        "cron(0 8 ? * 6L *)",
        "cron(0 8 ? * 3#2 *)",
        "rate(1 minute)",
        "rate(5 minutes)",
        "rate(1 hour)",
        "rate(2 hours)",
        "rate(1 day)",
        "rate(7 days)",
        "rate(1 second)",
        "rate(30 seconds)",
    ],
)
def test_valid_schedules(schedule: str) -> None:
    assert parse_schedule({"schedule": schedule}).schedule == schedule


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (
            "*/5 * *",
            "triggers[0].schedule: invalid cron expression '*/5 * *' "
            "(expected 5 fields: minute hour day-of-month month day-of-week)",
        ),
        ("* * * * * *", "seconds are not supported"),
        ("0 0 12 * * ? *", "seconds and years are not supported"),
        ("60 * * * *", "minute field '60' is not valid (allowed: 0-59"),
        ("0 24 * * *", "hour field '24' is not valid"),
        ("0 0 32 * *", "day-of-month field '32' is not valid"),
        ("0 0 * 13 *", "month field '13' is not valid"),
        ("0 0 * * 8", "day-of-week field '8' is not valid"),
        ("0 0 * * FUNDAY", "day-of-week field 'FUNDAY' is not valid"),
        ("*/0 * * * *", "minute field '*/0' is not valid"),
        ("0 0 * * 5L", "day-of-week field '5L' is not valid"),
        ("H * * * *", "hashed (H) and random (R) values are not supported"),
        ("0 R * * *", "hour field 'R': hashed (H) and random (R)"),
        ("0 0 30 2 *", "invalid cron expression '0 0 30 2 *': Day(s) [30] can never occur"),
        ("@reboot", "unknown macro '@reboot'"),
        ("", "triggers[0].schedule: must not be empty"),
        ("cron(0 12 * * *)", "cron() takes 6 fields"),
        ("cron(0 12 * * ? 2027)", "the year field must be '*'"),
        ("cron(0 12 * * MON *)", "exactly one of day-of-month and day-of-week must be '?'"),
        ("cron(0 12 ? * ? *)", "exactly one of day-of-month and day-of-week must be '?'"),
        ("cron(0 12 ? * 0 *)", "day-of-week numbers are 1-7 (SUN-SAT); got 0"),
    ],
)
def test_invalid_cron(schedule: str, message: str) -> None:
    got = error({"schedule": schedule})
    assert got.startswith("triggers[0].schedule: ")
    assert message in got


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (
            "rate(1 minutes)",
            "'rate(1 minutes)': use the singular unit with 1, i.e. 'rate(1 minute)'",
        ),
        ("rate(1 hours)", "i.e. 'rate(1 hour)'"),
        ("rate(1 days)", "i.e. 'rate(1 day)'"),
        ("rate(1 seconds)", "i.e. 'rate(1 second)'"),
        (
            "rate(5 minute)",
            "'rate(5 minute)': use the plural unit for values other than 1, i.e. 'rate(5 minutes)'",
        ),
        ("rate(2 day)", "i.e. 'rate(2 days)'"),
        ("rate(0 minutes)", "rate() needs a positive whole number and a unit"),
        ("rate(-5 minutes)", "rate() needs a positive whole number"),
        ("rate(1.5 hours)", "rate() needs a positive whole number"),
        ("rate(five minutes)", "rate() needs a positive whole number"),
        ("rate(5)", "rate() needs a positive whole number"),
        ("rate(5minutes)", "rate() needs a positive whole number"),
        ("rate(2 weeks)", "unknown unit 'weeks' in 'rate(2 weeks)'"),
        ("rate(99999999 days)", "at most 100 years"),
    ],
)
def test_invalid_rate(schedule: str, message: str) -> None:
    got = error({"schedule": schedule})
    assert got.startswith("triggers[0].schedule: ")
    assert message in got


@pytest.mark.parametrize("tz", ["Mars/Olympus", "America", "../etc/passwd", "/etc/localtime", ""])
def test_bad_timezone(tz: str) -> None:
    assert error({"schedule": "0 * * * *", "timezone": tz}).startswith(
        f"triggers[0].timezone: unknown time zone {tz!r}"
    )


def test_timezone_must_be_a_string() -> None:
    assert error({"schedule": "0 * * * *", "timezone": 5}) == (
        "triggers[0].timezone: must be a string (got 5)"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "overlap",
            "sometimes",
            "triggers[2].overlap: must be one of 'allow', 'forbid', 'replace' (got 'sometimes')",
        ),
        (
            "catch_up",
            "all",
            "triggers[2].catch_up: must be one of 'none', 'once' (got 'all')",
        ),
        # YAML 1.1 reads an unquoted `no` as false.
        ("catch_up", False, "triggers[2].catch_up: must be one of 'none', 'once' (got False)"),
    ],
)
def test_bad_policies(field: str, value: Any, message: str) -> None:
    assert error({"schedule": "rate(1 minute)", field: value}, index=2) == message


def test_structural_errors() -> None:
    assert error({}) == "triggers[0].schedule: is required"
    assert error({"schedule": 5}) == "triggers[0].schedule: must be a string (got 5)"
    assert error({"schedule": "rate(1 minute)", "tz": "UTC"}).startswith(
        "triggers[0].tz: unknown field (known: type, schedule, timezone"
    )
    assert error({"type": "http", "schedule": "rate(1 minute)"}) == (
        "triggers[0].type: expected 'schedule' (got 'http')"
    )
    assert error(["rate(1 minute)"]) == "triggers[0]: expected a mapping of fields"
    assert error({"schedule": "60 * * * *"}, index=None).startswith("trigger.schedule: ")


@pytest.mark.parametrize("name", ["-lead", "has space", "x" * 65, "ü"])
def test_bad_name(name: str) -> None:
    assert error({"schedule": "rate(1 minute)", "name": name}).startswith(
        "triggers[0].name: must be 1-64 letters"
    )


def test_payload_must_be_json() -> None:
    # YAML turns an unquoted 2026-01-01 into a date.
    assert error({"schedule": "rate(1 minute)", "payload": {"day": date(2026, 1, 1)}}).startswith(
        "triggers[0].payload: must be JSON"
    )
    assert error({"schedule": "rate(1 minute)", "payload": math.nan}).startswith(
        "triggers[0].payload: must be JSON"
    )
    assert "at most 262144 bytes" in error({"schedule": "rate(1 minute)", "payload": "x" * 300_000})


def test_payload_is_a_private_copy() -> None:
    payload: dict[str, Any] = {"items": (1, 2)}
    s = spec("rate(1 minute)", payload=payload)
    payload["items"] = ()
    assert s.payload == {"items": [1, 2]}


# -- next_fire -----------------------------------------------------------------------


def test_cron_in_utc() -> None:
    s = spec("*/5 * * * *")
    assert next_fire(s, at("2026-06-01T10:02:30")) == at("2026-06-01T10:05")
    # Strictly after: a fire time itself gives the following one.
    assert next_fire(s, at("2026-06-01T10:05")) == at("2026-06-01T10:10")
    assert next_fire(s, at("2026-06-01T10:04:59.999999")) == at("2026-06-01T10:05")
    assert next_fire(spec("0 0 1 1 *"), at("2026-06-01")) == at("2027-01-01")


def test_day_of_month_or_day_of_week() -> None:
    # Both restricted: a day matching either fires (Vixie cron).
    s = spec("0 0 1 * MON")
    first = next_fire(s, at("2026-01-31"))
    assert first == at("2026-02-01")  # a Sunday, the 1st
    assert next_fire(s, first) == at("2026-02-02")  # a Monday


def test_equal_range_is_one_value() -> None:
    # croniter alone reads "1-1" as the whole cycle; cron reads it as day 1.
    assert next_fire(spec("0 0 1-1 * *"), at("2026-01-01")) == at("2026-02-01")
    assert next_fire(spec("0 0 * * SUN-SUN"), at("2026-01-01")) == at("2026-01-04")


def test_eventbridge_cron_is_translated() -> None:
    after = at("2026-01-02T13:00")  # a Friday afternoon
    weekdays = spec("cron(0 12 ? * 2-6 *)")  # EventBridge: 2-6 = MON-FRI
    assert next_fire(weekdays, after) == next_fire(spec("0 12 * * MON-FRI"), after)
    assert next_fire(weekdays, after) == at("2026-01-05T12:00")
    assert next_fire(spec("cron(0 8 ? * 6L *)"), after) == at("2026-01-30T08:00")  # last Fri
    assert next_fire(spec("cron(0 8 ? * 3#2 *)"), after) == at("2026-01-13T08:00")  # 2nd Tue
    assert next_fire(spec("cron(0 12 * * ? *)"), after) == at("2026-01-03T12:00")


def test_cron_in_a_time_zone() -> None:
    s = spec("0 9 * * *", timezone=PARIS)
    assert next_fire(s, at("2026-01-15")) == at("2026-01-15T08:00")  # 09:00 CET
    assert next_fire(s, at("2026-07-15")) == at("2026-07-15T07:00")  # 09:00 CEST


@pytest.mark.parametrize(
    ("tz", "day_before", "transition_day", "day_after_utc"),
    [
        # Europe: 02:00 CET -> 03:00 CEST on 29 March 2026.
        (PARIS, "2026-03-28", "2026-03-29", "2026-03-30T00:30"),
        # US: 02:00 EST -> 03:00 EDT on 8 March 2026.
        (NEW_YORK, "2026-03-07", "2026-03-08", "2026-03-09T06:30"),
    ],
)
def test_spring_forward_skips_the_missing_time(
    tz: str, day_before: str, transition_day: str, day_after_utc: str
) -> None:
    s = spec("30 2 * * *", timezone=tz)
    last = at(f"{day_before}T02:30", tz)
    # 02:30 does not exist on the transition day: that day has no run.
    nxt = next_fire(s, last)
    assert nxt == at(day_after_utc)
    assert wall(nxt, tz).startswith(f"{day_after_utc[:10]}T02:30")
    assert not wall(nxt, tz).startswith(transition_day)


def test_spring_forward_keeps_other_times() -> None:
    # Every half hour in New York: 01:30 EST is followed by 03:00 EDT, 30 real minutes.
    s = spec("*/30 * * * *", timezone=NEW_YORK)
    t = next_fire(s, at("2026-03-08T01:15", NEW_YORK))
    times = [t]
    for _ in range(2):
        times.append(next_fire(s, times[-1]))
    assert [wall(x, NEW_YORK) for x in times] == [
        "2026-03-08T01:30:00-05:00",
        "2026-03-08T03:00:00-04:00",
        "2026-03-08T03:30:00-04:00",
    ]
    assert times[1] - times[0] == 1800


@pytest.mark.parametrize(
    ("tz", "expr", "first_utc", "next_utc"),
    [
        # Europe: 03:00 CEST -> 02:00 CET on 25 October 2026; 02:30 happens twice.
        (PARIS, "30 2 * * *", "2026-10-25T00:30", "2026-10-26T01:30"),
        # US: 02:00 EDT -> 01:00 EST on 1 November 2026; 01:30 happens twice.
        (NEW_YORK, "30 1 * * *", "2026-11-01T05:30", "2026-11-02T06:30"),
    ],
)
def test_fall_back_fires_once(tz: str, expr: str, first_utc: str, next_utc: str) -> None:
    s = spec(expr, timezone=tz)
    first = next_fire(s, at(first_utc) - 86400)
    assert first == at(first_utc)  # the first occurrence
    assert next_fire(s, first) == at(next_utc)  # not the second, one hour later
    # Asked from inside the repeated hour (its second pass), still not again today.
    assert next_fire(s, first + 3600 - 60) == at(next_utc)
    assert next_fire(s, first + 3600) == at(next_utc)


def test_fall_back_interval_has_a_gap() -> None:
    # The documented consequence: no runs during the repeated hour's second pass.
    s = spec("*/30 * * * *", timezone=NEW_YORK)
    times = [next_fire(s, at("2026-11-01T04:45"))]
    for _ in range(3):
        times.append(next_fire(s, times[-1]))
    assert times == [
        at("2026-11-01T05:00"),  # 01:00 EDT
        at("2026-11-01T05:30"),  # 01:30 EDT
        at("2026-11-01T07:00"),  # 02:00 EST
        at("2026-11-01T07:30"),
    ]


def test_rate_anchoring() -> None:
    s = spec("rate(5 minutes)")
    assert next_fire(s, 1000.0) == 1200.0  # epoch-anchored by default
    assert next_fire(s, 1200.0) == 1500.0  # strictly after
    assert next_fire(s, 1000.0, anchor=100.5) == 1000.5
    assert next_fire(s, 1000.5, anchor=100.5) == 1300.5
    assert next_fire(s, 50.0, anchor=100.5) == 100.5
    assert next_fire(spec("rate(1 second)"), 7.25) == 8.0


def test_rate_ignores_the_time_zone_and_dst() -> None:
    # A day is 86,400 s, even across spring forward.
    s = spec("rate(1 day)", timezone=NEW_YORK)
    anchor = at("2026-03-07T12:00", NEW_YORK)
    assert next_fire(s, anchor, anchor=anchor) == anchor + 86400
    assert wall(anchor + 86400, NEW_YORK) == "2026-03-08T13:00:00-04:00"


def test_next_fire_rejects_a_spec_built_by_hand() -> None:
    with pytest.raises(InvalidParameterValue, match="schedule: invalid cron expression"):
        next_fire(ScheduleSpec(schedule="* *"), 0.0)
    with pytest.raises(InvalidParameterValue, match="timezone: unknown time zone"):
        next_fire(ScheduleSpec(schedule="* * * * *", timezone="Nowhere/Here"), 0.0)


# -- decide ------------------------------------------------------------------------

C = 1_780_000_200.0  # created_at (a multiple of 300); rate() is anchored to it by default
EVERY_5 = spec("rate(5 minutes)")
EVERY_5_ONCE = spec("rate(5 minutes)", catch_up="once")


def test_never_fired_not_yet_due() -> None:
    assert decide(EVERY_5, last_fire=None, created_at=C, now=C + 10) == Tick(
        fires=(), next_at=C + 300, last_fire=None
    )


def test_due_exactly_at_the_boundary() -> None:
    tick = decide(EVERY_5, last_fire=None, created_at=C, now=C + 300)
    assert tick == Tick(fires=(Fire(C + 300, 0),), next_at=C + 600, last_fire=C + 300)


def test_not_yet_due_after_a_fire() -> None:
    tick = decide(EVERY_5, last_fire=C + 300, created_at=C, now=C + 599.999)
    assert tick == Tick(fires=(), next_at=C + 600, last_fire=C + 300)


def test_restart_right_after_firing_does_not_fire_again() -> None:
    # Persisted before firing, then a crash and a restart a second later.
    for now in (C + 300, C + 301, C + 599):
        tick = decide(EVERY_5_ONCE, last_fire=C + 300, created_at=C, now=now)
        assert tick.fires == ()
        assert tick.last_fire == C + 300


def test_downtime_catch_up_none_skips_everything() -> None:
    # Fired at C+300, then down for ten periods (C+600 ... C+3300 due), back 2 min late.
    tick = decide(EVERY_5, last_fire=C + 300, created_at=C, now=C + 3300 + 120)
    assert tick == Tick(fires=(), next_at=C + 3600, last_fire=C + 3300, skipped=10)
    # And the next call, with last_fire persisted, fires on time again.
    tick = decide(EVERY_5, last_fire=tick.last_fire, created_at=C, now=C + 3600)
    assert tick.fires == (Fire(C + 3600, 0),)


def test_downtime_catch_up_once_runs_one() -> None:
    tick = decide(EVERY_5_ONCE, last_fire=C + 300, created_at=C, now=C + 3300 + 120)
    assert tick == Tick(
        fires=(Fire(scheduled_for=C + 3300, missed=9),),
        next_at=C + 3600,
        last_fire=C + 3300,
        skipped=9,
    )


def test_small_lateness_within_grace_fires() -> None:
    tick = decide(EVERY_5, last_fire=C + 300, created_at=C, now=C + 600 + 30)
    assert tick.fires == (Fire(C + 600, 0),)
    # The edge of the grace is still current; past it is missed.
    assert decide(EVERY_5, last_fire=C + 300, created_at=C, now=C + 600 + DEFAULT_GRACE).fires
    late = decide(EVERY_5, last_fire=C + 300, created_at=C, now=C + 600 + DEFAULT_GRACE + 1)
    assert late == Tick(fires=(), next_at=C + 900, last_fire=C + 600, skipped=1)


def test_downtime_ending_near_a_due_time_fires_that_one() -> None:
    # catch_up none skips the missed ones but the latest due time is current.
    tick = decide(EVERY_5, last_fire=C + 300, created_at=C, now=C + 3300 + 10)
    assert tick == Tick(
        fires=(Fire(C + 3300, missed=9),), next_at=C + 3600, last_fire=C + 3300, skipped=9
    )


def test_grace_is_tunable() -> None:
    tick = decide(EVERY_5, last_fire=C + 300, created_at=C, now=C + 600 + 30, grace=10)
    assert tick.fires == ()


def test_short_periods_always_fire_the_latest() -> None:
    # For periods under the grace the latest due time is always current.
    s = spec("rate(1 second)")
    tick = decide(s, last_fire=C + 1, created_at=C, now=C + 5.9)
    assert tick == Tick(fires=(Fire(C + 5, 3),), next_at=C + 6, last_fire=C + 5, skipped=3)


def test_a_single_very_late_time() -> None:
    daily = spec("0 9 * * *")
    last = at("2026-05-01T09:00")
    now = at("2026-05-02T20:00")  # down from 08:00 to 20:00
    assert decide(daily, last_fire=last, created_at=0.0, now=now) == Tick(
        fires=(), next_at=at("2026-05-03T09:00"), last_fire=at("2026-05-02T09:00"), skipped=1
    )
    once = spec("0 9 * * *", catch_up="once")
    assert decide(once, last_fire=last, created_at=0.0, now=now).fires == (
        Fire(at("2026-05-02T09:00"), 0),
    )


def test_never_fired_counts_from_creation() -> None:
    created = at("2026-05-01T08:30")
    hourly = spec("0 * * * *", catch_up="once")
    tick = decide(hourly, last_fire=None, created_at=created, now=at("2026-05-01T12:20"))
    assert tick.fires == (Fire(at("2026-05-01T12:00"), missed=3),)  # 09:00, 10:00, 11:00
    assert tick.next_at == at("2026-05-01T13:00")


def test_rate_anchor_override() -> None:
    # Epoch-anchored instead of creation-anchored: fires on the multiples of 300.
    tick = decide(EVERY_5, last_fire=None, created_at=C + 7, now=C + 300, anchor=0.0)
    assert tick.fires == (Fire(C + 300, 0),)
    tick = decide(EVERY_5, last_fire=None, created_at=C + 7, now=C + 300)
    assert tick == Tick(fires=(), next_at=C + 307, last_fire=None)


def test_clock_stepping_back_never_refires() -> None:
    tick = decide(EVERY_5_ONCE, last_fire=C + 3000, created_at=C, now=C + 1000)
    assert tick == Tick(fires=(), next_at=C + 3300, last_fire=C + 3000)


def test_cron_decide_inside_the_repeated_hour() -> None:
    # New York, every 15 min, last fired 01:00 EDT; now 01:40 EST (second pass).
    s = spec("*/15 * * * *", timezone=NEW_YORK, catch_up="once")
    tick = decide(s, last_fire=at("2026-11-01T05:00"), created_at=0.0, now=at("2026-11-01T06:40"))
    assert tick == Tick(
        fires=(Fire(at("2026-11-01T05:45"), missed=2),),  # 01:45 EDT; 01:15, 01:30 missed
        next_at=at("2026-11-01T07:00"),  # 02:00 EST
        last_fire=at("2026-11-01T05:45"),
        skipped=2,
    )


def test_long_downtime_on_a_frequent_cron_is_capped() -> None:
    s = spec("* * * * *", catch_up="once")
    now = at("2026-05-31T12:34:56")
    tick = decide(s, last_fire=at("2026-05-01T00:00"), created_at=0.0, now=now)
    assert tick == Tick(
        fires=(Fire(at("2026-05-31T12:34"), missed=MISSED_COUNT_LIMIT),),
        next_at=at("2026-05-31T12:35"),
        last_fire=at("2026-05-31T12:34"),
        skipped=MISSED_COUNT_LIMIT,
    )


def test_capped_jump_lands_in_the_first_pass_of_a_repeated_hour() -> None:
    # now is 01:59:30 EST (second pass): the latest fire is 01:59 EDT, an hour earlier.
    s = spec("* * * * *", timezone=NEW_YORK, catch_up="once")
    now = at("2026-11-01T06:59:30")
    tick = decide(s, last_fire=at("2026-10-30T00:00"), created_at=0.0, now=now)
    assert tick.fires == (Fire(at("2026-11-01T05:59"), missed=MISSED_COUNT_LIMIT),)
    assert tick.next_at == at("2026-11-01T07:00")


@pytest.mark.parametrize("catch_up", ["none", "once"])
def test_a_loop_fires_every_time_once(catch_up: str) -> None:
    """Drive decide() like the loop: wake at next_at (sometimes late, sometimes twice,
    sometimes after a restart that lost nothing but the in-memory state)."""
    s = spec("rate(1 second)", catch_up=catch_up)
    last: float | None = None
    fired: list[float] = []
    now = C
    for step in range(400):
        tick = decide(s, last_fire=last, created_at=C, now=now)
        last = tick.last_fire  # persisted before firing
        fired += [f.scheduled_for for f in tick.fires]
        assert tick.next_at > now
        # Wake at next_at, a little late every 7th step, or again at once every 5th.
        now = now if step % 5 == 4 else tick.next_at + (0.3 if step % 7 == 0 else 0.0)
    assert fired == sorted(set(fired))
    assert fired == [C + k for k in range(1, len(fired) + 1)]


# -- overlap and the event ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlap", "running", "action"),
    [
        ("allow", 0, "fire"),
        ("allow", 3, "fire"),
        ("forbid", 0, "fire"),
        ("forbid", 1, "skip"),
        ("replace", 0, "fire"),
        ("replace", 2, "replace"),
    ],
)
def test_overlap_action(overlap: str, running: int, action: str) -> None:
    assert overlap_action(spec("rate(1 minute)", overlap=overlap), running=running) == action


def test_scheduled_event_shape() -> None:
    s = spec("rate(5 minutes)", payload={"job": "report"})
    event = scheduled_event(
        s,
        trigger_arn_name="nightly",
        function="reports",
        fire=Fire(scheduled_for=at("2026-05-01T09:00:00.75"), missed=0),
        event_id="a1b2",
    )
    assert event == {
        "version": "0",
        "id": "a1b2",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": "2026-05-01T09:00:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:000000000000:rule/reports-nightly"],
        "detail": {"job": "report"},
    }
    event["detail"]["job"] = "changed"
    assert s.payload == {"job": "report"}


def test_scheduled_event_without_payload_has_empty_detail() -> None:
    event = scheduled_event(
        spec("rate(1 minute)"), trigger_arn_name="t", function="f", fire=Fire(0.0, 0), event_id="x"
    )
    assert event["detail"] == {}
    assert event["time"] == "1970-01-01T00:00:00Z"


def test_package_is_import_light() -> None:
    code = (
        "import sys, nimbus.triggers as t; assert 'croniter' not in sys.modules; "
        "assert t.decide.__module__ == 'nimbus.triggers.schedule'; "
        "assert 'croniter' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
