"""Per-instance cgroups behind one interface, for cgroup v1 and v2.

    driver = detect(node_id)          # v2 if usable, else v1; or CgroupUnavailable
    driver.prepare()                  # once, at server start
    driver.limit_node(NodeLimits(memory_bytes=..., pids_max=..., cpus=...))  # all together
    procs_files = driver.create(instance_id, Limits.for_memory_mb(128))
    # the instance writes its pid into every file of procs_files to join
    driver.freeze(instance_id); driver.thaw(instance_id)   # between invocations (if driver.freezer)
    driver.kill(instance_id); driver.remove(instance_id)   # retry remove() while False
    driver.cleanup()                  # at server stop

Standard library only: these modules are imported inside the zygote.
"""

from nimbus.executor.sandbox.cgroups.auto import detect
from nimbus.executor.sandbox.cgroups.base import (
    CgroupDriver,
    CgroupUnavailable,
    Limits,
    NodeLimits,
)
from nimbus.executor.sandbox.cgroups.v1 import CgroupV1
from nimbus.executor.sandbox.cgroups.v2 import CgroupV2

__all__ = [
    "CgroupDriver",
    "CgroupUnavailable",
    "CgroupV1",
    "CgroupV2",
    "Limits",
    "NodeLimits",
    "detect",
]
