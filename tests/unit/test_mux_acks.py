"""Specification of AckWatch: when a stream the peer has not acknowledged is given up."""

from __future__ import annotations

from pico.mux.acks import AckWatch


def test_a_stream_is_given_up_after_the_timeout_of_silence() -> None:
    watch = AckWatch()
    watch.opened(2)
    assert watch.tick(lambda sid: True) == []  # half a timeout
    assert watch.tick(lambda sid: True) == []  # a timeout, but opened mid-period
    assert watch.tick(lambda sid: True) == [2]
    assert not watch.responsive and not watch.waiting
    watch.heard = True  # the peer sent something: back in rotation
    assert watch.responsive
    watch.tick(lambda sid: True)
    assert watch.responsive


def test_a_peer_that_talks_keeps_its_unacknowledged_streams() -> None:
    watch = AckWatch()
    watch.opened(2)
    for _ in range(10):
        watch.heard = True
        assert watch.tick(lambda sid: True) == []
    assert list(watch.waiting) == [(2, 0)] and watch.responsive
    # Then it goes silent: a timeout later, the stream is given up.
    assert watch.tick(lambda sid: True) == []
    assert watch.tick(lambda sid: True) == [2]


def test_acknowledged_or_closed_streams_are_forgotten() -> None:
    watch = AckWatch()
    watch.opened(2)
    watch.opened(4)
    assert watch.tick(lambda sid: sid == 4) == []
    assert list(watch.waiting) == [(4, 0)]
    assert watch.tick(lambda sid: False) == []
    assert not watch.waiting and watch.responsive


def test_only_streams_old_enough_are_given_up() -> None:
    watch = AckWatch()
    watch.opened(2)
    watch.tick(lambda sid: True)
    watch.opened(4)  # half a timeout younger
    watch.tick(lambda sid: True)
    assert watch.tick(lambda sid: True) == [2]
    assert watch.tick(lambda sid: True) == [4]
