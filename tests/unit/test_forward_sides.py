"""`pico.forward`'s two protocols, driven with bytes and fake transports (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

from pico.forward import READ_SIZE, LocalSide, WebSocketSide
from pico.mux.websocket import (
    OP_BINARY,
    OP_PING,
    OP_PONG,
    ZERO_KEY,
    ControlFrame,
    FrameDecoder,
    encode_frame,
    frame_header,
)


class KeepingTransport:
    """A transport that sends nothing: it keeps what it is given, as uvloop keeps the rest of
    a write the socket did not take (the object itself, a view included)."""

    def __init__(self, buffered: int = 0) -> None:
        self.kept: list[Any] = []
        self.buffered = buffered  # what get_write_buffer_size() reports

    def write(self, data: Any) -> None:
        self.kept.append(data)

    def writelines(self, parts: Any) -> None:
        self.kept.extend(parts)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def bridged(local_transport: KeepingTransport, ws_transport: KeepingTransport) -> WebSocketSide:
    local = LocalSide()
    local.connection_made(local_transport)  # type: ignore[arg-type]
    ws = WebSocketSide(local, lambda why: None)
    ws.transport = ws_transport  # type: ignore[assignment]
    local.bridge(ws)
    return ws


def read_into(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """What the loop does for one read of `data`."""
    buf = protocol.get_buffer(-1)
    buf[: len(data)] = data
    protocol.buffer_updated(len(data))


async def test_a_view_the_local_transport_keeps_is_not_overwritten_by_the_next_read() -> None:
    local = KeepingTransport()
    ws = bridged(local, KeepingTransport())
    first, second = b"a" * 100_000, b"b" * 100_000
    for payload in (first, second):
        read_into(ws, frame_header(OP_BINARY, len(payload), mask_key=None) + payload)
    assert [bytes(kept) for kept in local.kept] == [first, second]


async def test_a_local_read_goes_to_the_node_as_one_frame_in_one_write() -> None:
    node = KeepingTransport()
    ws = bridged(KeepingTransport(), node)
    payload = bytes(range(256)) * 1024  # over the join limit: header and payload, not joined
    read_into(ws.local, payload)
    assert len(node.kept) == 2  # one writelines() call: header and the payload's view
    assert bytes(node.kept[0]) == frame_header(OP_BINARY, len(payload), mask_key=ZERO_KEY)
    payloads, _ = FrameDecoder(expect_mask=True).feed(b"".join(bytes(p) for p in node.kept))
    assert b"".join(bytes(p) for p in payloads) == payload
    assert ws.bytes_sent == len(payload)


async def test_a_local_read_is_copied_when_the_node_transport_already_buffers() -> None:
    node = KeepingTransport(buffered=1)  # it would keep a view of the read buffer
    ws = bridged(KeepingTransport(), node)
    read_into(ws.local, b"x" * (READ_SIZE // 2))
    assert [type(part) for part in node.kept] == [bytes, bytes]


async def test_a_node_that_pings_without_reading_is_owed_only_the_last_pong() -> None:
    node = KeepingTransport()
    ws = bridged(KeepingTransport(), node)
    ws.pause_writing()  # the node does not read what we send: our buffer to it is full
    read_into(ws, b"".join(encode_frame(OP_PING, b"%d" % i, mask=False) for i in range(10_000)))
    assert node.kept == []  # no pong per ping piling up for a node that does not read
    ws.resume_writing()
    payloads, controls = FrameDecoder(expect_mask=True).feed(b"".join(map(bytes, node.kept)))
    assert payloads == [] and controls == [ControlFrame(OP_PONG, b"9999")]


async def test_tiny_frames_from_the_node_in_one_read_reach_the_local_side_in_one_write() -> None:
    local = KeepingTransport()
    ws = bridged(local, KeepingTransport())
    payload = bytes(range(256)) * 4
    read_into(
        ws, b"".join(encode_frame(OP_BINARY, payload[i : i + 1], mask=False) for i in range(1024))
    )
    assert [bytes(kept) for kept in local.kept] == [payload]  # not a write per 3-byte frame
