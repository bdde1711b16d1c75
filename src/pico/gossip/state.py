"""Versioned per-node key/value state for scuttlebutt anti-entropy (sans-I/O).

``GossipState`` holds, for every known node, its entries and its version (the highest entry version
we hold for it). It answers digests with deltas, applies remote digests and deltas, marks nodes
left/unreachable, compacts local tombstones, and expires dead nodes. Expired node ids are kept as
tombstones so that stale gossip from peers that still carry them can never bring them back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pico.gossip.events import (
    GossipEvent,
    NodeExpired,
    NodeJoined,
    NodeKeyDeleted,
    NodeLeft,
    NodeReachable,
    NodeUnreachable,
    NodeUpdated,
)

LEFT_KEY = "_internal:left"
COMPACT_KEY = "_internal:compact"


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


@dataclass(frozen=True, slots=True)
class NodeDelta:
    """Entries of one node, sorted by version ascending.

    ``since`` is the version the entries start after: they are *all* the node's entries with a
    version in ``(since, last entry's version]``. A receiver whose version for the node is below
    ``since`` would leave a gap, so it ignores the chunk (it is resent in a later round). ``None``
    means "complete state newer than what the receiver asked for" (TCP join/leave).
    """

    id: str
    addr: str
    entries: tuple[Entry, ...]
    since: int | None = None


@dataclass(frozen=True, slots=True)
class NodeMetadata:
    """Public view of a node; ``expiry`` is when it will be removed (caller's clock, seconds)."""

    id: str
    addr: str
    version: int
    left: bool
    unreachable: bool
    expiry: float | None


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


@dataclass(slots=True)
class _Node:
    id: str
    addr: str
    version: int = 0
    left: bool = False
    unreachable: bool = False
    expiry: float | None = None
    entries: dict[str, Entry] = field(default_factory=dict)

    def metadata(self) -> NodeMetadata:
        return NodeMetadata(
            self.id, self.addr, self.version, self.left, self.unreachable, self.expiry
        )

    def newer_than(self, version: int) -> tuple[Entry, ...]:
        if version >= self.version:
            return ()
        newer = [e for e in self.entries.values() if e.version > version]
        newer.sort(key=lambda e: e.version)
        return tuple(newer)


class GossipState:
    """Known nodes and their entries, with the local node's as the one we may change.

    ``expiry`` (seconds) is how long a left or unreachable node is kept. ``tombstone_ttl`` is how
    long an expired node id is remembered after the last time any peer mentioned it; it must be
    longer than ``expiry`` so that peers that expire the node later than us cannot re-add it.
    """

    def __init__(
        self,
        node_id: str,
        addr: str,
        *,
        expiry: float = 60.0,
        tombstone_ttl: float | None = None,
        compact_threshold: int = 100,
    ) -> None:
        self.node_id = node_id
        self.addr = addr
        self.expiry = expiry
        self.tombstone_ttl = 2 * expiry if tombstone_ttl is None else tombstone_ttl
        self.compact_threshold = compact_threshold
        self._local = _Node(node_id, addr)
        self._nodes: dict[str, _Node] = {node_id: self._local}
        self._expired: dict[str, float] = {}  # expired node id -> forget-after time
        self._events: list[GossipEvent] = []

    # -- local changes -------------------------------------------------------------------------

    @property
    def left(self) -> bool:
        """Whether the local node has left the cluster."""
        return self._local.left

    def upsert(self, key: str, value: str, *, internal: bool = False) -> None:
        """Set a local key; a no-op if the value is unchanged."""
        current = self._local.entries.get(key)
        if current is not None and not current.deleted and current.value == value:
            return
        self._bump(key, value, internal=internal, deleted=False)

    def delete(self, key: str) -> None:
        """Tombstone a local key; a no-op if it is missing or already deleted."""
        current = self._local.entries.get(key)
        if current is None or current.deleted:
            return
        self._bump(key, "", internal=current.internal, deleted=True)

    def mark_left(self) -> None:
        """Mark the local node left (adds the ``_internal:left`` entry); idempotent."""
        if self._local.left:
            return
        self._local.left = True
        self._bump(LEFT_KEY, "true", internal=True, deleted=False)

    def _bump(self, key: str, value: str, *, internal: bool, deleted: bool) -> None:
        self._local.version += 1
        self._local.entries[key] = Entry(key, value, self._local.version, internal, deleted)

    def compact(self) -> bool:
        """Drop local tombstones once there are ``compact_threshold`` of them.

        Survivors are re-versioned after the current version V and ``_internal:compact = "V"`` is
        added last, so peers drop everything they hold at or below V. Returns whether it compacted.
        """
        local = self._local
        tombstones = sum(1 for e in local.entries.values() if e.deleted)
        if tombstones < self.compact_threshold:
            return False
        base = local.version
        survivors = sorted(
            (e for e in local.entries.values() if not e.deleted and e.key != COMPACT_KEY),
            key=lambda e: e.version,
        )
        local.entries = {}
        version = base
        for e in survivors:
            version += 1
            local.entries[e.key] = Entry(e.key, e.value, version, e.internal, e.deleted)
        version += 1
        local.entries[COMPACT_KEY] = Entry(COMPACT_KEY, str(base), version, True, False)
        local.version = version
        return True

    # -- digests and deltas --------------------------------------------------------------------

    def digest(self) -> list[DigestEntry]:
        """Every known node's id, address, version and left flag, the local node first."""
        return [DigestEntry(n.id, n.addr, n.version, n.left) for n in self._nodes.values()]

    def delta(
        self, digest: Iterable[DigestEntry], *, include_missing: bool = False
    ) -> list[NodeDelta]:
        """Entries newer than the digest's versions, for the nodes the digest names.

        Nodes with nothing newer are omitted. With ``include_missing`` (the TCP join reply), also
        the full state of every node the digest does not name.
        """
        result: list[NodeDelta] = []
        named: set[str] = set()
        for d in digest:
            named.add(d.id)
            node = self._nodes.get(d.id)
            if node is None:
                continue
            entries = node.newer_than(d.version)
            if entries:
                result.append(NodeDelta(node.id, node.addr, entries, since=d.version))
        if include_missing:
            for node in self._nodes.values():
                if node.id not in named and node.entries:
                    result.append(NodeDelta(node.id, node.addr, node.newer_than(0), since=0))
        return result

    def local_delta(self) -> NodeDelta:
        """The full local state, as sent in a TCP join or leave."""
        return NodeDelta(self.node_id, self.addr, self._local.newer_than(0), since=0)

    def apply_digest(self, digest: Iterable[DigestEntry], now: float) -> None:
        """Add the unknown nodes a digest names, unless they left or were expired."""
        for d in digest:
            if d.id == self.node_id or d.id in self._nodes:
                continue
            if d.id in self._expired:
                self._mention_expired(d.id, now)
                continue
            if d.left:
                continue  # a left node is never (re)discovered from a digest
            self._add(d.id, d.addr)

    def apply_delta(self, deltas: Iterable[NodeDelta], now: float) -> None:
        """Apply remote nodes' entries in version order; entries about ourselves are ignored."""
        for delta in deltas:
            if delta.id == self.node_id:
                continue
            if delta.id in self._expired:
                self._mention_expired(delta.id, now)
                continue
            node = self._nodes.get(delta.id)
            if node is None:
                if delta.since or not delta.entries:
                    continue  # a later chunk of state we never started receiving
                node = self._add(delta.id, delta.addr)
            elif delta.since is not None and delta.since > node.version:
                continue  # applying would leave a gap; the missing chunk comes in a later round
            for entry in sorted(delta.entries, key=lambda e: e.version):
                if entry.version > node.version:
                    self._store(node, entry, now)

    def _add(self, node_id: str, addr: str) -> _Node:
        node = _Node(node_id, addr)
        self._nodes[node_id] = node
        self._events.append(NodeJoined(node_id, addr))
        return node

    def _store(self, node: _Node, entry: Entry, now: float) -> None:
        previous = node.entries.get(entry.key)
        node.entries[entry.key] = entry
        node.version = entry.version
        if entry.internal:
            if entry.key == LEFT_KEY and not node.left:
                node.left = True
                node.expiry = now + self.expiry
                self._events.append(NodeLeft(node.id))
            elif entry.key == COMPACT_KEY:
                self._apply_compaction(node, entry.value)
        elif entry.deleted:
            if previous is not None and not previous.deleted:
                self._events.append(NodeKeyDeleted(node.id, entry.key))
        elif previous is None or previous.deleted or previous.value != entry.value:
            self._events.append(NodeUpdated(node.id, entry.key, entry.value))

    def _apply_compaction(self, node: _Node, value: str) -> None:
        try:
            upto = int(value)
        except ValueError:
            return  # a malformed marker from a peer: keep the entries rather than guess
        for key, e in list(node.entries.items()):
            if e.version <= upto:
                del node.entries[key]
                if not e.deleted and not e.internal:
                    self._events.append(NodeKeyDeleted(node.id, key))

    # -- liveness and expiry -------------------------------------------------------------------

    def mark_unreachable(self, node_id: str, now: float) -> None:
        """Mark a remote node unreachable; it expires ``expiry`` seconds from now."""
        node = self._nodes.get(node_id)
        if node is None or node is self._local or node.unreachable or node.left:
            return
        node.unreachable = True
        node.expiry = now + self.expiry
        self._events.append(NodeUnreachable(node_id))

    def mark_reachable(self, node_id: str) -> None:
        """Mark an unreachable node reachable again and cancel its expiry."""
        node = self._nodes.get(node_id)
        if node is None or not node.unreachable:
            return
        node.unreachable = False
        if not node.left:
            node.expiry = None
        self._events.append(NodeReachable(node_id))

    def expire(self, now: float) -> list[str]:
        """Remove nodes whose expiry passed, remembering their ids; returns the removed ids."""
        for node_id, forget_after in list(self._expired.items()):
            if forget_after <= now:
                del self._expired[node_id]
        removed = [n.id for n in self._nodes.values() if n.expiry is not None and n.expiry <= now]
        for node_id in removed:
            del self._nodes[node_id]
            self._expired[node_id] = now + self.tombstone_ttl
            self._events.append(NodeExpired(node_id))
        return removed

    def _mention_expired(self, node_id: str, now: float) -> None:
        # A peer still carries this node: remember it until peers have forgotten it too.
        self._expired[node_id] = max(self._expired[node_id], now + self.tombstone_ttl)

    def is_expired(self, node_id: str) -> bool:
        """Whether the id belongs to a node that was expired (and is ignored in gossip)."""
        return node_id in self._expired

    def forget_expired(self, node_id: str) -> None:
        """Lift an expired node's tombstone (the node itself contacted us: it is alive)."""
        self._expired.pop(node_id, None)

    # -- queries -------------------------------------------------------------------------------

    def knows(self, node_id: str) -> bool:
        """Whether the node is currently known (the local node included)."""
        return node_id in self._nodes

    def remote_ids(self, *, live: bool) -> list[str]:
        """Remote nodes that have not left: reachable ones if ``live``, else unreachable ones."""
        return [
            n.id
            for n in self._nodes.values()
            if n is not self._local and not n.left and n.unreachable != live
        ]

    def addr_of(self, node_id: str) -> str:
        """The gossip address of a known node."""
        return self._nodes[node_id].addr

    def metadata(self) -> list[NodeMetadata]:
        """Metadata of every known node, sorted by id."""
        return sorted((n.metadata() for n in self._nodes.values()), key=lambda m: m.id)

    def node_state(self, node_id: str) -> NodeState | None:
        """A node's metadata and entries, or ``None`` if unknown."""
        node = self._nodes.get(node_id)
        if node is None:
            return None
        entries = tuple(sorted(node.entries.values(), key=lambda e: e.key))
        m = node.metadata()
        return NodeState(m.id, m.addr, m.version, m.left, m.unreachable, m.expiry, entries)

    def drain_events(self) -> list[GossipEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events
