"""A frozen agent (SIGSTOP) of an endpoint with two: requests go on, and it leaves rotation.

The node is in-process (its registry is what rotation is); the agents are real processes.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from tests.support.cluster import Harness, proxy_url, wait_for
from tests.support.procs import Procs
from tests.support.services import sample_app

EP = {"x-pico-endpoint": "ep"}


async def test_a_frozen_agent_leaves_rotation_and_its_requests_go_to_the_other(
    h: Harness, procs: Procs
) -> None:
    """Before: pings every 15 s with a 15 s deadline kept a frozen agent in rotation ~27 s,
    and a request on a stream it never acknowledged got 504 after `proxy.timeout`. Now:
    unacknowledged streams are retried elsewhere after `proxy.stream_ack_timeout` (2 s),
    and the agent leaves within heartbeat_interval + heartbeat_timeout (5 s + 5 s)."""
    node = await h.node()  # the default heartbeats and stream_ack_timeout
    port = await h.service(sample_app())
    assert node.addrs is not None
    up_host, up_port = node.addrs.upstream
    agents = [
        procs.pico(
            "agent",
            "--endpoints",
            f"ep/127.0.0.1:{port}",
            "--server.url",
            f"http://{up_host}:{up_port}",
            "--admin.bind-addr",
            "127.0.0.1:0",
            name=f"agent-{i}",
        )
        for i in range(2)
    ]
    await h.tunnel_up(node, "ep", 2)
    frozen = agents[0]
    timeout = aiohttp.ClientTimeout(total=8)  # far below proxy.timeout (30 s)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def post(i: int) -> int:
            body = f"request {i}".encode()
            async with http.post(proxy_url(node) + "/echo", data=body, headers=EP) as resp:
                assert await resp.read() == body
                return resp.status

        assert [await post(i) for i in range(4)] == [200] * 4  # both agents serve
        frozen.signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        left_at: list[float] = []
        try:

            async def rotation() -> None:
                await wait_for(lambda: node.registry.counts().get("ep") == 1, timeout=20)
                left_at.append(time.monotonic())

            watcher = asyncio.ensure_future(rotation())
            statuses = []
            i = 0
            while not left_at and time.monotonic() - frozen_at < 20:
                statuses.append(await post(i))  # POSTs: only provably undelivered ones retry
                i += 1
            await watcher
            assert statuses and set(statuses) == {200}
            assert left_at[0] - frozen_at < 11.0  # 5 s + 5 s, and a little scheduling
            assert [await post(i) for i in range(4)] == [200] * 4
        finally:
            frozen.signal(signal.SIGCONT)  # so that it can be stopped
