"""Every port has timeouts and quiet errors (issue 10, item 7): the admin port's head and idle
timeouts and connection cap, and bad input logged once per reason per minute, no traceback."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
from aiohttp import web

from pico.server.node import Node
from pico.webapp import ConnectionGuard, ConnectionLimits, serve_app
from tests.support.cluster import Harness, admin_url, wait_for
from tests.support.services import RawConnection

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


async def admin_conn(node: Node) -> RawConnection:
    assert node.addrs is not None
    return await RawConnection.open(*node.addrs.admin)


async def closed_by_peer(conn: RawConnection, timeout: float = 5.0) -> bool:
    """True once the node closed the connection (EOF, or a reset)."""
    try:
        while await asyncio.wait_for(conn.reader.read(65536), timeout):
            pass
    except (ConnectionError, TimeoutError):
        return False
    return True


async def admin_metric(node: Node, line_start: str) -> float:
    """The sum of the samples on the node's /metrics whose line starts with `line_start`."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(admin_url(node) + "/metrics") as resp,
    ):
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    )


async def test_an_admin_connection_that_never_completes_its_head_is_closed(h: Harness) -> None:
    node = await h.node(admin={"read_header_timeout": "300ms"})
    conn = await admin_conn(node)
    await conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and nothing more
    assert await closed_by_peer(conn)
    rejected = 'pico_admin_rejected_connections_total{reason="read_header_timeout"}'
    assert await admin_metric(node, rejected) == 1.0


async def test_an_idle_admin_connection_is_closed_after_the_idle_timeout(h: Harness) -> None:
    node = await h.node(admin={"idle_timeout": "300ms"})
    conn = await admin_conn(node)
    await conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await conn.read_response()).status == 200
    assert await closed_by_peer(conn)
    assert node.admin_guard.rejected == {"idle_timeout": 1}


async def test_a_slowloris_crowd_cannot_lock_the_admin_port(h: Harness) -> None:
    node = await h.node(admin={"max_connections": 8, "read_header_timeout": "60s"})
    crowd = [await admin_conn(node) for _ in range(20)]
    for conn in crowd:
        await conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # heads never finished
    await wait_for(lambda: node.admin_guard.open_connections <= 8, what="the cap holds")
    # Probes still get through: the oldest unfinished heads make room.
    for _ in range(3):
        conn = await admin_conn(node)
        await conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await conn.read_response()).status == 200
    still_open = [c for c in crowd if not c.reader.at_eof()]
    closed = await asyncio.gather(*(closed_by_peer(c, 0.2) for c in still_open))
    assert len(crowd) - len(still_open) + sum(closed) >= 12
    assert node.admin_guard.open_connections <= 8
    rejected = 'pico_admin_rejected_connections_total{reason="max_connections"}'
    assert await admin_metric(node, rejected) >= 12
    assert await admin_metric(node, "pico_admin_connections ") <= 8


async def test_http2_prefaces_on_the_admin_port_are_logged_once_without_traceback(
    h: Harness, logs: io.StringIO
) -> None:
    node = await h.node()
    for _ in range(50):
        conn = await admin_conn(node)
        await conn.send(H2_PREFACE)
        assert (await conn.read_response()).status == 400
        assert await closed_by_peer(conn)
    assert "Traceback" not in logs.getvalue()
    bad = [r for r in records(logs) if r.get("reason") == "bad_request"]
    assert len(bad) == 1, bad
    assert bad[0]["level"] == "warn" and "PRI" in str(bad[0]["error"])
    assert node.admin_guard.rejected == {"bad_request": 50}


async def test_malformed_requests_on_the_proxy_port_are_logged_once_per_reason(
    h: Harness, logs: io.StringIO
) -> None:
    node = await h.node()
    assert node.addrs is not None
    before = await admin_metric(node, "pico_proxy_bad_requests_total{")
    for _ in range(20):
        conn = await RawConnection.open(*node.addrs.proxy)
        await conn.send(H2_PREFACE)
        assert (await conn.read_response()).status == 400
    bad = [r for r in records(logs) if r["msg"] == "bad request"]
    assert len(bad) <= 1, bad  # one per reason per minute (another test may have had it)
    assert await admin_metric(node, "pico_proxy_bad_requests_total{") - before == 20


async def test_a_connection_over_the_cap_gets_503_when_every_other_one_is_busy() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        started.set()
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/slow", slow)
    guard = ConnectionGuard(ConnectionLimits(max_connections=1))
    runner, (host, port) = await serve_app(app, "127.0.0.1:0", "admin.bind_addr", guard=guard)
    try:
        busy = await RawConnection.open(host, port)
        await busy.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)  # busy: its request is being handled
        refused = await RawConnection.open(host, port)
        await refused.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await refused.read_response()
        assert answer.status == 503
        assert json.loads(answer.body) == {"error": "too many connections"}
        release.set()
        assert (await busy.read_response()).status == 200
        assert guard.rejected == {"max_connections": 1}
    finally:
        release.set()
        await runner.cleanup()
