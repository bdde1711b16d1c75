"""Yamux wire format: frame header layout, frame types, flags and error codes.

Every frame starts with a 12-byte big-endian header ``version, type, flags, stream_id,
length`` (see hashicorp/yamux ``spec.md``). Pico adds one extension: a DATA frame with the
RST flag may carry a single payload byte holding a :class:`ResetReason`.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "PROTOCOL_VERSION",
    "Flags",
    "FrameType",
    "GoAwayCode",
    "MuxProtocolError",
    "ResetReason",
    "decode_header",
    "encode_header",
]

PROTOCOL_VERSION = 0
HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size  # 12


class FrameType(IntEnum):
    """The frame ``type`` field."""

    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flags(IntFlag):
    """Bits of the frame ``flags`` field."""

    NONE = 0
    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


class GoAwayCode(IntEnum):
    """The ``length`` field of a GO_AWAY frame."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class ResetReason(IntEnum):
    """Why a stream was reset (the optional payload byte of an RST DATA frame)."""

    NORMAL = 0
    REFUSED = 1  # the local service refused the connection
    TIMEOUT = 2  # connecting to the local service timed out
    UNREACHABLE = 3  # any other dial error
    PROTOCOL = 4
    GOING_AWAY = 5  # the session closed under the stream (it may have reached a service)
    CANCELLED = 6
    REJECTED = 7  # refused before reaching any service (the peer is going away): safe to retry
    # Never on the wire: the peer did not acknowledge the stream in time (it never read the
    # SYN, so nothing reached a service), and this side reset it: safe to retry.
    UNACKNOWLEDGED = 8


class MuxProtocolError(Exception):
    """The peer broke a framing or flow-control rule; the message names the rule."""


def encode_header(type: int, flags: int, stream_id: int, length: int) -> bytes:
    """Pack one 12-byte frame header. Raises ``struct.error`` if a field is out of range."""
    return HEADER.pack(PROTOCOL_VERSION, type, flags, stream_id, length)


def decode_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, ...]:
    """Unpack ``(version, type, flags, stream_id, length)`` from ``data`` at ``offset``.

    Raises ``struct.error`` if fewer than 12 bytes are available. No validation is done.
    """
    return HEADER.unpack_from(data, offset)
