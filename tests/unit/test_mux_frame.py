"""Specification of the yamux wire format helpers."""

from __future__ import annotations

import struct

import pytest

from pico.mux.frame import (
    HEADER,
    HEADER_SIZE,
    Flags,
    FrameType,
    GoAwayCode,
    MuxProtocolError,
    ResetReason,
    decode_header,
    encode_header,
)


def test_header_is_twelve_bytes_big_endian() -> None:
    assert HEADER_SIZE == 12
    assert HEADER.format == ">BBHII"
    assert encode_header(FrameType.DATA, Flags.SYN | Flags.FIN, 0x01020304, 0x0A0B0C0D) == bytes(
        [0, 0, 0, 5, 1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0x0D]
    )


def test_encode_then_decode_round_trips() -> None:
    raw = encode_header(FrameType.WINDOW_UPDATE, Flags.ACK, 7, 65536)
    assert decode_header(raw) == (0, 1, 2, 7, 65536)
    assert decode_header(b"xx" + raw, 2) == (0, 1, 2, 7, 65536)


def test_frame_type_values_match_yamux_spec() -> None:
    assert [int(t) for t in FrameType] == [0, 1, 2, 3]
    assert int(FrameType.PING) == 2 and int(FrameType.GO_AWAY) == 3


def test_flag_values_match_yamux_spec() -> None:
    assert (Flags.SYN, Flags.ACK, Flags.FIN, Flags.RST) == (1, 2, 4, 8)


def test_go_away_codes_match_yamux_spec() -> None:
    assert (GoAwayCode.NORMAL, GoAwayCode.PROTOCOL_ERROR, GoAwayCode.INTERNAL_ERROR) == (0, 1, 2)


def test_reset_reasons_fit_in_one_byte_and_are_stable() -> None:
    assert {r.name: int(r) for r in ResetReason} == {
        "NORMAL": 0,
        "REFUSED": 1,
        "TIMEOUT": 2,
        "UNREACHABLE": 3,
        "PROTOCOL": 4,
        "GOING_AWAY": 5,
        "CANCELLED": 6,
        "REJECTED": 7,
        "UNACKNOWLEDGED": 8,
    }


def test_encode_rejects_out_of_range_fields() -> None:
    with pytest.raises(struct.error):
        encode_header(FrameType.DATA, 0, 2**32, 0)


def test_protocol_error_is_an_exception_carrying_the_broken_rule() -> None:
    err = MuxProtocolError("unknown frame type 9")
    assert isinstance(err, Exception)
    assert "unknown frame type" in str(err)
