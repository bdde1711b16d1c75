"""`WebSocketBridge`: a /_pico/v1/tcp WebSocket on one side, a tunnel stream on the other."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import pytest

from pico.http.channel import ResetReason
from pico.mux.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameDecoder,
    accept_key,
    encode_frame,
)
from pico.server.tcp import State, TcpRecord, WebSocketBridge

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
HEAD = (
    b"GET /_pico/v1/tcp/my-db HTTP/1.1\r\nHost: node\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY.encode() + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\nX-Forwarded-For: 10.1.2.3\r\n\r\n"
)


class FakeStream:
    """What the bridge does to its stream, recorded."""

    def __init__(self) -> None:
        self.receiver: object = None
        self.sent = bytearray()
        self.eof = False
        self.reset_reason: ResetReason | None = None
        self.paused = False
        self.acknowledged = False  # the agent's ACK arrived (its service connection is up)
        self.on_accepted: Callable[[], None] | None = None

    @property
    def closed(self) -> bool:
        return self.reset_reason is not None

    def when_accepted(self, callback: Callable[[], None]) -> bool:
        if self.acknowledged:
            return False
        self.on_accepted = callback
        return True

    def acknowledge(self) -> None:
        """The agent's ACK arrives."""
        self.acknowledged = True
        callback, self.on_accepted = self.on_accepted, None
        if callback is not None:
            callback()

    def set_receiver(self, receiver: object) -> None:
        self.receiver = receiver

    def write(self, data: bytes | memoryview) -> None:
        self.sent += data

    def write_eof(self) -> None:
        self.eof = True

    def reset(self, reason: ResetReason = ResetReason.CANCELLED) -> None:
        self.reset_reason = reason

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Client:
    """The engine's receiver: what reaches the client."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = False
        self.lost_reason: ResetReason | None = None
        self.paused = False

    def data_received(self, data: bytes | memoryview) -> None:
        self.data += data

    def eof_received(self) -> None:
        raise AssertionError("a WebSocket ends with Close frames, not a bare FIN")

    def connection_lost(self, reason: ResetReason | None) -> None:
        self.lost = True
        self.lost_reason = reason

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


class Observer:
    def __init__(self) -> None:
        self.opened = 0
        self.records: list[TcpRecord] = []

    def tcp_opened(self) -> None:
        self.opened += 1

    def tcp_closed(self, record: TcpRecord) -> None:
        self.records.append(record)


async def opened() -> tuple[WebSocketBridge, FakeStream, Client, Observer]:
    stream, client, observer = FakeStream(), Client(), Observer()
    bridge = WebSocketBridge(stream, "my-db", observer)  # type: ignore[arg-type]
    bridge.set_receiver(client)
    bridge.write(HEAD)
    stream.acknowledge()  # the agent reached the service
    assert client.data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: " + accept_key(KEY).encode() in client.data
    client.data.clear()
    return bridge, stream, client, observer


def frames_to_client(client: Client) -> list[tuple[str, bytes]]:
    payloads, controls = FrameDecoder(expect_mask=False).feed(bytes(client.data))
    out = [("data", b"".join(payloads))] if payloads else []
    return out + [(f"op{c.opcode}", c.payload) for c in controls]


async def test_client_frames_become_stream_bytes_however_they_are_cut() -> None:
    bridge, stream, _, _ = await opened()
    wire = encode_frame(OP_BINARY, b"hello ", mask=True) + encode_frame(
        OP_BINARY, b"world", mask=True
    )
    for i in range(len(wire)):
        bridge.write(wire[i : i + 1])
    assert bytes(stream.sent) == b"hello world"


async def test_stream_bytes_go_to_the_client_as_binary_frames() -> None:
    bridge, _, client, _ = await opened()
    bridge.data_received(memoryview(b"answer"))
    assert frames_to_client(client) == [("data", b"answer")]


async def test_ping_is_answered_with_pong() -> None:
    bridge, stream, client, _ = await opened()
    bridge.write(encode_frame(OP_PING, b"are you there", mask=True))
    assert frames_to_client(client) == [(f"op{OP_PONG}", b"are you there")]
    assert stream.sent == b""


async def test_client_close_half_closes_and_the_service_may_still_answer() -> None:
    bridge, stream, client, observer = await opened()
    bridge.write(encode_frame(OP_BINARY, b"query", mask=True))
    bridge.write(encode_frame(OP_CLOSE, struct.pack(">H", 1000), mask=True))
    assert stream.eof and not client.lost
    bridge.data_received(b"late answer")
    bridge.eof_received()
    assert frames_to_client(client) == [
        ("data", b"late answer"),
        (f"op{OP_CLOSE}", struct.pack(">H", 1000)),
    ]
    assert client.lost and bridge.state is State.CLOSED
    assert observer.records == [
        TcpRecord("my-db", "10.1.2.3", 5, 11, observer.records[0].duration, "closed")
    ]


async def test_service_eof_sends_close_and_the_client_may_still_send() -> None:
    bridge, stream, client, _ = await opened()
    bridge.eof_received()
    assert frames_to_client(client) == [(f"op{OP_CLOSE}", struct.pack(">H", 1000))]
    assert not client.lost
    bridge.write(encode_frame(OP_BINARY, b"more", mask=True))
    assert bytes(stream.sent) == b"more"
    bridge.write_eof()  # the client's FIN
    assert stream.eof and client.lost


async def test_a_service_that_cannot_be_reached_closes_with_1011_and_a_reason() -> None:
    bridge, _, client, observer = await opened()
    bridge.connection_lost(ResetReason.REFUSED)
    assert frames_to_client(client) == [
        (f"op{OP_CLOSE}", struct.pack(">H", 1011) + b"upstream unreachable")
    ]
    assert client.lost
    assert observer.opened == 1 and observer.records[0].reason == "refused"


async def test_an_unmasked_client_frame_is_a_protocol_error() -> None:
    bridge, stream, client, _ = await opened()
    bridge.write(encode_frame(OP_BINARY, b"x", mask=False))
    [(op, payload)] = frames_to_client(client)
    assert (op, payload[:2]) == (f"op{OP_CLOSE}", struct.pack(">H", 1002))
    assert stream.reset_reason is ResetReason.PROTOCOL and client.lost


async def test_an_http_request_gets_400_endpoint_is_tcp_and_nothing_reaches_the_service() -> None:
    stream, client = FakeStream(), Client()
    bridge = WebSocketBridge(stream, "my-db")  # type: ignore[arg-type]
    bridge.set_receiver(client)
    bridge.write(b"GET / HTTP/1.1\r\nHost: my-db.example.com\r\n\r\n")
    await asyncio.sleep(0)
    assert client.data.startswith(b"HTTP/1.1 400 ")
    assert b'{"error":"endpoint is tcp"}' in client.data
    assert stream.sent == b"" and stream.reset_reason is ResetReason.NORMAL
    assert client.lost


async def test_backpressure_passes_both_ways() -> None:
    bridge, stream, client, _ = await opened()
    bridge.pause_writing()  # the stream's window is full: stop reading the client
    assert client.paused
    bridge.resume_writing()
    assert not client.paused
    bridge.pause_reading()  # the client is slow: stop crediting the service
    assert stream.paused
    bridge.resume_reading()
    assert not stream.paused


async def test_the_101_waits_until_the_agent_acknowledges_the_stream() -> None:
    stream, client, observer = FakeStream(), Client(), Observer()
    bridge = WebSocketBridge(stream, "my-db", observer)  # type: ignore[arg-type]
    bridge.set_receiver(client)
    bridge.write(HEAD + encode_frame(OP_BINARY, b"early", mask=True))
    for _ in range(3):
        await asyncio.sleep(0)  # loop passes: nothing is answered before the agent's ACK
    assert client.data == b"" and bridge.state is State.CONNECTING
    assert observer.opened == 0 and stream.sent == b""
    stream.acknowledge()
    assert client.data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert bytes(stream.sent) == b"early"  # what followed the head, once open
    assert observer.opened == 1 and bridge.state is State.OPEN


@pytest.mark.parametrize(
    "reason",
    [ResetReason.REFUSED, ResetReason.UNREACHABLE, ResetReason.TIMEOUT],
    ids=lambda r: r.name.lower(),
)
async def test_a_dial_failure_before_the_ack_reaches_the_engine_as_its_reason(
    reason: ResetReason,
) -> None:
    stream, client, observer = FakeStream(), Client(), Observer()
    bridge = WebSocketBridge(stream, "my-db", observer)  # type: ignore[arg-type]
    bridge.set_receiver(client)
    bridge.write(HEAD)
    bridge.connection_lost(reason)  # the agent's RST, before any ACK
    # No 101 and no Close frame: the engine answers (another upstream, or 502/504).
    assert client.data == b"" and client.lost and client.lost_reason is reason
    assert bridge.state is State.CLOSED
    assert observer.opened == 0 and observer.records == []


async def test_an_agent_that_acknowledged_at_once_gets_the_101_on_the_next_loop_pass() -> None:
    stream, client = FakeStream(), Client()
    stream.acknowledged = True  # an agent that does not wait for its dial
    bridge = WebSocketBridge(stream, "my-db")  # type: ignore[arg-type]
    bridge.set_receiver(client)
    bridge.write(HEAD)
    assert client.data == b""  # the engine is still sending the request
    await asyncio.sleep(0)
    assert client.data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


async def test_a_client_gone_while_the_agent_dials_resets_the_stream() -> None:
    stream, client, observer = FakeStream(), Client(), Observer()
    bridge = WebSocketBridge(stream, "my-db", observer)  # type: ignore[arg-type]
    bridge.set_receiver(client)
    bridge.write(HEAD)
    bridge.reset(ResetReason.CANCELLED)
    assert stream.reset_reason is ResetReason.CANCELLED and bridge.state is State.CLOSED
    stream.acknowledge()  # too late: nothing is answered
    assert client.data == b"" and observer.opened == 0


class LinesClient(Client):
    """A receiver that also takes several pieces at once (as the proxy engine's splice does)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []  # pieces per call: 1 for data_received

    def data_received(self, data: bytes | memoryview) -> None:
        self.calls.append(1)
        super().data_received(data)

    def writelines(self, parts: tuple[bytes | memoryview, ...]) -> None:
        self.calls.append(len(parts))
        for part in parts:
            self.data += part


async def test_a_big_service_chunk_reaches_the_client_as_header_and_payload_in_one_call() -> None:
    stream, client = FakeStream(), LinesClient()
    bridge = WebSocketBridge(stream, "my-db")  # type: ignore[arg-type]
    bridge.set_receiver(client)
    bridge.write(HEAD)
    stream.acknowledge()
    client.data.clear()
    client.calls.clear()
    big, small = bytes(range(256)) * 400, b"tiny"  # over and under the join limit
    bridge.data_received(memoryview(big))
    bridge.data_received(small)
    assert client.calls == [2, 1]  # never the header alone: one syscall each
    assert frames_to_client(client) == [("data", big + small)]


async def test_a_client_that_pings_without_reading_is_owed_only_the_last_pong() -> None:
    bridge, _, client, _ = await opened()
    bridge.pause_reading()  # the client's write buffer is full: it does not read
    bridge.write(b"".join(encode_frame(OP_PING, b"%d" % i, mask=True) for i in range(10_000)))
    assert client.data == b""  # no pong per ping piling up for a client that does not read
    bridge.resume_reading()
    assert frames_to_client(client) == [(f"op{OP_PONG}", b"9999")]


class CountingStream(FakeStream):
    """A stream that also counts the bridge's writes (each is a tunnel frame, and a write to
    the service on the agent's side)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.writes += 1
        super().write(data)


def open_bridge(stream: CountingStream) -> WebSocketBridge:
    """A bridge on `stream`, past its 101."""
    bridge = WebSocketBridge(stream, "my-db")  # type: ignore[arg-type]
    bridge.set_receiver(Client())
    bridge.write(HEAD)
    stream.acknowledge()
    return bridge


async def test_many_tiny_client_frames_in_one_read_reach_the_stream_in_one_write() -> None:
    stream = CountingStream()
    bridge = open_bridge(stream)
    payload = bytes(range(256)) * 4
    bridge.write(
        b"".join(encode_frame(OP_BINARY, payload[i : i + 1], mask=True) for i in range(1024))
    )
    assert bytes(stream.sent) == payload
    assert stream.writes == 1  # not one per 7-byte client frame


async def test_big_client_frames_reach_the_stream_as_they_are() -> None:
    stream = CountingStream()
    bridge = open_bridge(stream)
    big = bytes(range(256)) * 256  # 64 KiB: over the join limit, never copied to be joined
    bridge.write(b"".join(encode_frame(OP_BINARY, p, mask=True) for p in (b"a", big, b"b", b"c")))
    assert bytes(stream.sent) == b"a" + big + b"bc"
    assert stream.writes == 3
