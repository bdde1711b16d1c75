"""Versioned per-node key/value state for scuttlebutt anti-entropy (sans-I/O).

``GossipState`` holds, for every known node, its entries and its version (the highest entry version
we hold for it) within its incarnation (one life of the node id). It answers digests with deltas,
applies remote digests and deltas, marks nodes left/unreachable, compacts local tombstones, and
expires dead nodes. Expired node ids are kept as tombstones so that stale gossip from peers that
still carry them can never bring that life back; a newer incarnation replaces an old life at once.
Everything peers can make it hold is bounded by :class:`~pico.gossip.limits.Limits`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pico.gossip.events import (
    GossipEvent,
    NodeExpired,
    NodeJoined,
    NodeKeyDeleted,
    NodeLeft,
    NodeReachable,
    NodeRestarted,
    NodeUnreachable,
    NodeUpdated,
)
from pico.gossip.limits import Admission, Limits
from pico.gossip.local import LocalNode
from pico.gossip.records import (
    COMPACT_KEY,
    LEFT_KEY,
    DigestEntry,
    Entry,
    NodeDelta,
    NodeMetadata,
    NodeRecord,
    NodeState,
    newer,
)
from pico.gossip.rejections import Rejections


class GossipState:
    """Known nodes and their entries, with the local node's as the one we may change.

    ``expiry`` (seconds) is how long a left or unreachable node is kept, and a node only named
    in digests waits for its state. ``tombstone_ttl`` is how long an expired node id is
    remembered after the last time any peer mentioned it; it must be longer than ``expiry`` so
    that peers that expire the node later than us cannot re-add it. ``limits`` bound what peers
    can make us hold; what they refuse is counted in ``rejections``. ``refute_every`` spaces
    out refutations (see :meth:`apply_digest`). ``on_forget`` is told the id of every node
    whose past is gone (removed, or restarted), for its failure-detector history.
    """

    def __init__(
        self,
        node_id: str,
        addr: str,
        *,
        incarnation: int = 0,
        expiry: float = 60.0,
        tombstone_ttl: float | None = None,
        compact_threshold: int = 100,
        limits: Limits | None = None,
        rejections: Rejections | None = None,
        refute_every: float = 1.0,
        on_forget: Callable[[str], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.addr = addr
        self.expiry = expiry
        self.tombstone_ttl = 2 * expiry if tombstone_ttl is None else tombstone_ttl
        self.compact_threshold = compact_threshold
        self.limits = limits if limits is not None else Limits()
        self.rejections = rejections if rejections is not None else Rejections()
        self._admit = Admission(self.limits, self.rejections)
        self.refute_every = refute_every
        self._on_forget = on_forget
        self._me = LocalNode(NodeRecord(node_id, addr, incarnation), self.limits, compact_threshold)
        self._local = self._me.record
        self._nodes: dict[str, NodeRecord] = {node_id: self._local}
        self._heard_only: dict[str, None] = {}  # ids of heard-only nodes, oldest first
        self._expired: dict[str, tuple[int, float]] = {}  # id -> (incarnation, forget-after)
        self._refuted_at = float("-inf")
        self._events: list[GossipEvent] = []

    # -- local changes -------------------------------------------------------------------------

    @property
    def left(self) -> bool:
        """Whether the local node has left the cluster."""
        return self._local.left

    @property
    def incarnation(self) -> int:
        """The local node's current incarnation."""
        return self._local.incarnation

    def upsert(self, key: str, value: str, *, internal: bool = False) -> None:
        """Set a local key; a no-op if the value is unchanged (see :meth:`LocalNode.upsert`:
        raises ``ValueError`` for a new key once the node has as many entries as peers accept)."""
        self._me.upsert(key, value, internal=internal)

    def delete(self, key: str) -> None:
        """Tombstone a local key; a no-op if it is missing or already deleted."""
        self._me.delete(key)

    def mark_left(self) -> None:
        """Mark the local node left (adds the ``_internal:left`` entry); idempotent."""
        self._me.mark_left()

    def compact(self) -> bool:
        """Drop local tombstones once there are enough (see :meth:`LocalNode.compact`)."""
        return self._me.compact()

    # -- digests and deltas --------------------------------------------------------------------

    def digest(self) -> list[DigestEntry]:
        """Every known node's id, address, version and left flag, the local node first."""
        return [
            DigestEntry(n.id, n.addr, n.version, n.left, n.incarnation)
            for n in self._nodes.values()
        ]

    def delta(
        self, digest: Iterable[DigestEntry], *, include_missing: bool = False
    ) -> list[NodeDelta]:
        """Entries newer than the digest's versions, for the nodes the digest names.

        A peer that holds an older life of a node gets all of its current one. Nodes with nothing
        newer are omitted. With ``include_missing`` (the TCP join reply), also the full state of
        every node the digest does not name.
        """
        result: list[NodeDelta] = []
        named: set[str] = set()
        for d in digest:
            named.add(d.id)
            node = self._nodes.get(d.id)
            if node is None or node.heard_only:
                continue
            if d.incarnation == node.incarnation:
                since = d.version
            elif newer(node.incarnation, d.incarnation):
                since = 0
            else:
                continue  # the peer knows a later life of the node than we do
            entries = node.newer_than(since)
            if entries:
                result.append(NodeDelta(node.id, node.addr, entries, since, node.incarnation))
        if include_missing:
            for node in self._nodes.values():
                if node.id not in named and node.entries:
                    result.append(
                        NodeDelta(node.id, node.addr, node.newer_than(0), 0, node.incarnation)
                    )
        return result

    def local_delta(self) -> NodeDelta:
        """The full local state, as sent in a TCP join or leave."""
        local = self._local
        return NodeDelta(self.node_id, self.addr, local.newer_than(0), 0, local.incarnation)

    def apply_digest(
        self, digest: Iterable[DigestEntry], now: float, *, refute: bool = False
    ) -> None:
        """Note the unknown nodes a digest names (as heard-only), unless they left or expired.

        A node named at version 0 is skipped: the peer knows nothing about it either, and
        passing such names on is how made-up ids would spread. With ``refute`` (the sender is
        a member), a claim about the local node newer than its own state is answered with a
        new incarnation: see :meth:`_refute`.
        """
        for d in digest:
            if d.id == self.node_id:
                self._refute(d.incarnation, d.version, now, refute)
                continue
            node = self._nodes.get(d.id)
            if node is not None:
                if node.heard_only and newer(d.incarnation, node.incarnation):
                    if self._admit.names_fit(d.id, d.addr):
                        node.incarnation, node.addr = d.incarnation, d.addr
                continue
            if d.left or d.version == 0:
                continue  # a left node is never (re)discovered from a digest
            if not self._admit.names_fit(d.id, d.addr) or not self._may_return(d, now):
                continue
            if self._room(evict=False):
                self._add(d.id, d.addr, d.incarnation, heard_at=now)

    def apply_delta(self, deltas: Iterable[NodeDelta], now: float, *, refute: bool = False) -> None:
        """Apply remote nodes' entries in version order; entries about ourselves are ignored
        (but with ``refute``, a newer claim about us is refuted, as in :meth:`apply_digest`).

        A chunk over a limit is dropped whole and counted: applying part of it would leave a
        gap in the node's versions.
        """
        for delta in deltas:
            if delta.id == self.node_id:
                if delta.entries:
                    top = max(e.version for e in delta.entries)
                    self._refute(delta.incarnation, top, now, refute)
                continue
            if self._admit.chunk_fits(delta) and self._may_return(delta, now):
                self._apply_chunk(delta, now)

    def _apply_chunk(self, delta: NodeDelta, now: float) -> None:
        node = self._nodes.get(delta.id)
        starts = not delta.since  # holds the node's first versions
        if node is None:
            if not starts or not delta.entries:
                return  # a later chunk of state we never started receiving
            if not self._admit.step_fits(delta, 0) or not self._admit.count_fits(delta, {}, 0):
                return
            if not self._room(evict=True):
                return
            node = self._add(delta.id, delta.addr, delta.incarnation, heard_at=None)
        elif delta.incarnation != node.incarnation:
            if not (node.heard_only or newer(delta.incarnation, node.incarnation)):
                return  # an older life of the node: stale gossip
            if not starts or not delta.entries:
                return  # the start of the new life comes in another chunk
            if not self._admit.step_fits(delta, 0) or not self._admit.count_fits(delta, {}, 0):
                return
            self._restart(node, delta)
        else:
            if delta.since is not None and delta.since > node.version:
                return  # applying would leave a gap; the missing chunk comes in a later round
            if not self._admit.step_fits(delta, node.version):
                return
            if not self._admit.count_fits(delta, node.entries, node.version):
                return
        for entry in sorted(delta.entries, key=lambda e: e.version):
            if entry.version > node.version:
                if node.heard_only:
                    self._promote(node)
                self._store(node, entry, now)

    def _add(
        self, node_id: str, addr: str, incarnation: int, *, heard_at: float | None
    ) -> NodeRecord:
        node = NodeRecord(node_id, addr, incarnation)
        if heard_at is not None:
            node.heard_only = True
            node.expiry = heard_at + self.expiry
            self._heard_only[node_id] = None
        self._nodes[node_id] = node
        self._events.append(NodeJoined(node_id, addr))
        return node

    def add_member(self, node_id: str, addr: str, incarnation: int, now: float) -> None:
        """Know a node we exchanged with over TCP, even if it has published nothing yet."""
        node = self._nodes.get(node_id)
        if node is not None:
            if node.heard_only:
                node.incarnation, node.addr = incarnation, addr
                self._promote(node)
            return
        if node_id == self.node_id or not self._admit.names_fit(node_id, addr):
            return
        named = DigestEntry(node_id, addr, 0, False, incarnation)
        if self._may_return(named, now) and self._room(evict=True):
            self._add(node_id, addr, incarnation, heard_at=None)

    def _promote(self, node: NodeRecord) -> None:
        node.heard_only = False
        node.expiry = None
        self._heard_only.pop(node.id, None)

    def _restart(self, node: NodeRecord, delta: NodeDelta) -> None:
        had_state = not node.heard_only
        node.incarnation = delta.incarnation
        node.addr = delta.addr
        node.version = 0
        node.entries = {}
        node.left = node.unreachable = False
        node.expiry = None
        if node.heard_only:
            self._promote(node)
        if had_state:
            self._events.append(NodeRestarted(node.id, node.addr))
            self._forget(node.id)

    def _store(self, node: NodeRecord, entry: Entry, now: float) -> None:
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

    def _apply_compaction(self, node: NodeRecord, value: str) -> None:
        try:
            upto = int(value)
        except ValueError:
            return  # a malformed marker from a peer: keep the entries rather than guess
        for key, e in list(node.entries.items()):
            if e.version <= upto:
                del node.entries[key]
                if not e.deleted and not e.internal:
                    self._events.append(NodeKeyDeleted(node.id, key))

    def _refute(self, incarnation: int, version: int, now: float, trusted: bool) -> None:
        # Peers hold a life of our id newer than ours: we restarted with a clock behind the last
        # life's, another process uses our id, or someone forged it. A new incarnation above
        # the claim makes peers take our real state again (memberlist refutes the same way).
        # Spaced out, so that two processes sharing an id cannot make each other churn.
        outbid = self._me.outbid(incarnation, version)
        if outbid is None or not trusted or now - self._refuted_at < self.refute_every:
            return
        self._refuted_at = now
        self.rejections.add("refuted", "newer state claimed for this node id: refuted")
        self._me.renew(outbid)

    def _room(self, *, evict: bool) -> bool:
        """Whether one more node fits; a node that brings state may push out a heard-only one."""
        if len(self._nodes) < self.limits.max_nodes:
            return True
        if evict and self._heard_only:
            self._remove(self._nodes[next(iter(self._heard_only))])
            return True
        return self._admit.refuse("max_nodes", "node table full (gossip.max_nodes): node ignored")

    def _may_return(self, d: DigestEntry | NodeDelta, now: float) -> bool:
        """Whether gossip about this node may (re)add it: not an expired life of it."""
        tomb = self._expired.get(d.id)
        if tomb is None:
            return True
        incarnation, forget_after = tomb
        if newer(d.incarnation, incarnation):
            del self._expired[d.id]  # a new life of an expired node
            return True
        # A peer still carries this node: remember it until peers have forgotten it too.
        self._expired[d.id] = (incarnation, max(forget_after, now + self.tombstone_ttl))
        return False

    # -- liveness and expiry -------------------------------------------------------------------

    def mark_unreachable(self, node_id: str, now: float) -> None:
        """Mark a remote node unreachable; it expires ``expiry`` seconds from now."""
        node = self._nodes.get(node_id)
        if node is None or node is self._local or node.unreachable or node.left:
            return
        if node.heard_only:
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
        """Remove nodes whose expiry passed, remembering their ids; returns the removed ids.

        A heard-only node is forgotten without a tombstone: there was no state of it to keep
        out, and whoever has some can still tell us.
        """
        for node_id, (_, forget_after) in list(self._expired.items()):
            if forget_after <= now:
                del self._expired[node_id]
        removed = [n for n in self._nodes.values() if n.expiry is not None and n.expiry <= now]
        for node in removed:
            if not node.heard_only:
                self._tombstone(node, now)
            self._remove(node)
        return [n.id for n in removed]

    def _remove(self, node: NodeRecord) -> None:
        del self._nodes[node.id]
        self._heard_only.pop(node.id, None)
        self._events.append(NodeExpired(node.id))
        self._forget(node.id)

    def _tombstone(self, node: NodeRecord, now: float) -> None:
        if len(self._expired) >= self.limits.max_nodes:
            del self._expired[next(iter(self._expired))]  # the oldest
        self._expired[node.id] = (node.incarnation, now + self.tombstone_ttl)

    def _forget(self, node_id: str) -> None:
        if self._on_forget is not None:
            self._on_forget(node_id)

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

    def is_member(self, node_id: str, addr: str) -> bool:
        """Whether ``node_id`` is a remote node with state whose gossip address is ``addr``."""
        node = self._nodes.get(node_id)
        return (
            node is not None
            and node is not self._local
            and not node.heard_only
            and node.addr == addr
        )

    def remote_ids(self, *, live: bool) -> list[str]:
        """Remote nodes with state that have not left: reachable ones if ``live``, else
        unreachable ones. Heard-only nodes are not contacted (made-up ids would otherwise turn
        us into a reflector towards the addresses they name)."""
        return [
            n.id
            for n in self._nodes.values()
            if n is not self._local and not n.left and not n.heard_only and n.unreachable != live
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
        return NodeState(
            m.id, m.addr, m.version, m.left, m.unreachable, m.expiry, entries, m.incarnation
        )

    def drain_events(self) -> list[GossipEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events
