"""The store's numbers as Prometheus metric families, built at scrape time.

Imported only when /metrics is served (RELAY_METRICS=1), so a relay without
it never loads prometheus_client.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from relay_core.store.metrics import (ACCEPTED, ATTEMPTS, HISTOGRAMS, OUTCOMES, PREFIX, REJECTED, WORKER_ALIVE_SECONDS,
                                message_states, oldest_waiting, totals, worker_heartbeats)

__all__ = ["CONTENT_TYPE", "render"]


def render(connect: Any) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(connect))
    return generate_latest(registry)


class RelayCollector(Collector):
    """Builds every metric family from one look at the store."""

    def __init__(self, connect: Any, clock: Any = time.time) -> None:
        self._connect = connect  # returns this thread's store connection
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        conn = self._connect()
        now = self._clock()
        counted = totals(conn)
        states = message_states(conn)
        oldest = oldest_waiting(conn)
        beats = worker_heartbeats(conn)

        accepted = CounterMetricFamily(PREFIX + ACCEPTED, "Messages accepted (answered 202) by the API.")
        accepted.add_metric([], counted.get((ACCEPTED, ""), 0.0))
        yield accepted

        rejected = CounterMetricFamily(PREFIX + REJECTED, "Sends refused by the API, by reason.", labels=["reason"])
        for (name, label), value in sorted(counted.items()):
            if name == REJECTED:
                rejected.add_metric([label], value)
        yield rejected

        attempts = CounterMetricFamily(PREFIX + ATTEMPTS, "Delivery attempts by outcome (sent, partial, "
                                       "deferred, failed).", labels=["outcome"])
        for outcome in OUTCOMES:
            attempts.add_metric([outcome], counted.get((ATTEMPTS, outcome), 0.0))
        yield attempts

        by_state = GaugeMetricFamily(PREFIX + "messages", "Messages in the store by state.", labels=["state"])
        for state, count in states.items():
            by_state.add_metric([state], count)
        yield by_state

        age = GaugeMetricFamily(PREFIX + "oldest_waiting_age_seconds",
                                "Age of the oldest queued or deferred message (0 when none waits).")
        age.add_metric([], max(0.0, now - oldest) if oldest is not None else 0.0)
        yield age

        for name, bounds in HISTOGRAMS.items():
            doc = ("Time of one delivery attempt's SMTP transaction." if name.startswith("delivery")
                   else "Time from a send request's arrival to its durable commit (the 202).")
            yield _histogram(PREFIX + name, doc, bounds, name, counted)

        heartbeat = GaugeMetricFamily(PREFIX + "worker_heartbeat_timestamp_seconds",
                                      "When each worker last reported (Unix time).", labels=["worker"])
        for worker, beat in sorted(beats.items()):
            heartbeat.add_metric([worker], beat)
        yield heartbeat
        alive = GaugeMetricFamily(PREFIX + "workers_alive", "Workers that reported in the last minute.")
        alive.add_metric([], sum(1 for beat in beats.values() if now - beat < WORKER_ALIVE_SECONDS))
        yield alive


def _histogram(full_name: str, doc: str, bounds: tuple[float, ...], name: str,
               counted: dict[tuple[str, str], float]) -> HistogramMetricFamily:
    cumulative, buckets = 0.0, []
    for bound in bounds:
        cumulative += counted.get((f"{name}_bucket", repr(bound)), 0.0)
        buckets.append((floatToGoString(bound), cumulative))
    buckets.append(("+Inf", counted.get((f"{name}_count", ""), 0.0)))
    return HistogramMetricFamily(full_name, doc, buckets=buckets, sum_value=counted.get((f"{name}_sum", ""), 0.0))

