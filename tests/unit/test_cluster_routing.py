"""Cluster state and the gossip syncer: who has which endpoint, and whom to forward to."""

from __future__ import annotations

import random
from collections import Counter

from pico.gossip import (
    GossipConfig,
    Gossiper,
    NodeExpired,
    NodeJoined,
    NodeKeyDeleted,
    NodeLeft,
    NodeReachable,
    NodeRestarted,
    NodeUnreachable,
    NodeUpdated,
)
from pico.server.cluster import ClusterState, NodeInfo
from pico.server.syncer import ClusterSyncer


def state(seed: int = 1) -> ClusterState:
    return ClusterState(
        NodeInfo(id="local", proxy_addr="10.0.0.1:8000", admin_addr="10.0.0.1:8002"),
        rng=random.Random(seed),
    )


def syncer(cluster: ClusterState) -> ClusterSyncer:
    return ClusterSyncer(cluster, Gossiper("local", "10.0.0.1:8003"))


def add(sync: ClusterSyncer, node_id: str, **endpoints: int) -> None:
    sync.apply(
        [
            NodeJoined(node_id, f"{node_id}:8003"),
            NodeUpdated(node_id, "proxy_addr", f"{node_id}:8000"),
            NodeUpdated(node_id, "admin_addr", f"{node_id}:8002"),
            *(NodeUpdated(node_id, f"endpoint:{k}", str(v)) for k, v in endpoints.items()),
        ]
    )


def test_node_is_routable_only_once_both_addresses_are_known() -> None:
    cluster = state()
    sync = syncer(cluster)
    sync.apply([NodeJoined("b", "b:8003"), NodeUpdated("b", "endpoint:ep", "2")])
    sync.apply([NodeUpdated("b", "proxy_addr", "b:8000")])
    assert "b" not in cluster.remotes
    assert cluster.remote_candidates("ep") == []
    sync.apply([NodeUpdated("b", "admin_addr", "b:8002")])
    assert cluster.remotes["b"].endpoints == {"ep": 2}
    assert [n.id for n in cluster.remote_candidates("ep")] == ["b"]


def test_unreachable_and_left_nodes_are_not_routed_to() -> None:
    cluster = state()
    sync = syncer(cluster)
    add(sync, "b", ep=1)
    add(sync, "c", ep=1)
    sync.apply([NodeUnreachable("b")])
    assert [n.id for n in cluster.remote_candidates("ep")] == ["c"]
    sync.apply([NodeReachable("b"), NodeLeft("c")])
    assert [n.id for n in cluster.remote_candidates("ep")] == ["b"]
    sync.apply([NodeExpired("c")])
    assert "c" not in cluster.remotes


def test_deleted_endpoint_key_stops_routing() -> None:
    cluster = state()
    sync = syncer(cluster)
    add(sync, "b", ep=1)
    sync.apply([NodeKeyDeleted("b", "endpoint:ep")])
    assert cluster.remote_candidates("ep") == []


def test_remote_choice_is_weighted_by_upstream_count() -> None:
    cluster = state()
    sync = syncer(cluster)
    add(sync, "b", ep=1)
    add(sync, "c", ep=3)
    firsts = Counter(cluster.remote_candidates("ep")[0].id for _ in range(4000))
    assert 0.2 < firsts["b"] / 4000 < 0.3  # expected 1/4
    # Every candidate list holds each node once, so a retry goes to another node.
    assert sorted(n.id for n in cluster.remote_candidates("ep")) == ["b", "c"]


def test_events_about_the_local_node_are_ignored() -> None:
    cluster = state()
    sync = syncer(cluster)
    add(sync, "local", ep=1)
    assert cluster.remotes == {}


def test_local_endpoint_counts_are_published_and_deleted_at_zero() -> None:
    cluster = state()
    gossiper = Gossiper("local", "10.0.0.1:8003")
    sync = ClusterSyncer(cluster, gossiper)
    sync.publish_local()
    sync.local_endpoint_changed("ep", 2)
    entries = {e.key: e for e in gossiper.node_state("local").entries}  # type: ignore[union-attr]
    assert entries["endpoint:ep"].value == "2"
    assert entries["proxy_addr"].value == "10.0.0.1:8000"
    sync.local_endpoint_changed("ep", 0)
    entries = {e.key: e for e in gossiper.node_state("local").entries}  # type: ignore[union-attr]
    assert entries["endpoint:ep"].deleted


def test_addresses_that_are_not_a_plain_host_port_never_make_a_node_known() -> None:
    """A fake admin_addr once turned `?forward=` into a request to any URL (SSRF)."""
    cluster = state()
    sync = syncer(cluster)
    bad = [
        "10.0.0.9:8002/admin?x=",
        "evil@10.0.0.9:8002",
        "10.0.0.9:8002#frag",
        "10.0.0.9",
        ":8002",
        "10.0.0.9:99999",
        " 10.0.0.9:8002",
        "http://10.0.0.9:8002",
    ]
    for i, addr in enumerate(bad):
        node = f"n{i}"
        sync.apply(
            [
                NodeJoined(node, f"{node}:8003"),
                NodeUpdated(node, "proxy_addr", "10.0.0.9:8000"),
                NodeUpdated(node, "admin_addr", addr),
            ]
        )
        assert node not in cluster.remotes, addr
    sync.apply([NodeUpdated("n0", "admin_addr", "[fd00::9]:8002")])
    assert cluster.remotes["n0"].admin_addr == "[fd00::9]:8002"


def test_a_restarted_node_loses_its_old_endpoints_and_takes_its_new_addresses() -> None:
    cluster = state()
    lost: list[tuple[str, bool]] = []
    gone: list[str] = []
    sync = ClusterSyncer(
        cluster,
        Gossiper("local", "10.0.0.1:8003"),
        on_node_gone=gone.append,
        on_endpoint=lambda ep, up: lost.append((ep, up)),
    )
    add(sync, "b", old=1)
    sync.apply([NodeLeft("b")])
    lost.clear()
    gone.clear()
    sync.apply(
        [
            NodeRestarted("b", "b:9003"),
            NodeUpdated("b", "proxy_addr", "b:9000"),
            NodeUpdated("b", "admin_addr", "b:9002"),
            NodeUpdated("b", "endpoint:new", "1"),
        ]
    )
    node = cluster.remotes["b"]
    assert (node.status, node.proxy_addr, node.endpoints) == ("active", "b:9000", {"new": 1})
    assert gone == ["b"]  # its connection pool (to the old address) is dropped
    assert lost == [("new", True)]
    assert [n.id for n in cluster.remote_candidates("new")] == ["b"]
    assert cluster.remote_candidates("old") == []


def test_an_endpoint_over_the_entry_limit_is_served_locally_but_not_gossiped() -> None:
    cluster = state()
    gossiper = Gossiper("local", "10.0.0.1:8003", GossipConfig(max_entries_per_node=8))
    sync = ClusterSyncer(cluster, gossiper)
    sync.publish_local()
    for i in range(10):
        sync.local_endpoint_changed(f"ep{i}", 1)  # never raises into the registry
    published = {e.key for e in gossiper.node_state("local").entries}  # type: ignore[union-attr]
    assert len(published) == 6
