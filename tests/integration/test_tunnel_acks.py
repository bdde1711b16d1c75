"""Streams an agent never acknowledges: reset, retried elsewhere, the tunnel out of rotation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import aiohttp

from pico.mux.frame import Flags, FrameType, ResetReason, encode_header
from pico.mux.tunnel import Tunnel
from pico.mux.websocket import OP_BINARY, encode_frame
from tests.support.cluster import (
    Harness,
    agent_config,
    agent_tunnel,
    proxy_url,
    start_agent,
    wait_for,
)
from tests.support.services import PEERS, sample_app


class _Sink(asyncio.Transport):
    """A transport that takes every write and never reads."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def writelines(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _Receiver:
    def __init__(self) -> None:
        self.lost: list[ResetReason | None] = []

    def data_received(self, data: bytes | memoryview) -> None: ...
    def eof_received(self) -> None: ...

    def connection_lost(self, reason: ResetReason | None) -> None:
        self.lost.append(reason)

    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


def from_agent(mux: bytes) -> bytes:
    return encode_frame(OP_BINARY, mux, mask=True, random_key=False)


PING = from_agent(encode_header(FrameType.PING, Flags.SYN, 0, 1))


async def test_a_stream_a_silent_peer_never_acknowledges_is_reset_as_unacknowledged() -> None:
    tunnel = Tunnel(client=False, ping_interval=0, ack_timeout=0.2)
    tunnel.attach(_Sink())
    try:
        stream = tunnel.open_stream()
        receiver = _Receiver()
        stream.set_receiver(receiver)
        await wait_for(lambda: receiver.lost == [ResetReason.UNACKNOWLEDGED], what="reset")
        assert not tunnel.usable and not tunnel.streams
        tunnel.data_received(PING)  # heard from again: back in rotation
        assert tunnel.usable
    finally:
        tunnel.close()


async def test_a_stream_of_a_peer_that_talks_but_has_not_acked_yet_is_kept() -> None:
    # Its ACK may be queued behind megabytes it is sending us: the stream may have reached
    # a service, so it must not be sent elsewhere.
    tunnel = Tunnel(client=False, ping_interval=0, ack_timeout=0.1)
    tunnel.attach(_Sink())
    try:
        stream = tunnel.open_stream()
        receiver = _Receiver()
        stream.set_receiver(receiver)
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0  # ten ack timeouts
        while loop.time() < end:
            tunnel.data_received(PING)
            await asyncio.sleep(0.01)
        assert receiver.lost == [] and tunnel.usable
        ack = encode_header(FrameType.WINDOW_UPDATE, Flags.ACK, stream.stream_id, 0)
        tunnel.data_received(from_agent(ack))
        assert tunnel.session.acknowledged(stream.stream_id)
    finally:
        tunnel.close()


async def test_a_post_on_a_stream_a_frozen_agent_never_acks_goes_to_the_other_upstream(
    h: Harness,
) -> None:
    node = await h.node(proxy={"stream_ack_timeout": "300ms"})
    frozen_app, healthy_app = sample_app(), sample_app()
    frozen_port = await h.service(frozen_app)
    healthy_port = await h.service(healthy_app)
    # No heartbeat of its own: once its reading stops, the agent says nothing at all.
    config = agent_config(
        node, [f"ep/127.0.0.1:{frozen_port}"], server={"heartbeat_interval": "1h"}
    )
    frozen = await start_agent(config)
    h.agents.append(frozen)
    await h.tunnel_up(node, "ep")
    await h.agent(node, [f"ep/127.0.0.1:{healthy_port}"])
    await h.tunnel_up(node, "ep", 2)
    tunnel = await agent_tunnel(frozen)
    assert tunnel.transport is not None
    tunnel.transport.pause_reading()  # frozen: it reads nothing, so it sends nothing
    headers = {"x-pico-endpoint": "ep"}
    try:
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            for i in range(4):  # round robin: at least one is sent to the frozen agent first
                body = b"payment %d" % i
                async with http.post(proxy_url(node) + "/echo", data=body, headers=headers) as r:
                    assert r.status == 200
                    assert await r.read() == body
            assert time.monotonic() - started < 10  # not proxy.timeout (30 s)
        assert not frozen_app[PEERS]  # nothing ever reached the frozen agent's service
        assert len(healthy_app[PEERS]) >= 1
        # Out of rotation until it is heard from, though its tunnel is still registered.
        assert node.registry.counts()["ep"] == 2
        assert [up.tunnel.usable for up in node.registry.all()].count(False) == 1
    finally:
        tunnel.transport.resume_reading()  # thawed: it stops as usual
