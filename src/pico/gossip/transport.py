"""The asyncio transport of gossip: UDP rounds and TCP join/leave on one port.

A thin layer over the sans-I/O `Gossiper`: it owns the clock (loop time), the sockets and one
round task, and hands the gossiper's events to a callback after every step. Replies go to the
source address of the datagram they answer. Join and leave messages are frames (a 4-byte length,
then the message, sealed with gossip keys), read with exactly two reads each. Refused input is
counted by reason and logged at warn at most once per reason per minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from pico import log
from pico.gossip.codec import (
    FRAME_HEADER_SIZE,
    GossipDecodeError,
    GossipError,
    GossipRejected,
    MessageType,
    frame,
    frame_length,
)
from pico.gossip.events import GossipEvent
from pico.gossip.protocol import Gossiper, Outgoing
from pico.gossip.rejections import Rejections
from pico.gossip.seal import MAX_OVERHEAD, Keyring

_log = log.get_logger("gossip")

# A join or leave exchange must not hang start-up or shutdown on a dead peer.
_TCP_TIMEOUT = 10.0
# Join/leave exchanges handled at once; more are refused.
_MAX_STREAMS = 64


@dataclass
class GossipCounters:
    """Byte and connection counts for the gossip metrics."""

    packet_bytes_in: int = 0
    packet_bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    stream_bytes_in: int = 0
    stream_bytes_out: int = 0
    connections_in: int = 0
    connections_out: int = 0
    decode_errors: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    # Messages refused here, by reason: by the keyring (unsealed, bad_seal, stale) or too
    # large (join_size). The gossiper counts what its limits refuse: see `rejected()`.
    rejected: dict[str, int] = field(default_factory=dict)


def split_host_port(addr: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` or a bare v6 address → (host, port)."""
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if addr.count(":") == 1:
        host, _, port = addr.partition(":")
        return host, int(port)
    return addr, default_port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, transport: GossipTransport) -> None:
        self.owner = transport

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.owner._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the failure detector deals with dead peers.
        pass


class GossipTransport:
    """Runs a `Gossiper` on a UDP+TCP port."""

    def __init__(
        self,
        host: str,
        port: int,
        on_events: Callable[[list[GossipEvent]], None],
        keyring: Keyring | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._gossiper: Gossiper | None = None
        # With a keyring every packet and join/leave message is sealed, and anything that does
        # not open is dropped (and counted, never logged per packet). Seals carry wall-clock
        # time: nodes compare it with their own.
        self.keyring = keyring
        self.wall_clock = wall_clock
        self.host = host
        self.port = port
        self.on_events = on_events
        self.counters = GossipCounters()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._rounds: asyncio.Task[None] | None = None
        self._resolved: dict[str, tuple[str, int]] = {}
        # The reverse: the advertised name of a peer, from the source address of its datagrams.
        self._names: dict[tuple[str, int], str] = {}
        self._resolving: set[str] = set()
        self.rejections = Rejections(self.counters.rejected)
        # Join/leave exchanges that failed (peers that hang up, garbage): logged, paced alike.
        self._failures = Rejections()
        self._push_scheduled = False
        self._last_push = float("-inf")
        self._handlers: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_event_loop()

    @property
    def gossiper(self) -> Gossiper:
        """The gossip core (attached after `bind()`, once the advertised address is known)."""
        assert self._gossiper is not None, "attach() a Gossiper first"
        return self._gossiper

    def attach(self, gossiper: Gossiper) -> None:
        """Set the gossip core this transport runs."""
        self._gossiper = gossiper

    def rejected(self) -> dict[str, int]:
        """Gossip input refused so far, by reason (here and by the gossiper's limits)."""
        counts = dict(self.counters.rejected)
        if self._gossiper is not None:
            for reason, n in self._gossiper.rejections.counts.items():
                counts[reason] = counts.get(reason, 0) + n
        return counts

    # -- lifecycle -------------------------------------------------------------------------------

    async def bind(self) -> int:
        """Bind TCP and UDP on the same port; returns the port (useful with port 0)."""
        loop = self._loop = asyncio.get_running_loop()
        self._tcp = await asyncio.start_server(
            self._serve_stream, self.host or None, self.port, reuse_address=True
        )
        port = int(self._tcp.sockets[0].getsockname()[1])
        try:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self), local_addr=(self.host or "0.0.0.0", port)
            )
        except OSError:
            self._tcp.close()
            raise
        self.port = port
        return port

    def start(self) -> None:
        """Start gossip rounds (requires an attached Gossiper)."""
        self._rounds = self._loop.create_task(self._round_loop())

    async def close(self) -> None:
        """Stop rounds and close the sockets."""
        if self._rounds is not None:
            self._rounds.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rounds
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 1.0)

    def push_soon(self) -> None:
        """Spread local changes now rather than at the next round.

        At most one push per half interval: a wave of agents reconnecting here would
        otherwise flood peers (and look like a burst of heartbeats to their failure
        detectors). Changes made meanwhile go out with a trailing push.
        """
        if self._gossiper is None or self._push_scheduled or self._udp is None:
            return
        self._push_scheduled = True
        spacing = self.gossiper.config.interval / 2
        delay = max(0.0, self._last_push + spacing - self._loop.time())
        self._loop.call_later(delay, self._push)

    def _push(self) -> None:
        self._push_scheduled = False
        if self._udp is None:
            return
        self._last_push = self._loop.time()
        try:
            self._send(self.gossiper.push(self._loop.time()))
        except Exception as exc:  # pragma: no cover - defensive, like the rounds loop
            _log.error("gossip push failed", error=repr(exc))

    # -- rounds ----------------------------------------------------------------------------------

    async def _round_loop(self) -> None:
        g = self.gossiper
        while True:
            await asyncio.sleep(g.next_tick_delay())
            try:
                self._send(g.tick(self._loop.time()))
                self._flush_events()
                self._warn_refused()
            except Exception as exc:  # a bug here must not stop gossip: peers would drop us
                _log.error("gossip round failed", error=repr(exc))

    def _on_datagram(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self._gossiper is None:
            return
        c = self.counters
        c.packets_in += 1
        c.packet_bytes_in += len(data)
        try:
            if self.keyring is not None:
                data = self.keyring.open(data, self.wall_clock())
            replies = self.gossiper.receive_datagram(data, self._loop.time(), self._source(addr))
        except GossipRejected as exc:
            self.rejections.add(exc.reason, str(exc))
            replies = []
        except GossipDecodeError as exc:
            c.decode_errors += 1
            _log.debug("dropped bad gossip datagram", error=str(exc), size=len(data))
            return
        self._send(replies)
        self._flush_events()
        self._warn_refused()

    def _source(self, addr: tuple[str | object, ...]) -> str:
        """The peer a datagram came from, as "host:port": its advertised name if we resolved
        one to this address (so that it matches what it advertises), else the address."""
        host, port = str(addr[0]), int(str(addr[1]))
        name = self._names.get((host, port))
        if name is not None:
            return name
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _warn_refused(self) -> None:
        """Log what was refused since the last warning, at most once per reason per minute."""
        now = self._loop.time()
        warnings = self.rejections.due(now)
        if self._gossiper is not None:
            warnings += self._gossiper.rejections.due(now)
        for warning in warnings:
            about = {"node_id": warning.subject} if warning.subject else {}
            _log.warn(
                "gossip input refused",
                reason=warning.reason,
                count=warning.count,
                detail=warning.detail,
                **about,
            )
        for warning in self._failures.due(now):
            _log.warn("gossip stream failed", error=warning.detail, count=warning.count)

    def _send(self, outgoing: list[Outgoing]) -> None:
        udp = self._udp
        if udp is None:
            return
        c = self.counters
        keyring = self.keyring
        for out in outgoing:
            target = self._resolve(out.addr)
            if target is None:
                continue
            data = out.data if keyring is None else keyring.seal(out.data, self.wall_clock())
            c.packets_out += 1
            c.packet_bytes_out += len(data)
            udp.sendto(data, target)

    def _resolve(self, addr: str) -> tuple[str, int] | None:
        target = self._resolved.get(addr)
        if target is not None:
            return target
        try:
            host, port = split_host_port(addr, self.port)
        except ValueError:
            return None
        if _is_ip(host):
            self._resolved[addr] = (host, port)
            return host, port
        # A host name: resolve once in the background (sendto would block on DNS).
        if addr not in self._resolving:
            self._resolving.add(addr)
            self._spawn(self._resolve_name(addr, host, port))
        return None

    async def _resolve_name(self, addr: str, host: str, port: int) -> None:
        try:
            infos = await self._loop.getaddrinfo(host, port, type=2)  # SOCK_DGRAM
            if infos:
                sockaddr = infos[0][4]
                target = (str(sockaddr[0]), int(sockaddr[1]))
                self._resolved[addr] = target
                self._names.setdefault(target, addr)
        except OSError as exc:
            _log.warn("cannot resolve gossip peer", addr=addr, error=str(exc))
        finally:
            self._resolving.discard(addr)

    def _flush_events(self) -> None:
        events = self.gossiper.events()
        if events:
            self.on_events(events)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    # -- TCP: join and leave ---------------------------------------------------------------------

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.counters.connections_in += 1
        if len(self._handlers) >= _MAX_STREAMS or self._gossiper is None:
            # A join/leave storm (or an attack): drop the excess. Or the node is still
            # starting (the port is bound before the gossiper exists): the joiner retries.
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            msg = await asyncio.wait_for(self._read_message(reader), _TCP_TIMEOUT)
            now = self._loop.time()
            if msg[0] == MessageType.JOIN:
                answer = self.gossiper.handle_join(msg, now)
            else:
                answer = self.gossiper.handle_leave(msg, now)
            answer = self._frame(answer)
            self.counters.stream_bytes_out += len(answer)
            writer.write(answer)
            await asyncio.wait_for(writer.drain(), _TCP_TIMEOUT)
            self._flush_events()
        except GossipRejected as exc:
            self.rejections.add(exc.reason, str(exc))
        except GossipDecodeError as exc:
            self.counters.decode_errors += 1
            self._failures.add("stream", str(exc))
        except (GossipError, OSError, TimeoutError) as exc:
            self._failures.add("stream", str(exc) or type(exc).__name__)
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            self._warn_refused()

    def _frame(self, msg: bytes) -> bytes:
        """A join/leave message as it goes on the wire: sealed with keys, then length-prefixed.

        Raises GossipRejected (`join_size`) if it is over `max_join_size`: peers would refuse it.
        """
        limit = self.gossiper.config.max_join_size
        if len(msg) > limit:
            raise GossipRejected(
                "join_size", f"our join/leave message of {len(msg)} bytes is over {limit}"
            )
        if self.keyring is not None:
            msg = self.keyring.seal(msg, self.wall_clock())
        return frame(msg)

    async def _read_message(self, reader: asyncio.StreamReader) -> bytes:
        """One join/leave frame, opened if sealed: two reads, linear in its size.

        Raises GossipRejected (too large, or refused by the keyring) and GossipDecodeError.
        """
        limit = self.gossiper.config.max_join_size
        if self.keyring is not None:
            limit += MAX_OVERHEAD
        try:
            size = frame_length(await reader.readexactly(FRAME_HEADER_SIZE), limit)
            msg = await reader.readexactly(size)
        except asyncio.IncompleteReadError:
            hint = " (gossip keys differ?)" if self.keyring is not None else ""
            raise GossipDecodeError(f"connection closed mid-message{hint}") from None
        self.counters.stream_bytes_in += FRAME_HEADER_SIZE + size
        if self.keyring is not None:
            msg = self.keyring.open(msg, self.wall_clock())
            if len(msg) < 2:
                raise GossipDecodeError("empty message")
        return msg

    async def _exchange(self, host: str, port: int, data: bytes) -> bytes:
        self.counters.connections_out += 1
        data = self._frame(data)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), _TCP_TIMEOUT)
        try:
            writer.write(data)
            self.counters.stream_bytes_out += len(data)
            await writer.drain()
            return await asyncio.wait_for(self._read_message(reader), _TCP_TIMEOUT)
        finally:
            writer.close()

    async def join(self, addrs: list[str]) -> tuple[list[str], list[str]]:
        """Join through every address (DNS names: every A/AAAA record).

        Returns (node ids joined, error messages). Joining ourselves counts as joined.
        """
        joined: list[str] = []
        errors: list[str] = []
        for addr in addrs:
            try:
                host, port = split_host_port(addr, self.port)
            except ValueError:
                errors.append(f"{addr}: invalid address")
                continue
            try:
                targets = await self._targets(host, port)
            except OSError as exc:
                errors.append(f"{addr}: cannot resolve: {exc}")
                continue
            if not targets:
                _log.info("join address resolved to nothing", addr=addr)
            for ip, p in targets:
                if self._is_self(ip, p):
                    joined.append(self.gossiper.node_id)
                    continue
                try:
                    reply = await self._exchange(
                        ip, p, self.gossiper.join_request(self._loop.time())
                    )
                    joined.append(self.gossiper.handle_join_reply(reply, self._loop.time()))
                except (GossipError, OSError, TimeoutError) as exc:
                    errors.append(f"{ip}:{p}: {exc or type(exc).__name__}")
        self._flush_events()
        return joined, errors

    async def _targets(self, host: str, port: int) -> list[tuple[str, int]]:
        if _is_ip(host):
            return [(host, port)]
        infos = await self._loop.getaddrinfo(host, port, type=1)  # SOCK_STREAM
        seen: list[tuple[str, int]] = []
        for info in infos:
            target = (str(info[4][0]), int(info[4][1]))
            if target not in seen:
                seen.append(target)
        return seen

    def _is_self(self, ip: str, port: int) -> bool:
        if port != self.port:
            return False
        own = split_host_port(self.gossiper.addr, self.port)[0]
        return ip in (own, self.host) or (
            self.host in ("", "0.0.0.0", "::") and ipaddress.ip_address(ip).is_loopback
        )

    async def leave(self, timeout: float) -> int:
        """Announce that we leave to a few live peers; returns how many acknowledged."""
        g = self.gossiper
        data = g.leave_request(self._loop.time())
        acked = 0
        targets = g.leave_targets()
        random.shuffle(targets)
        deadline = self._loop.time() + timeout
        for addr in targets:
            if acked >= 4 or self._loop.time() > deadline:
                break
            host, port = split_host_port(addr, self.port)
            try:
                ack = await asyncio.wait_for(
                    self._exchange(host, port, data), max(0.1, deadline - self._loop.time())
                )
                g.handle_leave_ack(ack)
                acked += 1
            except (GossipError, OSError, TimeoutError) as exc:
                _log.debug("leave notification failed", addr=addr, error=str(exc))
        return acked
