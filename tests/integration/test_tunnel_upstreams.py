"""Tunnels as upstreams: dial failures and retries, load balancing, agents that stop, stale
keep-alive streams, and garbage on the upstream port."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterable

import aiohttp
import pytest

from pico.mux.tunnel import Tunnel
from pico.mux.websocket import ZERO_KEY, FrameDecoder
from pico.server.node import Node
from tests.support.cluster import Harness, proxy_url, wait_for
from tests.support.services import crashing_service, one_shot_service, sample_app

EP = {"x-pico-endpoint": "ep"}


def closed_port() -> int:
    """A local port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def upstream_url(node: Node, endpoint: str) -> str:
    assert node.addrs is not None
    host, port = node.addrs.upstream
    return f"http://{host}:{port}/pico/v1/upstream/{endpoint}"


async def get(http: aiohttp.ClientSession, node: Node, path: str = "/") -> tuple[int, str]:
    async with http.get(proxy_url(node) + path, headers=EP) as resp:
        return resp.status, await resp.text()


async def test_service_down_returns_502_upstream_unreachable(h: Harness) -> None:
    node = await h.node()
    await h.agent(node, [f"ep/127.0.0.1:{closed_port()}"])
    await h.tunnel_up(node, "ep")
    async with aiohttp.ClientSession() as http:
        status, text = await get(http, node)
    assert status == 502
    assert json.loads(text) == {"error": "upstream unreachable"}


async def test_dial_failure_is_retried_on_another_upstream(h: Harness) -> None:
    node = await h.node()
    port = await h.service(sample_app())
    await h.agent(node, [f"ep/127.0.0.1:{closed_port()}"])
    await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep", count=2)
    async with aiohttp.ClientSession() as http:
        for _ in range(8):
            assert await get(http, node) == (200, "hello")
        # A request with a body is replayed too (it never reached a service).
        async with http.post(proxy_url(node) + "/echo", data=b"payload", headers=EP) as resp:
            assert (resp.status, await resp.read()) == (200, b"payload")


async def test_request_that_reached_a_crashing_service_is_not_replayed_elsewhere(
    h: Harness,
) -> None:
    node = await h.node()
    server, crashed = await crashing_service()
    healthy = sample_app()
    try:
        await h.agent(node, [f"ep/127.0.0.1:{server.sockets[0].getsockname()[1]}"])
        await h.agent(node, [f"ep/127.0.0.1:{await h.service(healthy)}"])
        await h.tunnel_up(node, "ep", count=2)
        statuses = []
        async with aiohttp.ClientSession() as http:
            for _ in range(6):
                async with http.post(proxy_url(node) + "/echo", data=b"x", headers=EP) as resp:
                    statuses.append(resp.status)
        # The service may have acted on the request before it crashed: not safe to retry.
        assert crashed[0] >= 1
        assert statuses.count(502) == crashed[0]
        assert statuses.count(200) == 6 - crashed[0]
    finally:
        server.close()
        await server.wait_closed()


async def test_requests_are_spread_round_robin_over_upstreams(h: Harness) -> None:
    node = await h.node()
    for name in ("a", "b"):
        port = await h.service(sample_app(name))
        await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep", count=2)
    async with aiohttp.ClientSession() as http:
        seen = [(await get(http, node, "/whoami"))[1] for _ in range(10)]
    assert sorted(set(seen)) == ["a", "b"]
    assert abs(seen.count("a") - seen.count("b")) <= 2


async def test_endpoint_ids_that_differ_in_case_are_one_endpoint_balanced_together(
    h: Harness,
) -> None:
    node = await h.node()
    for name in ("Web", "web"):
        port = await h.service(sample_app(name))
        await h.agent(node, [f"{name}/127.0.0.1:{port}"])
    await h.tunnel_up(node, "web", count=2)
    host = {"Host": "WEB.Example.COM"}
    async with aiohttp.ClientSession() as http:
        seen = []
        for _ in range(10):
            async with http.get(proxy_url(node) + "/whoami", headers=host) as resp:
                seen.append(await resp.text())
        async with http.get(proxy_url(node) + "/", headers={"x-pico-endpoint": "WEB"}) as resp:
            assert resp.status == 200
    assert sorted(set(seen)) == ["Web", "web"]


async def test_stopped_agent_is_removed_at_once(h: Harness) -> None:
    node = await h.node()
    port = await h.service(sample_app())
    agent = await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    async with aiohttp.ClientSession() as http:
        assert await get(http, node) == (200, "hello")
        await agent.close()
        status, text = await asyncio.wait_for(get(http, node), 5)
    assert status == 502
    assert json.loads(text) == {"error": "no available upstreams"}


async def test_stopping_agent_lets_in_flight_request_finish(h: Harness) -> None:
    node = await h.node()
    port = await h.service(sample_app())
    agent = await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    async with aiohttp.ClientSession() as http:
        slow = asyncio.ensure_future(get(http, node, "/slow?delay=1"))
        await wait_for(lambda: len(node.connections) == 1, what="slow request in flight")
        stopping = asyncio.ensure_future(agent.close())
        # GoAway: the node stops routing to the agent at once...
        await wait_for(lambda: "ep" not in node.registry.counts(), what="upstream unregistered")
        status, _ = await asyncio.wait_for(get(http, node), 5)
        assert status == 502
        # ...while the request already on it completes.
        assert await asyncio.wait_for(slow, 5) == (200, "slow")
        await asyncio.wait_for(stopping, 10)


async def test_stale_keep_alive_streams_are_retried_on_fresh_ones(h: Harness) -> None:
    node = await h.node()
    server = await one_shot_service()
    try:
        port = server.sockets[0].getsockname()[1]
        await h.agent(node, [f"ep/127.0.0.1:{port}"])
        await h.tunnel_up(node, "ep")
        async with aiohttp.ClientSession() as http:
            for _ in range(20):
                assert await get(http, node) == (200, "ok")
    finally:
        server.close()
        await server.wait_closed()


async def test_garbage_on_the_upstream_websocket_closes_only_that_tunnel(h: Harness) -> None:
    node = await h.node()
    port = await h.service(sample_app())
    await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(upstream_url(node, "x")) as ws:
            await h.tunnel_up(node, "x")
            for _ in range(5):
                await ws.send_bytes(os.urandom(4096))
            # The node may say GoAway(protocol error) first; then it closes the WebSocket.
            msg = await asyncio.wait_for(ws.receive(), 5)
            while msg.type == aiohttp.WSMsgType.BINARY:
                msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
            )
        await wait_for(lambda: "x" not in node.registry.counts(), what="garbage tunnel dropped")
        assert await get(http, node) == (200, "hello")


async def test_truncated_frame_header_then_silence_does_not_hang_the_node(h: Harness) -> None:
    node = await h.node()
    port = await h.service(sample_app())
    await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(upstream_url(node, "y")) as ws:
            await h.tunnel_up(node, "y")
            # A DATA frame that claims a huge payload: refused at once, not buffered.
            await ws.send_bytes(bytes([0, 0, 0, 1, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF]))
            msg = await asyncio.wait_for(ws.receive(), 5)
            while msg.type == aiohttp.WSMsgType.BINARY:
                msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type != aiohttp.WSMsgType.ERROR
        await wait_for(lambda: "y" not in node.registry.counts(), what="bad tunnel dropped")
        assert await get(http, node) == (200, "hello")


async def test_invalid_endpoint_id_on_the_upstream_route_gets_400_json(h: Harness) -> None:
    node = await h.node()
    async with aiohttp.ClientSession() as http:
        async with http.get(upstream_url(node, "bad!id")) as resp:
            assert resp.status == 400
            assert resp.headers["Content-Type"].startswith("application/json")
            assert "invalid endpoint id" in (await resp.json())["error"]


@pytest.mark.parametrize("mask_frames", [False, True])
async def test_bodies_cross_the_tunnel_intact_with_either_mask_mode(
    h: Harness, mask_frames: bool
) -> None:
    # Zero-key frames (the default) and random-key frames (server.mask_frames) both carry
    # multi-megabyte bodies both ways, byte for byte.
    node = await h.node()
    port = await h.service(sample_app())
    await h.agent(node, [f"ep/127.0.0.1:{port}"], server={"mask_frames": mask_frames})
    await h.tunnel_up(node, "ep")
    body = os.urandom(3 * 1024 * 1024 + 7)
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy_url(node) + "/echo", data=body, headers=EP) as resp,
    ):
        assert resp.status == 200
        assert await resp.read() == body


class _Capture(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def writelines(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        for part in parts:
            self.out += part

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("random_mask", [False, True])
@pytest.mark.parametrize("size", [100, 200_000])  # a small frame and a big, vectored one
async def test_agent_frames_carry_the_mask_key_of_its_mode(random_mask: bool, size: int) -> None:
    tunnel = Tunnel(client=True, ping_interval=0, random_mask=random_mask)
    capture = _Capture()
    tunnel.attach(capture)
    stream = tunnel.open_stream()
    stream.write(b"\x55" * size)
    await asyncio.sleep(0)  # the flush runs at the end of this loop iteration
    tunnel.close()
    keys = []
    wire = bytes(capture.out)
    pos = 0
    while pos < len(wire):
        length = wire[pos + 1] & 0x7F
        assert wire[pos + 1] & 0x80  # a client always sets the mask bit
        offset = pos + 2 + {126: 2, 127: 8}.get(length, 0)
        if length >= 126:
            length = int.from_bytes(wire[pos + 2 : offset], "big")
        keys.append(wire[offset : offset + 4])
        pos = offset + 4 + length
    assert keys
    assert all((key != ZERO_KEY) == random_mask for key in keys)
    decoded, _ = FrameDecoder(expect_mask=True).feed(wire)
    assert b"\x55" * size in b"".join(decoded)


async def test_a_stream_finishing_after_its_pool_closed_is_not_pooled(h: Harness) -> None:
    """A request finishing between the pool's close and the GoAway put its stream back in the
    pool; the drain then waited for it until the end of the grace period."""
    node, _, _ = await h.with_service()
    (upstream,) = node.upstream_server.tunnels()
    async with aiohttp.ClientSession() as http:
        pending = asyncio.ensure_future(get(http, node, "/slow?delay=0.3"))
        await wait_for(lambda: len(upstream.tunnel.streams) == 1, what="request in flight")
        upstream.close_idle()  # what a drain does first
        assert await asyncio.wait_for(pending, 10) == (200, "slow")
    assert upstream.idle_count == 0
    await wait_for(lambda: not upstream.tunnel.streams, what="the stream reset")
