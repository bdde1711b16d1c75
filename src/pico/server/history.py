"""The last 15 minutes of the proxy port's traffic, in 10-second slots, for the dashboard charts.

Each slot holds, for the node and for each endpoint, the requests that came in from clients
(a request another node forwarded to us was counted there), the 5xx among them, and a
latency histogram. Histograms (not quantiles) are kept so that the page can merge the nodes'
slots and then compute the cluster's p50/p99, which quantiles could not give.

A fixed ring: `slots` slots of `slot_seconds` each, aligned on the wall clock so that the
slots of different nodes line up; at most `max_endpoints` endpoints per slot (further ones
are counted in the node's totals only).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable

from pico.http.settings import RequestRecord

# Upper bounds (seconds) of the latency buckets; one more bucket above the last.
LATENCY_BOUNDS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_WIDTH = 2 + len(LATENCY_BOUNDS) + 1  # requests, errors, then the buckets


class _Slot:
    __slots__ = ("endpoints", "start", "total")

    def __init__(self, start: int) -> None:
        self.start = start
        self.total = [0] * _WIDTH
        self.endpoints: dict[str, list[int]] = {}


class History:
    """A ring of per-slot request counts and latency histograms (see the module docstring)."""

    def __init__(
        self,
        slot_seconds: int = 10,
        slots: int = 90,
        max_endpoints: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.slot_seconds = slot_seconds
        self.max_endpoints = max_endpoints
        self.clock = clock
        self._ring: deque[_Slot] = deque(maxlen=slots)

    def _current(self) -> _Slot:
        start = int(self.clock()) // self.slot_seconds * self.slot_seconds
        ring = self._ring
        if not ring or ring[-1].start != start:
            ring.append(_Slot(start))
        return ring[-1]

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request (called for every request: kept to a few operations)."""
        if record.forwarded:
            return  # counted by the node the client sent it to
        slot = self._current()
        bucket = 2 + bisect.bisect_left(LATENCY_BOUNDS, record.duration)
        error = record.status >= 500
        total = slot.total
        total[0] += 1
        total[bucket] += 1
        if error:
            total[1] += 1
        if not record.upstream:
            return  # no such endpoint: clients choose the names, only real ones are kept
        counts = slot.endpoints.get(record.endpoint)
        if counts is None:
            if len(slot.endpoints) >= self.max_endpoints:
                return
            counts = slot.endpoints[record.endpoint] = [0] * _WIDTH
        counts[0] += 1
        counts[bucket] += 1
        if error:
            counts[1] += 1

    def snapshot(self) -> dict[str, object]:
        """The `/status/history` shape: slots with traffic, oldest first.

        `{"slot_seconds", "now", "latency_bounds", "slots": [{"start", "total", "endpoints"}]}`
        where `total` and each endpoint's value are `[requests, errors, *latency buckets]`.
        The last slot may still be filling (its `start` is within `slot_seconds` of `now`).
        """
        self._current()  # drop slots that fell out of the window while idle
        oldest = self._ring[-1].start - (self._ring.maxlen or 1) * self.slot_seconds
        return {
            "slot_seconds": self.slot_seconds,
            "now": self.clock(),
            "latency_bounds": list(LATENCY_BOUNDS),
            "slots": [
                {
                    "start": s.start,
                    "total": list(s.total),
                    "endpoints": {k: list(v) for k, v in s.endpoints.items()},
                }
                for s in self._ring
                if s.total[0] and s.start > oldest
            ],
        }
