"""The sans-I/O gossip node: bytes and time in, datagrams and events out.

A :class:`Gossiper` owns a :class:`~pico.gossip.state.GossipState` and a
:class:`~pico.gossip.failure.FailureDetector`. The transport calls :meth:`Gossiper.tick` every
``interval`` (plus :meth:`Gossiper.next_tick_delay` jitter), feeds it every UDP datagram with
:meth:`Gossiper.receive_datagram`, sends the returned :class:`Outgoing` datagrams, runs the TCP
join and leave exchanges with the ``join_*``/``leave_*``/``handle_*`` methods, and drains
:meth:`Gossiper.events`. Nothing here blocks, reads a clock (but for the default incarnation,
the wall-clock time of construction), or touches a socket.

Replies go to the datagram's source address, never to an address written in it, and a reply to
a sender that is not a known member at that address is at most 4 times the size of its request:
a spoofed source can neither reflect our traffic to a third party nor amplify it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pico.gossip import codec
from pico.gossip.events import GossipEvent
from pico.gossip.failure import Distribution, FailureDetector
from pico.gossip.limits import Limits, text_size
from pico.gossip.records import DigestEntry, Entry, NodeDelta, NodeMetadata, NodeState
from pico.gossip.rejections import Rejections
from pico.gossip.state import GossipState

# Bytes of a delta datagram around one entry (prefix, headers); an entry larger than
# max_packet_size minus this could never be gossiped over UDP, so local upserts refuse it.
_DELTA_OVERHEAD = 256
# A reply to a sender that is not a member at its source address is at most this many times
# its request: a spoofed source can then not turn us into an amplifier.
_REPLY_FACTOR = 4


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Gossip tuning; times are seconds.

    * ``interval``: time between rounds (each round sends about 4 datagrams per node).
    * ``fanout``: live nodes sent a digest each round. More peers per round means faster
      convergence and failure detection (a pair hears from each other every
      ``peers / (2 * fanout)`` rounds, and detection takes about 18 such gaps) for a few
      more small datagrams.
    * ``push_limit``: nodes sent a digest at once by :meth:`Gossiper.push` (a local change).
    * ``max_packet_size``: bytes per UDP datagram, sent and received.
    * ``max_delta_packets``: datagrams in one delta reply; bounds what one digest (which is
      unauthenticated UDP) can make us send; the rest follows in later rounds.
    * ``expiry``: how long a left or unreachable node is kept before it is removed.
    * ``tombstone_ttl``: how long an expired node id is ignored after a peer last mentioned it
      (default ``2 * expiry``).
    * ``phi_threshold``: suspicion above which a node is unreachable.
    * ``failure_window``: arrival intervals remembered per node (memory: one float each).
    * ``failure_distribution``: see :mod:`pico.gossip.failure`.
    * ``compact_threshold``: local tombstones that trigger compaction.
    * ``maintenance_every``: rounds between compaction/expiry passes (and the least time
      between two refutations).
    * ``max_nodes``, ``max_entries_per_node``, ``max_key_size``, ``max_value_size``,
      ``max_version_step``: see :class:`~pico.gossip.limits.Limits`.
    * ``max_join_size``: bytes of one TCP join/leave message, sent or received (a join carries
      the whole cluster state; the transport buffers one message of this size per exchange).
    """

    interval: float = 0.1
    fanout: int = 3
    push_limit: int = 16
    max_packet_size: int = 1400
    max_delta_packets: int = 16
    expiry: float = 60.0
    tombstone_ttl: float | None = None
    phi_threshold: float = 5.0
    failure_window: int = 50
    failure_distribution: Distribution = "exponential"
    compact_threshold: int = 100
    maintenance_every: int = 10
    max_nodes: int = 1024
    max_entries_per_node: int = 16384
    max_key_size: int = 256
    max_value_size: int = 1024
    max_version_step: int = 1 << 32
    max_join_size: int = 16 << 20

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError("interval must be positive")
        if self.max_packet_size < 2 * _DELTA_OVERHEAD:
            raise ValueError(f"max_packet_size must be at least {2 * _DELTA_OVERHEAD}")
        if self.max_delta_packets < 1:
            raise ValueError("max_delta_packets must be at least 1")
        if self.max_join_size < self.max_packet_size:
            raise ValueError("max_join_size must be at least max_packet_size")
        self.limits()  # raises now for inconsistent limits, not at first use

    def limits(self) -> Limits:
        """The state bounds of this configuration (raises ValueError if inconsistent)."""
        return Limits(
            max_nodes=self.max_nodes,
            max_entries_per_node=self.max_entries_per_node,
            max_key_size=self.max_key_size,
            max_value_size=self.max_value_size,
            max_version_step=self.max_version_step,
        )


@dataclass(slots=True)
class GossipStats:
    """Entries carried by datagrams, in and out (for metrics; digests count entries offered)."""

    digest_entries_in: int = 0
    digest_entries_out: int = 0
    delta_entries_in: int = 0
    delta_entries_out: int = 0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A datagram to send to ``addr`` ("host:port"): a peer's advertised gossip address for
    rounds and pushes, the datagram's source address for replies."""

    addr: str
    data: bytes


class Gossiper:
    """One cluster member's gossip protocol.

    ``rng`` drives peer choice and digest order; pass a seeded ``random.Random`` for
    deterministic tests. ``incarnation`` tells this life of the node id from earlier ones: it
    must be newer (see :func:`~pico.gossip.records.newer`) than any earlier life's, which the
    default, the wall-clock time in nanoseconds, is unless the clock went back (then the node
    refutes its old life when it hears of it). Methods that take bytes raise
    :class:`~pico.gossip.codec.GossipDecodeError` on malformed input and leave the state
    unchanged. Input over a limit is dropped (the offending part only, where the rest stands
    alone) and counted in ``rejections``.
    """

    def __init__(
        self,
        node_id: str,
        addr: str,
        config: GossipConfig | None = None,
        *,
        rng: random.Random | None = None,
        incarnation: int | None = None,
    ) -> None:
        self.config = config if config is not None else GossipConfig()
        self._rng = rng if rng is not None else random.Random()
        self.rejections = Rejections()
        self._detector = FailureDetector(
            2 * self.config.interval,
            # Packets of one exchange (digest, delta, digest reply) arrive within a round trip;
            # they are one arrival. Exchanges started by different nodes are separate arrivals.
            min_interval=self.config.interval / 10,
            window_size=self.config.failure_window,
            distribution=self.config.failure_distribution,
        )
        self._state = GossipState(
            node_id,
            addr,
            incarnation=time.time_ns() if incarnation is None else incarnation,
            expiry=self.config.expiry,
            tombstone_ttl=self.config.tombstone_ttl,
            compact_threshold=self.config.compact_threshold,
            limits=self.config.limits(),
            rejections=self.rejections,
            refute_every=self.config.maintenance_every * self.config.interval,
            on_forget=self._detector.remove,
        )
        self._next_maintenance: float | None = None
        self.stats = GossipStats()
        self._state_size = 0

    @property
    def node_id(self) -> str:
        """The local node id."""
        return self._state.node_id

    @property
    def addr(self) -> str:
        """The local advertised gossip address."""
        return self._state.addr

    @property
    def incarnation(self) -> int:
        """The current life of the local node id (it changes when the node refutes one)."""
        return self._state.incarnation

    # -- local state ---------------------------------------------------------------------------

    def upsert(self, key: str, value: str) -> None:
        """Publish ``key = value`` (a no-op if unchanged).

        Raises ``ValueError`` for internal keys, for entries too large for a datagram or for
        the key and value limits peers apply, and for a new key once the node has as many
        entries as peers accept.
        """
        if key.startswith("_internal:"):
            raise ValueError(f"{key!r} is reserved for the gossip protocol")
        size = codec.encoded_entry_size(Entry(key, value, 2**64 - 1, False, False))
        if size > self.config.max_packet_size - _DELTA_OVERHEAD:
            raise ValueError(f"entry {key!r} ({size} bytes) does not fit in a gossip datagram")
        if text_size(key) > self.config.max_key_size:
            raise ValueError(f"key {key!r} is over gossip.max_key_size")
        if text_size(value) > self.config.max_value_size:
            raise ValueError(f"value of {key!r} is over gossip.max_value_size")
        self._state.upsert(key, value)

    def delete(self, key: str) -> None:
        """Delete a published key (a no-op if missing)."""
        self._state.delete(key)

    # -- rounds --------------------------------------------------------------------------------

    def next_tick_delay(self) -> float:
        """How long the transport should wait before the next :meth:`tick` (interval + 0-10 %)."""
        return self.config.interval * (1.0 + 0.1 * self._rng.random())

    def tick(self, now: float) -> list[Outgoing]:
        """Run one gossip round: failure detection, maintenance, and digests to send.

        Sends a digest (``request=true``) to ``fanout`` random live nodes and to a random
        unreachable node. After the local node has left it only runs maintenance.
        """
        live = self._state.remote_ids(live=True)
        unreachable = self._state.remote_ids(live=False)
        self._detect_failures(now, live, unreachable)
        if self._next_maintenance is None:
            self._next_maintenance = now + self.config.maintenance_every * self.config.interval
        elif now >= self._next_maintenance:
            self._next_maintenance = now + self.config.maintenance_every * self.config.interval
            self._state.compact()
            self._state.expire(now)  # forgets the failure history of what it removes
        if self._state.left:
            return []
        # Recomputed: detection and expiry may have moved nodes between the two sets.
        live = self._state.remote_ids(live=True)
        chosen = self._rng.sample(live, min(self.config.fanout, len(live)))
        # Probe nodes we are starting to suspect directly: a live one answers within a round
        # (even with some packet loss) and clears the suspicion, so the threshold can be low
        # enough to detect a dead node in a few seconds without false alarms.
        probe_at = self.config.phi_threshold / 2
        suspects = [n for n in live if n not in chosen and self._detector.phi(n, now) > probe_at]
        chosen += suspects[: self.config.fanout]
        unreachable = self._state.remote_ids(live=False)
        if unreachable:
            chosen.append(self._rng.choice(unreachable))
        targets = [self._state.addr_of(node_id) for node_id in chosen]
        if not targets:
            return []
        digest = self._digest_packet(request=True)
        self.stats.digest_entries_out += self._state_size * (len(targets) - 1)
        return [Outgoing(addr, digest) for addr in targets]

    def push(self, now: float) -> list[Outgoing]:
        """Digests for every live node (at most `push_limit`), to spread a local change now.

        Each receiver answers with its own digest, and our reply to that carries the change:
        about one and a half round trips instead of waiting for the next rounds.
        """
        if self._state.left:
            return []
        live = self._state.remote_ids(live=True)
        if len(live) > self.config.push_limit:
            live = self._rng.sample(live, self.config.push_limit)
        if not live:
            return []
        digest = self._digest_packet(request=True)
        return [Outgoing(self._state.addr_of(node_id), digest) for node_id in live]

    def _detect_failures(self, now: float, live: list[str], unreachable: list[str]) -> None:
        # A pair of nodes hears from each other when either picks the other, on average every
        # (peers / (2 * fanout)) rounds; seed new histories with twice that (at least 2 rounds)
        # so that a freshly discovered node in a large cluster is not suspected too early.
        self._detector.bootstrap_interval = self.config.interval * max(
            2.0, (len(live) + len(unreachable)) / self.config.fanout
        )
        threshold = self.config.phi_threshold
        for node_id in live:
            if self._detector.phi(node_id, now) > threshold:
                self._state.mark_unreachable(node_id, now)
        for node_id in unreachable:
            if self._detector.phi(node_id, now) <= threshold:
                self._state.mark_reachable(node_id)

    def _digest_packet(self, *, request: bool, max_size: int | None = None) -> bytes:
        digest = self._state.digest()
        self._state_size = len(digest)
        self.stats.digest_entries_out += len(digest)
        own, others = digest[0], digest[1:]
        self._rng.shuffle(others)
        size = self.config.max_packet_size if max_size is None else max_size
        return codec.encode_digest(
            self.node_id,
            self.addr,
            request,
            [own, *others],
            size,
            incarnation=self._state.incarnation,
        )

    def receive_datagram(self, data: bytes, now: float, source: str) -> list[Outgoing]:
        """Handle one UDP datagram from ``source`` ("host:port", the datagram's source address,
        or the advertised address of the peer it belongs to); returns the datagrams to send in
        reply, all to ``source``.

        A digest is always answered with a delta (possibly empty: it doubles as a heartbeat), and
        with our own digest if it asked for one. Unless the sender is a member at ``source``,
        the reply is at most 4 times the size of the digest: a delta truncated to fit, then our
        digest if there is room. Any datagram counts as an arrival from its sender.
        """
        message = codec.decode_datagram(data)
        sender = message.node_id
        if sender == self.node_id:
            return []
        self._contact(sender)
        member = self._state.is_member(sender, source)
        stats = self.stats
        if isinstance(message, codec.Delta):
            stats.delta_entries_in += sum(len(n.entries) for n in message.nodes)
            self._state.apply_delta(message.nodes, now, refute=member)
            self._heard_from(sender, now)
            return []
        stats.digest_entries_in += len(message.entries)
        self._state.apply_digest(message.entries, now, refute=member)
        self._heard_from(sender, now)
        delta = self._state.delta(message.entries)
        stats.delta_entries_out += sum(len(n.entries) for n in delta)
        if member:
            packets = self._delta_packets(
                delta, self.config.max_packet_size, self.config.max_delta_packets
            )
            if message.request and not self._state.left:
                packets.append(self._digest_packet(request=False))
        else:
            packets = self._bounded_reply(delta, message.request, _REPLY_FACTOR * len(data))
        return [Outgoing(source, packet) for packet in packets]

    def _delta_packets(self, delta: Sequence[NodeDelta], size: int, count: int) -> list[bytes]:
        return codec.encode_delta(
            self.node_id, self.addr, delta, size, count, incarnation=self._state.incarnation
        )

    def _bounded_reply(self, delta: Sequence[NodeDelta], request: bool, budget: int) -> list[bytes]:
        (packet,) = self._delta_packets(delta, min(budget, self.config.max_packet_size), 1)
        if len(packet) > budget:
            return []  # not even an empty delta fits: a tiny datagram gets no answer
        packets = [packet]
        budget -= len(packet)
        if request and not self._state.left:
            digest = self._digest_packet(request=False, max_size=budget)
            if len(digest) <= budget:
                packets.append(digest)
        return packets

    def _contact(self, sender: str) -> None:
        # Gossip *about* an expired node is ignored, but a packet *from* it proves it is alive
        # (e.g. a partition healed after expiry), so it may rejoin.
        if self._state.is_expired(sender):
            self._state.forget_expired(sender)

    def _heard_from(self, sender: str, now: float) -> None:
        if self._state.knows(sender):
            self._detector.report(sender, now)

    # -- TCP join and leave --------------------------------------------------------------------

    def join_request(self, now: float) -> bytes:
        """The TCP join request to send to a seed node: our full state and full digest."""
        return codec.encode_join(
            self.node_id,
            self.addr,
            [self._state.local_delta()],
            self._state.digest(),
            incarnation=self._state.incarnation,
        )

    def handle_join(self, data: bytes, now: float) -> bytes:
        """Serve a TCP join request; returns the reply (the state the joiner is missing)."""
        join = codec.decode_join(data)
        if join.node_id != self.node_id:
            self._contact(join.node_id)
            self._state.apply_delta(join.nodes, now)
            # A member now, even if it has published nothing yet.
            self._state.add_member(join.node_id, join.addr, join.incarnation, now)
            self._state.apply_digest(join.digest, now)
            self._heard_from(join.node_id, now)
        nodes = self._state.delta(join.digest, include_missing=True)
        return codec.encode_join_reply(
            self.node_id, self.addr, nodes, incarnation=self._state.incarnation
        )

    def handle_join_reply(self, data: bytes, now: float) -> str:
        """Apply a join reply; returns the responder's node id (ours when we joined ourselves).

        We chose the responder and reached it over TCP: what it holds about our own id is
        trusted enough to refute (a restart with a clock behind the last life's).
        """
        reply = codec.decode_join(data)
        if reply.node_id != self.node_id:
            self._contact(reply.node_id)
            self._state.apply_delta(reply.nodes, now, refute=True)
            # The reply only carries nodes with entries; the responder itself is known regardless.
            self._state.add_member(reply.node_id, reply.addr, reply.incarnation, now)
            self._heard_from(reply.node_id, now)
        return reply.node_id

    def leave_request(self, now: float) -> bytes:
        """Mark the local node left; returns the TCP leave notification to send to peers.

        Send it to the addresses from :meth:`leave_targets` until 4 have acknowledged.
        """
        self._state.mark_left()
        return codec.encode_leave(
            self.node_id,
            self.addr,
            [self._state.local_delta()],
            incarnation=self._state.incarnation,
        )

    def leave_targets(self) -> list[str]:
        """Addresses of the live remote nodes, shuffled, to notify of our leave."""
        addrs = [self._state.addr_of(n) for n in self._state.remote_ids(live=True)]
        self._rng.shuffle(addrs)
        return addrs

    def handle_leave(self, data: bytes, now: float) -> bytes:
        """Apply a peer's leave notification; returns the ack to send back."""
        leave = codec.decode_leave(data)
        if leave.node_id != self.node_id:
            self._state.apply_delta(leave.nodes, now)
            self._heard_from(leave.node_id, now)
        return codec.encode_leave_ack(self.node_id, self.addr, incarnation=self._state.incarnation)

    def handle_leave_ack(self, data: bytes) -> str:
        """Check a leave ack; returns the acknowledging node's id."""
        return codec.decode_leave(data).node_id

    # -- queries -------------------------------------------------------------------------------

    def events(self) -> list[GossipEvent]:
        """Events since the last call, oldest first."""
        return self._state.drain_events()

    def nodes(self) -> list[NodeMetadata]:
        """Metadata of every known node (the local one included), sorted by id."""
        return self._state.metadata()

    def node_state(self, node_id: str) -> NodeState | None:
        """A node's metadata and entries, or ``None`` if unknown."""
        return self._state.node_state(node_id)

    def digest(self) -> list[DigestEntry]:
        """The full local digest (for status and tests)."""
        return self._state.digest()
