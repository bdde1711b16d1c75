"""Gossip wire format: msgpack maps with string keys behind a two-byte prefix.

Byte 0 is the message type (1 digest, 2 delta, 3 join, 4 leave), byte 1 the protocol version (0).
Then concatenated msgpack objects:

* digest (UDP): ``{node_id, addr, request, incarnation}`` +
  ``{id, addr, version, left, incarnation}``...
* delta (UDP): ``{node_id, addr, incarnation}`` + per node
  ``{node_id, addr, entries: n, since, incarnation}`` followed by exactly ``n`` entries
  ``{key, value, version, internal, deleted}``. ``since`` is our extension (see
  :class:`~pico.gossip.state.NodeDelta`); a decoder without it reads it as absent.
* join (TCP): ``{node_id, addr, incarnation}`` + ``[{id, addr, incarnation, entries: [entry...]}]``
  + ``[digest entry...]``; the reply (also prefixed ``[3, 0]``) is the header +
  ``[{id, addr, incarnation, entries}]``.
* leave (TCP): the header + ``[{id, addr, incarnation, entries}]``; the ack is ``[4, 0]`` + the
  header.

``incarnation`` (our extension, absent = 0) tells one life of a node id from the next: a node
that restarts under the same id publishes a newer one, and its versions start again.

On TCP each message is a frame: a 4-byte big-endian length, then the message (sealed, with
gossip keys). See :func:`frame` and :func:`frame_length`.

Every decoder raises :class:`GossipDecodeError`, and nothing else, on malformed input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from pico.gossip.records import DigestEntry, Entry, NodeDelta

PROTOCOL_VERSION = 0
_MAX_UINT64 = 2**64 - 1


class MessageType(IntEnum):
    """Byte 0 of every gossip message."""

    DIGEST = 1
    DELTA = 2
    JOIN = 3
    LEAVE = 4


class GossipError(Exception):
    """Base class of gossip errors."""


class GossipDecodeError(GossipError):
    """A peer sent bytes that are not a valid gossip message; the message says which rule broke."""


class GossipRejected(GossipDecodeError):
    """A message refused by a limit or a check; ``reason`` labels ``pico_gossip_rejected_total``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Digest:
    """A decoded digest datagram."""

    node_id: str
    addr: str
    request: bool
    entries: tuple[DigestEntry, ...]
    incarnation: int = 0


@dataclass(frozen=True, slots=True)
class Delta:
    """A decoded delta datagram."""

    node_id: str
    addr: str
    nodes: tuple[NodeDelta, ...]
    incarnation: int = 0


@dataclass(frozen=True, slots=True)
class Join:
    """A decoded TCP join request (``digest`` is empty in a join reply)."""

    node_id: str
    addr: str
    nodes: tuple[NodeDelta, ...]
    digest: tuple[DigestEntry, ...]
    incarnation: int = 0


@dataclass(frozen=True, slots=True)
class Leave:
    """A decoded TCP leave request (``nodes`` is empty in a leave ack)."""

    node_id: str
    addr: str
    nodes: tuple[NodeDelta, ...]
    incarnation: int = 0


# -- encoding --------------------------------------------------------------------------------------


def _prefix(kind: MessageType) -> bytes:
    return bytes((kind, PROTOCOL_VERSION))


def _header(node_id: str, addr: str, incarnation: int) -> dict[str, Any]:
    return {"node_id": node_id, "addr": addr, "incarnation": incarnation}


def _entry_map(e: Entry) -> dict[str, Any]:
    return {
        "key": e.key,
        "value": e.value,
        "version": e.version,
        "internal": e.internal,
        "deleted": e.deleted,
    }


def _digest_map(d: DigestEntry) -> dict[str, Any]:
    return {
        "id": d.id,
        "addr": d.addr,
        "version": d.version,
        "left": d.left,
        "incarnation": d.incarnation,
    }


def _delta_entry_map(n: NodeDelta) -> dict[str, Any]:
    return {
        "id": n.id,
        "addr": n.addr,
        "incarnation": n.incarnation,
        "entries": [_entry_map(e) for e in n.entries],
    }


def encoded_entry_size(entry: Entry) -> int:
    """Bytes one entry takes in a delta (to check it can ever fit in a datagram)."""
    return len(msgpack.packb(_entry_map(entry)))


def encode_digest(
    node_id: str,
    addr: str,
    request: bool,
    entries: Sequence[DigestEntry],
    max_packet_size: int,
    *,
    incarnation: int = 0,
) -> bytes:
    """One digest datagram; entries that do not fit in ``max_packet_size`` are left out.

    Callers shuffle ``entries`` (keeping their own first) so each round covers a different subset.
    """
    parts = [
        _prefix(MessageType.DIGEST),
        msgpack.packb({**_header(node_id, addr, incarnation), "request": request}),
    ]
    size = len(parts[0]) + len(parts[1])
    for d in entries:
        packed: bytes = msgpack.packb(_digest_map(d))
        if size + len(packed) > max_packet_size:
            break
        parts.append(packed)
        size += len(packed)
    return b"".join(parts)


def encode_delta(
    node_id: str,
    addr: str,
    nodes: Sequence[NodeDelta],
    max_packet_size: int,
    max_packets: int,
    *,
    incarnation: int = 0,
) -> list[bytes]:
    """Delta datagrams of at most ``max_packet_size`` bytes, at most ``max_packets`` of them.

    A node whose entries do not fit in one datagram is split into chunks, each with the ``since``
    version it continues from. Always returns at least one datagram (an empty delta is a heartbeat).
    What does not fit in ``max_packets`` is sent in a later round.
    """
    start = _prefix(MessageType.DELTA) + msgpack.packb(_header(node_id, addr, incarnation))
    packets: list[bytes] = []
    parts: list[bytes] = [start]
    size = len(start)
    for node in nodes:
        packed = [msgpack.packb(_entry_map(e)) for e in node.entries]
        since = node.since
        i = 0
        while i < len(packed):
            node_header = _node_header(node, len(packed) - i, since)
            room = max_packet_size - size - len(node_header)
            count = 0
            while i + count < len(packed) and len(packed[i + count]) <= room:
                room -= len(packed[i + count])
                count += 1
            if count == 0:
                if len(parts) == 1:
                    break  # one entry larger than a datagram: it cannot go over UDP at all
                packets.append(b"".join(parts))
                if len(packets) == max_packets:
                    return packets
                parts, size = [start], len(start)
                continue
            parts.append(_node_header(node, count, since))
            parts.extend(packed[i : i + count])
            size += len(parts[-count - 1]) + sum(len(p) for p in packed[i : i + count])
            since = node.entries[i + count - 1].version
            i += count
    packets.append(b"".join(parts))
    return packets


def _node_header(node: NodeDelta, count: int, since: int | None) -> bytes:
    header: dict[str, Any] = {
        "node_id": node.id,
        "addr": node.addr,
        "entries": count,
        "incarnation": node.incarnation,
    }
    if since is not None:
        header["since"] = since
    packed: bytes = msgpack.packb(header)
    return packed


def encode_join(
    node_id: str,
    addr: str,
    nodes: Sequence[NodeDelta],
    digest: Sequence[DigestEntry],
    *,
    incarnation: int = 0,
) -> bytes:
    """A TCP join request: our header, our full state, and our full digest."""
    return b"".join(
        (
            _prefix(MessageType.JOIN),
            msgpack.packb(_header(node_id, addr, incarnation)),
            msgpack.packb([_delta_entry_map(n) for n in nodes]),
            msgpack.packb([_digest_map(d) for d in digest]),
        )
    )


def encode_join_reply(
    node_id: str, addr: str, nodes: Sequence[NodeDelta], *, incarnation: int = 0
) -> bytes:
    """A TCP join reply: the responder's header and the state the joiner is missing."""
    return b"".join(
        (
            _prefix(MessageType.JOIN),
            msgpack.packb(_header(node_id, addr, incarnation)),
            msgpack.packb([_delta_entry_map(n) for n in nodes]),
        )
    )


def encode_leave(
    node_id: str, addr: str, nodes: Sequence[NodeDelta], *, incarnation: int = 0
) -> bytes:
    """A TCP leave notification carrying the leaver's full state (with ``_internal:left``)."""
    return b"".join(
        (
            _prefix(MessageType.LEAVE),
            msgpack.packb(_header(node_id, addr, incarnation)),
            msgpack.packb([_delta_entry_map(n) for n in nodes]),
        )
    )


def encode_leave_ack(node_id: str, addr: str, *, incarnation: int = 0) -> bytes:
    """The acknowledgement of a leave notification."""
    header: bytes = msgpack.packb(_header(node_id, addr, incarnation))
    return _prefix(MessageType.LEAVE) + header


# -- TCP framing ---------------------------------------------------------------------------------

FRAME_HEADER_SIZE = 4


def frame(message: bytes) -> bytes:
    """A TCP message as it goes on the wire: its 4-byte big-endian length, then the message."""
    return len(message).to_bytes(FRAME_HEADER_SIZE, "big") + message


def frame_length(header: bytes, max_size: int) -> int:
    """The length a frame header announces; the reader then reads exactly that many bytes.

    Raises :class:`GossipRejected` (``join_size``) above ``max_size``, so that a peer can make
    us buffer at most that much, and :class:`GossipDecodeError` for an empty frame.
    """
    size = int.from_bytes(header, "big")
    if size > max_size:
        raise GossipRejected(
            "join_size", f"join/leave message of {size} bytes is over the limit of {max_size}"
        )
    if size < 2:
        raise GossipDecodeError(f"join/leave message of {size} bytes has no prefix")
    return size


# -- decoding --------------------------------------------------------------------------------------


def message_type(data: bytes) -> MessageType:
    """Check the two-byte prefix and return the message type."""
    if len(data) < 2:
        raise GossipDecodeError(f"message of {len(data)} bytes is shorter than its 2-byte prefix")
    if data[1] != PROTOCOL_VERSION:
        raise GossipDecodeError(f"unsupported protocol version {data[1]} (expected 0)")
    try:
        return MessageType(data[0])
    except ValueError:
        raise GossipDecodeError(f"unknown message type {data[0]}") from None


def _objects(data: bytes) -> list[object]:
    payload = data[2:]
    if not payload:
        raise GossipDecodeError("message has no header")
    # max_buffer_size = len(payload) also caps the array/map/str lengths msgpack will allocate.
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(payload))
    objects: list[object] = []
    consumed = 0
    try:
        unpacker.feed(payload)
        while True:
            objects.append(unpacker.unpack())
            consumed = unpacker.tell()
    except msgpack.OutOfData:
        pass
    except Exception as exc:  # msgpack raises many types (ValueError, TypeError, StackError...)
        raise GossipDecodeError(f"invalid msgpack: {exc}") from None
    if consumed != len(payload):
        raise GossipDecodeError("truncated msgpack object at the end of the message")
    return objects


def _map(obj: object, what: str) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise GossipDecodeError(f"{what} is a {type(obj).__name__}, expected a map")
    return obj


def _str(m: dict[str, object], key: str, what: str) -> str:
    value = m.get(key)
    if not isinstance(value, str):
        raise GossipDecodeError(f"{what}.{key} is missing or not a string")
    return value


def _bool(m: dict[str, object], key: str, what: str) -> bool:
    value = m.get(key, False)
    if not isinstance(value, bool):
        raise GossipDecodeError(f"{what}.{key} is not a bool")
    return value


def _uint(m: dict[str, object], key: str, what: str) -> int:
    value = m.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_UINT64:
        raise GossipDecodeError(f"{what}.{key} is missing or not a uint64")
    return value


def _decode_header(obj: object, what: str = "header") -> tuple[str, str, int]:
    m = _map(obj, what)
    return _str(m, "node_id", what), _str(m, "addr", what), _incarnation(m, what)


def _incarnation(m: dict[str, object], what: str) -> int:
    # Absent in messages from nodes that predate incarnations: they all have incarnation 0.
    return _uint(m, "incarnation", what) if "incarnation" in m else 0


def _decode_entry(obj: object) -> Entry:
    m = _map(obj, "entry")
    return Entry(
        key=_str(m, "key", "entry"),
        value=_str(m, "value", "entry"),
        version=_uint(m, "version", "entry"),
        internal=_bool(m, "internal", "entry"),
        deleted=_bool(m, "deleted", "entry"),
    )


def _decode_digest_entry(obj: object) -> DigestEntry:
    m = _map(obj, "digest entry")
    return DigestEntry(
        id=_str(m, "id", "digest entry"),
        addr=_str(m, "addr", "digest entry"),
        version=_uint(m, "version", "digest entry"),
        left=_bool(m, "left", "digest entry"),
        incarnation=_incarnation(m, "digest entry"),
    )


def _decode_delta_entry(obj: object) -> NodeDelta:
    m = _map(obj, "delta entry")
    entries = m.get("entries", [])
    if not isinstance(entries, list):
        raise GossipDecodeError("delta entry.entries is not an array")
    return NodeDelta(
        _str(m, "id", "delta entry"),
        _str(m, "addr", "delta entry"),
        tuple(_decode_entry(e) for e in entries),
        incarnation=_incarnation(m, "delta entry"),
    )


def _array(obj: object, what: str) -> list[object]:
    if not isinstance(obj, list):
        raise GossipDecodeError(f"{what} is a {type(obj).__name__}, expected an array")
    return obj


def decode_datagram(data: bytes) -> Digest | Delta:
    """Decode a UDP digest or delta."""
    kind = message_type(data)
    objects = _objects(data)
    if kind == MessageType.DIGEST:
        m = _map(objects[0], "digest header")
        node_id, addr, incarnation = _decode_header(m, "digest header")
        request = _bool(m, "request", "digest header")
        entries = tuple(_decode_digest_entry(o) for o in objects[1:])
        return Digest(node_id, addr, request, entries, incarnation)
    if kind == MessageType.DELTA:
        node_id, addr, incarnation = _decode_header(objects[0], "delta header")
        return Delta(node_id, addr, tuple(_decode_delta_nodes(objects[1:])), incarnation)
    raise GossipDecodeError(f"message type {kind.name} is not sent over UDP")


def _decode_delta_nodes(objects: list[object]) -> Iterator[NodeDelta]:
    i = 0
    while i < len(objects):
        m = _map(objects[i], "delta node header")
        node_id, addr, incarnation = _decode_header(m, "delta node header")
        since = _uint(m, "since", "delta node header") if "since" in m else None
        # Without an entry count (the seed format), the entries run to the end of the datagram.
        count = _uint(m, "entries", "delta node header") if "entries" in m else len(objects)
        entries = objects[i + 1 : i + 1 + count]
        i += 1 + len(entries)
        yield NodeDelta(node_id, addr, tuple(_decode_entry(e) for e in entries), since, incarnation)


def decode_join(data: bytes) -> Join:
    """Decode a TCP join request, or a join reply (which has no digest)."""
    objects = _tcp_objects(data, MessageType.JOIN, (2, 3))
    node_id, addr, incarnation = _decode_header(objects[0])
    nodes = tuple(_decode_delta_entry(o) for o in _array(objects[1], "join delta"))
    digest: tuple[DigestEntry, ...] = ()
    if len(objects) == 3:
        digest = tuple(_decode_digest_entry(o) for o in _array(objects[2], "join digest"))
    return Join(node_id, addr, nodes, digest, incarnation)


def decode_leave(data: bytes) -> Leave:
    """Decode a TCP leave notification, or a leave ack (which has no state)."""
    objects = _tcp_objects(data, MessageType.LEAVE, (1, 2))
    node_id, addr, incarnation = _decode_header(objects[0])
    nodes: tuple[NodeDelta, ...] = ()
    if len(objects) == 2:
        nodes = tuple(_decode_delta_entry(o) for o in _array(objects[1], "leave delta"))
    return Leave(node_id, addr, nodes, incarnation)


def _tcp_objects(data: bytes, kind: MessageType, counts: tuple[int, ...]) -> list[object]:
    actual = message_type(data)
    if actual != kind:
        raise GossipDecodeError(f"expected a {kind.name} message, got {actual.name}")
    objects = _objects(data)
    if len(objects) not in counts:
        raise GossipDecodeError(
            f"{kind.name} message has {len(objects)} objects, expected {counts}"
        )
    return objects
