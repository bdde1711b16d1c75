"""What to do when a channel fails before the response head: a pure function, no sockets.

A request is sent again only when it provably never reached a service (the agent could not
connect, a node refused it while leaving, the connection to another node could not be made,
the agent never read the stream's SYN), or when repeating it is harmless (RFC 9110 §9.2.2
idempotent methods) and no response byte came back: it rode a pooled stream the service had
already closed, or the connection to its upstream collapsed under it (the node or the agent
died).
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


# The connection to the upstream collapsed under the request: the tunnel's session ended
# (GOING_AWAY: its agent, or the connection to it, died), or the node it was forwarded to
# dropped the connection (GOING_AWAY) or closed it (None) without a response byte. The request
# may have reached a service, so only an idempotent one is sent again.
_COLLAPSED = frozenset({ResetReason.GOING_AWAY})
_COLLAPSED_REMOTE = frozenset({ResetReason.GOING_AWAY, None})

_NEXT = Decision(Action.NEXT)
_FRESH = Decision(Action.FRESH)
_UNREACHABLE = Decision(Action.FAIL)
_COLLAPSED_HOLD = Decision(Action.HOLD)


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
    if (
        replayable
        and method in IDEMPOTENT
        and reason in (_COLLAPSED_REMOTE if remote else _COLLAPSED)
    ):
        # Not provably undelivered (a node that forwarded it must not try another), but
        # harmless to repeat: elsewhere, or once an upstream of the endpoint is back.
        return _NEXT if more_candidates else _COLLAPSED_HOLD
    if dial is not None:
        return Decision(Action.FAIL, dial[0], dial[1])
    return _UNREACHABLE
