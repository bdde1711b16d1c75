"""Which streams we opened still await the peer's ACK, and when to give up on them (sans-I/O).

A stream whose SYN the peer never read reached no service: a request on it may be sent to
another upstream, even a POST. Only silence proves it was not read: a peer that sends anything
is alive, and its ACK may simply be queued behind what it is sending, after the request it
carries reached a service. So a stream is given up only when it is still unacknowledged
`timeout` after it was opened *and* the peer sent nothing at all for `timeout`.

The caller ticks `AckWatch` every `timeout / 2` while `waiting` is not empty, and sets `heard`
whenever the peer sends anything (one store per read: no clock, no allocation).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

# Ticks (of timeout / 2) a stream must wait and the peer must be silent before giving up:
# opened before the tick 3 ago is more than `timeout` old; 2 silent ticks are `timeout`.
_AGE_TICKS = 3
_SILENT_TICKS = 2


class AckWatch:
    """Streams awaiting their ACK, oldest first; whether the peer seems frozen.

    A tick looks only at the oldest streams, up to the first that is pending and too young
    (the ones behind it are younger): its cost is the streams it forgets, not all of them.
    """

    __slots__ = ("heard", "silent_ticks", "ticks", "unresponsive", "waiting")

    def __init__(self) -> None:
        self.waiting: deque[tuple[int, int]] = deque()  # (stream id, tick it was opened at)
        self.ticks = 0
        self.silent_ticks = 0  # ticks in a row during which the peer sent nothing
        self.heard = False  # the peer sent something since the last tick
        self.unresponsive = False  # streams were given up; until the peer is heard again

    @property
    def responsive(self) -> bool:
        """False from giving up on a stream until the peer is heard from again."""
        return self.heard or not self.unresponsive

    def opened(self, stream_id: int) -> None:
        """A stream was opened: its SYN awaits the peer's ACK."""
        self.waiting.append((stream_id, self.ticks))

    def tick(self, pending: Callable[[int], bool]) -> list[int]:
        """One period passed: the streams to give up on (forgotten here).

        `pending(stream_id)` says whether a stream is still open and unacknowledged.
        """
        self.ticks += 1
        if self.heard:
            self.silent_ticks = 0
            self.unresponsive = False
        else:
            self.silent_ticks += 1
        self.heard = False
        silent = self.silent_ticks >= _SILENT_TICKS
        waiting = self.waiting
        expired = []
        while waiting:
            stream_id, opened = waiting[0]
            if pending(stream_id):
                if not silent or self.ticks - opened < _AGE_TICKS:
                    break
                expired.append(stream_id)
            waiting.popleft()
        if expired:
            self.unresponsive = True
        return expired
