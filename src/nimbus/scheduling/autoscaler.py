"""Scaling decisions: a pure function of a pool's state, its spec and the time.

Like Knative's ``Scale(now)``, :func:`decide` reads no clock and changes
nothing; the scheduler's loop applies what it returns, and tests move a
synthetic clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from nimbus.models import ScalingSpec


@dataclass(frozen=True, slots=True)
class IdleInstance:
    id: str
    last_used: float


@dataclass(frozen=True, slots=True)
class PoolState:
    idle: tuple[IdleInstance, ...]
    busy: int
    starting: int
    waiting: int
    retired: bool = False

    @property
    def total(self) -> int:
        return len(self.idle) + self.busy + self.starting


@dataclass(frozen=True, slots=True)
class Decision:
    #: Idle instances to stop, by id.
    stop: tuple[str, ...] = ()
    #: Instances to start now (to honour ``scaling.min``).
    start: int = 0


def decide(state: PoolState, scaling: ScalingSpec, now: float) -> Decision:
    """What to do with one pool at time ``now``.

    - A retired pool (an old version, a deleted function) stops every idle
      instance and never starts one.
    - Idle instances that have waited ``keep_warm`` seconds are stopped, oldest
      first, but never below ``scaling.min``.
    - Below ``scaling.min``, start the difference.
    - While the function is busy with no idle instance and none starting, start
      one *spare* (within ``scaling.max``), so the next request of a burst does
      not wait for a cold start. Not for ``keep_warm: 0``, which asks for no
      idle instances at all.
    """
    if state.retired:
        return Decision(stop=tuple(i.id for i in state.idle))
    floor = scaling.min
    total = state.total
    stop: list[str] = []
    for inst in sorted(state.idle, key=lambda i: i.last_used):
        if total - len(stop) <= floor:
            break
        if now - inst.last_used >= scaling.keep_warm:
            stop.append(inst.id)
    start = max(0, floor - total)
    wants_spare = (
        state.busy > 0
        and not state.idle
        and state.starting == 0
        and scaling.keep_warm > 0
        and total < scaling.max
    )
    if wants_spare:
        start = max(start, 1)
    return Decision(stop=tuple(stop), start=start)
