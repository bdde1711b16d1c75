"""The gossip value types: entries, digest entries, deltas, node views, and incarnations.

Frozen values shared by the state, the codec and the limits (plus the mutable record the state
keeps per node); nothing here has behaviour beyond comparing incarnations and versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LEFT_KEY = "_internal:left"
COMPACT_KEY = "_internal:compact"

_UINT64 = 1 << 64
_HALF = 1 << 63


def newer(a: int, b: int) -> bool:
    """Whether incarnation ``a`` is later than ``b``.

    Serial-number arithmetic over uint64 (RFC 1982): there is no largest incarnation, so a node
    can always outbid one that was forged for its id (no value locks it out for good).
    """
    return 0 < (a - b) % _UINT64 < _HALF


def next_incarnation(incarnation: int) -> int:
    """The incarnation just after ``incarnation``."""
    return (incarnation + 1) % _UINT64


@dataclass(frozen=True, slots=True)
class Entry:
    """One versioned key/value of a node; ``deleted`` entries are tombstones with value ``""``."""

    key: str
    value: str
    version: int
    internal: bool = False
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class DigestEntry:
    """What a node knows about another node: its address, version and whether it left."""

    id: str
    addr: str
    version: int
    left: bool
    incarnation: int = 0


@dataclass(frozen=True, slots=True)
class NodeDelta:
    """Entries of one node, sorted by version ascending.

    ``since`` is the version the entries start after: they are *all* the node's entries with a
    version in ``(since, last entry's version]``. A receiver whose version for the node is below
    ``since`` would leave a gap, so it ignores the chunk (it is resent in a later round). ``None``
    means "complete state newer than what the receiver asked for" (TCP join/leave).
    ``incarnation`` is the life of the node the entries belong to.
    """

    id: str
    addr: str
    entries: tuple[Entry, ...]
    since: int | None = None
    incarnation: int = 0


@dataclass(frozen=True, slots=True)
class NodeMetadata:
    """Public view of a node; ``expiry`` is when it will be removed (caller's clock, seconds)."""

    id: str
    addr: str
    version: int
    left: bool
    unreachable: bool
    expiry: float | None
    incarnation: int = 0


@dataclass(frozen=True, slots=True)
class NodeState:
    """A node's metadata plus its entries sorted by key."""

    id: str
    addr: str
    version: int
    left: bool
    unreachable: bool
    expiry: float | None
    entries: tuple[Entry, ...]
    incarnation: int = 0


@dataclass(slots=True)
class NodeRecord:
    """What is held about one node: the one mutable record here, owned by ``GossipState``
    (the local node's by ``LocalNode``)."""

    id: str
    addr: str
    incarnation: int = 0
    version: int = 0
    left: bool = False
    unreachable: bool = False
    expiry: float | None = None
    # Only named in digests so far: no state, never gossiped to, forgotten at `expiry`.
    heard_only: bool = False
    entries: dict[str, Entry] = field(default_factory=dict)

    def metadata(self) -> NodeMetadata:
        return NodeMetadata(
            self.id,
            self.addr,
            self.version,
            self.left,
            self.unreachable,
            self.expiry,
            self.incarnation,
        )

    def newer_than(self, version: int) -> tuple[Entry, ...]:
        if version >= self.version:
            return ()
        newer = [e for e in self.entries.values() if e.version > version]
        newer.sort(key=lambda e: e.version)
        return tuple(newer)
