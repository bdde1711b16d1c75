"""Tokens on every port: agents registering endpoints, clients reaching them, operators reading
the admin API. Keys are HMAC here (tests/unit/test_auth_tokens.py covers every algorithm)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import jwt
import pytest

from pico.agent.agent import AgentRejected
from pico.server.node import Node
from pico.status.client import StatusClient, StatusError
from tests.integration.test_cluster import cluster
from tests.support.cluster import Harness, admin_url, proxy_url, wait_for
from tests.support.services import sample_app

SECRET = "test-secret-" + "k" * 64
AUTH = {"auth": {"hmac_secret_key": SECRET}}


def token(ttl: float = 60, **claims: Any) -> str:
    return jwt.encode({"exp": int(time.time() + ttl), **claims}, SECRET, algorithm="HS256")


def permits(*endpoints: str, ttl: float = 60) -> str:
    return token(ttl, pico={"endpoints": list(endpoints)})


async def rejected_agent(h: Harness, node: Node, api_key: str) -> str:
    port = await h.service(sample_app())
    running = await h.agent(node, [f"ep/127.0.0.1:{port}"], auth={"api_key": api_key})
    with pytest.raises(AgentRejected) as err:
        await asyncio.wait_for(running.task, 10)
    return str(err.value)


async def test_agents_without_a_valid_token_for_the_endpoint_are_refused(h: Harness) -> None:
    node = await h.node(upstream=AUTH)
    assert "401 missing token" in await rejected_agent(h, node, "")
    assert "401 expired token" in await rejected_agent(h, node, permits("ep", ttl=-5))
    assert "401 invalid signature" in await rejected_agent(
        h, node, jwt.encode({"exp": int(time.time()) + 60}, "x" * 64, algorithm="HS256")
    )
    assert "403 endpoint not permitted" in await rejected_agent(h, node, permits("other-*"))
    assert node.registry.counts() == {}
    async with aiohttp.ClientSession() as http:
        async with http.get(admin_url(node) + "/metrics") as resp:
            metrics = await resp.text()
    for reason in ("missing", "expired", "invalid_signature", "not_permitted"):
        line = f'pico_auth_failures_total{{port="upstream",reason="{reason}"}} 1.0'
        assert line in metrics, reason


async def test_an_agent_with_a_token_for_the_endpoint_serves_it(h: Harness) -> None:
    node = await h.node(upstream=AUTH)
    port = await h.service(sample_app())
    await h.agent(node, [f"ep/127.0.0.1:{port}"], auth={"api_key": permits("e*")})
    await h.tunnel_up(node, "ep")
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node), headers={"x-pico-endpoint": "ep"}) as resp:
            assert (resp.status, await resp.text()) == (200, "hello")


async def test_a_tunnel_is_closed_when_its_token_expires(h: Harness) -> None:
    node = await h.node(upstream=AUTH)
    port = await h.service(sample_app())
    running = await h.agent(node, [f"ep/127.0.0.1:{port}"], auth={"api_key": permits(ttl=2)})
    await h.tunnel_up(node, "ep")
    # The node drains the tunnel at `exp`; the agent reconnects with its (now expired) token,
    # is refused, and stops.
    with pytest.raises(AgentRejected, match="401 expired token"):
        await asyncio.wait_for(running.task, 15)
    assert node.registry.counts() == {}


async def test_with_disconnect_on_expiry_off_the_tunnel_outlives_its_token(h: Harness) -> None:
    node = await h.node(
        upstream={"auth": {"hmac_secret_key": SECRET, "disable_disconnect_on_expiry": True}}
    )
    port = await h.service(sample_app())
    running = await h.agent(node, [f"ep/127.0.0.1:{port}"], auth={"api_key": permits(ttl=1)})
    await h.tunnel_up(node, "ep")
    deadline = time.time() + 1.5
    await wait_for(lambda: time.time() > deadline, what="the token's expiry to pass")
    assert node.registry.counts() == {"ep": 1}
    assert not running.task.done()


async def get(url: str, headers: dict[str, str]) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        body = await resp.json(content_type=None)
        return resp.status, body, resp


async def test_proxy_clients_need_a_token_for_the_endpoint(h: Harness) -> None:
    node, _, _ = await h.with_service(proxy=AUTH)
    url = proxy_url(node) + "/headers"
    status, body, resp = await get(url, {"x-pico-endpoint": "ep"})
    assert (status, body) == (401, {"error": "missing token"})
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    status, body, _ = await get(
        url, {"x-pico-endpoint": "ep", "x-pico-authorization": f"Bearer {permits('other')}"}
    )
    assert (status, body) == (403, {"error": "endpoint not permitted"})
    status, body, _ = await get(url, {"x-pico-endpoint": "ep", "Authorization": "Bearer junk"})
    assert (status, body) == (401, {"error": "malformed token"})


async def test_pico_credentials_are_removed_and_the_services_own_pass(h: Harness) -> None:
    node, _, _ = await h.with_service(proxy=AUTH)
    url = proxy_url(node) + "/headers"
    status, seen, _ = await get(
        url,
        {
            "x-pico-endpoint": "ep",
            "x-pico-authorization": f"Bearer {permits('ep')}",
            "Authorization": "Basic c2VydmljZTpvd24=",
        },
    )
    assert status == 200
    assert "x-pico-authorization" not in seen
    assert seen["authorization"] == "Basic c2VydmljZTpvd24="
    # Without x-pico-authorization, Authorization is Pico's, and is taken away.
    status, seen, _ = await get(
        url, {"x-pico-endpoint": "ep", "Authorization": f"Bearer {token()}"}
    )
    assert status == 200 and "authorization" not in seen


async def test_a_forwarded_request_is_checked_once_at_the_edge(h: Harness) -> None:
    a, b = await cluster(h, 2, proxy=AUTH)
    port = await h.service(sample_app())
    await h.agent(a, [f"ep/127.0.0.1:{port}"])
    await wait_for(lambda: b.cluster.remotes[a.node_id].endpoints.get("ep") == 1)
    status, _, _ = await get(proxy_url(b) + "/headers", {"x-pico-endpoint": "ep"})
    assert status == 401
    status, seen, _ = await get(
        proxy_url(b) + "/headers",
        {"x-pico-endpoint": "ep", "x-pico-authorization": f"Bearer {permits('ep')}"},
    )
    assert status == 200 and "x-pico-authorization" not in seen


async def test_admin_routes_need_a_token_but_probes_stay_open(h: Harness) -> None:
    node = await h.node(admin=AUTH)
    async with aiohttp.ClientSession() as http:
        for path in ("/health", "/ready", "/"):  # probes, and the page without data
            async with http.get(admin_url(node) + path) as resp:
                assert resp.status == 200, path
        for path in ("/metrics", "/status/cluster/nodes", "/status/proxy/stats"):
            async with http.get(admin_url(node) + path) as resp:
                assert resp.status == 401, path
                assert resp.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(StatusError, match="401"):
        await asyncio.to_thread(StatusClient(admin_url(node)).cluster_nodes)
    nodes = await asyncio.to_thread(StatusClient(admin_url(node), token=token()).cluster_nodes)
    assert [n["id"] for n in nodes] == [node.node_id]


async def test_admin_forward_carries_the_callers_token(h: Harness) -> None:
    a, b = await cluster(h, 2, admin=AUTH)
    client = StatusClient(admin_url(a), forward=b.node_id, token=token())
    node = await asyncio.to_thread(client.cluster_node, "local")
    assert node["id"] == b.node_id
