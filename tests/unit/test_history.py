"""The dashboard's traffic history: 10-second slots on the wall clock, a 15-minute ring."""

from __future__ import annotations

from typing import Any

from pico.http.settings import RequestRecord
from pico.server.history import LATENCY_BOUNDS, History


def record(**fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "method": "GET", "host": "h", "path": "/", "status": 200, "duration": 0.003,
        "bytes_in": 0, "bytes_out": 2, "endpoint": "ep", "upstream": "u", "forwarded": False,
        "remote": False,
    }  # fmt: skip
    return RequestRecord(**{**base, **fields})


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_requests_are_counted_in_wall_clock_slots_with_a_latency_histogram() -> None:
    clock = Clock(1_000_003.5)
    history = History(clock=clock)
    history.observe(record(duration=0.003))
    history.observe(record(duration=0.2, status=502))
    clock.now += 10  # the next slot
    history.observe(record(endpoint="other", duration=5.0))
    snap: Any = history.snapshot()
    assert [s["start"] for s in snap["slots"]] == [1_000_000, 1_000_010]
    first = snap["slots"][0]
    assert first["total"][:2] == [2, 1]  # requests, 5xx
    buckets = first["total"][2:]
    assert len(buckets) == len(LATENCY_BOUNDS) + 1
    assert buckets[LATENCY_BOUNDS.index(0.005)] == 1 and buckets[LATENCY_BOUNDS.index(0.25)] == 1
    assert first["endpoints"] == {"ep": first["total"]}
    assert list(snap["slots"][1]["endpoints"]) == ["other"]


def test_forwarded_requests_and_unknown_endpoints_count_where_they_should() -> None:
    history = History(clock=Clock(50.0))
    history.observe(record(forwarded=True))  # the node it came in at counted it
    history.observe(record(endpoint="nope", upstream="", status=502))  # a client's made-up name
    (slot,) = history.snapshot()["slots"]  # type: ignore[misc]
    assert slot["total"][:2] == [1, 1] and slot["endpoints"] == {}


def test_endpoints_per_slot_are_capped_and_old_slots_leave_the_window() -> None:
    clock = Clock(0.0)
    history = History(slots=3, max_endpoints=2, clock=clock)
    for name in ("a", "b", "c"):
        history.observe(record(endpoint=name))
    (slot,) = history.snapshot()["slots"]  # type: ignore[misc]
    assert slot["total"][0] == 3 and sorted(slot["endpoints"]) == ["a", "b"]
    clock.now = 25.0
    history.observe(record())
    assert len(history.snapshot()["slots"]) == 2  # type: ignore[arg-type]
    clock.now = 1000.0  # idle far past the window: nothing old is shown
    assert history.snapshot()["slots"] == []
