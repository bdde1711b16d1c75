"""The agent's dialers: services on Unix sockets (`--endpoints id/unix:PATH`, listeners with
`addr: unix:PATH`), and what a missing socket means to the node."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import aiohttp
from aiohttp import web

from pico.forward import open_connection
from tests.support.cluster import Harness, proxy_url, start_agent, tcp_agent_config
from tests.support.services import sample_app


async def unix_service(h: Harness, path: Path) -> None:
    """The sample service on the Unix socket `path`."""
    runner = web.AppRunner(sample_app("unix-service"), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    h.runners.append(runner)


async def get(url: str, endpoint: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"x-pico-endpoint": endpoint}) as resp:
            return resp.status, (await resp.text()).strip()


async def test_endpoint_on_a_unix_socket_serves_requests(h: Harness, tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    await unix_service(h, path)
    node = await h.node()
    running = await h.agent(node, [f"sock/unix:{path}"])
    await h.tunnel_up(node, "sock")
    assert await get(proxy_url(node) + "/whoami", "sock") == (200, "unix-service")
    assert running.agent.links[0].dialer.service == f"unix:{path}"


async def test_a_missing_unix_socket_answers_502_upstream_unreachable(
    h: Harness, tmp_path: Path
) -> None:
    node = await h.node()
    running = await h.agent(node, [f"sock/unix:{tmp_path / 'nobody.sock'}"])
    await h.tunnel_up(node, "sock")
    status, body = await get(proxy_url(node) + "/", "sock")
    assert (status, body) == (502, '{"error":"upstream unreachable"}')
    metrics = running.agent.metrics.registry
    labels = {"endpoint": "sock", "reason": "unreachable"}
    assert metrics.get_sample_value("pico_agent_dial_errors_total", labels) == 1.0


async def test_a_service_the_agent_cannot_reach_is_logged_once_naming_the_listener(
    h: Harness, tmp_path: Path, logs: io.StringIO
) -> None:
    missing = tmp_path / "nobody.sock"
    node = await h.node()
    await h.agent(node, [f"sock/unix:{missing}"])
    await h.tunnel_up(node, "sock")
    for _ in range(3):
        assert (await get(proxy_url(node) + "/", "sock"))[0] == 502
    records = [json.loads(line) for line in logs.getvalue().splitlines()]
    failed = [r for r in records if r["msg"] == "cannot connect to the service"]
    assert len(failed) == 1  # at most once a minute
    assert failed[0]["level"] == "warn"
    assert failed[0]["endpoint-id"] == "sock"
    assert failed[0]["service"] == f"unix:{missing}"
    assert "No such file or directory" in failed[0]["error"]


async def test_tcp_listener_on_a_unix_socket_carries_raw_bytes(h: Harness, tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write((await reader.read()).upper())
        writer.close()

    server = await asyncio.start_unix_server(echo, str(path))
    h.closers.append(server.close)
    node = await h.node()
    running = await start_agent(tcp_agent_config(node, "raw", f"unix:{path}"))
    h.agents.append(running)
    await h.tunnel_up(node, "raw")
    reader, writer = await open_connection("raw", url=proxy_url(node))
    writer.write(b"through a unix socket")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b"THROUGH A UNIX SOCKET"
    writer.close()
