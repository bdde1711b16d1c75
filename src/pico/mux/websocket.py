"""Sans-I/O WebSocket framing (RFC 6455) for the tunnel: handshake helpers and a frame codec.

The tunnel treats the WebSocket as a byte stream, so message boundaries do not matter: every
binary or continuation frame's payload is simply the next bytes of the stream. Control frames
(ping, pong, close) are surfaced separately. Masking uses the C helper of `websockets` when it
is installed (tens of GB/s) and a big-integer XOR otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

_c_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:  # pragma: no cover - which branch runs depends on the environment
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover
    _c_apply_mask = None

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_DATA_OPCODES = (OP_CONTINUATION, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

_SHORT = struct.Struct(">H")
_LONG = struct.Struct(">Q")


class WebSocketError(Exception):
    """The peer broke the WebSocket framing rules; the message says which."""


def apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR `data` with the 4-byte `mask` repeated."""
    if _c_apply_mask is not None:
        return _c_apply_mask(data, mask)
    n = len(data)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    value = int.from_bytes(data, "big") ^ int.from_bytes(key, "big")
    return value.to_bytes(n, "big")


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def new_key() -> str:
    """A random Sec-WebSocket-Key."""
    return base64.b64encode(os.urandom(16)).decode()


def frame_header(opcode: int, length: int, *, mask_key: bytes | None) -> bytes:
    """The header of one final frame of `length` payload bytes (with the mask key, if any)."""
    first = 0x80 | opcode
    mask_bit = 0x80 if mask_key is not None else 0
    if length < 126:
        head = bytes((first, mask_bit | length))
    elif length < 65536:
        head = bytes((first, mask_bit | 126)) + _SHORT.pack(length)
    else:
        head = bytes((first, mask_bit | 127)) + _LONG.pack(length)
    return head + mask_key if mask_key is not None else head


def encode_frame_parts(opcode: int, payload: bytes, *, mask: bool) -> tuple[bytes, bytes]:
    """One final frame as (header, payload) without joining them (no copy of a big payload)."""
    if not mask:
        return frame_header(opcode, len(payload), mask_key=None), payload
    key = os.urandom(4)
    return frame_header(opcode, len(payload), mask_key=key), apply_mask(payload, key)


def frame_pieces(
    opcode: int, pieces: list[bytes | memoryview], size: int, *, mask: bool
) -> list[bytes | memoryview]:
    """One frame whose payload is `pieces` concatenated (`size` bytes), as a list to write.

    With `mask`, each piece is masked with the key rotated to its offset in the payload, so the
    payload is never joined into one buffer.
    """
    if not mask:
        return [frame_header(opcode, size, mask_key=None), *pieces]
    key = os.urandom(4)
    out: list[bytes | memoryview] = [frame_header(opcode, size, mask_key=key)]
    offset = 0
    for piece in pieces:
        shift = offset & 3
        out.append(apply_mask(piece, key[shift:] + key[:shift] if shift else key))
        offset += len(piece)
    return out


def encode_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame carrying `payload` (masked, as a client must)."""
    head, body = encode_frame_parts(opcode, payload, mask=mask)
    return head + body


@dataclass(frozen=True, slots=True)
class ControlFrame:
    """A ping, pong or close frame (payload at most 125 bytes)."""

    opcode: int
    payload: bytes


class FrameDecoder:
    """Incremental decoder: bytes in, stream bytes and control frames out.

    `expect_mask` is true on the server side (clients must mask) and false on the client side.
    `max_frame` bounds the payload of one frame, and so the memory a peer can make us buffer.
    """

    def __init__(self, *, expect_mask: bool, max_frame: int = 16 << 20) -> None:
        self.expect_mask = expect_mask
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> tuple[list[bytes], list[ControlFrame]]:
        """Decode what `data` completes. Returns (stream payloads, control frames).

        Raises WebSocketError on a framing violation; the connection must then be closed.
        """
        # Fast path: nothing buffered, so parse `data` in place instead of copying it first.
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data
        payloads: list[bytes] = []
        controls: list[ControlFrame] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            if b0 & 0x70:
                raise WebSocketError("reserved bits set (no extension was negotiated)")
            masked = bool(b1 & 0x80)
            if masked != self.expect_mask:
                raise WebSocketError(
                    "unmasked frame from client" if self.expect_mask else "masked frame from server"
                )
            length = b1 & 0x7F
            offset = pos + 2
            if length == 126:
                if end - offset < 2:
                    break
                length = _SHORT.unpack_from(buf, offset)[0]
                offset += 2
            elif length == 127:
                if end - offset < 8:
                    break
                length = _LONG.unpack_from(buf, offset)[0]
                offset += 8
            if length > self.max_frame:
                raise WebSocketError(f"frame of {length} bytes exceeds the {self.max_frame} limit")
            key = b""
            if masked:
                if end - offset < 4:
                    break
                key = bytes(buf[offset : offset + 4])
                offset += 4
            if end - offset < length:
                break
            raw = memoryview(buf)[offset : offset + length]
            payload = apply_mask(raw, key) if masked else bytes(raw)
            raw.release()
            pos = offset + length
            if opcode in _DATA_OPCODES:
                if payload:
                    payloads.append(payload)
            elif opcode in _CONTROL_OPCODES:
                if length > 125 or not b0 & 0x80:
                    raise WebSocketError("control frame too long or fragmented")
                controls.append(ControlFrame(opcode, payload))
                if opcode == OP_CLOSE:
                    break  # nothing after a close frame is read
            elif opcode == OP_TEXT:
                raise WebSocketError("text frame on a binary tunnel")
            else:
                raise WebSocketError(f"unknown opcode {opcode:#x}")
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < end:
            self._buf = bytearray(memoryview(buf)[pos:])
        return payloads, controls
