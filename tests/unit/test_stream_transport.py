"""`StreamTransport`: a mux stream as an asyncio transport, checked against a fake stream and
a recording protocol (what asyncio's own transports promise a protocol)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from pico.agent.inprocess import NODE_PEER, StreamTransport
from pico.mux.frame import ResetReason
from pico.mux.stream import MuxStream


class FakeStream:
    """Records what the transport asks of the stream."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.receiver: Any = None

    def accept(self) -> None:
        self.calls.append("accept")

    def set_receiver(self, receiver: Any) -> None:
        self.receiver = receiver

    def write(self, data: bytes | memoryview) -> None:
        self.calls.append(("write", bytes(data)))

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def reset(self, reason: ResetReason) -> None:
        self.calls.append(("reset", reason))

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def get_write_buffer_size(self) -> int:
        return 7


class Recorder(asyncio.Protocol):
    def __init__(self, keep_open_on_eof: bool = True) -> None:
        self.events: list[Any] = []
        self.keep_open_on_eof = keep_open_on_eof
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes
        self.events.append(data)

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self.keep_open_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", type(exc).__name__ if exc else None))
        self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")


def started(protocol: Recorder) -> tuple[StreamTransport, FakeStream, list[str]]:
    stream = FakeStream()
    done: list[str] = []
    transport = StreamTransport(cast(MuxStream, stream), protocol, lambda: done.append("done"))
    transport.start()
    assert stream.receiver is transport
    assert stream.calls == ["accept"]  # acknowledged before anything else
    stream.calls.clear()
    return transport, stream, done


async def test_bytes_held_while_paused_arrive_in_order_on_resume_then_the_eof() -> None:
    protocol = Recorder()
    transport, stream, _ = started(protocol)
    transport.data_received(b"a")
    transport.pause_reading()
    transport.data_received(memoryview(b"b"))
    transport.data_received(b"c")
    transport.eof_received()
    assert protocol.events == ["made", b"a"]
    assert not transport.is_reading()
    transport.resume_reading()
    assert protocol.events == ["made", b"a", b"b", b"c", "eof"]
    # Crediting the node stops with the pause and starts again after the held bytes.
    assert stream.calls == ["pause_reading", "resume_reading"]


async def test_eof_that_the_protocol_does_not_keep_open_closes_the_transport() -> None:
    protocol = Recorder(keep_open_on_eof=False)
    transport, stream, done = started(protocol)
    transport.eof_received()
    assert transport.is_closing()
    await protocol.lost  # on a later loop pass, as asyncio's transports do
    assert protocol.events == ["made", "eof", ("lost", None)]
    assert stream.calls == ["write_eof"]
    assert done == ["done"]


async def test_close_half_closes_and_connection_lost_comes_once() -> None:
    protocol = Recorder()
    transport, stream, done = started(protocol)
    transport.write(b"answer")
    transport.close()
    transport.close()
    transport.write(b"dropped")
    await protocol.lost
    transport.data_received(b"after close")  # answered like a closed socket: reset
    transport.connection_lost(None)  # the node's end arrives too
    assert stream.calls == [("write", b"answer"), "write_eof", ("reset", ResetReason.CANCELLED)]
    assert protocol.events == ["made", ("lost", None)]
    assert done == ["done"]


async def test_a_reset_stream_is_a_connection_reset_for_the_protocol() -> None:
    protocol = Recorder()
    transport, _, done = started(protocol)
    transport.pause_reading()
    transport.data_received(b"never delivered")
    transport.connection_lost(ResetReason.CANCELLED)
    assert protocol.events == ["made", ("lost", "ConnectionResetError")]
    assert done == ["done"]


async def test_a_clean_end_while_paused_delivers_what_is_held_first() -> None:
    protocol = Recorder()
    transport, _, _ = started(protocol)
    transport.pause_reading()
    transport.data_received(b"last")
    transport.connection_lost(None)
    assert protocol.events == ["made"]
    transport.resume_reading()
    assert protocol.events == ["made", b"last", ("lost", None)]


async def test_abort_resets_the_stream() -> None:
    protocol = Recorder()
    transport, stream, _ = started(protocol)
    transport.abort()
    await protocol.lost
    assert stream.calls == [("reset", ResetReason.CANCELLED)]
    assert protocol.events == ["made", ("lost", None)]


async def test_window_pauses_reach_the_protocol_and_the_peer_is_the_node() -> None:
    protocol = Recorder()
    transport, _, _ = started(protocol)
    transport.pause_writing()
    transport.resume_writing()
    assert protocol.events == ["made", "pause_writing", "resume_writing"]
    assert transport.get_extra_info("peername") == NODE_PEER
    assert transport.get_extra_info("sockname") is None
    assert transport.get_write_buffer_size() == 7


class Failing(Recorder):
    """A protocol with a bug: it raises in the callback named `failing`."""

    def __init__(self, failing: str) -> None:
        super().__init__()
        self.failing = failing

    def data_received(self, data: bytes) -> None:
        if self.failing == "data_received":
            raise RuntimeError("bug in data_received")
        super().data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.failing == "connection_made":
            raise RuntimeError("bug in connection_made")
        super().connection_made(transport)

    def eof_received(self) -> bool:
        if self.failing == "eof_received":
            raise RuntimeError("bug in eof_received")
        return super().eof_received()


@pytest.mark.parametrize("failing", ["data_received", "eof_received"])
@pytest.mark.parametrize("paused", [False, True])
async def test_a_protocol_that_raises_loses_its_stream_alone(failing: str, paused: bool) -> None:
    # As asyncio's transports do: the exception ends this connection (the stream is reset,
    # connection_lost(exc) follows), and never reaches the tunnel, whose other streams go on.
    protocol = Failing(failing)
    transport, stream, done = started(protocol)
    if paused:
        transport.pause_reading()
    transport.data_received(b"request")
    transport.eof_received()
    if paused:
        transport.resume_reading()
    await protocol.lost
    assert ("reset", ResetReason.CANCELLED) in stream.calls
    assert protocol.events[-1] == ("lost", "RuntimeError")
    assert done == ["done"]


async def test_a_protocol_that_raises_when_connected_loses_its_stream_alone() -> None:
    protocol = Failing("connection_made")
    stream = FakeStream()
    done: list[str] = []
    transport = StreamTransport(cast(MuxStream, stream), protocol, lambda: done.append("done"))
    transport.start()
    transport.data_received(b"request")  # answered as a closed socket would be
    await protocol.lost
    assert stream.calls[:2] == ["accept", ("reset", ResetReason.CANCELLED)]
    assert protocol.events == [("lost", "RuntimeError")]
    assert done == ["done"]
