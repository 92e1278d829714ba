"""Prometheus metrics, in a registry of the server's own (tests run many servers)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nimbus.models import InvokeResult

#: Invocation durations are mostly milliseconds: buckets from 0.5 ms to 15 min.
BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
)


class _Instances(Collector):
    def __init__(self, counts: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "nimbus_instances", "Instances by function and state", labels=["function", "state"]
        )
        for function, state, n in self._counts():
            family.add_metric([function, state], n)
        yield family


class Metrics:
    def __init__(self, instance_counts: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._invocations = Counter(
            "nimbus_invocations",
            "Invocations by function and outcome",
            ["function", "outcome"],
            registry=self.registry,
        )
        self._cold = Counter(
            "nimbus_cold_starts",
            "Invocations that started an instance",
            ["function"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "nimbus_invocation_duration_seconds",
            "Handler run time (billed time before rounding)",
            ["function"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._throttled = Counter(
            "nimbus_throttles", "Requests refused with 429", ["function"], registry=self.registry
        )
        self.registry.register(_Instances(instance_counts))

    def observe(self, function: str, result: InvokeResult) -> None:
        self._invocations.labels(function, result.error or "success").inc()
        self._duration.labels(function).observe(result.duration_ms / 1000.0)
        if result.cold:
            self._cold.labels(function).inc()

    def throttled(self, function: str) -> None:
        self._throttled.labels(function).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
