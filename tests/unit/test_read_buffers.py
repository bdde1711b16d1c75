"""Tunnel read buffers: shared by all tunnels, reused only when no view of them is alive, and
never pinned by what a slow peer leaves in a transport's write buffer. And the agent's pipes:
pooled per tunnel, reused only when empty."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import pytest

from pico.http.channel import Router
from pico.http.proxy import ProxyConnection
from pico.http.settings import ProxyLimits
from pico.mux import splice
from pico.mux.buffers import READ_BUFFERS, PooledReads, ReadBuffers
from pico.mux.tunnel import Tunnel


def test_a_buffer_is_reused_only_once_every_view_of_it_is_gone() -> None:
    pool = ReadBuffers(1024, keep=2)
    first = pool.take()
    view = memoryview(first)[:10].toreadonly()
    pool.give(first)
    second = pool.take()
    assert second is not first  # a view is alive: the data under it must not change
    pool.give(second)
    assert pool.take() is second
    del view
    pool.give(first)
    assert pool.take() is first


def test_the_pool_keeps_few_spares() -> None:
    pool = ReadBuffers(1024, keep=2)
    buffers = [pool.take() for _ in range(5)]
    for buf in buffers:
        pool.give(buf)
    assert len(pool.spares) == 2


class _Transport:
    def __init__(self) -> None:
        self.buffered = 0
        self.written: list[Any] = []

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: Any) -> None:
        self.written.append(data)


async def test_views_written_behind_buffered_bytes_are_copied() -> None:
    conn = ProxyConnection(router=cast(Router, object()), limits=ProxyLimits())
    transport = _Transport()
    conn.transport = cast(asyncio.Transport, transport)
    view = memoryview(bytearray(b"x" * 100)).toreadonly()
    conn.write(view)
    assert transport.written[-1] is view  # sent at once: no copy
    transport.buffered = 10  # the client is not keeping up: what we write now is kept
    conn.write(view[:50])
    assert type(transport.written[-1]) is bytes and transport.written[-1] == b"x" * 50


async def test_small_views_collected_while_corked_are_copied() -> None:
    conn = ProxyConnection(router=cast(Router, object()), limits=ProxyLimits())
    transport = _Transport()
    conn.transport = cast(asyncio.Transport, transport)
    read_buffer = bytearray(b"y" * 100)
    assert conn.cork()
    conn.write(memoryview(read_buffer)[:10].toreadonly())
    conn.uncork()
    assert transport.written == [b"y" * 10]
    read_buffer.pop()  # no view of it was kept: it can be reused


async def test_tunnels_hold_no_read_buffer_between_reads() -> None:
    tunnel = Tunnel(client=False, ping_interval=0)
    buf = tunnel.get_buffer(-1)
    buf[:3] = b"\x82\x01a"  # a one-byte binary frame, unmasked (rejected: the client must mask)
    tunnel.buffer_updated(3)
    assert tunnel._reads._buffer is None
    tunnel.close()


@pytest.mark.parametrize("end", ["eof", "lost"])
async def test_a_read_that_finds_the_end_gives_its_buffer_back(end: str) -> None:
    # The loop asks for a buffer before every read; a read that finds EOF (or an error)
    # never calls buffer_updated. That buffer must go back to the pool, not stay with the
    # closed tunnel (1 MiB per closed tunnel: 1.2 GB after 1,300).
    READ_BUFFERS.spares.clear()
    tunnel = Tunnel(client=False, ping_interval=0)
    view = tunnel.get_buffer(-1)
    taken = view.obj
    del view
    if end == "eof":
        tunnel.eof_received()
    else:
        tunnel.connection_lost(ConnectionResetError())
    assert tunnel._reads._buffer is None
    assert READ_BUFFERS.spares and READ_BUFFERS.spares[-1] is taken


def test_pipes_come_back_to_the_pool_only_when_empty() -> None:
    pool = splice.PipePool(keep=2)
    service, other = socket.socketpair()
    try:
        service.send(b"abc")
        sent = pool.take()
        assert sent.fill(other.fileno(), 3) == 3
        sent.drained(3)  # all three bytes went out: empty, back in the pool
        assert pool.spares == [sent] and not sent.closed
        assert pool.take() is sent
        service.send(b"def")
        dropped = pool.take()
        dropped.fill(other.fileno(), 3)
        dropped.discard()  # its bytes were never sent: it must not carry them to another stream
        assert dropped.closed and dropped not in pool.spares
        extra = [pool.take() for _ in range(3)]
        for pipe in extra:
            pool.give(pipe)
        assert len(pool.spares) == 2 and extra[2].closed  # beyond `keep`, closed
        pool.close()
        assert all(p.closed for p in extra[:2])
    finally:
        service.close()
        other.close()


def test_pooled_reads_give_each_buffer_back_once_its_bytes_are_delivered() -> None:
    pool = ReadBuffers(16, keep=2)
    reads = PooledReads(pool)
    view = reads.buffer()
    view[:5] = b"hello"  # the loop reads into it, and lets go of the view
    view.release()
    got: list[bytes] = []
    reads.deliver(5, lambda data: got.append(bytes(data)))
    assert got == [b"hello"]
    [spare] = pool.spares  # back in the pool, and nothing pins it
    assert reads.buffer().obj is spare  # so the next read reuses it


def test_pooled_reads_release_a_buffer_no_read_filled_when_the_connection_ends() -> None:
    pool = ReadBuffers(16, keep=2)
    reads = PooledReads(pool)
    first = reads.buffer().obj
    assert reads.buffer().obj is first  # a read that got nothing (EOF) took no second one
    reads.release()
    assert pool.spares == [first]
