"""Cluster membership by gossip: sans-I/O core (this package) for an asyncio transport.

Scuttlebutt anti-entropy over per-node versioned key/values, a phi-accrual failure detector, node
states active / unreachable / left, and expiry of dead nodes (see ``reference/pico-spec.md`` §5.4),
with incarnations (a node restarted under the same id replaces its old life) and bounds on what
peers can make a node hold (:class:`Limits`).

Transport contract (UDP and TCP on the gossip port; all times are seconds from one monotonic
clock the transport owns)::

    g = Gossiper(node_id, advertise_addr, GossipConfig(interval=0.1))
    g.upsert("proxy_addr", "10.0.0.1:8000")
    # every g.next_tick_delay() seconds:
    for out in g.tick(now): udp.sendto(out.data, resolve(out.addr))
    # on every datagram (read buffer = config.max_packet_size), from source "host:port":
    try: replies = g.receive_datagram(data, now, source)   # every reply goes to source
    except GossipDecodeError: log and drop (GossipRejected: count exc.reason)
    # TCP messages are frames: codec.frame(msg) on write; on read, 4 bytes, then
    #   codec.frame_length(header, config.max_join_size) bytes.
    # join (TCP client): write g.join_request(now); read one frame; g.handle_join_reply(msg, now)
    # join (TCP server): read one frame; write g.handle_join(msg, now)
    # leave: data = g.leave_request(now); for addr in g.leave_targets(): send data, read the ack
    #   frame, g.handle_leave_ack(ack); stop after 4 acks.
    #   The server side answers with g.handle_leave(msg, now).
    # then drain g.events() and apply them to the cluster state;
    # g.rejections counts (and paces warnings about) what the limits refused.

``Outgoing.addr`` of a reply is the ``source`` it answers, never an address written in the
message; rounds and pushes go to peers' advertised addresses.
"""

from pico.gossip.codec import (
    GossipDecodeError,
    GossipError,
    GossipRejected,
    MessageType,
    frame,
    frame_length,
)
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
from pico.gossip.failure import FailureDetector
from pico.gossip.limits import Limits
from pico.gossip.protocol import GossipConfig, Gossiper, Outgoing
from pico.gossip.records import (
    COMPACT_KEY,
    LEFT_KEY,
    DigestEntry,
    Entry,
    NodeDelta,
    NodeMetadata,
    NodeState,
    newer,
)
from pico.gossip.rejections import Rejections, RejectionWarning
from pico.gossip.state import GossipState

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
    "GossipRejected",
    "GossipState",
    "Gossiper",
    "Limits",
    "MessageType",
    "NodeDelta",
    "NodeExpired",
    "NodeJoined",
    "NodeKeyDeleted",
    "NodeLeft",
    "NodeMetadata",
    "NodeReachable",
    "NodeRestarted",
    "NodeState",
    "NodeUnreachable",
    "NodeUpdated",
    "Outgoing",
    "RejectionWarning",
    "Rejections",
    "frame",
    "frame_length",
    "newer",
]
