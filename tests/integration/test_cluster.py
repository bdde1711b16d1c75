"""An in-process 3-node cluster: membership by gossip, cross-node forwarding, leave."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

import aiohttp

from pico.server.node import Node
from tests.support.cluster import Harness, admin_url, connect, proxy_url, wait_for
from tests.support.services import sample_app


def gossip_addr(node: Node) -> str:
    assert node.addrs is not None
    host, port = node.addrs.gossip
    return f"{host}:{port}"


async def cluster(h: Harness, n: int = 3, **sections: Any) -> list[Node]:
    first = await h.node(**sections)
    nodes = [first]
    for _ in range(n - 1):
        nodes.append(await h.node(cluster={"join": [gossip_addr(first)]}, **sections))
    for node in nodes:
        await wait_for(
            lambda node=node: (
                len(node.cluster.remotes) == n - 1  # type: ignore[misc]
                and all(r.status == "active" for r in node.cluster.remotes.values())
            ),
            what=f"{node.node_id} sees {n - 1} active peers",
        )
    return nodes


async def test_nodes_discover_each_other_through_one_seed(h: Harness) -> None:
    nodes = await cluster(h)
    async with aiohttp.ClientSession() as http:
        async with http.get(admin_url(nodes[2]) + "/status/cluster/nodes") as resp:
            listed = await resp.json()
    assert sorted(n["id"] for n in listed) == sorted(n.node_id for n in nodes)
    assert {n["status"] for n in listed} == {"active"}


async def test_request_to_any_node_is_forwarded_to_the_node_with_the_tunnel(h: Harness) -> None:
    a, b, c = await cluster(h)
    port = await h.service(sample_app())
    await h.agent(a, [f"my-endpoint/127.0.0.1:{port}"])
    await h.tunnel_up(a, "my-endpoint")
    for node in (b, c):
        await wait_for(
            lambda node=node: node.cluster.remotes[a.node_id].endpoints.get("my-endpoint") == 1,  # type: ignore[misc]
            what="endpoint gossiped",
        )
    async with aiohttp.ClientSession() as http:
        for node in (a, b, c):
            for _ in range(3):
                headers = {"x-pico-endpoint": "my-endpoint"}
                async with http.get(proxy_url(node) + "/echo", headers=headers) as resp:
                    assert resp.status == 200
                    # One X-Forwarded-For entry: the client, not the forwarding node.
                    assert resp.headers["x-seen-x-forwarded-for"] == "127.0.0.1"
        async with http.get(admin_url(b) + "/metrics") as resp:
            metrics = await resp.text()
    assert f'pico_proxy_forwarded_remote_total{{node_id="{a.node_id}"}} 3.0' in metrics


async def test_forwarded_request_is_never_forwarded_again(h: Harness) -> None:
    a, b, _ = await cluster(h)
    port = await h.service(sample_app())
    await h.agent(a, [f"my-endpoint/127.0.0.1:{port}"])
    await wait_for(lambda: b.cluster.remotes[a.node_id].endpoints.get("my-endpoint") == 1)
    async with aiohttp.ClientSession() as http:
        headers = {"x-pico-endpoint": "my-endpoint", "x-pico-forward": "true"}
        async with http.get(proxy_url(b), headers=headers) as resp:
            assert resp.status == 502
            assert await resp.json() == {"error": "no available upstreams"}


async def test_requests_spread_over_every_node_with_the_endpoint(h: Harness) -> None:
    a, b, c = await cluster(h)
    port_a = await h.service(sample_app("service-a"))
    port_b = await h.service(sample_app("service-b"))
    await h.agent(a, [f"ep/127.0.0.1:{port_a}"])
    await h.agent(b, [f"ep/127.0.0.1:{port_b}"])
    await wait_for(
        lambda: all(c.cluster.remotes[n.node_id].endpoints.get("ep") == 1 for n in (a, b)),
        what="both endpoints gossiped to c",
    )
    seen: set[str] = set()
    async with aiohttp.ClientSession() as http:
        for _ in range(40):
            async with http.get(proxy_url(c) + "/whoami", headers={"x-pico-endpoint": "ep"}) as r:
                assert r.status == 200
                seen.add(await r.text())
    assert seen == {"service-a", "service-b"}


async def test_stopped_node_is_seen_as_left_and_dropped_from_routing(h: Harness) -> None:
    a, b, c = await cluster(h, proxy={"upstream_wait": "200ms"})
    port = await h.service(sample_app())
    await h.agent(a, [f"my-endpoint/127.0.0.1:{port}"])
    await wait_for(lambda: b.cluster.remotes[a.node_id].endpoints.get("my-endpoint") == 1)
    await a.shutdown()
    for node in (b, c):
        await wait_for(
            lambda node=node: node.cluster.remotes[a.node_id].status == "left",  # type: ignore[misc]
            what="left",
        )
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(b), headers={"x-pico-endpoint": "my-endpoint"}) as resp:
            assert resp.status == 502


async def test_admin_forward_query_reaches_the_named_node(h: Harness) -> None:
    a, b, _ = await cluster(h)
    async with aiohttp.ClientSession() as http:
        url = admin_url(a) + f"/status/cluster/nodes/local?forward={b.node_id}"
        async with http.get(url) as resp:
            assert (await resp.json())["id"] == b.node_id
        async with http.get(admin_url(a) + "/status/proxy/endpoints?forward=nope") as resp:
            assert resp.status == 404
        async with http.get(admin_url(a) + "/status/gossip/nodes") as resp:
            gossip = await resp.json()
        assert len(gossip) == 3
        async with http.get(admin_url(a) + f"/status/gossip/nodes/{b.node_id}") as resp:
            state = await resp.json()
        assert {e["key"] for e in state["entries"]} >= {"proxy_addr", "admin_addr"}


async def test_forward_header_from_a_client_is_not_trusted(h: Harness) -> None:
    node = await h.node()  # alone: no peer may mark a request as forwarded
    port = await h.service(sample_app())
    await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    async with aiohttp.ClientSession() as http:
        headers = {
            "x-pico-endpoint": "ep",
            "x-pico-forward": "true",
            "X-Forwarded-For": "10.9.9.9",
        }
        async with http.get(proxy_url(node) + "/echo", headers=headers) as resp:
            assert resp.status == 200
            # The client's own address is appended: a spoofed header cannot hide it.
            assert resp.headers["x-seen-x-forwarded-for"] == "10.9.9.9, 127.0.0.1"


async def test_request_waits_for_an_endpoint_whose_node_just_left(h: Harness) -> None:
    a, b, c = await cluster(h)
    port = await h.service(sample_app())
    agent_a = await h.agent(a, [f"ep/127.0.0.1:{port}"])
    await wait_for(lambda: c.cluster.remotes[a.node_id].endpoints.get("ep") == 1)
    await agent_a.close()
    await a.shutdown()  # its endpoint is gone cluster-wide: c has nowhere to send "ep"
    await wait_for(lambda: c.cluster.remotes[a.node_id].status == "left", what="a left")
    async with aiohttp.ClientSession() as http:
        held = asyncio.ensure_future(
            http.get(proxy_url(c) + "/whoami", headers={"x-pico-endpoint": "ep"})
        )
        await wait_for(lambda: c.router._waiting == 1, what="request held")
        # The agent comes back on b (as through a load balancer): the held request goes there.
        await h.agent(b, [f"ep/127.0.0.1:{port}"])
        resp = await asyncio.wait_for(held, 10)
        assert resp.status == 200
        assert await resp.text() == "service"
        resp.release()


async def test_request_for_a_never_seen_endpoint_is_not_held(h: Harness) -> None:
    a, _, _ = await cluster(h)
    assert a.router.wait_for_upstream("never", lambda: None) is None
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(a), headers={"x-pico-endpoint": "never"}) as resp:
            assert resp.status == 502
            assert await resp.json() == {"error": "no available upstreams"}


async def test_new_endpoint_is_routable_from_other_nodes_before_the_next_gossip_round(
    h: Harness,
) -> None:
    # Rounds every 30 s: only the push on registration can tell the other nodes in time.
    first = await h.node(gossip={"interval": "30s"})
    others = [
        await h.node(gossip={"interval": "30s"}, cluster={"join": [gossip_addr(first)]})
        for _ in range(2)
    ]
    port = await h.service(sample_app())
    await h.agent(first, [f"ep/127.0.0.1:{port}"])
    for node in others:
        await wait_for(
            lambda node=node: (
                node.cluster.remotes.get(first.node_id) is not None  # type: ignore[misc]
                and node.cluster.remotes[first.node_id].endpoints.get("ep") == 1
            ),
            timeout=5,
            what="endpoint pushed",
        )
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(others[0]), headers={"x-pico-endpoint": "ep"}) as resp:
            assert resp.status == 200


async def test_a_client_abort_on_a_forwarding_node_reaches_the_service(h: Harness) -> None:
    # The client gives up on node B (its connection is reset), which forwarded its request to
    # A: the service behind A must learn it (its connection ends), not keep working for
    # nobody. B used to end its connection to A with a FIN, which A took for a client that
    # half-closed and still waits for the answer.
    a, b = await cluster(h, n=2)
    got_request, service_gone = asyncio.Event(), asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got_request.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # never answered: returns when the node ends the connection
        service_gone.set()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await h.agent(a, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(a, "ep")
    await wait_for(
        lambda: b.cluster.remotes[a.node_id].endpoints.get("ep") == 1, what="endpoint gossiped"
    )
    client = await connect(b)
    await client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\n\r\n")
    await asyncio.wait_for(got_request.wait(), 10)
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()  # an RST: the client is gone, not half-closed
    await asyncio.wait_for(service_gone.wait(), 10)
    server.close()
    await server.wait_closed()


def _on(ip: str) -> dict[str, Any]:
    """A node's sections with every port on `ip`."""
    return {name: {"bind_addr": f"{ip}:0"} for name in ("proxy", "upstream", "admin", "gossip")}


async def test_a_node_on_its_own_address_forwards_from_it_and_is_trusted(h: Harness) -> None:
    # Without gossip keys a node trusts a forwarded request by its source address: the
    # forwarding node must connect from the address it advertises. It connected from whatever
    # the kernel chose (127.0.0.1 here), so the other node took it for a client: it appended
    # the forwarding node to X-Forwarded-For, and could have forwarded the request again.
    a = await h.node(**_on("127.0.0.61"))
    b = await h.node(**_on("127.0.0.62"), cluster={"join": [gossip_addr(a)]})
    port = await h.service(sample_app())
    await h.agent(a, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(a, "ep")
    await wait_for(
        lambda: (
            a.node_id in b.cluster.remotes and b.cluster.remotes[a.node_id].endpoints.get("ep") == 1
        ),
        what="endpoint gossiped",
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(b) + "/echo", headers={"x-pico-endpoint": "ep"}) as resp:
            assert resp.status == 200
            assert resp.headers["x-seen-x-forwarded-for"] == "127.0.0.1"
