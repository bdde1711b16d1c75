"""Cluster membership by gossip: sans-I/O core (this package) for an asyncio transport.

Scuttlebutt anti-entropy over per-node versioned key/values, a phi-accrual failure detector, node
states active / unreachable / left, and expiry of dead nodes (see ``reference/pico-spec.md`` §5.4).

Transport contract (UDP and TCP on the gossip port; all times are seconds from one monotonic
clock the transport owns)::

    g = Gossiper(node_id, advertise_addr, GossipConfig(interval=0.1))
    g.upsert("proxy_addr", "10.0.0.1:8000")
    # every g.next_tick_delay() seconds:
    for out in g.tick(now): udp.sendto(out.data, resolve(out.addr))
    # on every datagram (read buffer = config.max_packet_size):
    try: replies = g.receive_datagram(data, now)
    except GossipDecodeError: log and drop
    # join (TCP client): write g.join_request(now); read until
    #   stream_message_length(buf, reply=True) is not None; g.handle_join_reply(msg, now)
    # join (TCP server): read a request with stream_message_length(buf, reply=False);
    #   write g.handle_join(msg, now)
    # leave: data = g.leave_request(now); for addr in g.leave_targets(): send data, read the ack
    #   (stream_message_length(buf, reply=True)), g.handle_leave_ack(ack); stop after 4 acks.
    #   The server side answers with g.handle_leave(msg, now).
    # then drain g.events() and apply them to the cluster state.

``Outgoing.addr`` is the peer's advertised "host:port" string from the message header, never the
UDP source address.
"""

from pico.gossip.codec import (
    GossipDecodeError,
    GossipError,
    MessageType,
    stream_message_length,
)
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
from pico.gossip.failure import FailureDetector
from pico.gossip.protocol import GossipConfig, Gossiper, Outgoing
from pico.gossip.state import (
    COMPACT_KEY,
    LEFT_KEY,
    DigestEntry,
    Entry,
    GossipState,
    NodeDelta,
    NodeMetadata,
    NodeState,
)

__all__ = [
    "COMPACT_KEY",
    "LEFT_KEY",
    "DigestEntry",
    "Entry",
    "FailureDetector",
    "GossipConfig",
    "GossipDecodeError",
    "GossipError",
    "GossipEvent",
    "GossipState",
    "Gossiper",
    "MessageType",
    "NodeDelta",
    "NodeExpired",
    "NodeJoined",
    "NodeKeyDeleted",
    "NodeLeft",
    "NodeMetadata",
    "NodeReachable",
    "NodeState",
    "NodeUnreachable",
    "NodeUpdated",
    "Outgoing",
    "stream_message_length",
]
