"""Fuzz targets: each takes one input (bytes) and fails only on a broken invariant.

An expected refusal of bad input (a protocol error, a config error) is the right answer and
passes; anything else raised is a bug, and so is an assertion below:

* `mux`: a mux session never raises on peer bytes, and the bytes each stream receives do not
  depend on how the input was split (no input corrupts another stream's data).
* `websocket`: the frame decoder refuses or decodes, and what it decodes does not depend on
  how the input was split.
* `gossip`: a datagram, join or leave from anyone is decoded or refused, replies go to the
  datagram's source and are at most 4x its size, and applying it keeps the node's state
  consistent (no entry newer than its node, no duplicate keys, its own state intact).
* `http`: whatever a client sends, the node answers with HTTP responses, what reaches the
  service is unambiguous HTTP/1.1 (h11 parses it), and no task is left behind.
* `config`: any YAML text gives a config or a `ConfigError` naming what is wrong.

Run them with hypothesis (tests/unit/test_fuzz.py) or atheris (`python -m fuzz.run`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import h11
import yaml

from pico.config import AgentConfig, ConfigError, ServerConfig, load_config_dict
from pico.config.values import expand_env
from pico.gossip import codec
from pico.gossip.protocol import Gossiper
from pico.http.channel import Cancellable, Channel, ChannelReceiver, ResetReason, Upstream
from pico.http.proxy import ProxyConnection
from pico.http.settings import ProxyLimits
from pico.mux.events import DataReceived
from pico.mux.frame import HEADER_SIZE
from pico.mux.session import Session
from pico.mux.websocket import FrameDecoder, WebSocketError

# Inputs are cut at these offsets (modulo their length) to check split-independence.
_CUTS = (1, 2, 3, 5, 7, 12, 13, 64)


def _chunks(data: bytes, step: int) -> list[bytes]:
    return [data[i : i + step] for i in range(0, len(data), step)] or [b""]


# ---------------------------------------------------------------------------------------- mux


def _mux_streams(data_parts: list[bytes], client: bool) -> dict[int, bytes]:
    session = Session(client=client, initial_window=256 * 1024)
    received: dict[int, bytearray] = {}
    for part in data_parts:
        session.receive_data(part)  # must never raise on peer input
        for event in session.events_received():
            if isinstance(event, DataReceived):
                received.setdefault(event.stream_id, bytearray()).extend(event.data)
                with contextlib.suppress(Exception):
                    session.consume(event.stream_id, len(event.data))
        session.data_to_send()
    # Every stream the peer opened cost it a 12-byte frame: state grows only with input.
    assert session.stream_count <= sum(map(len, data_parts)) // HEADER_SIZE, "streams"
    return {k: bytes(v) for k, v in received.items()}


def mux(data: bytes) -> None:
    for client in (False, True):
        whole = _mux_streams([data], client)
        for step in _CUTS[: 2 + len(data) // 64]:
            assert _mux_streams(_chunks(data, step), client) == whole, f"split at {step}"


# ---------------------------------------------------------------------------------- websocket


def _ws_decode(parts: list[bytes], expect_mask: bool) -> tuple[bytes, list[tuple[int, bytes]]]:
    decoder = FrameDecoder(expect_mask=expect_mask, max_frame=1 << 16)
    payload = bytearray()
    controls: list[tuple[int, bytes]] = []
    try:
        for part in parts:
            pieces, frames = decoder.feed(part)
            for piece in pieces:
                payload += piece
            controls += [(f.opcode, bytes(f.payload)) for f in frames]
    except WebSocketError:
        controls.append((-1, b""))  # a refusal is part of the result: it must happen too
    return bytes(payload), controls


def websocket(data: bytes) -> None:
    for expect_mask in (False, True):
        whole = _ws_decode([data], expect_mask)
        controls = whole[1]
        assert all(len(p) <= 125 for _, p in controls), "control frame over 125 bytes"
        for step in _CUTS[: 2 + len(data) // 64]:
            got = _ws_decode(_chunks(data, step), expect_mask)
            if whole[1] and whole[1][-1][0] == -1:
                # After a refusal the connection is closed: only what came before must agree.
                assert got[1] and got[1][-1][0] == -1, f"split at {step}: refusal lost"
                assert whole[0].startswith(got[0]) or got[0].startswith(whole[0])
            else:
                assert got == whole, f"split at {step}"


# ------------------------------------------------------------------------------------- gossip


def gossip(data: bytes) -> None:
    node = Gossiper("fuzz-node", "127.0.0.1:7946")
    node.upsert("proxy_addr", "127.0.0.1:8000")
    source = "127.0.0.99:4000"  # not a member: replies must stay small (no reflection)
    try:
        replies = node.receive_datagram(data, 1.0, source)
    except codec.GossipDecodeError:
        replies = []
    assert all(r.addr == source for r in replies), "a reply to an address from the packet"
    assert sum(len(r.data) for r in replies) <= 4 * len(data), "amplified reply"
    for handle in (lambda: node.handle_join(data, 1.0), lambda: node.handle_leave(data, 1.0)):
        try:
            handle()
        except codec.GossipDecodeError:
            pass
    node.events()
    node.tick(2.0)
    for meta in node.nodes():
        state = node.node_state(meta.id)
        assert state is not None
        versions = [e.version for e in state.entries]
        assert all(v <= meta.version for v in versions), "entry newer than its node"
        assert len(set(e.key for e in state.entries)) == len(state.entries), "duplicate keys"
    own = node.node_state("fuzz-node")
    assert own is not None and {e.key for e in own.entries} >= {"proxy_addr"}, "own state lost"


# --------------------------------------------------------------------------------------- http

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Service:
    """The far side of a channel: parses what the node sends with h11 (a strict, independent
    parser), answers each complete request, and fails the input on anything ambiguous."""

    def __init__(self) -> None:
        self.h11 = h11.Connection(h11.SERVER)
        self.receiver: ChannelReceiver | None = None
        self.closed = False

    def set_receiver(self, receiver: ChannelReceiver) -> None:
        self.receiver = receiver

    def write(self, data: bytes | memoryview) -> None:
        if self.closed:
            return
        self.h11.receive_data(bytes(data))
        self._parse()

    def write_eof(self) -> None:
        if not self.closed and self.h11.their_state is not h11.CLOSED:
            with contextlib.suppress(h11.RemoteProtocolError):
                self.h11.receive_data(b"")

    def _parse(self) -> None:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise AssertionError(f"the service got ambiguous HTTP: {exc}") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if type(event) is h11.EndOfMessage:
                asyncio.get_running_loop().call_soon(self._answer)
                return
            if type(event) is h11.ConnectionClosed:
                return

    def _answer(self) -> None:
        if self.receiver is not None and not self.closed:
            self.receiver.data_received(_OK)
            self.closed = True  # one request per channel: the pool is not under test here

    def reset(self, reason: ResetReason = ResetReason.CANCELLED) -> None:
        self.closed = True
        self.receiver = None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Upstream:
    label = "fuzz"
    remote = False

    def open_channel(self, fresh: bool = False) -> tuple[Channel, bool]:
        return _Service(), False

    def release_channel(self, channel: Channel) -> None:
        channel.reset(ResetReason.NORMAL)


class _Router:
    def candidates(self, endpoint_id: str, forwarded: bool) -> list[Upstream]:
        return [_Upstream()]

    def wait_for_upstream(
        self, endpoint_id: str, callback: Callable[[], None], *, known: bool = False
    ) -> Cancellable | None:
        return None


class _Client(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.9", 40000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def writelines(self, parts: object) -> None:
        for part in parts:  # type: ignore[attr-defined]
            self.out += part

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


_LOOP: asyncio.AbstractEventLoop | None = None
_LIMITS = ProxyLimits(max_header_bytes=4096, read_header_timeout=0, idle_timeout=0)


async def _serve(data: bytes) -> None:
    conn = ProxyConnection(_Router(), _LIMITS)
    client = _Client()
    conn.connection_made(client)
    for part in _chunks(data, 97):
        if client.closing:
            break
        conn.data_received(part)
        for _ in range(3):
            await asyncio.sleep(0)
    if not client.closing:
        conn.eof_received()
    for _ in range(3):
        await asyncio.sleep(0)
    conn.connection_lost(None)
    out = bytes(client.out)
    assert not out or out.startswith(b"HTTP/1.1 "), f"not an HTTP response: {out[:40]!r}"


def http(data: bytes) -> None:
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    _LOOP.run_until_complete(_serve(data))
    tasks = [t for t in asyncio.all_tasks(_LOOP) if not t.done()]
    assert not tasks, f"tasks left behind: {tasks}"


# ------------------------------------------------------------------------------------- config


def config(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # the loader reports undecodable files before parsing (config.path)
    try:
        parsed = yaml.safe_load(expand_env(text, {}))
    except yaml.YAMLError:
        return
    for model in (ServerConfig, AgentConfig):
        try:
            load_config_dict(model, parsed if parsed is not None else {})
        except ConfigError as exc:
            assert str(exc), "a config error without a message"


TARGETS: dict[str, Callable[[bytes], None]] = {
    "mux": mux,
    "websocket": websocket,
    "gossip": gossip,
    "http": http,
    "config": config,
}
