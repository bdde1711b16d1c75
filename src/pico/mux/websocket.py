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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_c_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:  # pragma: no cover - which branch runs depends on the environment
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover
    _c_apply_mask = None

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# The mask key of an agent that does not mask with random keys (the default; `server.mask_frames`
# turns random keys on). XOR with zeros is the identity, so neither side copies the payload to
# mask or unmask it: about a tenth of the CPU a relayed megabyte costs. Random keys exist so that
# a script in a browser cannot choose the bytes a WebSocket-unaware transparent proxy sees; the
# agent is not a browser, its payload comes from the operator's own service, and over TLS no
# proxy sees the bytes at all.
ZERO_KEY = b"\0\0\0\0"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_DATA_OPCODES = (OP_CONTINUATION, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

# The longest frame start ever buffered: a 14-byte header and a 125-byte control payload.
_LONGEST_START = 14 + 125

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


def handshake_problem(method: bytes, headers: Mapping[str, str]) -> str | None:
    """What makes an upgrade to a WebSocket no valid opening handshake, or None: its method
    and its Sec-WebSocket-Version and -Key (RFC 6455 §4.2.1). `headers` are by lower-cased
    name (only the sec-websocket-* ones are read)."""
    if method != b"GET":
        return "expected GET for a WebSocket upgrade"
    if headers.get("sec-websocket-version", "") != "13":
        return "unsupported Sec-WebSocket-Version (expected 13)"
    key = headers.get("sec-websocket-key")
    if not key:
        return "missing Sec-WebSocket-Key"
    try:
        nonce = base64.b64decode(key, validate=True)
    except ValueError:  # binascii.Error, or not ASCII
        nonce = b""
    if len(nonce) != 16:
        return "invalid Sec-WebSocket-Key (expected 16 bytes in base64)"
    return None


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


def encode_frame_parts(
    opcode: int, payload: bytes, *, mask: bool, random_key: bool = True
) -> tuple[bytes, bytes]:
    """One final frame as (header, payload) without joining them (no copy of a big payload).

    With `mask` and not `random_key`, the frame is masked with the all-zero key: well-formed
    for any WebSocket peer or proxy, and neither side touches the payload (see ZERO_KEY).
    """
    if not mask:
        return frame_header(opcode, len(payload), mask_key=None), payload
    if not random_key:
        return frame_header(opcode, len(payload), mask_key=ZERO_KEY), payload
    key = os.urandom(4)
    return frame_header(opcode, len(payload), mask_key=key), apply_mask(payload, key)


def frame_pieces(
    opcode: int,
    pieces: list[bytes | memoryview],
    size: int,
    *,
    mask: bool,
    random_key: bool = True,
) -> list[bytes | memoryview]:
    """One frame whose payload is `pieces` concatenated (`size` bytes), as a list to write.

    With `mask`, each piece is masked with the key rotated to its offset in the payload, so the
    payload is never joined into one buffer; without `random_key` the key is ZERO_KEY and the
    pieces go out as they are.
    """
    if not mask or not random_key:
        return [frame_header(opcode, size, mask_key=ZERO_KEY if mask else None), *pieces]
    key = os.urandom(4)
    out: list[bytes | memoryview] = [frame_header(opcode, size, mask_key=key)]
    offset = 0
    for piece in pieces:
        shift = offset & 3
        out.append(apply_mask(piece, key[shift:] + key[:shift] if shift else key))
        offset += len(piece)
    return out


def encode_frame(opcode: int, payload: bytes, *, mask: bool, random_key: bool = True) -> bytes:
    """One final frame carrying `payload` (masked, as a client must)."""
    head, body = encode_frame_parts(opcode, payload, mask=mask, random_key=random_key)
    return head + body


def join_small(pieces: list[bytes | memoryview], limit: int) -> list[bytes | memoryview]:
    """`pieces` (what one `FrameDecoder.feed` gave) with each run of pieces under `limit`
    bytes joined into one: a peer's tiny frames (3 to 7 bytes on the wire each) must not cost
    a write each where the bytes go. A piece of `limit` bytes or more goes on as it is
    (joining would copy it)."""
    out: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = []
    for piece in pieces:
        if len(piece) < limit:
            run.append(piece)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else b"".join(run))
            run = []
        out.append(piece)
    if run:
        out.append(run[0] if len(run) == 1 else b"".join(run))
    return out


@dataclass(frozen=True, slots=True)
class ControlFrame:
    """A ping, pong or close frame (payload at most 125 bytes)."""

    opcode: int
    payload: bytes


class PongCoalescer:
    """Which pings are answered now: every one while the peer reads what we send, and while
    it does not (our writes to it are paused) only the most recent, once it reads again
    (RFC 6455 §5.5.3 allows that). So a peer that pings without reading costs at most one
    held payload (125 bytes), not a pong per ping queued in our write buffer.
    """

    __slots__ = ("_held", "paused")

    def __init__(self) -> None:
        self.paused = False
        self._held: bytes | None = None

    def ping(self, payload: bytes) -> bytes | None:
        """A ping arrived: the payload to answer with now, or None (held until `resume`)."""
        if self.paused:
            self._held = payload
            return None
        return payload

    def pause(self) -> None:
        """Our writes to the peer are paused: hold pongs."""
        self.paused = True

    def resume(self) -> bytes | None:
        """Writes flow again: the payload of the pong still owed, if any."""
        self.paused = False
        held, self._held = self._held, None
        return held


class FrameDecoder:
    """Incremental decoder: bytes in, stream bytes and control frames out.

    `expect_mask` is true on the server side (clients must mask) and false on the client side.
    `max_frame` bounds the payload of one frame. A data frame's payload is handed out as it
    arrives, piece by piece (unmasked as it goes), so a big frame is never reassembled:
    unmasked pieces are views on the bytes given to `feed` (no copy at all). Only a cut
    header or control frame (at most 139 bytes) is ever buffered.
    """

    def __init__(self, *, expect_mask: bool, max_frame: int = 16 << 20) -> None:
        self.expect_mask = expect_mask
        self.max_frame = max_frame
        self._buf = bytearray()  # a cut header or control frame
        self._left = 0  # payload bytes of the current data frame still to come
        self._key: bytes | None = None  # its mask key, rotated to the next byte's offset
        self._closed = False  # a close frame was read: nothing after it is

    def feed(self, data: bytes | memoryview) -> tuple[list[bytes | memoryview], list[ControlFrame]]:
        """Decode what `data` completes. Returns (stream payload pieces, control frames).

        Raises WebSocketError on a framing violation; the connection must then be closed.
        """
        payloads: list[bytes | memoryview] = []
        controls: list[ControlFrame] = []
        if self._closed or not data:
            return payloads, controls
        view = memoryview(data)
        if not view.readonly:  # pieces are views on `data`: it must not change under them
            view = memoryview(bytes(view))
        buf = self._buf
        if buf:
            # Complete the cut frame start from the front of `data`, decode the joined bytes,
            # then go on in `data` itself.
            have = len(buf)
            take = min(len(view), _LONGEST_START - have)
            head = bytes(buf) + view[:take]
            used = self._decode(memoryview(head), payloads, controls)
            if used <= have:  # still incomplete: all of `data` fits in the buffer
                buf[have:] = view[:take]
                return payloads, controls
            buf.clear()
            if self._closed:
                return payloads, controls  # the close frame was completed: nothing after it
            view = view[used - have :]
        used = self._decode(view, payloads, controls)
        if used < len(view) and not self._closed:
            buf += view[used:]
        return payloads, controls

    def _decode(
        self, view: memoryview, payloads: list[bytes | memoryview], controls: list[ControlFrame]
    ) -> int:
        """Decode frames from `view`; return the bytes used (a cut frame start is not)."""
        pos = 0
        end = len(view)
        while pos < end:
            left = self._left
            if left:
                n = end - pos
                if n > left:
                    n = left
                piece = view[pos : pos + n]
                key = self._key
                if key is None:
                    payloads.append(piece)
                else:
                    payloads.append(apply_mask(piece, key))
                    shift = n & 3
                    if shift:
                        self._key = key[shift:] + key[:shift]
                self._left = left - n
                pos += n
                continue
            if end - pos < 2:
                break
            b0 = view[pos]
            b1 = view[pos + 1]
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
                length = _SHORT.unpack_from(view, offset)[0]
                offset += 2
            elif length == 127:
                if end - offset < 8:
                    break
                length = _LONG.unpack_from(view, offset)[0]
                offset += 8
            if length > self.max_frame:
                raise WebSocketError(f"frame of {length} bytes exceeds the {self.max_frame} limit")
            key = None
            if masked:
                if end - offset < 4:
                    break
                key = bytes(view[offset : offset + 4])
                offset += 4
                if key == ZERO_KEY:
                    key = None  # XOR with zeros: hand the payload out as it is
            if opcode in _DATA_OPCODES:
                pos = offset
                self._left = length
                self._key = key
            elif opcode in _CONTROL_OPCODES:
                if length > 125 or not b0 & 0x80:
                    raise WebSocketError("control frame too long or fragmented")
                if end - offset < length:
                    break
                raw = view[offset : offset + length]
                pos = offset + length
                payload = apply_mask(raw, key) if key is not None else bytes(raw)
                controls.append(ControlFrame(opcode, payload))
                if opcode == OP_CLOSE:
                    self._closed = True  # nothing after a close frame is read
                    return end
            elif opcode == OP_TEXT:
                raise WebSocketError("text frame on a binary tunnel")
            else:
                raise WebSocketError(f"unknown opcode {opcode:#x}")
        return pos
