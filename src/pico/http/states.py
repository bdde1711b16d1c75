"""The lifecycle of one exchange, one state enum per direction, with its transition tables
(the shape of h11's `_state.py`).

`Send` is what has gone to the service; `Receive` is what has come back to the client. An
`Exchange` moves through them with `advance()`, which refuses a transition its table does not
list, so an impossible sequence (a body after the end, a retry after the response began) is a
bug found at once, not a silent desync.
"""

from __future__ import annotations

import enum


class Send(enum.Enum):
    # Members are singletons: identity hashing (a C slot) instead of Enum's hash of the name,
    # which cost a Python call per table lookup on every request.
    __hash__ = object.__hash__

    CONNECTING = "connecting"  # choosing an upstream; request bytes are held
    HELD = "held"  # waiting for an upstream of the endpoint to appear
    SENDING = "sending"  # the head is on a channel; the body is on its way
    SENT = "sent"  # the whole request (body end and trailers included) is on the channel
    DONE = "done"  # nothing more will be sent (finished, failed or abandoned)


class Receive(enum.Enum):
    __hash__ = object.__hash__

    AWAITING_HEAD = "awaiting-head"  # no final response head yet (1xx may pass)
    RELAYING = "relaying"  # the head went to the client; the body follows
    DONE = "done"  # the response is complete
    UPGRADED = "upgraded"  # 101: the connection is a byte relay now
    FAILED = "failed"  # answered with an error, or the client connection was dropped


# In Python 3.11 reading an enum member off its class (`Send.SENT`) goes through a descriptor,
# about 80 ns, and the hot path does it dozens of times per request: it uses these names for
# the same members instead.
CONNECTING = Send.CONNECTING
HELD = Send.HELD
SENDING = Send.SENDING
SENT = Send.SENT
SEND_DONE = Send.DONE
AWAITING_HEAD = Receive.AWAITING_HEAD
RELAYING = Receive.RELAYING
DONE = Receive.DONE
UPGRADED = Receive.UPGRADED
FAILED = Receive.FAILED


class TransitionError(RuntimeError):
    """An exchange tried a transition its table does not allow (a bug, never peer input)."""


SEND_TRANSITIONS: dict[Send, frozenset[Send]] = {
    Send.CONNECTING: frozenset({Send.SENDING, Send.HELD, Send.DONE}),
    Send.HELD: frozenset({Send.CONNECTING, Send.DONE}),
    # A channel that fails before any response byte sends the request again elsewhere.
    Send.SENDING: frozenset({Send.SENT, Send.CONNECTING, Send.DONE}),
    Send.SENT: frozenset({Send.CONNECTING, Send.DONE}),
    Send.DONE: frozenset(),
}

RECEIVE_TRANSITIONS: dict[Receive, frozenset[Receive]] = {
    Receive.AWAITING_HEAD: frozenset({Receive.RELAYING, Receive.UPGRADED, Receive.FAILED}),
    Receive.RELAYING: frozenset({Receive.DONE, Receive.FAILED}),
    Receive.DONE: frozenset(),
    Receive.UPGRADED: frozenset(),
    Receive.FAILED: frozenset(),
}

# Once the response is over (either way), the request side is done too.
FINAL = frozenset({Receive.DONE, Receive.UPGRADED, Receive.FAILED})


def check_send(old: Send, new: Send) -> None:
    """Raise TransitionError unless `old -> new` is in SEND_TRANSITIONS."""
    if new not in SEND_TRANSITIONS[old]:
        raise TransitionError(f"request side: {old.value} -> {new.value} is not allowed")


def check_receive(old: Receive, new: Receive) -> None:
    """Raise TransitionError unless `old -> new` is in RECEIVE_TRANSITIONS."""
    if new not in RECEIVE_TRANSITIONS[old]:
        raise TransitionError(f"response side: {old.value} -> {new.value} is not allowed")
