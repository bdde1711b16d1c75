"""Sealing gossip messages: tampering, old timestamps, foreign and rotated keys."""

from __future__ import annotations

import base64
import os

import pytest

from pico.gossip.seal import Keyring, SealError, parse_key

K1, K2, K3 = os.urandom(32), os.urandom(16), os.urandom(24)
NOW = 1_800_000_000.0
MSG = b"\x01" + b"a gossip payload"


def reason(ring: Keyring, data: bytes, now: float = NOW) -> str:
    with pytest.raises(SealError) as err:
        ring.open(data, now)
    return err.value.reason


def test_a_sealed_message_opens_with_the_same_key_only() -> None:
    sealed = Keyring([K1], "node-a").seal(MSG, NOW)
    assert Keyring([K1], "node-b").open(sealed, NOW) == MSG
    assert MSG not in sealed  # encrypted, not only signed
    assert reason(Keyring([K2], "node-b"), sealed) == "bad_seal"


def test_any_byte_tampered_is_refused() -> None:
    ring = Keyring([K1], "node-a")
    sealed = ring.seal(MSG, NOW)
    for i in range(len(sealed)):
        forged = bytearray(sealed)
        forged[i] ^= 0x01
        with pytest.raises(SealError):
            ring.open(bytes(forged), NOW)


def test_the_same_message_seals_differently_each_time() -> None:
    ring = Keyring([K1], "node-a")
    assert ring.seal(MSG, NOW) != ring.seal(MSG, NOW)  # a fresh nonce per message


def test_old_or_future_timestamps_are_refused() -> None:
    ring = Keyring([K1], "node-a")
    sealed = ring.seal(MSG, NOW)
    assert ring.open(sealed, NOW + 29) == MSG
    assert reason(ring, sealed, NOW + 31) == "stale"  # a replay, later
    assert reason(ring, sealed, NOW - 31) == "stale"


def test_unsealed_and_truncated_messages_are_refused() -> None:
    ring = Keyring([K1], "node-a")
    assert reason(ring, MSG) == "unsealed"
    assert reason(ring, b"") == "unsealed"
    assert reason(ring, ring.seal(MSG, NOW)[:30]) == "unsealed"


def test_keys_rotate_without_a_gap() -> None:
    old, both, new = Keyring([K1], "a"), Keyring([K1, K2], "b"), Keyring([K2, K1], "c")
    assert both.open(old.seal(MSG, NOW), NOW) == MSG  # step 1: new key added second
    assert old.open(both.seal(MSG, NOW), NOW) == MSG  # ... still sealing with the old one
    assert both.open(new.seal(MSG, NOW), NOW) == MSG  # step 2: new key first
    assert reason(old, new.seal(MSG, NOW)) == "bad_seal"  # a node without it is not heard
    assert Keyring([K2], "d").open(new.seal(MSG, NOW), NOW) == MSG  # step 3: old key dropped


def test_keys_are_base64_of_16_24_or_32_bytes() -> None:
    for key in (K1, K2, K3):
        assert parse_key(base64.b64encode(key).decode()) == key
    for bad, why in [("not base64!", "base64"), (base64.b64encode(b"x" * 20).decode(), "20")]:
        with pytest.raises(ValueError, match=why):
            parse_key(bad)


def test_a_forwarding_proof_holds_for_its_request_only() -> None:
    ring = Keyring([K1], "node-a")
    mark = ring.forward_mark(b"POST", b"/pay?x=1", NOW)
    other = Keyring([K1], "node-b")
    assert other.forwarded_by_member(mark, b"POST", b"/pay?x=1", NOW + 5)
    assert not other.forwarded_by_member(mark, b"GET", b"/pay?x=1", NOW)
    assert not other.forwarded_by_member(mark, b"POST", b"/pay?x=2", NOW)
    assert not other.forwarded_by_member(mark, b"POST", b"/pay?x=1", NOW + 31)  # replayed later
    assert not Keyring([K2], "c").forwarded_by_member(mark, b"POST", b"/pay?x=1", NOW)
    for forged in (b"true", b"", b"v1.node-a.1.00", mark.replace(b"node-a", b"node-x")):
        assert not other.forwarded_by_member(forged, b"POST", b"/pay?x=1", NOW), forged
    assert Keyring([K2, K1], "d").forwarded_by_member(mark, b"POST", b"/pay?x=1", NOW)
