"""What a node may make an agent hold: at most `max_streams` streams (service connections)."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from pico.config import AgentConfig, load_config_dict
from pico.mux.frame import Flags, FrameType, ResetReason, decode_header, encode_header
from pico.mux.upgrade import accept_response
from pico.mux.websocket import OP_BINARY, FrameDecoder, encode_frame
from tests.support.cluster import Harness, agent_config, proxy_url, start_agent, wait_for
from tests.support.services import PEERS, sample_app


async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the agent's WebSocket handshake and accept it, as a node's upstream port does."""
    head = await reader.readuntil(b"\r\n\r\n")
    key = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key")
    )
    writer.write(accept_response(key))


class FakeNode:
    """A node that upgrades the agent's connection, then sends what the test writes."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.wire = b""
        self.decoder = FrameDecoder(expect_mask=True)
        self.mux = b""
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await upgrade(reader, writer)
            self.writer = writer
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    payloads, _ = self.decoder.feed(data)
                    self.mux += b"".join(payloads)

        def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(handle(reader, writer))
            self.tasks.add(task)

        self.server = await asyncio.start_server(track, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def send(self, mux: bytes) -> None:
        assert self.writer is not None
        self.writer.write(encode_frame(OP_BINARY, mux, mask=False))

    def frames(self) -> list[tuple[int, int, int, int]]:
        """(type, flags, stream id, length or RST reason) of what the agent sent."""
        out, data, pos = [], self.mux, 0
        while pos + 12 <= len(data):
            _, ftype, flags, sid, length = decode_header(data, pos)
            pos += 12
            if ftype == FrameType.DATA:
                out.append((ftype, flags, sid, data[pos] if flags & Flags.RST and length else 0))
                pos += length
            else:
                out.append((ftype, flags, sid, length))
        return out

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()


def syn(stream_id: int) -> bytes:
    return encode_header(FrameType.WINDOW_UPDATE, Flags.SYN, stream_id, 0)


async def test_streams_beyond_agent_max_streams_are_refused_and_never_dialed(h: Harness) -> None:
    """A node opened 2,000 streams: the agent made 2,000 service connections (4,018 fds).
    Beyond `max_streams` a stream is refused (RST REFUSED) before any dial."""
    app = sample_app()
    port = await h.service(app)
    node = FakeNode()
    node_port = await node.start()
    config = load_config_dict(
        AgentConfig,
        {
            "endpoints": [f"ep/127.0.0.1:{port}"],
            "server": {"url": f"http://127.0.0.1:{node_port}"},
            "max_streams": 20,
        },
    )
    running = await start_agent(config)
    h.agents.append(running)
    try:
        await wait_for(lambda: node.writer is not None, what="agent connected")
        node.send(b"".join(syn(2 * i) for i in range(1, 51)))

        def answered() -> tuple[list[int], list[int]]:
            frames = node.frames()
            acked = [f[2] for f in frames if f[0] == FrameType.WINDOW_UPDATE and f[1] & Flags.ACK]
            refused = [f[2] for f in frames if f[1] & Flags.RST and f[3] == ResetReason.REFUSED]
            return acked, refused

        await wait_for(lambda: sum(map(len, answered())) == 50, what="every SYN answered")
        acked, refused = answered()
        assert acked == [2 * i for i in range(1, 21)]
        assert refused == [2 * i for i in range(21, 51)]
        # Each accepted stream gets its service connection, the refused none.
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        node.send(
            b"".join(
                encode_header(FrameType.DATA, Flags(0), sid, len(request)) + request
                for sid in acked
            )
        )
        await wait_for(lambda: len(app[PEERS]) == 20, what="20 service connections")
        metric = running.agent.metrics.registry.get_sample_value(
            "pico_agent_limit_rejections_total", {"endpoint": "ep", "limit": "max_streams"}
        )
        assert metric == 30
        # A stream that ends frees its slot.
        node.send(encode_header(FrameType.DATA, Flags.RST, 2, 0) + syn(102))
        await wait_for(lambda: 102 in answered()[0], what="a new stream accepted")
        assert len(app[PEERS]) <= 21
    finally:
        await node.close()


async def test_a_request_refused_by_a_full_agent_goes_to_another_upstream(h: Harness) -> None:
    node = await h.node()
    full = await h.service(sample_app("full"))
    other = await h.service(sample_app("other"))
    config = agent_config(node, [f"ep/127.0.0.1:{full}"]).model_copy(update={"max_streams": 1})
    full_agent = await start_agent(config)
    h.agents.append(full_agent)
    await h.tunnel_up(node, "ep")
    await h.agent(node, [f"ep/127.0.0.1:{other}"])
    await h.tunnel_up(node, "ep", 2)
    headers = {"x-pico-endpoint": "ep"}
    async with aiohttp.ClientSession() as http:
        slow = asyncio.ensure_future(http.get(proxy_url(node) + "/slow?delay=1", headers=headers))
        tunnels = node.upstream_server.tunnels()
        await wait_for(lambda: any(t.tunnel.streams for t in tunnels), what="request in flight")
        # Whichever agent holds the slow request, POSTs (never retried unless provably
        # undelivered) all succeed: a refusal by the full agent sends them to the other.
        for _ in range(6):
            async with http.post(proxy_url(node) + "/echo", data=b"x", headers=headers) as resp:
                assert resp.status == 200
        async with await slow as resp:
            assert resp.status == 200
    refused = full_agent.agent.metrics.registry.get_sample_value(
        "pico_agent_limit_rejections_total", {"endpoint": "ep", "limit": "max_streams"}
    )
    assert refused is not None and refused >= 1


class DrainingNode:
    """A node that opens a stream on each tunnel (the agent dials the service for it), sends
    GoAway on the first `goaways` tunnels, and never ends a tunnel itself."""

    def __init__(self, goaways: int) -> None:
        self.goaways = goaways
        self.connections = 0  # tunnels the agent opened
        self.open = 0  # ... and still has open
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.open += 1
            try:
                await upgrade(reader, writer)
                mux = syn(2)
                if self.connections <= self.goaways:
                    mux += encode_header(FrameType.GO_AWAY, Flags(0), 0, 0)
                writer.write(encode_frame(OP_BINARY, mux, mask=False))
                with contextlib.suppress(ConnectionError):
                    while await reader.read(65536):
                        pass
            finally:
                self.open -= 1
                writer.close()

        def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(handle(reader, writer))
            self.tasks.add(task)

        self.server = await asyncio.start_server(track, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_tunnels_a_node_drains_but_never_ends_are_bounded(h: Harness) -> None:
    """Each GoAway made the agent open a new tunnel and keep the old one, with its streams
    and their service connections, until the node ended it: a node that never did made the
    agent hold ten tunnels after ten GoAways, a thousand after a thousand."""
    app = sample_app()
    port = await h.service(app)
    node = DrainingNode(goaways=10)
    node_port = await node.start()
    config = load_config_dict(
        AgentConfig,
        {"endpoints": [f"ep/127.0.0.1:{port}"], "server": {"url": f"http://127.0.0.1:{node_port}"}},
    )
    running = await start_agent(config)
    h.agents.append(running)
    try:
        await wait_for(lambda: node.connections == 11, what="ten GoAways followed")
        limit = config.max_draining_tunnels
        # The current tunnel and `limit` draining ones; older ones were closed.
        await wait_for(lambda: node.open == 1 + limit, what="older draining tunnels closed")
        metric = running.agent.metrics.registry.get_sample_value(
            "pico_agent_limit_rejections_total", {"endpoint": "ep", "limit": "max_draining_tunnels"}
        )
        assert metric == 10 - limit
    finally:
        running.agent.grace = 0.1  # the node never ends its streams
        await running.close()
        h.agents.remove(running)
        await node.close()
