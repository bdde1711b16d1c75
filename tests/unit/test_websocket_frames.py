"""The tunnel's WebSocket frame codec."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pico.mux.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    ZERO_KEY,
    FrameDecoder,
    WebSocketError,
    accept_key,
    apply_mask,
    encode_frame,
    frame_pieces,
)


def test_accept_key_matches_rfc_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_mask_is_an_involution() -> None:
    data = bytes(range(256)) * 3 + b"tail"
    assert apply_mask(apply_mask(data, b"\x01\x02\x03\x04"), b"\x01\x02\x03\x04") == data


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_frames_of_every_length_encoding_round_trip(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    for mask in (True, False):
        decoder = FrameDecoder(expect_mask=mask)
        payloads, controls = decoder.feed(encode_frame(OP_BINARY, payload, mask=mask))
        assert b"".join(payloads) == payload
        assert controls == []


@given(
    chunks=st.lists(st.binary(max_size=3000), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=30000), max_size=10),
)
def test_any_split_of_the_byte_stream_yields_the_same_payload(
    chunks: list[bytes], cuts: list[int]
) -> None:
    wire = b"".join(encode_frame(OP_BINARY, c, mask=True) for c in chunks)
    wire += encode_frame(OP_PING, b"hi", mask=True)
    decoder = FrameDecoder(expect_mask=True)
    got: list[bytes] = []
    pings = []
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    for a, b in itertools.pairwise(points):
        payloads, controls = decoder.feed(wire[a:b])
        got += payloads
        pings += controls
    assert b"".join(got) == b"".join(chunks)
    assert [(c.opcode, c.payload) for c in pings] == [(OP_PING, b"hi")]


@given(
    chunks=st.lists(st.binary(max_size=3000), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=30000), max_size=10),
    mask=st.booleans(),
)
def test_control_frames_between_cut_data_frames_keep_their_order(
    chunks: list[bytes], cuts: list[int], mask: bool
) -> None:
    # Data payloads are handed out piece by piece as they arrive (never reassembled), with
    # the mask key carried across cuts; pings between data frames are still seen whole.
    wire = b"".join(
        encode_frame(OP_BINARY, c, mask=mask) + encode_frame(OP_PING, b"%d" % i, mask=mask)
        for i, c in enumerate(chunks)
    )
    decoder = FrameDecoder(expect_mask=mask)
    got: list[bytes | memoryview] = []
    pings = []
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    for a, b in itertools.pairwise(points):
        payloads, controls = decoder.feed(wire[a:b])
        assert all(len(p) for p in payloads)
        got += payloads
        pings += controls
    assert b"".join(got) == b"".join(chunks)
    assert [c.payload for c in pings] == [b"%d" % i for i in range(len(chunks))]


def test_unmasked_pieces_are_views_that_never_change() -> None:
    wire = bytearray(encode_frame(OP_BINARY, b"x" * 1000, mask=False))
    decoder = FrameDecoder(expect_mask=False)
    first, _ = decoder.feed(wire[:500])
    wire[:] = b"\0" * len(wire)  # the caller reuses its buffer
    assert bytes(first[0]) == b"x" * (500 - 4)
    payloads, _ = decoder.feed(bytes(encode_frame(OP_BINARY, b"y" * 10, mask=False)))
    assert isinstance(payloads[0], memoryview) and payloads[0].readonly


def test_nothing_after_a_close_frame_is_decoded() -> None:
    decoder = FrameDecoder(expect_mask=False)
    wire = encode_frame(OP_CLOSE, b"\x03\xe8", mask=False) + encode_frame(
        OP_BINARY, b"late", mask=False
    )
    payloads, controls = decoder.feed(wire[:3])
    assert (payloads, controls) == ([], [])
    payloads, controls = decoder.feed(wire[3:])
    assert payloads == [] and [c.opcode for c in controls] == [OP_CLOSE]
    assert decoder.feed(encode_frame(OP_BINARY, b"more", mask=False)) == ([], [])


def test_unmasked_client_frame_is_rejected() -> None:
    with pytest.raises(WebSocketError, match="unmasked"):
        FrameDecoder(expect_mask=True).feed(encode_frame(OP_BINARY, b"x", mask=False))


def test_text_frames_and_reserved_bits_are_rejected() -> None:
    with pytest.raises(WebSocketError, match="text"):
        FrameDecoder(expect_mask=False).feed(b"\x81\x01a")
    with pytest.raises(WebSocketError, match="reserved"):
        FrameDecoder(expect_mask=False).feed(b"\xc2\x01a")


def test_oversized_frame_is_rejected_before_buffering_it() -> None:
    decoder = FrameDecoder(expect_mask=False, max_frame=1024)
    with pytest.raises(WebSocketError, match="exceeds"):
        decoder.feed(b"\x82\x7e\x10\x00")


def test_close_frame_stops_decoding() -> None:
    decoder = FrameDecoder(expect_mask=False)
    wire = encode_frame(OP_CLOSE, b"\x03\xe8", mask=False) + encode_frame(
        OP_BINARY, b"x", mask=False
    )
    payloads, controls = decoder.feed(wire)
    assert payloads == [] and [c.opcode for c in controls] == [OP_CLOSE]


@given(pieces=st.lists(st.binary(max_size=300), min_size=1, max_size=12))
def test_frame_built_from_pieces_equals_one_masked_frame(pieces: list[bytes]) -> None:
    size = sum(map(len, pieces))
    wire = b"".join(frame_pieces(OP_BINARY, list(pieces), size, mask=True))
    payloads, _ = FrameDecoder(expect_mask=True).feed(wire)
    assert b"".join(payloads) == b"".join(pieces)
    wire = b"".join(frame_pieces(OP_BINARY, list(pieces), size, mask=False))
    payloads, _ = FrameDecoder(expect_mask=False).feed(wire)
    assert b"".join(payloads) == b"".join(pieces)


def test_a_close_frame_completed_from_the_buffer_ends_decoding() -> None:
    decoder = FrameDecoder(expect_mask=False)
    close = encode_frame(OP_CLOSE, b"\x03\xe8", mask=False)
    after = encode_frame(OP_BINARY, b"z" * 300, mask=False)  # longer than the head window
    assert decoder.feed(close[:1]) == ([], [])
    payloads, controls = decoder.feed(close[1:] + after)
    assert payloads == [] and [c.opcode for c in controls] == [OP_CLOSE]


def test_zero_key_frames_are_handed_out_as_views() -> None:
    # An agent's default frames: masked with the all-zero key, so nothing is unmasked (copied).
    wire = encode_frame(OP_BINARY, b"payload", mask=True, random_key=False)
    assert wire[2:6] == ZERO_KEY
    payloads, _ = FrameDecoder(expect_mask=True).feed(wire)
    assert [type(p) for p in payloads] == [memoryview] and bytes(payloads[0]) == b"payload"
