"""Phi-accrual failure detector (Hayashibara et al.), sans-I/O: time is passed in.

For each node it keeps a sliding window of the intervals between arrivals of its packets and
reports ``phi = -log10(P(an interval at least this long))`` for the time since the last arrival,
under a distribution fitted to the window. ``phi = 8`` means that, if the node were alive, a silence
this long would happen once in 10^8 intervals.

Two distributions are offered. ``"normal"`` (mean and standard deviation of the window, as in
Akka/Cassandra) suits regular heartbeats. ``"exponential"`` (only the mean) suits gossip, where a
pair of nodes hears from each other when one of them happens to pick the other at random: the gaps
are then geometric, and a normal fit underestimates their long tail and raises false alarms.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Distribution = Literal["normal", "exponential"]

_LN10 = math.log(10.0)
_SQRT2 = math.sqrt(2.0)


@dataclass(slots=True)
class _History:
    last_arrival: float
    intervals: deque[float] = field(default_factory=deque)
    total: float = 0.0
    total_squares: float = 0.0

    def add(self, interval: float, window_size: int) -> None:
        if len(self.intervals) == window_size:
            old = self.intervals.popleft()
            self.total -= old
            self.total_squares -= old * old
        self.intervals.append(interval)
        self.total += interval
        self.total_squares += interval * interval

    def mean_and_std(self) -> tuple[float, float]:
        n = len(self.intervals)
        mean = self.total / n
        variance = max(self.total_squares / n - mean * mean, 0.0)
        return mean, math.sqrt(variance)


class FailureDetector:
    """Per-node arrival history and phi.

    ``bootstrap_interval`` seeds the window of a node we have just started tracking (use twice the
    gossip interval). ``window_size`` bounds memory per node and how fast the estimate adapts.
    ``min_interval`` bounds the mean from below and ``min_std_deviation`` the standard deviation, so
    a burst of packets cannot make a single late packet look like a death. Arrivals closer together
    than ``min_interval`` are one arrival (a delta and a digest sent in reply to the same round).
    """

    def __init__(
        self,
        bootstrap_interval: float,
        *,
        window_size: int = 50,
        min_interval: float | None = None,
        min_std_deviation: float | None = None,
        distribution: Distribution = "exponential",
    ) -> None:
        if bootstrap_interval <= 0:
            raise ValueError("bootstrap_interval must be positive")
        if window_size < 1:
            raise ValueError("window_size must be at least 1")
        self.bootstrap_interval = bootstrap_interval
        self.window_size = window_size
        self.min_interval = bootstrap_interval / 4 if min_interval is None else min_interval
        self.min_std_deviation = (
            bootstrap_interval / 4 if min_std_deviation is None else min_std_deviation
        )
        self.distribution: Distribution = distribution
        self._histories: dict[str, _History] = {}

    def _start(self, node_id: str, now: float) -> _History:
        history = _History(now)
        history.add(self.bootstrap_interval, self.window_size)
        self._histories[node_id] = history
        return history

    def report(self, node_id: str, now: float) -> None:
        """Record that a packet from ``node_id`` arrived at ``now``."""
        history = self._histories.get(node_id)
        if history is None:
            self._start(node_id, now)
            return
        interval = now - history.last_arrival
        if interval < self.min_interval:
            # Same burst; keep the earliest time so the next gap is not shortened by the burst.
            return
        history.add(interval, self.window_size)
        history.last_arrival = now

    def phi(self, node_id: str, now: float) -> float:
        """Suspicion level of ``node_id`` at ``now`` (0 = just heard; ``inf`` = certainly dead).

        A node never heard from starts being tracked at its first query, as if it arrived then.
        """
        history = self._histories.get(node_id)
        if history is None:
            history = self._start(node_id, now)
        elapsed = max(now - history.last_arrival, 0.0)
        mean, std = history.mean_and_std()
        mean = max(mean, self.min_interval)
        if self.distribution == "exponential":
            return elapsed / (mean * _LN10)
        std = max(std, self.min_std_deviation)
        survival = 0.5 * math.erfc((elapsed - mean) / (std * _SQRT2))
        return -math.log10(survival) if survival > 0.0 else math.inf

    def remove(self, node_id: str) -> None:
        """Forget a node (it expired)."""
        self._histories.pop(node_id, None)

    def tracked(self) -> int:
        """How many nodes have a history (for tests and metrics)."""
        return len(self._histories)
