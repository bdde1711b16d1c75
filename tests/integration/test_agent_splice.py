"""The agent's zero-copy path (Linux): service bytes go socket -> pipe -> tunnel by splice(2).

Every other integration test runs through it too (it is the default on Linux); these check
what is particular to it: descriptors, the bytes the event loop reads before its pause, and
that it is really the path in use. Like the rest of the suite (nginx, chromium, promtool) they
need the platform CI runs on: Linux, where splice(2) is. Elsewhere they fail on
`tunnel.splicing` rather than skip, so a lost splice path cannot go unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from typing import Any

import aiohttp
import pytest

from pico.agent.service import SplicedServiceSide
from pico.mux import splice
from pico.mux.frame import Flags, FrameType, encode_header
from pico.mux.tunnel import Tunnel
from pico.mux.websocket import OP_BINARY, OP_PING, encode_frame, frame_header
from tests.support.cluster import Harness, agent_tunnel, proxy_url, wait_for
from tests.support.services import pattern, sample_app

EP = {"x-pico-endpoint": "ep"}


def open_fds(kind: str) -> int:
    """Descriptors of this process whose target starts with `kind` ('pipe', 'socket')."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith(kind):
                count += 1
        except OSError:
            pass  # closed while listing
    return count


async def download(size: int, node: Any) -> bytes:
    async with (
        aiohttp.ClientSession() as http,
        http.get(proxy_url(node) + f"/download?size={size}", headers=EP) as resp,
    ):
        assert resp.status == 200
        return await resp.read()


async def whole_body_service(body: bytes) -> asyncio.Server:
    """A service that writes its whole response at once (so the agent's reads come back full
    and it splices)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                writer.write(head + body)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(handler, "127.0.0.1", 0)


async def get_all(node: Any, count: int) -> list[bytes]:
    async with aiohttp.ClientSession() as http:

        async def get() -> bytes:
            async with http.get(proxy_url(node), headers=EP) as resp:
                assert resp.status == 200
                return await resp.read()

        return await asyncio.gather(*(get() for _ in range(count)))


async def test_big_responses_are_spliced_and_arrive_intact(h: Harness) -> None:
    # After the first full read the agent splices the rest (the start of a response, and
    # small ones, are read and copied).
    body = pattern(9 * 1024 * 1024 + 17)
    server = await whole_body_service(body)
    node = await h.node()
    running = await h.agent(node, [f"ep/127.0.0.1:{server.sockets[0].getsockname()[1]}"])
    await h.tunnel_up(node, "ep")
    tunnel = await agent_tunnel(running)
    assert tunnel.splicing
    assert all(got == body for got in await get_all(node, 4))
    assert tunnel.pipes is not None and tunnel.pipes.spares  # chunks went through pipes
    server.close()


async def test_pipes_and_duplicate_descriptors_are_all_closed(h: Harness) -> None:
    node = await h.node()
    port = await h.service(sample_app())
    pipes, sockets = open_fds("pipe"), open_fds("socket")
    running = await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    keep = splice.PipePool().keep
    await asyncio.gather(*(download(300_000, node) for _ in range(keep + 16)))
    # The pool's spares serve every stream: a pipe is needed only while a chunk is out, and
    # no more than `keep` are kept once the streams are done.
    assert pipes < open_fds("pipe") <= pipes + 2 * keep
    await running.close()
    await wait_for(lambda: open_fds("pipe") == pipes, what="every pipe closed")
    # Every socket the agent opened (and its duplicates) is closed, and so the node's and
    # the service's ends of them.
    await wait_for(lambda: open_fds("socket") == sockets, what="the agent's sockets closed")


async def test_bytes_the_loop_reads_before_its_pause_go_first(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvloop starts reading a new connection after connection_made, whatever it was told
    # there. Do the same here, after the agent's own deferred pause: the bytes read that way
    # must reach the client before the spliced ones, in order.
    read_by_loop: list[int] = []
    original_made = SplicedServiceSide.connection_made
    original_received = SplicedServiceSide.data_received

    def connection_made(self: Any, transport: asyncio.Transport) -> None:
        original_made(self, transport)
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, transport.resume_reading)

    def data_received(self: Any, data: bytes) -> None:
        read_by_loop.append(len(data))
        original_received(self, data)

    monkeypatch.setattr(SplicedServiceSide, "connection_made", connection_made)
    monkeypatch.setattr(SplicedServiceSide, "data_received", data_received)
    node, _, _ = await h.with_service()
    size = 3 * 1024 * 1024 + 5
    assert await download(size, node) == pattern(size)
    assert read_by_loop, "the loop never read: the case under test did not happen"


async def tunnel_over_socket(small_buffers: bool) -> tuple[Tunnel, socket.socket]:
    """An agent-side tunnel writing directly to a TCP socket; returns it and the peer's end."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    if small_buffers:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.socket()
    if small_buffers:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    client.connect(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    peer.setblocking(False)
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=client)
    tunnel = Tunnel(client=True, ping_interval=0, ping_timeout=0.1)
    tunnel.attach(transport, direct=True)
    assert tunnel.splicing
    return tunnel, peer


@pytest.mark.parametrize("peer_talks", [False, True])
async def test_a_closing_tunnel_sends_what_it_queued_before_closing(peer_talks: bool) -> None:
    # Streams count as done once their FIN is framed; the bytes before it may still wait for
    # the socket. A graceful close (an agent stopping) must send them, not drop them, and
    # must not reset the connection under them when the peer sends something meanwhile
    # (closing a socket with unread input resets it).
    loop = asyncio.get_running_loop()
    tunnel, peer = await tunnel_over_socket(small_buffers=True)
    body = b"x" * 250_000
    fins = b""
    for _ in range(4):
        stream = tunnel.open_stream()
        stream.write(body)
        stream.write_eof()
        fins += encode_header(FrameType.DATA, Flags.FIN, stream.stream_id, 0)
    tunnel.data_received(frame_header(OP_BINARY, len(fins), mask_key=None) + fins)

    async def read_all() -> int:
        await tunnel.wait_closing()  # the peer reads only once the tunnel is closing
        if peer_talks:
            await loop.sock_sendall(peer, encode_frame(OP_PING, b"hi", mask=False))
        got = 0
        while chunk := await loop.sock_recv(peer, 1 << 20):
            got += len(chunk)
        peer.close()  # as the node does when the agent's end closes
        return got

    reader = loop.create_task(read_all())
    await tunnel.drain_and_close(10.0)
    got = await asyncio.wait_for(reader, 10)
    assert got > 4 * len(body)  # every body (plus frame headers), then the end of the stream


async def test_pipe_chunks_framed_when_the_connection_is_lost_are_released() -> None:
    tunnel, peer = await tunnel_over_socket(small_buffers=False)
    stream = tunnel.open_stream()
    service, other = socket.socketpair()
    service.send(b"y" * 1000)
    pipe = splice.Pipe()
    size = pipe.fill(other.fileno(), 1000)
    stream.write_chunk(splice.PipeChunk(pipe, size))  # framed; the flush is still to come
    tunnel.connection_lost(ConnectionResetError(104, "reset"))  # in the same iteration
    await wait_for(lambda: pipe.closed, what="the pipe closed")
    for sock in (service, other, peer):
        sock.close()


async def test_without_descriptors_for_pipes_big_responses_are_copied(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of descriptors (EMFILE), no pipe can be made: the agent copies instead of failing
    # the read again and again on every loop iteration.
    tried: list[int] = []

    def no_pipe(flags: int) -> tuple[int, int]:
        tried.append(1)
        raise OSError(errno.EMFILE, "Too many open files")

    # The os function, not the pool's method: the compiled build calls methods directly.
    monkeypatch.setattr(os, "pipe2", no_pipe)
    body = pattern(5 * 1024 * 1024 + 3)
    server = await whole_body_service(body)
    node = await h.node()
    await h.agent(node, [f"ep/127.0.0.1:{server.sockets[0].getsockname()[1]}"])
    await h.tunnel_up(node, "ep")
    assert await asyncio.wait_for(get_all(node, 2), 30) == [body, body]
    assert tried  # the agent did want a pipe
    server.close()
