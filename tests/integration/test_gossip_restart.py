"""A node restarted with the same `cluster.node_id`: the others drop what its last life
published and route to what it publishes now."""

from __future__ import annotations

import aiohttp

from tests.integration.test_cluster import gossip_addr
from tests.support.cluster import Harness, proxy_url, wait_for
from tests.support.services import sample_app


async def test_a_node_restarted_with_the_same_id_is_routed_to_at_once_through_the_others(
    h: Harness,
) -> None:
    b = await h.node(proxy={"upstream_wait": "200ms"})  # old-ep: a 502 without waiting long
    old = await h.node(cluster={"node_id": "restarting", "join": [gossip_addr(b)]})
    port = await h.service(sample_app())
    old_agent = await h.agent(old, [f"old-ep/127.0.0.1:{port}"])
    await wait_for(
        lambda: (
            "restarting" in b.cluster.remotes
            and b.cluster.remotes["restarting"].endpoints.get("old-ep") == 1
        ),
        what="old-ep gossiped to b",
    )
    await old.shutdown()  # it leaves with old-ep still registered
    await old_agent.close()
    await wait_for(lambda: b.cluster.remotes["restarting"].status == "left", what="left")

    # The same id again, on new ports (port 0), with another endpoint.
    new = await h.node(cluster={"node_id": "restarting", "join": [gossip_addr(b)]})
    await h.agent(new, [f"new-ep/127.0.0.1:{port}"])
    await h.tunnel_up(new, "new-ep")

    def b_sees_the_new_life() -> bool:
        node = b.cluster.remotes.get("restarting")
        return (
            node is not None
            and node.status == "active"
            and node.endpoints == {"new-ep": 1}
            and node.proxy_addr == new.cluster.local.proxy_addr
        )

    await wait_for(b_sees_the_new_life, timeout=10, what="b routes to the restarted node")
    async with aiohttp.ClientSession() as http:
        for endpoint, status in (("new-ep", 200), ("old-ep", 502)):
            headers = {"x-pico-endpoint": endpoint}
            async with http.get(proxy_url(b) + "/whoami", headers=headers) as resp:
                assert resp.status == status, endpoint
