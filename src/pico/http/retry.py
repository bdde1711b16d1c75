"""What to do when a channel fails before the response head: a pure function, no sockets.

A request is sent again only when it provably never reached a service (the agent could not
connect, a node refused it while leaving, the agent never read the stream's SYN), or when it
rode a pooled stream the service had already closed and repeating it is harmless (RFC 9110
§9.2.2 idempotent methods).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pico.mux.frame import ResetReason

# A request that may have reached the service is only re-sent if repeating it is harmless.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Failures that prove the request never reached a service, and the answer when no one else can.
DIAL_FAILURES: dict[ResetReason, tuple[int, str]] = {
    ResetReason.REJECTED: (502, "upstream unreachable"),
    ResetReason.REFUSED: (502, "upstream unreachable"),
    ResetReason.UNREACHABLE: (502, "upstream unreachable"),
    ResetReason.TIMEOUT: (504, "upstream timeout"),
    # The agent did not acknowledge the stream (`proxy.stream_ack_timeout`): frozen or stuck.
    ResetReason.UNACKNOWLEDGED: (504, "upstream timeout"),
}


class Action(enum.Enum):
    NEXT = "next"  # drop this upstream, try the next candidate
    FRESH = "fresh"  # the same upstream again, on a channel that was never used
    HOLD = "hold"  # wait (bounded) for an upstream of the endpoint to appear, else fail
    FAIL = "fail"  # answer the client with `status`


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    status: int = 502
    message: str = "upstream unreachable"
    # No service saw the request (a node that forwarded it may try another).
    undelivered: bool = False


_NEXT = Decision(Action.NEXT)
_FRESH = Decision(Action.FRESH)
_UNREACHABLE = Decision(Action.FAIL)


def after_failure(
    reason: ResetReason | None,
    *,
    replayable: bool,
    reused: bool,
    retried_fresh: bool,
    method: bytes,
    more_candidates: bool,
    remote: bool,
) -> Decision:
    """The next step after the channel of an exchange failed before its response head.

    `replayable`: every request byte sent is still held and no response byte came back.
    `reused`: the channel came from the idle pool. `remote`: the upstream is another node.
    """
    dial = DIAL_FAILURES.get(reason) if reason is not None else None
    if dial is not None and replayable:
        if more_candidates:
            return _NEXT
        # Only a node that could not be reached is worth waiting out (its agents are moving),
        # and an agent that is leaving (REJECTED): it reconnects. A service that refuses
        # connections will not be fixed by waiting.
        action = Action.HOLD if reason is ResetReason.REJECTED or remote else Action.FAIL
        return Decision(action, dial[0], dial[1], undelivered=True)
    if reused and replayable and not retried_fresh and method in IDEMPOTENT:
        # An idle pooled stream the service had already closed: once more on a fresh one.
        return _FRESH
    if dial is not None:
        return Decision(Action.FAIL, dial[0], dial[1])
    return _UNREACHABLE
