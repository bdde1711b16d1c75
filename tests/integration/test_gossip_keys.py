"""A cluster with gossip keys: members hear each other, nobody else is heard."""

from __future__ import annotations

import base64
import os
import socket
import time
from typing import Any

import aiohttp

from pico.gossip import codec
from pico.gossip.records import Entry, NodeDelta
from pico.gossip.seal import Keyring
from pico.server.node import Node
from tests.integration.test_cluster import gossip_addr
from tests.support.cluster import Harness, proxy_url, wait_for
from tests.support.services import sample_app

KEY = base64.b64encode(os.urandom(32)).decode()
OTHER_KEY = base64.b64encode(os.urandom(32)).decode()


async def keyed_cluster(h: Harness, n: int, keys: list[str]) -> list[Node]:
    gossip: dict[str, Any] = {"secret_keys": keys}
    first = await h.node(gossip=gossip)
    nodes = [first]
    for _ in range(n - 1):
        nodes.append(await h.node(gossip=gossip, cluster={"join": [gossip_addr(first)]}))
    for node in nodes:
        await wait_for(
            lambda node=node: (  # type: ignore[misc]
                len(node.cluster.remotes) == n - 1
                and all(r.status == "active" for r in node.cluster.remotes.values())
            ),
            what=f"{node.node_id} sees {n - 1} active peers",
        )
    return nodes


def fake_node_delta(endpoint: str = "ep") -> bytes:
    """An unsealed delta announcing a node that does not exist, claiming `endpoint`."""
    fake = NodeDelta(
        "intruder",
        "127.0.0.1:1",
        (
            Entry("proxy_addr", "127.0.0.1:1", 1),
            Entry("admin_addr", "127.0.0.1:1", 2),
            Entry(f"endpoint:{endpoint}", "1000", 3),
        ),
        None,
    )
    (packet,) = codec.encode_delta("intruder", "127.0.0.1:1", [fake], 1400, 1)
    return packet


def send_udp(node: Node, data: bytes) -> None:
    assert node.addrs is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(data, node.addrs.gossip)


async def test_a_keyed_cluster_forms_and_forwards(h: Harness) -> None:
    a, b, _ = await keyed_cluster(h, 3, [KEY])
    port = await h.service(sample_app())
    await h.agent(a, [f"ep/127.0.0.1:{port}"])
    await wait_for(lambda: b.cluster.remotes[a.node_id].endpoints.get("ep") == 1)
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(b), headers={"x-pico-endpoint": "ep"}) as resp:
            assert (resp.status, await resp.text()) == (200, "hello")


async def test_forged_and_foreign_packets_change_nothing(h: Harness) -> None:
    nodes = await keyed_cluster(h, 3, [KEY])
    before = {n.node_id: sorted(n.cluster.remotes) for n in nodes}
    target = nodes[0]
    unsealed = fake_node_delta()
    foreign = Keyring([base64.b64decode(OTHER_KEY)], "intruder").seal(unsealed, time.time())
    for _ in range(20):
        send_udp(target, unsealed)
        send_udp(target, foreign)
        send_udp(target, os.urandom(200))
    rejected = target.gossip.counters.rejected
    await wait_for(
        lambda: rejected.get("unsealed", 0) >= 40 and rejected.get("bad_seal", 0) >= 20,
        what="every forged packet counted",
    )
    assert {n.node_id: sorted(n.cluster.remotes) for n in nodes} == before
    assert "intruder" not in {m.id for m in target.gossip.gossiper.nodes()}
    metrics = await _metrics(target)
    assert 'pico_gossip_rejected_total{reason="unsealed"}' in metrics


async def test_a_node_without_the_keys_cannot_join(h: Harness) -> None:
    (a,) = await keyed_cluster(h, 1, [KEY])
    outsider = await h.node(
        cluster={"join": [gossip_addr(a)], "join_timeout": "1s"},
        gossip={"secret_keys": [OTHER_KEY]},
    )
    await wait_for(lambda: a.gossip.counters.rejected.get("bad_seal", 0) >= 1)
    assert outsider.node_id not in a.cluster.remotes
    assert a.node_id not in outsider.cluster.remotes


async def test_a_node_with_the_new_key_second_joins_a_cluster_on_the_old_one(h: Harness) -> None:
    """Rotation, step 1: a node restarted with [old, new] seals with the old key and opens
    both, so it joins and hears the members that have only the old one."""
    a, b = await keyed_cluster(h, 2, [KEY])
    c = await h.node(gossip={"secret_keys": [KEY, OTHER_KEY]}, cluster={"join": [gossip_addr(a)]})
    for node in (a, b, c):
        await wait_for(
            lambda node=node: len(node.cluster.remotes) == 2,  # type: ignore[misc]
            what=f"{node.node_id} hears both others",
        )


async def _metrics(node: Node) -> str:
    assert node.addrs is not None
    host, port = node.addrs.admin
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{host}:{port}/metrics") as resp:
            return await resp.text()


async def test_with_keys_only_a_members_proof_makes_a_request_forwarded(h: Harness) -> None:
    """Every node here shares 127.0.0.1: by address alone, a client's `x-pico-forward: true`
    would pass as a member's (and the node would not route it on)."""
    a, b = await keyed_cluster(h, 2, [KEY])
    port = await h.service(sample_app())
    await h.agent(a, [f"ep/127.0.0.1:{port}"])
    await wait_for(lambda: b.cluster.remotes[a.node_id].endpoints.get("ep") == 1)
    async with aiohttp.ClientSession() as http:
        for claim in ("true", "v1.intruder.1.deadbeef"):
            headers = {"x-pico-endpoint": "ep", "x-pico-forward": claim}
            async with http.get(proxy_url(b) + "/echo", headers=headers) as resp:
                assert resp.status == 200, claim  # treated as a client's, and routed to a
                assert resp.headers["x-seen-x-forwarded-for"] == "127.0.0.1"
