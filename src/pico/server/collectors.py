"""Metrics computed at scrape time from the node's state (no cost on the hot path).

Cluster membership, gossip traffic and state, tunnels and their streams (including bytes held
back by flow control, so a stalled stream is visible), requests in flight, and the process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import ProcessCollector

from pico.http import proxy
from pico.server.metrics import CounterCollector, CounterFamilyCollector, GaugeCollector

if TYPE_CHECKING:
    from pico.server.node import Node

Samples = Iterable[tuple[Sequence[str], float]]

_GOSSIP_COUNTERS = (
    ("packet_bytes_inbound", "Gossip UDP bytes received.", "packet_bytes_in"),
    ("packet_bytes_outbound", "Gossip UDP bytes sent.", "packet_bytes_out"),
    ("packets_inbound", "Gossip UDP packets received.", "packets_in"),
    ("packets_outbound", "Gossip UDP packets sent.", "packets_out"),
    ("stream_bytes_inbound", "Gossip TCP (join/leave) bytes received.", "stream_bytes_in"),
    ("stream_bytes_outbound", "Gossip TCP (join/leave) bytes sent.", "stream_bytes_out"),
    ("connections_inbound", "Gossip TCP connections accepted.", "connections_in"),
    ("connections_outbound", "Gossip TCP connections made.", "connections_out"),
    ("decode_errors", "Gossip packets dropped as malformed.", "decode_errors"),
)


def register(node: Node) -> None:
    """Register every scrape-time collector of `node` in its metrics registry."""
    metrics = node.metrics

    def gauge(name: str, doc: str, labels: list[str], read: Callable[[], Samples]) -> None:
        metrics.add_collector(GaugeCollector(name, doc, labels, read))

    def nodes_by_status() -> Samples:
        counts = {"active": 0, "unreachable": 0, "left": 0}
        for info in node.cluster.nodes():
            counts[info.status] += 1
        return [((status,), float(n)) for status, n in counts.items()]

    gauge("pico_cluster_nodes", "Known nodes by status.", ["status"], nodes_by_status)

    counters = node.gossip.counters
    for name, doc, attr in _GOSSIP_COUNTERS:
        metrics.add_collector(
            CounterCollector(f"pico_gossip_{name}_total", doc, _reader(counters, attr))
        )

    metrics.add_collector(
        CounterFamilyCollector(
            "pico_gossip_rejected_total",
            "Gossip input refused, by reason: by the keyring (unsealed, bad_seal, stale), over "
            "a limit (max_nodes, max_entries, key_size, value_size, version_step, join_size), "
            "or newer state claimed for this node's id (refuted).",
            ["reason"],
            lambda: [((reason,), float(n)) for reason, n in sorted(node.gossip.rejected().items())],
        )
    )

    for direction in ("inbound", "outbound"):
        for kind in ("digest", "delta"):
            attr = f"{kind}_entries_{'in' if direction == 'inbound' else 'out'}"
            metrics.add_collector(
                CounterCollector(
                    f"pico_gossip_{kind}_entries_{direction}_total",
                    f"Gossip {kind} entries {'received' if direction == 'inbound' else 'sent'}.",
                    _stats_reader(node, attr),
                )
            )

    def gossip_entries() -> Samples:
        # Every combination is exported, 0 included: a dashboard panel on tombstones shows 0,
        # not "no data", in a cluster that has not deleted anything yet.
        counts = {(d, i): 0 for d in ("false", "true") for i in ("false", "true")}
        if node.syncer is None:
            return []
        gossiper = node.gossip.gossiper
        for meta in gossiper.nodes():
            state = gossiper.node_state(meta.id)
            for entry in state.entries if state is not None else ():
                key = (str(entry.deleted).lower(), str(entry.internal).lower())
                counts[key] = counts.get(key, 0) + 1
        return [(key, float(n)) for key, n in sorted(counts.items())]

    gauge(
        "pico_gossip_entries",
        "Gossip entries held for all nodes, by tombstone and internal flags.",
        ["deleted", "internal"],
        gossip_entries,
    )

    def in_flight() -> Samples:
        return [((), float(sum(1 for c in node.connections.snapshot() if c.busy)))]

    gauge("pico_proxy_requests_in_flight", "Requests being proxied now.", [], in_flight)
    gauge(
        "pico_proxy_client_connections",
        "Open client connections on the proxy port.",
        [],
        lambda: [((), float(len(node.connections)))],
    )
    metrics.add_collector(
        CounterFamilyCollector(
            "pico_proxy_bad_requests_total",
            "Malformed requests answered with an error and closed on the proxy port, by "
            "reason (counted for every node of the process).",
            ["reason"],
            lambda: [((r,), float(n)) for r, n in sorted(proxy.BAD_REQUESTS.counts.items())],
        )
    )
    guard = node.admin_guard
    gauge(
        "pico_admin_connections",
        "Open connections on the admin port.",
        [],
        lambda: [((), float(guard.open_connections))],
    )
    metrics.add_collector(
        CounterFamilyCollector(
            "pico_admin_rejected_connections_total",
            "Admin connections refused or closed by a limit, by reason (read_header_timeout, "
            "idle_timeout, max_connections, bad_request).",
            ["reason"],
            lambda: [((r,), float(n)) for r, n in sorted(guard.rejected.items())],
        )
    )

    def tunnel_streams() -> Samples:
        active = idle = 0
        for up in node.upstream_server.tunnels():
            total = len(up.tunnel.streams)
            pooled = up.idle_count
            idle += pooled
            active += total - pooled
        return [(("active",), float(active)), (("idle",), float(idle))]

    gauge(
        "pico_tunnel_streams",
        "Streams open on this node's tunnels: carrying a request, or idle in the keep-alive pool.",
        ["state"],
        tunnel_streams,
    )

    def flow_control() -> Samples:
        held = stalled = 0
        for up in node.upstream_server.tunnels():
            session = up.tunnel.session
            for stream_id in session.stream_ids():
                queued = session.buffered(stream_id)
                if queued:
                    held += queued
                    stalled += 1
        return [(("bytes",), float(held)), (("streams",), float(stalled))]

    gauge(
        "pico_tunnel_flow_control_blocked",
        "Bytes queued on this node waiting for a peer's stream window, and how many streams "
        "are waiting (a slow or stalled reader at the other end).",
        ["unit"],
        flow_control,
    )
    ProcessCollector(registry=metrics.registry)


def _reader(obj: object, attr: str) -> Callable[[], float]:
    return lambda: float(getattr(obj, attr))


def _stats_reader(node: Node, attr: str) -> Callable[[], float]:
    def read() -> float:
        if node.syncer is None:  # gossip not started yet
            return 0.0
        return float(getattr(node.gossip.gossiper.stats, attr))

    return read
