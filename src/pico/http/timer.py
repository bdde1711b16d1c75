"""A timer that is cheap to re-arm on every request.

Re-arming an asyncio timer per request (cancel + call_later) allocates a handle and touches the
loop's heap each time. `LazyTimer` stores the deadline instead: moving it later costs a float
store, and the loop timer is only replaced when the deadline moves earlier. When the loop timer
fires early (the deadline moved on), it re-arms itself for the remaining time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LazyTimer:
    """Calls `callback` once the armed deadline passes (unless cancelled or re-armed first)."""

    __slots__ = ("_callback", "_deadline", "_handle", "_loop", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0

    @property
    def armed(self) -> bool:
        """True while a deadline is set."""
        return self._deadline is not None

    def arm(self, delay: float) -> None:
        """Fire `delay` seconds from now (replacing any earlier deadline); <= 0 cancels."""
        if delay <= 0:
            self._deadline = None
            return
        deadline = self._loop.time() + delay
        self._deadline = deadline
        if self._handle is None or self._when > deadline:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_at(deadline, self._fire)
            self._when = deadline

    def cancel(self) -> None:
        """Forget the deadline (the loop timer, if any, fires later and does nothing)."""
        self._deadline = None

    def close(self) -> None:
        """Cancel for good, releasing the loop timer and the callback (which usually refers
        back to the timer's owner: keeping it would make a reference cycle)."""
        self._deadline = None
        self._callback = _closed
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:
            self._handle = self._loop.call_at(deadline, self._fire)
            self._when = deadline
            return
        self._deadline = None
        self._callback()


def _closed() -> None:
    """The callback of a closed timer."""
