"""`pico dev lb`: the TCP load balancer of the demo when nginx is not installed."""

from __future__ import annotations

import socket

import aiohttp

from pico.devtools.lb import TcpLoadBalancer
from tests.support.cluster import Harness
from tests.support.services import sample_app


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connections_are_spread_round_robin_and_dead_backends_skipped(h: Harness) -> None:
    ports = [await h.service(sample_app(f"backend-{i}")) for i in range(2)]
    backends = [("127.0.0.1", ports[0]), ("127.0.0.1", closed_port()), ("127.0.0.1", ports[1])]
    lb = TcpLoadBalancer(("127.0.0.1", 0), backends)
    await lb.start()
    try:
        seen = []
        for _ in range(6):
            # A new connection each time: the balancer works per connection.
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{lb.port}/whoami") as resp:
                    assert resp.status == 200
                    seen.append(await resp.text())
        assert set(seen) == {"backend-0", "backend-1"}
    finally:
        await lb.close()


async def test_bodies_stream_through_both_ways(h: Harness) -> None:
    port = await h.service(sample_app())
    lb = TcpLoadBalancer(("127.0.0.1", 0), [("127.0.0.1", port)])
    await lb.start()
    try:
        payload = bytes(range(256)) * 40_000  # 10 MB
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{lb.port}/echo", data=payload) as resp:
                assert await resp.read() == payload
    finally:
        await lb.close()
