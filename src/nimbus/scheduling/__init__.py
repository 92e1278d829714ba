"""Per-function instance pools, admission and scale-to-zero."""

from nimbus.scheduling.autoscaler import Decision, IdleInstance, PoolState, decide
from nimbus.scheduling.scheduler import PoolCounts, Scheduler

__all__ = ["Decision", "IdleInstance", "PoolCounts", "PoolState", "Scheduler", "decide"]
