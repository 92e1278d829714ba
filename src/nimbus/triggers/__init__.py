"""Triggers: what starts a function besides a request (today: schedules).

Import-light on purpose: the public names of :mod:`nimbus.triggers.schedule`
are re-exported lazily, so importing this package does not load croniter.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nimbus.triggers.schedule import (
        Fire,
        ScheduleSpec,
        Tick,
        decide,
        next_fire,
        overlap_action,
        parse_schedule,
        scheduled_event,
    )

__all__ = [
    "Fire",
    "ScheduleSpec",
    "Tick",
    "decide",
    "next_fire",
    "overlap_action",
    "parse_schedule",
    "scheduled_event",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("nimbus.triggers.schedule"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
