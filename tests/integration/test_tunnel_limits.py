"""What agents and clients may make a node hold: floods, tunnels, streams, connections per IP.

Each limit answers clearly (a JSON 429/503, a close), counts in `pico_limit_rejections_total`,
and leaves everyone else served.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import orjson

from pico.mux.frame import Flags, FrameType, GoAwayCode, ResetReason, decode_header, encode_header
from pico.mux.session import MAX_REFUSED_SYNS
from pico.mux.upgrade import Target, upgrade_request
from pico.mux.websocket import OP_BINARY, OP_PING, FrameDecoder, encode_frame, new_key
from pico.server.node import Node
from tests.support.cluster import Harness, proxy_url, wait_for
from tests.support.services import sample_app

EP = {"x-pico-endpoint": "ep"}


def rejections(node: Node, limit: str) -> float:
    value = node.metrics.registry.get_sample_value("pico_limit_rejections_total", {"limit": limit})
    return value or 0.0


async def open_upstream(
    node: Node, endpoint: str, *, rcvbuf: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to the node's upstream port with the upgrade request sent."""
    assert node.addrs is not None
    host, port = node.addrs.upstream
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # a small receive window: a peer that does not read blocks the node sooner
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    target = Target.parse(f"ws://{host}:{port}/pico/v1/upstream/{endpoint}")
    writer.write(upgrade_request(target, new_key()))
    return reader, writer


async def raw_agent(
    node: Node, endpoint: str, *, rcvbuf: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-driven agent: its tunnel is up once this returns; it reads only if told."""
    reader, writer = await open_upstream(node, endpoint, rcvbuf=rcvbuf)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def refused_upgrade(node: Node, endpoint: str) -> tuple[int, str]:
    """Ask for a tunnel expecting a refusal: (status, JSON error)."""
    reader, writer = await open_upstream(node, endpoint)
    try:
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), head
    return int(head.split()[1]), orjson.loads(body)["error"]


def binary(mux: bytes) -> bytes:
    return encode_frame(OP_BINARY, mux, mask=True, random_key=False)


def mux_frames(wire: bytes) -> list[tuple[int, int, int, int]]:
    """(type, flags, stream id, length-or-reason) of the mux frames in the node's output."""
    payloads, _ = FrameDecoder(expect_mask=False).feed(wire)
    data = b"".join(payloads)
    out = []
    pos = 0
    while pos + 12 <= len(data):
        _, ftype, flags, sid, length = decode_header(data, pos)
        pos += 12
        if ftype == FrameType.DATA:
            if flags & Flags.RST and length:
                out.append((ftype, flags, sid, data[pos]))
            else:
                out.append((ftype, flags, sid, length))
            pos += length
        else:
            out.append((ftype, flags, sid, length))
    return out


async def get(http: aiohttp.ClientSession, node: Node) -> int:
    async with http.get(proxy_url(node), headers=EP) as resp:
        await resp.read()
        return resp.status


# ------------------------------------------------------------------------------- floods


async def test_ping_flood_from_an_agent_that_never_reads_closes_its_tunnel(h: Harness) -> None:
    """The node answered every WebSocket ping of a peer that read none of the pongs: it grew
    to 865 MB in 16 s. Past `upstream.max_control_frames` pongs owed (default 10000), the
    tunnel is dropped."""
    node, _, _ = await h.with_service()
    _, writer = await raw_agent(node, "flood", rcvbuf=4096)
    await h.tunnel_up(node, "flood")
    pings = encode_frame(OP_PING, b"p" * 125, mask=True, random_key=False) * 2000
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < 300 * 1024 * 1024 and "flood" in node.registry.counts():
            writer.write(pings)
            await asyncio.wait_for(writer.drain(), 10)
            sent += len(pings)
    await wait_for(lambda: "flood" not in node.registry.counts(), what="flooding tunnel dropped")
    # The node queued at most its write buffer (4 MiB) plus 10000 pongs, and the kernel's
    # buffers: it stopped long before the peer could send 300 MB.
    assert sent < 100 * 1024 * 1024
    assert rejections(node, "upstream.max_control_frames") == 1
    writer.close()
    async with aiohttp.ClientSession() as http:
        assert await get(http, node) == 200


async def test_mux_ping_flood_from_an_agent_that_never_reads_closes_its_tunnel(
    h: Harness,
) -> None:
    node = await h.node(upstream={"max_control_frames": 1000})
    _, writer = await raw_agent(node, "flood", rcvbuf=4096)
    await h.tunnel_up(node, "flood")
    pings = binary(encode_header(FrameType.PING, Flags.SYN, 0, 1) * 5000)
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < 300 * 1024 * 1024 and "flood" in node.registry.counts():
            writer.write(pings)
            await asyncio.wait_for(writer.drain(), 10)
            sent += len(pings)
    await wait_for(lambda: "flood" not in node.registry.counts(), what="flooding tunnel dropped")
    assert sent < 100 * 1024 * 1024
    assert rejections(node, "upstream.max_control_frames") == 1
    writer.close()


async def test_pings_of_an_agent_that_reads_its_pongs_are_all_answered(h: Harness) -> None:
    node = await h.node(upstream={"max_control_frames": 10})
    reader, writer = await raw_agent(node, "chatty")
    await h.tunnel_up(node, "chatty")
    writer.write(binary(encode_header(FrameType.PING, Flags.SYN, 0, 9) * 5000))
    pongs = 0
    wire = b""
    while pongs < 5000:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "the node closed the tunnel"
        wire += data
        pongs = sum(1 for f in mux_frames(wire) if f[0] == FrameType.PING and f[1] & Flags.ACK)
    assert "chatty" in node.registry.counts()
    assert rejections(node, "upstream.max_control_frames") == 0
    writer.close()


async def test_an_agent_opening_streams_is_refused_without_state_then_disconnected(
    h: Harness,
) -> None:
    """A SYN flood from an agent: the node built a stream (and a task) for each, at 100 % CPU,
    and the real client got 0 of 2 requests. Now a few get RST(REFUSED), then the tunnel goes."""
    node, _, _ = await h.with_service()
    reader, writer = await raw_agent(node, "syn")
    await h.tunnel_up(node, "syn")
    syns = b"".join(
        encode_header(FrameType.WINDOW_UPDATE, Flags.SYN, 1 + 2 * i, 0) for i in range(100)
    )
    writer.write(binary(syns))
    wire = await asyncio.wait_for(reader.read(), 5)  # until the node closes the connection
    frames = mux_frames(wire)
    refused = [(FrameType.DATA, Flags.RST, 1 + 2 * i, ResetReason.REFUSED) for i in range(8)]
    assert frames == [*refused, (FrameType.GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR)]
    assert MAX_REFUSED_SYNS == 8
    await wait_for(lambda: "syn" not in node.registry.counts(), what="flooding tunnel dropped")
    assert rejections(node, "upstream.agent_opened_streams") == MAX_REFUSED_SYNS
    writer.close()
    async with aiohttp.ClientSession() as http:
        assert [await get(http, node), await get(http, node)] == [200, 200]


# ------------------------------------------------------------------------------- tunnels


async def test_tunnels_over_max_tunnels_per_endpoint_get_429_json(h: Harness) -> None:
    node = await h.node(upstream={"max_tunnels_per_endpoint": 2})
    agents = [await raw_agent(node, "ep"), await raw_agent(node, "EP")]  # one endpoint
    await h.tunnel_up(node, "ep", 2)
    status, error = await refused_upgrade(node, "ep")
    assert status == 429
    assert "upstream.max_tunnels_per_endpoint" in error
    assert rejections(node, "upstream.max_tunnels_per_endpoint") == 1
    other = await raw_agent(node, "other")  # other endpoints are not affected
    await h.tunnel_up(node, "other")
    for _, writer in [*agents, other]:
        writer.close()
    await wait_for(lambda: not node.registry.counts(), what="tunnels closed")
    again = await raw_agent(node, "ep")  # a slot freed is a slot
    again[1].close()


async def test_tunnels_over_max_tunnels_get_503_json(h: Harness) -> None:
    node = await h.node(upstream={"max_tunnels": 2})
    agents = [await raw_agent(node, "a"), await raw_agent(node, "b")]
    await wait_for(lambda: len(node.upstream_server.tunnels()) == 2, what="two tunnels")
    status, error = await refused_upgrade(node, "c")
    assert status == 503
    assert "upstream.max_tunnels" in error
    assert rejections(node, "upstream.max_tunnels") == 1
    for _, writer in agents:
        writer.close()


async def test_connections_over_the_upstream_per_ip_limit_get_429_json(h: Harness) -> None:
    node = await h.node(upstream={"max_connections_per_ip": 2})
    tunnel = await raw_agent(node, "a")
    pending = await open_upstream(node, "b")  # an upgrade in progress counts too
    status, error = await refused_upgrade(node, "c")
    assert status == 429
    assert "upstream.max_connections_per_ip" in error
    assert rejections(node, "upstream.max_connections_per_ip") == 1
    tunnel[1].close()
    await wait_for(lambda: "a" not in node.registry.counts(), what="tunnel closed")
    ok = await raw_agent(node, "c")
    for _, writer in (pending, ok):
        writer.close()


async def test_requests_over_max_streams_per_tunnel_get_503_json(h: Harness) -> None:
    node = await h.node(upstream={"max_streams_per_tunnel": 2})
    port = await h.service(sample_app())
    await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    async with aiohttp.ClientSession() as http:

        async def slow() -> int:
            async with http.get(proxy_url(node) + "/slow?delay=1", headers=EP) as resp:
                await resp.read()
                return resp.status

        first = [asyncio.ensure_future(slow()) for _ in range(2)]
        (up,) = node.upstream_server.tunnels()
        await wait_for(lambda: len(up.tunnel.streams) == 2, what="two requests in flight")
        async with http.get(proxy_url(node), headers=EP) as resp:
            assert resp.status == 503
            assert "upstream busy" in (await resp.json())["error"]
        assert await asyncio.gather(*first) == [200, 200]
        assert rejections(node, "upstream.max_streams_per_tunnel") == 1
        # Idle keep-alive streams never block a request: the oldest makes room.
        await wait_for(lambda: up.idle_count == 2, what="both streams pooled")
        async with http.post(proxy_url(node) + "/echo", data=b"x", headers=EP) as resp:
            assert resp.status == 200  # a POST never rides a pooled stream: a new one
        assert rejections(node, "upstream.max_streams_per_tunnel") == 1


# ------------------------------------------------------------------------------- proxy port


async def test_connections_over_the_proxy_per_ip_limit_are_closed(h: Harness) -> None:
    node, _, _ = await h.with_service(proxy={"max_connections_per_ip": 2})
    assert node.addrs is not None
    request = b"GET / HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\n\r\n"
    conns = [await asyncio.open_connection(*node.addrs.proxy) for _ in range(2)]
    for reader, writer in conns:
        writer.write(request)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    reader, writer = await asyncio.open_connection(*node.addrs.proxy)
    with contextlib.suppress(ConnectionError):
        writer.write(request)
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert rejections(node, "proxy.max_connections_per_ip") == 1
    conns[0][1].close()
    await wait_for(lambda: len(node.connections) == 1, what="a connection closed")
    async with aiohttp.ClientSession() as http:
        assert await get(http, node) == 200
    for _, w in conns[1:]:
        w.close()


async def test_trusted_proxies_are_not_limited_per_ip(h: Harness) -> None:
    # A load balancer carries every client's connections from one address.
    node, _, _ = await h.with_service(
        proxy={"max_connections_per_ip": 1, "trusted_proxies": ["127.0.0.1/32"]}
    )
    assert node.addrs is not None
    request = b"GET / HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\n\r\n"
    conns = [await asyncio.open_connection(*node.addrs.proxy) for _ in range(3)]
    for reader, writer in conns:
        writer.write(request)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    for _, writer in conns:
        writer.close()
    assert rejections(node, "proxy.max_connections_per_ip") == 0
