"""One node, one agent, one service: the requests of the getting-started guide and the errors."""

from __future__ import annotations

import aiohttp

from tests.support.cluster import Harness, admin_url, proxy_url
from tests.support.services import sample_app


async def test_request_with_endpoint_header_reaches_the_service(h: Harness) -> None:
    node = await h.node()
    port = await h.service(sample_app())
    await h.agent(node, [f"my-endpoint/127.0.0.1:{port}"])
    await h.tunnel_up(node, "my-endpoint")
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node), headers={"x-pico-endpoint": "my-endpoint"}) as resp:
            assert resp.status == 200
            assert await resp.text() == "hello"


async def test_request_routed_by_host_first_label(h: Harness) -> None:
    node = await h.node()
    port = await h.service(sample_app())
    await h.agent(node, [f"my-endpoint/127.0.0.1:{port}"])
    await h.tunnel_up(node, "my-endpoint")
    async with aiohttp.ClientSession() as http:
        headers = {"Host": "my-endpoint.example.com:8000"}
        async with http.get(proxy_url(node) + "/echo", headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["x-seen-host"] == "my-endpoint.example.com:8000"
            assert resp.headers["x-seen-x-forwarded-for"] == "127.0.0.1"
            assert resp.headers["x-seen-x-forwarded-proto"] == "http"
            assert resp.headers["x-seen-x-forwarded-host"] == "my-endpoint.example.com:8000"


async def test_request_without_endpoint_returns_400(h: Harness) -> None:
    node = await h.node()
    async with aiohttp.ClientSession() as http:
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
            async with http.get(proxy_url(node), headers={"Host": host}) as resp:
                assert resp.status == 400
                assert resp.headers["Content-Type"] == "application/json"
                assert await resp.json() == {"error": "missing endpoint id"}


async def test_request_for_unknown_endpoint_returns_502(h: Harness) -> None:
    node = await h.node()
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node), headers={"x-pico-endpoint": "nope"}) as resp:
            assert resp.status == 502
            assert await resp.json() == {"error": "no available upstreams"}


async def test_status_api_lists_local_node_and_endpoint(h: Harness) -> None:
    node = await h.node(cluster={"node_id": "pico-test-1"})
    port = await h.service(sample_app())
    await h.agent(node, [f"my-endpoint/127.0.0.1:{port}"])
    await h.tunnel_up(node, "my-endpoint")
    async with aiohttp.ClientSession() as http:
        async with http.get(admin_url(node) + "/status/cluster/nodes") as resp:
            nodes = await resp.json()
        assert nodes == [
            {
                "id": "pico-test-1",
                "status": "active",
                "proxy_addr": f"127.0.0.1:{node.addrs.proxy[1]}",  # type: ignore[union-attr]
                "admin_addr": f"127.0.0.1:{node.addrs.admin[1]}",  # type: ignore[union-attr]
                "endpoints": 1,
                "upstreams": 1,
            }
        ]
        async with http.get(admin_url(node) + "/status/proxy/endpoints") as resp:
            endpoints = await resp.json()
        assert list(endpoints) == ["my-endpoint"]
        assert endpoints["my-endpoint"][0].startswith("127.0.0.1:")
        async with http.get(admin_url(node) + "/status/cluster/nodes/local") as resp:
            assert (await resp.json())["endpoints"] == {"my-endpoint": 1}
        async with http.get(admin_url(node) + "/status/cluster/nodes/nope") as resp:
            assert resp.status == 404


async def test_forwarding_headers_are_kept_only_from_trusted_proxies(h: Harness) -> None:
    claims = {"x-pico-endpoint": "ep", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "x.io"}
    for trusted, proto in (([], "http"), (["127.0.0.0/8"], "https")):
        node = await h.node(proxy={"trusted_proxies": trusted})
        port = await h.service(sample_app())
        await h.agent(node, [f"ep/127.0.0.1:{port}"])
        await h.tunnel_up(node, "ep")
        async with aiohttp.ClientSession() as http:
            async with http.get(proxy_url(node) + "/echo", headers=claims) as resp:
                assert resp.headers["x-seen-x-forwarded-proto"] == proto, trusted
