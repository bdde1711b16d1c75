"""The exchange lifecycle tables, and the retry decision, checked without sockets."""

from __future__ import annotations

import pytest

from pico.http.retry import Action, Decision, after_failure
from pico.http.states import (
    FINAL,
    RECEIVE_TRANSITIONS,
    SEND_TRANSITIONS,
    Receive,
    Send,
    TransitionError,
    check_receive,
    check_send,
)
from pico.mux.frame import ResetReason


def reachable(table: dict[Send, frozenset[Send]], start: Send) -> set[Send]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_has_a_row_and_every_state_is_reachable() -> None:
    assert set(SEND_TRANSITIONS) == set(Send)
    assert set(RECEIVE_TRANSITIONS) == set(Receive)
    assert reachable(SEND_TRANSITIONS, Send.CONNECTING) == set(Send)
    seen, todo = {Receive.AWAITING_HEAD}, [Receive.AWAITING_HEAD]
    while todo:
        for nxt in RECEIVE_TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(Receive)


def test_final_states_are_the_ones_without_a_way_out() -> None:
    assert {s for s, out in RECEIVE_TRANSITIONS.items() if not out} == FINAL
    assert {s for s, out in SEND_TRANSITIONS.items() if not out} == {Send.DONE}


def test_every_request_state_may_end() -> None:
    """A response may finish (or the client leave) while the request is in any state."""
    for state in Send:
        if state is not Send.DONE:
            check_send(state, Send.DONE)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (Send.DONE, Send.CONNECTING),  # nothing is sent after the end
        (Send.SENT, Send.SENDING),  # no body after the body's end
        (Send.HELD, Send.SENDING),  # a held request routes again before it sends
        (Send.CONNECTING, Send.SENT),  # the head goes out first
    ],
)
def test_impossible_request_transitions_raise(old: Send, new: Send) -> None:
    with pytest.raises(TransitionError):
        check_send(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (Receive.RELAYING, Receive.UPGRADED),  # a relayed response cannot become an upgrade
        (Receive.DONE, Receive.FAILED),  # a finished response cannot fail later
        (Receive.FAILED, Receive.RELAYING),  # nor relay after an error was answered
        (Receive.AWAITING_HEAD, Receive.DONE),  # completion needs a relayed head
    ],
)
def test_impossible_response_transitions_raise(old: Receive, new: Receive) -> None:
    with pytest.raises(TransitionError):
        check_receive(old, new)


def decide(reason: ResetReason | None, **facts: object) -> Decision:
    args: dict[str, object] = {
        "replayable": True,
        "reused": False,
        "retried_fresh": False,
        "method": b"GET",
        "more_candidates": False,
        "remote": False,
    }
    args.update(facts)
    return after_failure(reason, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "reason",
    [ResetReason.REFUSED, ResetReason.UNREACHABLE, ResetReason.TIMEOUT, ResetReason.REJECTED],
)
def test_a_dial_failure_goes_to_the_next_candidate(reason: ResetReason) -> None:
    assert decide(reason, more_candidates=True).action is Action.NEXT
    assert decide(reason, more_candidates=True, method=b"POST").action is Action.NEXT


def test_a_dial_failure_without_candidates_holds_only_where_waiting_helps() -> None:
    assert decide(ResetReason.REFUSED) == Decision(
        Action.FAIL, 502, "upstream unreachable", undelivered=True
    )
    assert decide(ResetReason.TIMEOUT) == Decision(
        Action.FAIL, 504, "upstream timeout", undelivered=True
    )
    assert decide(ResetReason.REFUSED, remote=True).action is Action.HOLD
    assert decide(ResetReason.REJECTED).action is Action.HOLD


def test_a_request_no_longer_held_is_never_sent_twice_after_a_dial_failure() -> None:
    assert decide(ResetReason.REFUSED, replayable=False, more_candidates=True) == Decision(
        Action.FAIL, 502, "upstream unreachable"
    )


def test_a_stale_pooled_stream_is_retried_once_fresh_for_idempotent_methods() -> None:
    assert decide(None, reused=True).action is Action.FRESH
    assert decide(ResetReason.CANCELLED, reused=True, method=b"PUT").action is Action.FRESH
    assert decide(None, reused=True, retried_fresh=True).action is Action.FAIL
    assert decide(None, reused=True, method=b"POST").action is Action.FAIL
    assert decide(None, reused=False).action is Action.FAIL
    assert decide(None, reused=True, replayable=False).action is Action.FAIL


def test_other_failures_answer_502() -> None:
    assert decide(ResetReason.PROTOCOL) == Decision(Action.FAIL, 502, "upstream unreachable")
    assert decide(None).undelivered is False


def test_a_request_under_which_the_connection_collapsed_is_repeated_only_if_idempotent() -> None:
    """A node died under a forwarded request, or an agent under its stream (issue 10, item 9):
    no response byte came back, but the request may have reached a service."""
    lost_remote = (ResetReason.GOING_AWAY, None)  # the node dropped or closed the connection
    for reason in lost_remote:
        assert decide(reason, remote=True, more_candidates=True).action is Action.NEXT
        # The last candidate: wait for the endpoint to come back, and never claim that no
        # service saw it (the node that forwarded it must not send it elsewhere).
        assert decide(reason, remote=True) == Decision(Action.HOLD)
        assert decide(reason, remote=True, method=b"POST").action is Action.FAIL
        assert decide(reason, remote=True, replayable=False).action is Action.FAIL
    assert decide(ResetReason.GOING_AWAY, more_candidates=True).action is Action.NEXT
    assert decide(ResetReason.GOING_AWAY, method=b"PATCH").action is Action.FAIL
    # A local service that closed its connection without answering is not asked again.
    assert decide(None, more_candidates=True).action is Action.FAIL
    assert decide(ResetReason.CANCELLED, remote=True, more_candidates=True).action is Action.FAIL
