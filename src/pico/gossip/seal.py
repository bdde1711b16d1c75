"""Sealing gossip messages with the cluster's keys: AES-GCM, sans-I/O (time is passed in).

With `gossip.secret_keys` set, every UDP packet and every TCP join/leave message is sealed:

    0xA5 | version 1 | message type | timestamp (ms, 8 bytes) | sender length | sender
         | nonce (12 random bytes) | ciphertext and tag

Everything before the nonce is the associated data, so the type, the sender and the time are
authenticated with the payload. The first key seals; every key opens, so keys rotate without
downtime (add the new key second, then first everywhere, then drop the old one). A message
that does not open, or whose timestamp is more than `max_skew` away, is refused with a reason
(a metric label): outsiders can neither be heard nor replay old packets later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pico.gossip.codec import GossipRejected

_MAGIC = 0xA5
_VERSION = 1
_HEAD = struct.Struct(">BBBQB")  # magic, version, type, timestamp ms, sender length
_NONCE = 12
_TAG = 16
# The most a sealed message adds to its payload, for a sender id of up to 255 bytes.
MAX_OVERHEAD = _HEAD.size + 255 + _NONCE + _TAG
KEY_SIZES = (16, 24, 32)


class SealError(GossipRejected):
    """A message refused; `reason` is the metric label (`unsealed`, `bad_seal`, `stale`)."""


def parse_key(text: str) -> bytes:
    """A base64 key of 16, 24 or 32 bytes. Raises ValueError saying what is wrong."""
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(key) not in KEY_SIZES:
        raise ValueError(f"a key must be 16, 24 or 32 bytes (got {len(key)})")
    return key


class Keyring:
    """The cluster's gossip keys: the first seals, all open."""

    def __init__(self, keys: Sequence[bytes], sender: str, max_skew: float = 30.0) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._ciphers = [AESGCM(k) for k in keys]
        # A key of its own for proving that a member forwarded a request (derived, so that a
        # forwarding proof can never be used as a gossip seal or the reverse).
        self._forward_keys = [
            HKDF(hashes.SHA256(), 32, salt=None, info=b"pico forward v1").derive(k) for k in keys
        ]
        self.sender = sender.encode()[:255]
        self.max_skew = max_skew

    @property
    def overhead(self) -> int:
        """What sealing adds to a message from this node."""
        return _HEAD.size + len(self.sender) + _NONCE + _TAG

    def seal(self, payload: bytes, now: float) -> bytes:
        """`payload` (a gossip message: its first byte is its type) sealed at `now` (seconds)."""
        kind = payload[0] if payload else 0
        head = _HEAD.pack(_MAGIC, _VERSION, kind, int(now * 1000), len(self.sender))
        aad = head + self.sender
        nonce = os.urandom(_NONCE)
        return aad + nonce + self._ciphers[0].encrypt(nonce, payload, aad)

    def open(self, data: bytes, now: float) -> bytes:
        """The payload of a sealed message. Raises SealError."""
        if len(data) < _HEAD.size + _NONCE + _TAG or data[0] != _MAGIC:
            raise SealError("unsealed", "not a sealed gossip message")
        _, version, kind, stamp, sender_len = _HEAD.unpack_from(data)
        if version != _VERSION:
            raise SealError("unsealed", f"unknown seal version {version}")
        start = _HEAD.size + sender_len
        if len(data) < start + _NONCE + _TAG:
            raise SealError("unsealed", "truncated sealed message")
        aad = data[:start]
        nonce = data[start : start + _NONCE]
        sealed = data[start + _NONCE :]
        for cipher in self._ciphers:
            try:
                payload = cipher.decrypt(nonce, sealed, aad)
                break
            except InvalidTag:
                continue
        else:
            raise SealError("bad_seal", "no key opens the message")
        # Checked after the tag: only a member's clock is worth comparing with ours.
        if abs(now - stamp / 1000) > self.max_skew:
            raise SealError("stale", f"timestamp {stamp / 1000 - now:+.0f} s from ours")
        if not payload or payload[0] != kind:
            raise SealError("bad_seal", "message type differs from the sealed one")
        return payload

    def forward_mark(self, method: bytes, target: bytes, now: float) -> bytes:
        """The `x-pico-forward` value proving that this member forwarded `method target`."""
        head = b"v1.%s.%d" % (self.sender, int(now))
        return head + b"." + self._mac(self._forward_keys[0], head, method, target)

    def forwarded_by_member(self, value: bytes, method: bytes, target: bytes, now: float) -> bool:
        """Whether `value` proves a member forwarded this request within `max_skew`."""
        head, _, mac = value.strip().rpartition(b".")
        parts = head.split(b".")
        if len(parts) < 3 or parts[0] != b"v1" or not parts[-1].isdigit():
            return False
        if abs(now - int(parts[-1])) > self.max_skew:
            return False
        return any(
            hmac.compare_digest(mac, self._mac(key, head, method, target))
            for key in self._forward_keys
        )

    @staticmethod
    def _mac(key: bytes, head: bytes, method: bytes, target: bytes) -> bytes:
        message = b"\n".join((head, method, target))
        return hmac.new(key, message, hashlib.sha256).hexdigest().encode()
