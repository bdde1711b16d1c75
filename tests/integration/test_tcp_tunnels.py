"""TCP endpoints: `/_pico/v1/tcp/{id}` on the proxy port, bridged to an agent's TCP listener."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
import json
import ssl
import time
from collections.abc import Awaitable, Callable

import aiohttp
import jwt
import pytest

from pico.forward import Forwarder, ForwardError, open_connection
from pico.mux.handshake import HandshakeError, open_websocket
from pico.server.node import Node
from pico.tls import client_context
from tests.integration.test_auth import SECRET, permits
from tests.integration.test_cluster import cluster
from tests.integration.test_tls import Pki
from tests.support.cluster import Harness, admin_url, proxy_url, wait_for
from tests.support.tcp_services import (
    TcpService,
    digest_after_eof_service,
    echo_service,
    greet_then_listen_service,
)


async def tcp_endpoint(
    h: Harness,
    node: Node,
    endpoint: str,
    start: Callable[[], Awaitable[TcpService]] = echo_service,
) -> TcpService:
    """A service started by `start`, registered on `node` as TCP endpoint `endpoint`."""
    service = await start()
    h.closers.append(service.close)
    await h.tcp_agent(node, endpoint, service.port)
    await h.tunnel_up(node, endpoint)
    return service


async def tcp_service(h: Harness, service: TcpService) -> TcpService:
    h.closers.append(service.close)
    return service


async def test_bytes_reach_a_tcp_service_and_come_back(h: Harness) -> None:
    node = await h.node()
    await tcp_endpoint(h, node, "my-db")
    reader, writer = await open_connection("my-db", url=proxy_url(node))
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.write_eof()
    assert await reader.read() == b""  # the echo answered our FIN with its own
    writer.close()


async def test_client_fin_reaches_the_service_which_still_answers(h: Harness) -> None:
    node = await h.node()
    await tcp_endpoint(h, node, "digest", digest_after_eof_service)
    reader, writer = await open_connection("digest", url=proxy_url(node))
    payload = bytes(range(256)) * 4096
    writer.write(payload)
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer == b"%d %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())
    writer.close()


async def test_service_fin_reaches_the_client_which_may_still_send(h: Harness) -> None:
    node = await h.node()
    service = await tcp_endpoint(h, node, "greet", greet_then_listen_service)
    reader, writer = await open_connection("greet", url=proxy_url(node))
    assert await asyncio.wait_for(reader.read(), 10) == b"hello"  # then EOF
    writer.write(b"still here")
    writer.write_eof()
    await wait_for(lambda: service.received == [b"still here"], what="the late bytes arrive")
    writer.close()


async def test_a_megabytes_transfer_each_way_keeps_every_byte(h: Harness) -> None:
    node = await h.node()
    await tcp_endpoint(h, node, "echo")
    reader, writer = await open_connection("echo", url=proxy_url(node))
    payload = hashlib.sha256(b"seed").digest() * (32 * 1024)  # 1 MiB

    async def send() -> None:
        for _ in range(8):
            writer.write(payload)
            await writer.drain()
        writer.write_eof()

    sender = asyncio.get_running_loop().create_task(send())
    received = hashlib.sha256()
    size = 0
    while data := await asyncio.wait_for(reader.read(1 << 20), 10):
        received.update(data)
        size += len(data)
    await sender
    assert size == 8 * len(payload)
    assert received.hexdigest() == hashlib.sha256(payload * 8).hexdigest()
    writer.close()


async def test_tcp_connection_to_any_node_reaches_the_node_with_the_tunnel(h: Harness) -> None:
    a, b, _c = await cluster(h)
    await tcp_endpoint(h, a, "my-db")
    await wait_for(
        lambda: b.cluster.remotes[a.node_id].endpoints.get("my-db") == 1, what="gossiped"
    )
    reader, writer = await open_connection("my-db", url=proxy_url(b))
    writer.write(b"through b")
    assert await reader.readexactly(9) == b"through b"
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()


async def test_unknown_endpoint_is_refused_with_502(h: Harness) -> None:
    node = await h.node()
    with pytest.raises(ForwardError) as caught:
        await open_connection("nobody", url=proxy_url(node))
    assert (caught.value.status, caught.value.message) == (502, "no available upstreams")


async def test_http_endpoint_is_not_served_as_tcp(h: Harness) -> None:
    node, _, _ = await h.with_service()
    with pytest.raises(ForwardError) as caught:
        await open_connection("ep", url=proxy_url(node))
    assert (caught.value.status, caught.value.message) == (400, "endpoint is http")


async def test_tcp_endpoint_is_not_served_http(h: Harness) -> None:
    node = await h.node()
    await tcp_endpoint(h, node, "my-db")
    async with aiohttp.ClientSession() as http:
        headers = {"x-pico-endpoint": "my-db"}
        async with http.get(proxy_url(node) + "/", headers=headers) as resp:
            assert resp.status == 400
            assert await resp.json() == {"error": "endpoint is tcp"}


async def test_tcp_endpoint_on_another_node_is_not_served_http(h: Harness) -> None:
    a, b, _c = await cluster(h)
    await tcp_endpoint(h, a, "my-db")
    await wait_for(
        lambda: b.cluster.remotes[a.node_id].endpoints.get("my-db") == 1, what="gossiped"
    )
    async with aiohttp.ClientSession() as http:
        headers = {"x-pico-endpoint": "my-db"}
        async with http.get(proxy_url(b) + "/", headers=headers) as resp:
            assert resp.status == 400
            assert await resp.json() == {"error": "endpoint is tcp"}


async def test_a_node_refuses_a_tcp_tunnel_for_an_http_endpoint_with_409(h: Harness) -> None:
    node, _, _ = await h.with_service()
    assert node.addrs is not None
    host, port = node.addrs.upstream
    with pytest.raises(HandshakeError) as caught:
        await open_websocket(f"ws://{host}:{port}/pico/v1/upstream/ep?protocol=tcp")
    assert caught.value.status == 409
    assert "registered as http" in caught.value.message


async def test_an_unknown_tunnel_protocol_is_refused_with_400(h: Harness) -> None:
    node = await h.node()
    assert node.addrs is not None
    host, port = node.addrs.upstream
    with pytest.raises(HandshakeError) as caught:
        await open_websocket(f"ws://{host}:{port}/pico/v1/upstream/ep?protocol=udp")
    assert caught.value.status == 400
    assert "invalid protocol" in caught.value.message


async def test_tcp_route_needs_a_token_for_the_endpoint_when_proxy_auth_is_on(
    h: Harness,
) -> None:
    node = await h.node(proxy={"auth": {"hmac_secret_key": SECRET}})
    await tcp_endpoint(h, node, "my-db")
    with pytest.raises(ForwardError) as caught:
        await open_connection("my-db", url=proxy_url(node))
    assert caught.value.status == 401
    with pytest.raises(ForwardError) as caught:
        await open_connection("my-db", url=proxy_url(node), api_key=permits("other"))
    assert caught.value.status == 403
    reader, writer = await open_connection("my-db", url=proxy_url(node), api_key=permits("my-db"))
    writer.write(b"ok")
    assert await reader.readexactly(2) == b"ok"
    writer.close()


async def test_a_tcp_connection_is_closed_when_its_token_expires(h: Harness) -> None:
    # A token lets a connection in for as long as it is valid, not for as long as the client
    # keeps the connection: the node closes it at `exp`, as it drains an agent's tunnel.
    node = await h.node(proxy={"auth": {"hmac_secret_key": SECRET}})
    await tcp_endpoint(h, node, "my-db")
    key = permits("my-db", ttl=2)
    expires = jwt.decode(key, SECRET, algorithms=["HS256"])["exp"]
    reader, writer = await open_connection("my-db", url=proxy_url(node), api_key=key)
    writer.write(b"ok")
    assert await reader.readexactly(2) == b"ok"
    with contextlib.suppress(ConnectionError):  # closed, or reset: either way it ends
        assert await asyncio.wait_for(reader.read(), 15) == b""
    assert time.time() >= expires - 0.05  # ended by the expiry, not before
    writer.close()


async def test_with_disconnect_on_expiry_off_a_tcp_connection_outlives_its_token(
    h: Harness,
) -> None:
    auth = {"hmac_secret_key": SECRET, "disable_disconnect_on_expiry": True}
    node = await h.node(proxy={"auth": auth})
    await tcp_endpoint(h, node, "my-db")
    key = permits("my-db", ttl=1)
    expires = jwt.decode(key, SECRET, algorithms=["HS256"])["exp"]
    reader, writer = await open_connection("my-db", url=proxy_url(node), api_key=key)
    await wait_for(lambda: time.time() > expires + 0.5, what="the token's expiry to pass")
    writer.write(b"still")
    assert await reader.readexactly(5) == b"still"
    writer.close()


async def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (a service that refuses connections)."""
    echo = await echo_service()
    port = echo.port
    echo.close()
    await echo.server.wait_closed()
    return port


async def test_a_service_that_refuses_gets_the_client_502_and_no_upgrade(h: Harness) -> None:
    node = await h.node()
    await h.tcp_agent(node, "gone", await closed_port())
    await h.tunnel_up(node, "gone")
    with pytest.raises(ForwardError) as caught:
        await open_connection("gone", url=proxy_url(node))
    assert (caught.value.status, caught.value.message) == (502, "upstream unreachable")
    async with aiohttp.ClientSession() as http:  # a plain client sees the same JSON error
        async with http.get(
            proxy_url(node) + "/_pico/v1/tcp/gone",
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        ) as resp:
            assert resp.status == 502
            assert resp.headers["Content-Type"] == "application/json"
            assert await resp.json() == {"error": "upstream unreachable"}


async def test_a_refused_connection_is_retried_on_another_agent_of_the_endpoint(
    h: Harness,
) -> None:
    node = await h.node()
    refusing = await h.tcp_agent(node, "db", await closed_port())
    await h.tunnel_up(node, "db")
    await tcp_endpoint(h, node, "db")  # a second agent, whose service answers
    await h.tunnel_up(node, "db", count=2)
    for i in range(4):  # round robin: half of them try the refusing agent first
        reader, writer = await open_connection("db", url=proxy_url(node))
        writer.write(b"try %d" % i)
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"try %d" % i
        writer.close()
    refused = refusing.agent.metrics.registry.get_sample_value(
        "pico_agent_dial_errors_total", {"endpoint": "db", "reason": "refused"}
    )
    assert refused is not None and refused >= 1


async def test_forwarder_logs_one_line_for_a_service_that_refuses(
    h: Harness, logs: io.StringIO
) -> None:
    node = await h.node()
    await h.tcp_agent(node, "gone", await closed_port())
    await h.tunnel_up(node, "gone")
    forwarder = Forwarder("gone", url=proxy_url(node))
    host, port = await forwarder.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

        def errors() -> list[str]:
            entries = [json.loads(line) for line in logs.getvalue().splitlines()]
            return [e["msg"] for e in entries if e["subsystem"] == "forward"]

        await wait_for(
            lambda: errors() == ["connection to gone failed: 502 upstream unreachable"],
            what="the error line",
        )
    finally:
        await forwarder.close()


async def test_forwarder_logs_one_line_for_a_refused_connection(
    h: Harness, logs: io.StringIO
) -> None:
    node = await h.node()
    forwarder = Forwarder("nobody", url=proxy_url(node))
    host, port = await forwarder.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await wait_for(
            lambda: any(
                e["msg"] == "connection to nobody failed: 502 no available upstreams"
                for e in (json.loads(line) for line in logs.getvalue().splitlines())
            ),
            what="the error line",
        )
    finally:
        await forwarder.close()


async def test_forwarder_logs_a_failure_repeated_by_reconnecting_clients_once_a_minute(
    h: Harness, logs: io.StringIO
) -> None:
    node = await h.node()
    forwarder = Forwarder("nobody", url=proxy_url(node))
    host, port = await forwarder.start("127.0.0.1", 0)
    try:
        for _ in range(3):  # a client that reconnects while the node refuses
            reader, writer = await asyncio.open_connection(host, port)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # after the failure's log
            writer.close()
        failures = [
            e
            for e in (json.loads(line) for line in logs.getvalue().splitlines())
            if e["msg"] == "connection to nobody failed: 502 no available upstreams"
        ]
        assert len(failures) == 1 and failures[0]["level"] == "error"
    finally:
        await forwarder.close()


async def test_forwarder_carries_each_connection_with_half_close(h: Harness) -> None:
    node = await h.node()
    await tcp_endpoint(h, node, "digest", digest_after_eof_service)
    forwarder = Forwarder("digest", url=proxy_url(node))
    host, port = await forwarder.start("127.0.0.1", 0)
    try:
        for body in (b"one", b"two two"):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(body)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 10)
            assert answer.startswith(b"%d " % len(body))
            writer.close()
    finally:
        await forwarder.close()


async def test_forwarder_closes_connections_over_max_connections(h: Harness) -> None:
    # Every local connection holds a WebSocket to the node and up to a read buffer: a local
    # client (or anyone, on a public bind address) cannot open them without bound.
    node = await h.node()
    await tcp_endpoint(h, node, "echo")
    forwarder = Forwarder("echo", url=proxy_url(node), max_connections=1)
    host, port = await forwarder.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"first")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"first"
        over_reader, over_writer = await asyncio.open_connection(host, port)
        assert await asyncio.wait_for(over_reader.read(), 10) == b""  # closed at once
        over_writer.close()
        assert forwarder.refused == 1
        writer.write(b"still")  # the connection within the limit is untouched
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"still"
        writer.close()
        await wait_for(lambda: not forwarder.connections, what="the first connection to end")
        reader, writer = await asyncio.open_connection(host, port)  # a slot is free again
        writer.write(b"again")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"again"
        writer.close()
    finally:
        await forwarder.close()


async def test_forwarded_connections_leave_no_reference_cycles_holding_read_buffers(
    h: Harness,
) -> None:
    # A finished connection is freed by its reference count at once, not by the cycle
    # collector, which would keep its read buffer until it runs.
    node = await h.node()
    await tcp_endpoint(h, node, "digest", digest_after_eof_service)
    forwarder = Forwarder("digest", url=proxy_url(node))
    host, port = await forwarder.start("127.0.0.1", 0)

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"x" * 300_000)
        writer.write_eof()
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"300000 ")
        writer.close()
        await writer.wait_closed()

    try:
        await one()
        await wait_for(lambda: not forwarder.connections, what="the first connection to end")
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept, to be inspected
        try:
            for _ in range(5):
                await one()
            await wait_for(lambda: not forwarder.connections, what="the connections to end")
            gc.collect()
            cyclic = {type(o).__name__ for o in gc.garbage} & {"LocalSide", "WebSocketSide"}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert not cyclic
    finally:
        await forwarder.close()


async def test_tcp_metrics_count_connections_and_bytes(h: Harness) -> None:
    node = await h.node()
    await tcp_endpoint(h, node, "my-db")
    reader, writer = await open_connection("my-db", url=proxy_url(node))
    writer.write(b"12345")
    assert await reader.readexactly(5) == b"12345"
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()

    async def scraped() -> bool:
        async with aiohttp.ClientSession() as http:
            async with http.get(admin_url(node) + "/metrics") as resp:
                text = await resp.text()
        return (
            "pico_tcp_connections_total 1.0" in text
            and 'pico_tcp_bytes_total{direction="in"} 5.0' in text
            and 'pico_tcp_bytes_total{direction="out"} 5.0' in text
            and "pico_tcp_active_connections 0.0" in text
        )

    await wait_for(scraped, what="tcp metrics")


async def test_http_endpoints_still_serve_requests(h: Harness) -> None:
    node, _, _ = await h.with_service()
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node) + "/echo", headers={"x-pico-endpoint": "ep"}) as r:
            assert r.status == 200


async def test_status_says_how_each_endpoint_is_served_in_a_route_of_its_own(
    h: Harness,
) -> None:
    node, _, _ = await h.with_service()
    await tcp_endpoint(h, node, "my-db")
    async with aiohttp.ClientSession() as http:
        async with http.get(admin_url(node) + "/status/proxy/protocols") as resp:
            assert await resp.json() == {"ep": "http", "my-db": "tcp"}
        async with http.get(admin_url(node) + "/status/proxy/endpoints") as resp:
            endpoints = await resp.json()
    # The seed's shape, for both kinds: endpoint id -> the upstreams' addresses.
    assert sorted(endpoints) == ["ep", "my-db"]
    assert all(isinstance(a, str) for addrs in endpoints.values() for a in addrs)
    assert len(endpoints["my-db"]) == 1


async def test_agent_access_log_has_a_line_per_service_connection(
    h: Harness, logs: io.StringIO
) -> None:
    from pico.agent.agent import Agent
    from tests.support.cluster import RunningAgent, tcp_agent_config

    node = await h.node()
    echo = await tcp_service(h, await echo_service())
    agent = Agent(tcp_agent_config(node, "my-db", f"127.0.0.1:{echo.port}", access_log=True))
    stop = asyncio.Event()
    running = RunningAgent(agent, stop, asyncio.get_running_loop().create_task(agent.run(stop)))
    h.agents.append(running)
    await h.tunnel_up(node, "my-db")
    reader, writer = await open_connection("my-db", url=proxy_url(node))
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()

    def lines() -> list[dict[str, object]]:
        out = [json.loads(x) for x in logs.getvalue().splitlines()]
        return [x for x in out if x["subsystem"] == "agent.access"]

    await wait_for(
        lambda: [x["msg"] for x in lines()] == ["connection opened", "connection closed"]
    )
    assert lines()[1]["service"] == f"127.0.0.1:{echo.port}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def test_tcp_endpoint_through_an_https_proxy_port(h: Harness, pki: Pki) -> None:
    node = await h.node(proxy=pki.port())
    await tcp_endpoint(h, node, "my-db")
    assert node.addrs is not None
    host, port = node.addrs.proxy
    reader, writer = await open_connection(
        "my-db", url=f"https://{host}:{port}", ssl=client_context(pki.ca, "", "")
    )
    writer.write(b"secret")
    assert await reader.readexactly(6) == b"secret"
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()
    with pytest.raises(ssl.SSLError):  # the system's roots do not know our CA
        await open_connection("my-db", url=f"https://{host}:{port}")


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "expected a WebSocket upgrade"),
        ({"Connection": "Upgrade", "Upgrade": "h2c"}, "expected a WebSocket upgrade"),
    ],
)
async def test_the_tcp_route_takes_only_websocket_upgrades(
    h: Harness, headers: dict[str, str], message: str
) -> None:
    node = await h.node()
    await tcp_endpoint(h, node, "my-db")
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node) + "/_pico/v1/tcp/my-db", headers=headers) as resp:
            assert resp.status == 400
            assert await resp.json() == {"error": message}


async def test_a_refused_connection_through_a_forwarding_node_gets_502(h: Harness) -> None:
    a, b, _c = await cluster(h, proxy={"upstream_wait": "0.2s"})
    await h.tcp_agent(a, "gone", await closed_port())
    await h.tunnel_up(a, "gone")
    await wait_for(lambda: b.cluster.remotes[a.node_id].endpoints.get("gone") == 1, what="gossiped")
    with pytest.raises(ForwardError) as caught:
        await open_connection("gone", url=proxy_url(b))
    assert (caught.value.status, caught.value.message) == (502, "upstream unreachable")
