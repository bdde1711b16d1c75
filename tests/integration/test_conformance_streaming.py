"""Proxy engine conformance: streamed responses (SSE), WebSocket upgrades, and proxy.timeout,
which bounds the wait for a response head but never cuts a response that is streaming."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import websockets

from pico.server.node import Node
from tests.support.cluster import Harness, connect, proxy_url

HOST = b"Host: ep.example.com\r\n"


async def start(h: Harness, **proxy: Any) -> Node:
    node, _, _ = await h.with_service(proxy=proxy) if proxy else await h.with_service()
    return node


EP = {"x-pico-endpoint": "ep"}


async def test_sse_event_reaches_client_before_the_service_writes_the_next(h: Harness) -> None:
    node = await start(h)
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node) + "/sse?wait=2", headers=EP) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            # The second event comes 2 s later: reading the first must not wait for it.
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 1.5)
            assert first == b"data: first\n\n"
            second = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
            assert second == b"data: second\n\n"


async def test_websocket_upgrade_relays_text_and_binary_both_ways(h: Harness) -> None:
    node = await start(h)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(proxy_url(node) + "/ws", headers=EP) as ws:
            await ws.send_str("hi")
            assert await asyncio.wait_for(ws.receive_str(), 5) == "echo:hi"
            blob = bytes(range(256)) * 1000
            await ws.send_bytes(blob)
            assert await asyncio.wait_for(ws.receive_bytes(), 5) == blob
            for i in range(20):
                await ws.send_str(str(i))
            for i in range(20):
                assert await asyncio.wait_for(ws.receive_str(), 5) == f"echo:{i}"


async def test_websocket_upgrade_works_with_the_websockets_client(h: Harness) -> None:
    node = await start(h)
    assert node.addrs is not None
    host, port = node.addrs.proxy
    async with websockets.connect(
        f"ws://{host}:{port}/ws", additional_headers=EP, open_timeout=5
    ) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "echo:hello"
        await ws.send(b"\x00\x01\x02")
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01\x02"


async def test_websocket_outlives_proxy_timeout(h: Harness) -> None:
    node = await start(h, timeout="300ms")
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(proxy_url(node) + "/ws", headers=EP) as ws:
            await ws.send_str("one")
            assert await asyncio.wait_for(ws.receive_str(), 5) == "echo:one"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 0.6
            while loop.time() < deadline:  # keep using it across two timeout periods
                await ws.send_str("again")
                assert await asyncio.wait_for(ws.receive_str(), 5) == "echo:again"
                await asyncio.sleep(0.1)


async def test_declined_upgrade_gets_the_service_response_and_a_closed_connection(
    h: Harness,
) -> None:
    node = await start(h)
    conn = await connect(node)
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"hello")
    assert await conn.closed_by_peer()
    await conn.close()


async def test_service_slower_than_proxy_timeout_gets_504(h: Harness) -> None:
    node = await start(h, timeout="300ms")
    conn = await connect(node)
    await conn.send(b"GET /slow?delay=1.5 HTTP/1.1\r\n" + HOST + b"\r\n")
    resp = await conn.read_response(timeout=5)
    assert resp.status == 504
    assert json.loads(resp.body) == {"error": "upstream timeout"}
    # The connection stays usable.
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    assert (await conn.read_response()).body == b"hello"
    await conn.close()


async def test_streaming_response_is_not_cut_by_proxy_timeout(h: Harness) -> None:
    node = await start(h, timeout="300ms")
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node) + "/sse?wait=1", headers=EP) as resp:
            assert resp.status == 200
            assert await asyncio.wait_for(resp.read(), 5) == b"data: first\n\ndata: second\n\n"


async def test_slow_upload_is_not_cut_by_proxy_timeout(h: Harness) -> None:
    node = await start(h, timeout="300ms")

    async def body() -> Any:
        for _ in range(6):
            yield b"x" * 1000
            await asyncio.sleep(0.1)  # the upload outlasts proxy.timeout, but keeps moving

    async with aiohttp.ClientSession() as http:
        async with http.post(proxy_url(node) + "/count", data=body(), headers=EP) as resp:
            assert resp.status == 200
            assert await resp.text() == "6000 corrupt"
