"""The reverse-proxy engine: one asyncio Protocol per client connection.

`ProxyConnection` parses client requests with httptools, enforces the limits, and runs one
`Exchange` (exchange.py) at a time: pipelined requests wait their turn, buffered up to a bound.
Both bodies are relayed as they arrive with backpressure in both directions. After a
`101 Switching Protocols` both directions are spliced byte for byte.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

import httptools

from pico import log
from pico.http.channel import Channel, ResetReason, Router
from pico.http.exchange import Exchange
from pico.http.head import (
    Headers,
    error_response,
    take_credentials,
    valid_endpoint_id,
)
from pico.http.request import BadRequest, Request, inspect_head
from pico.http.settings import (
    ConnectionTracker,
    ForwardProof,
    Observer,
    ProxyLimits,
    RequestAuth,
    RequestRecord,
)
from pico.http.timer import LazyTimer
from pico.mux.buffers import write_unpinned
from pico.mux.websocket import handshake_problem

_log = log.get_logger("proxy")
# Malformed requests, by reason: logged once per reason per minute, all counted (a client must
# not be able to fill the disk). Process-wide: one node per process outside tests.
BAD_REQUESTS = log.RateLimited(_log)
# Upgraded connections closed because their token expired: expected, so info, once a minute.
TOKEN_EXPIRIES = log.RateLimited(_log, level="info")

# Writes smaller than this are collected while corked; bigger ones go out directly.
_CORK_LIMIT = 16 * 1024
_PAUSE_CHANNEL = 1  # the upstream channel cannot take more request body yet
_PAUSE_PIPELINE = 2  # too many bytes of pipelined requests are waiting their turn
_PAUSE_UPGRADE = 4  # bytes after an Upgrade request wait for the 101
_CHALLENGE = ((b"WWW-Authenticate", b"Bearer"),)
# What a queued request is counted for beyond its head bytes (its Request, lists, tuples):
# without it, thousands of tiny pipelined heads would pass the pipeline limit unnoticed.
_QUEUED_REQUEST_COST = 512


class _NoRequests:
    """The protocol of the parser a closed connection keeps: it is never fed."""


_DETACHED_PARSER = httptools.HttpRequestParser(_NoRequests())


class ProxyConnection(asyncio.Protocol):
    """One client connection on the proxy port."""

    def __init__(
        self,
        router: Router,
        limits: ProxyLimits,
        observer: Observer | None = None,
        connections: ConnectionTracker | None = None,
        trusted_forwarder: Callable[[str], bool] | None = None,
        auth: RequestAuth | None = None,
        forward_proof: ForwardProof | None = None,
        protocol_of: Callable[[str], str | None] | None = None,
    ) -> None:
        self.router = router
        # How this node serves an endpoint (http or tcp; None: not here). A request of the
        # other kind is refused with 400 where the endpoint's tunnels are.
        self.protocol_of = protocol_of
        # With `auth`, a request needs a token for its endpoint; one another node forwarded
        # was checked where it came in.
        self.auth = auth
        # With the cluster's keys, forwarded requests carry an HMAC; it marks ours and checks
        # others'. Without, a member's address is the proof (`trusted_forwarder`).
        self.forward_proof = forward_proof
        self.connections = connections
        # Says whether a client IP is another node of the cluster: only those may mark a
        # request as forwarded (which keeps X-Forwarded-For as is and stops re-forwarding).
        self.trusted_forwarder = trusted_forwarder
        self.limits = limits
        self.observer = observer
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.trusted_client = False
        self.scheme = b"http"  # what the client spoke: X-Forwarded-Proto when Pico sets it
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request] = deque()
        self._parsing: Request | None = None
        self._header_bytes = 0
        # Head (and trailer) budget: `proxy.max_header_bytes`, plus room for the headers a
        # forwarding node adds, so that a request accepted at the edge is accepted here too.
        self._head_limit = limits.max_header_bytes
        self._in_message = False  # between the first byte of a request and its end
        self._in_head = False  # between the first byte of a request and its blank line
        self._progressed = False  # the parser reported a field or body bytes in this feed
        self._stalled = 0  # bytes fed since the parser last reported a field or body bytes
        self._pipelined = 0  # bytes of requests queued behind the one in flight
        self._starting = False
        self._exchange: Exchange | None = None
        # Ends an upgraded connection when its token expires (proxy.auth).
        self._expiry: asyncio.TimerHandle | None = None
        self._paused = 0
        self._write_paused = False
        self._closing = False
        # A request without keep-alive was read: it is the last one. What follows it is
        # discarded, not parsed (llhttp calls it an error, but the requests before it and this
        # one are still answered, as nginx does).
        self._last_read = False
        # Idle / head-read timeout of the connection, and the response-head timeout of the
        # exchange in flight (kept here so that a request does not allocate a timer).
        self._timer = LazyTimer(self.loop, self._on_timeout)
        self.response_timer = LazyTimer(self.loop, self._on_response_timeout)
        # While corked, writes to the client are collected and sent as one.
        self._cork: list[bytes | memoryview] | None = None
        self._upgrade_buffer: list[bytes] | None = None
        self._spliced: Channel | None = None
        self._client_eof = False
        self._drain = False

    @property
    def busy(self) -> bool:
        """True while a request is in flight or an upgraded connection is open."""
        return bool(self._queue) or self._spliced is not None

    def close_when_idle(self) -> None:
        """Graceful stop: close now if idle, else right after the response in flight.

        An upgraded connection (a WebSocket) has no end we could wait for, and the node cannot
        speak its protocol: the service's side is ended (a FIN through the tunnel), so that
        the service may send its own close frame and close, which reaches the client as a
        FIN. One still open when the grace period ends is closed by `stop()`.
        """
        self._drain = True
        if self._spliced is not None:
            self._spliced.write_eof()
        elif not self.busy:
            self._close()

    def stop(self) -> None:
        """The grace period is over: drop the connection now.

        An upgraded one gets a FIN (its protocol frames itself, so a clean end is the better
        news to the client); any other an RST, so a response cut short is never taken for a
        complete one.
        """
        if self._spliced is not None:
            self._close()
        else:
            self.abort()

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else ""
        if self.connections is not None and not self.connections.add(self, self.client_ip):
            # Over `proxy.max_connections_per_ip`: closed before anything is read. An answer
            # would cost what the limit saves, and the client already holds thousands.
            self._closing = True
            self._parser = _DETACHED_PARSER
            self.transport = None
            transport.abort()
            return
        transport.set_write_buffer_limits(high=self.limits.write_high_water)
        self.trusted_client = self.limits.trusts(self.client_ip)
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = b"https"
        if self.trusted_forwarder is not None and self.trusted_forwarder(self.client_ip):
            # A node adds X-Forwarded-Host (a copy of Host, itself within the limit) and less
            # than 1 KiB of other fields (X-Forwarded-For/-Proto, x-pico-forward, framing).
            self._head_limit = 2 * self.limits.max_header_bytes + 1024
        # A new connection owes us a request head: connections that never send one must not
        # hold a slot for the whole idle timeout.
        self._arm_timer(self.limits.read_header_timeout or self.limits.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self._spliced is not None:
            self._spliced.write(data)
            return
        if self._upgrade_buffer is not None:
            self._upgrade_buffer.append(data)
            self._pause(_PAUSE_UPGRADE)
            return
        if self._closing or self._last_read:
            return
        self._progressed = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade_request(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if self._last_read and cause is None:
                return  # bytes after the last request: dropped with the connection
            if isinstance(cause, BadRequest):
                self._reject(cause.status, cause.message, cause.headers)
            else:
                self._reject(400, f"malformed request: {exc}")
        else:
            if not self._in_message or self._progressed:
                self._stalled = 0
            else:
                # httptools holds an unfinished header or trailer line in memory and reports
                # it only once complete: count whole chunks fed without a field or body byte
                # coming out, so one endless line cannot grow without bound.
                self._stalled += len(data)
                if self._stalled > self._head_limit:
                    self._reject(431, "request header fields too large")

    def eof_received(self) -> bool:
        if self._spliced is not None:
            self._spliced.write_eof()
            return True
        self._client_eof = True
        if self._in_head and self._queue:
            # Only the head of a request behind the ones queued was cut short: answer those,
            # then close (nothing more will be parsed).
            self._last_read = True
            return True
        if self._in_message:
            # The request being received can never be completed: drop the connection
            # (connection_lost abandons the exchange and frees its stream).
            self._closing = True
            return False
        # Keep the write side open so a client that half-closes still gets its response.
        return bool(self._queue)

    def connection_lost(self, exc: Exception | None) -> None:
        # Release the loop timers now: a pending handle would keep this connection alive.
        self._timer.close()
        self.response_timer.close()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._closing = True
        # The parser refers back to this connection: drop it (nothing is parsed after this),
        # so the connection is freed by its reference count, not by the cycle collector.
        self._parser = _DETACHED_PARSER
        if self._spliced is not None:
            self._spliced.reset(ResetReason.CANCELLED)
            self._spliced = None
        exchange = self._exchange
        if exchange is not None:
            exchange.abandon(499)
        self._exchange = None
        self._queue.clear()
        self.transport = None
        if self.connections is not None:
            self.connections.discard(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._spliced is not None:
            self._spliced.pause_reading()
        elif self._exchange is not None:
            self._exchange.client_paused()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._spliced is not None:
            self._spliced.resume_reading()
        elif self._exchange is not None:
            self._exchange.client_resumed()

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = Request(self.loop.time())
        self._header_bytes = 0
        self._progressed = True
        self._in_message = self._in_head = True
        if not self._queue:
            self._arm_timer(self.limits.read_header_timeout)

    def on_url(self, url: bytes) -> None:
        req = self._parsing
        assert req is not None
        req.url += url
        self._progressed = True  # counted: a piece of the target, not an unfinished line
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._parsing
        assert req is not None
        self._count_header_bytes(len(name) + len(value) + 4)
        self._progressed = True
        if self._in_head:
            req.headers.append((name, value))
        else:
            req.trailers.append((name, value))  # after a chunked body: never a header field

    def on_headers_complete(self) -> None:
        req = self._parsing
        assert req is not None
        self._in_head = False
        parser = self._parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        inspect_head(req, upgrade=parser.should_upgrade())
        head_size, self._header_bytes = self._header_bytes, 0  # trailers: a budget of their own
        claim = req.forward_claim
        if claim is not None:
            proof = self.forward_proof
            if proof is not None:  # gossip keys: only a member's HMAC proves it
                req.forwarded = proof.verify(claim, req.method, req.url)
            else:
                trusted = self.trusted_forwarder
                req.forwarded = (
                    claim.strip().lower() == b"true"
                    and trusted is not None
                    and trusted(self.client_ip)
                )
        if not self._queue:
            self._cancel_timer()
        self._queue.append(req)
        if self._exchange is None and len(self._queue) == 1:
            self._start_next()
        else:
            # A queued request costs its head and its objects, however small the head.
            self._hold(req, head_size + _QUEUED_REQUEST_COST)

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        assert req is not None
        self._progressed = True
        req.bytes_in += len(body)
        exchange = self._exchange
        if exchange is not None and exchange.request is req:
            exchange.send_body(body)
        else:
            req.body.append(body)
            self._hold(req, len(body))

    def on_message_complete(self) -> None:
        req = self._parsing
        assert req is not None
        self._progressed = True
        self._in_message = False
        req.body_done = True
        if not req.keep_alive:
            self._last_read = True
        exchange = self._exchange
        if exchange is not None and exchange.request is req:
            exchange.end_body()

    # -- request handling ------------------------------------------------------------------------

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self._head_limit:
            raise BadRequest(431, "request header fields too large")

    def _hold(self, req: Request, n: int) -> None:
        """Count `n` bytes of a request that waits (behind the one in flight, or for an
        upstream); past the pipeline limit the client is not read until they are sent."""
        req.held += n
        self._pipelined += n
        if self._pipelined > self.limits.pipeline_limit:
            self._pause(_PAUSE_PIPELINE)

    def hold_body(self, req: Request, data: bytes) -> None:
        """Keep body bytes of the request in flight until its exchange has a channel."""
        req.body.append(data)
        self._hold(req, len(data))

    def release_held_body(self, req: Request) -> None:
        """The request's waiting bytes are being sent: take them off the budget."""
        if req.held:
            self._pipelined -= req.held
            req.held = 0
            if self._pipelined <= self.limits.pipeline_limit:
                self._resume(_PAUSE_PIPELINE)

    def _start_next(self) -> None:
        """Start the queued requests in turn until one is in flight or the queue is empty."""
        # A loop, not recursion: requests answered at once (errors) finish synchronously and
        # would otherwise recurse once per pipelined request.
        if self._starting:
            return
        self._starting = True
        try:
            while self._queue and self._exchange is None and not self._closing:
                req = self._queue[0]
                self.release_held_body(req)
                if not req.endpoint:
                    self._respond_error(req, 400, "missing endpoint id")
                    continue
                if not valid_endpoint_id(req.endpoint):
                    self._respond_error(req, 400, "invalid endpoint id")
                    continue
                if self.auth is not None and not req.forwarded:
                    credentials, req.headers = take_credentials(req.headers)
                    refusal, req.auth_expires = self.auth.admit(credentials, req.endpoint)
                    if refusal is not None:
                        self._respond_error(req, *refusal)
                        continue
                mismatch = self._protocol_mismatch(req)
                if mismatch is not None:
                    self._respond_error(req, 400, mismatch)
                    continue
                # With no candidates the exchange answers 502, or holds the request briefly if
                # the endpoint just lost its upstreams (a node restarting or failing).
                candidates = self.router.candidates(req.endpoint, req.forwarded)
                exchange = Exchange(self, req, list(candidates))
                self._exchange = exchange
                exchange.start()
        finally:
            self._starting = False

    def _protocol_mismatch(self, req: Request) -> str | None:
        """Why `req` cannot go to its endpoint as the kind of request it is, or None."""
        if req.tcp:
            if req.upgrade is None or req.upgrade.strip().lower() != b"websocket":
                return "expected a WebSocket upgrade"
            # The node answers this handshake itself (pico.server.tcp): checked here, before
            # a stream makes the agent dial the service.
            fields = {
                n.decode("latin-1").lower(): v.decode("latin-1")
                for n, v in req.headers
                if n[:14].lower() == b"sec-websocket-"
            }
            problem = handshake_problem(req.method, fields)
            if problem is not None:
                return problem
        if self.protocol_of is None:
            return None
        served = self.protocol_of(req.endpoint)
        if served is None or served == ("tcp" if req.tcp else "http"):
            return None
        return f"endpoint is {served}"

    def _on_upgrade_request(self, rest: bytes) -> None:
        # httptools stops parsing at an Upgrade head; what follows belongs to the new protocol
        # and waits for the 101 (or is dropped if the upstream declines the upgrade).
        self._upgrade_buffer = [rest] if rest else []
        req = self._parsing
        if req is not None and not req.body_done:
            self.on_message_complete()

    def _respond_error(self, req: Request, status: int, message: str) -> None:
        # A body we will not read leaves the connection unusable: close it after the answer.
        unread = req.expects_body and not req.body_done
        close = not req.keep_alive or unread or req.upgrade is not None
        head_request = req.method == b"HEAD"
        headers = _CHALLENGE if status == 401 else ()
        self._write(
            error_response(status, message, close=close, head_request=head_request, headers=headers)
        )
        self.finish_exchange(req, status, 0, "", remote=False, close=close)

    def _reject(
        self, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Answer malformed input and close the connection; nothing else is affected.

        A request whose head was fine but whose body is malformed is abandoned upstream; the
        client gets the error unless a response to it has already begun.
        """
        BAD_REQUESTS.warn(message, "bad request", client=self.client_ip, status=status)
        exchange = self._exchange
        if exchange is None or not exchange.head_sent:
            self._write(error_response(status, message, close=True, headers=headers))
        if exchange is not None:
            exchange.abandon(status)
        self._close()

    def _write(self, data: bytes | memoryview) -> None:
        cork = self._cork
        if cork is not None:
            if len(data) < _CORK_LIMIT:
                # A small view is copied: the joined write may be kept by the transport, and
                # a view would pin a whole tunnel read buffer for as long as it is.
                cork.append(bytes(data) if type(data) is memoryview else data)
                return
            # A big body chunk: joining it would only add a copy. Send what came before it.
            if cork:
                self.uncork()
                self._cork = []
        if self.transport is not None:
            write_unpinned(self.transport, data)

    def cork(self) -> bool:
        """Collect writes until `uncork()` (one syscall for a response head and body).

        Returns False if already corked (the outer caller uncorks)."""
        if self._cork is not None:
            return False
        self._cork = []
        return True

    def uncork(self) -> None:
        """Send what was collected since `cork()`."""
        parts, self._cork = self._cork, None
        if parts and self.transport is not None:
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    # -- called by the exchange ------------------------------------------------------------------

    def finish_exchange(
        self,
        req: Request,
        status: int,
        bytes_out: int,
        upstream: str,
        *,
        remote: bool,
        close: bool,
        response_headers: Headers | None = None,
    ) -> None:
        """Record a finished request and move on to the next one (or close)."""
        self.release_held_body(req)  # body bytes it was holding no longer count
        if self._queue and self._queue[0] is req:
            self._queue.popleft()
        self._exchange = None
        if self.observer is not None:
            path, _, _ = req.url.partition(b"?")
            self.observer(
                RequestRecord(
                    method=req.method.decode("latin-1"),
                    host=req.host.decode("latin-1"),
                    path=path.decode("latin-1"),
                    status=status,
                    duration=self.loop.time() - req.start,
                    bytes_in=req.bytes_in,
                    bytes_out=bytes_out,
                    endpoint=req.endpoint,
                    upstream=upstream,
                    forwarded=req.forwarded,
                    remote=remote,
                    client_ip=self.client_ip,
                    request_headers=req.headers,
                    response_headers=response_headers or [],
                )
            )
        if self._spliced is not None:
            return  # upgraded: the connection is a byte relay now
        self._resume(_PAUSE_CHANNEL)  # a pause asked for by this exchange's channel ends here
        unread = req.expects_body and not req.body_done
        # An upgrade request that got an answer other than 101: the bytes after it were meant
        # for a protocol that is not coming, so the connection ends here.
        declined = req.upgrade is not None
        if close or self._drain or self._client_eof or unread or declined:
            self._close()
            return
        if self._queue:
            self._start_next()
        elif self._in_head:  # the next head is already arriving (pipelined)
            self._arm_timer(self.limits.read_header_timeout)
        else:
            self._arm_timer(self.limits.idle_timeout)

    def start_splice(self, channel: Channel) -> None:
        """Switch to a byte-for-byte relay after a 101 response."""
        exchange = self._exchange
        if exchange is not None and exchange.request.auth_expires is not None:
            # The relay lasts no longer than the token it came in with.
            delay = max(0.0, exchange.request.auth_expires - time.time())
            self._expiry = self.loop.call_later(
                delay, self._token_expired, exchange.request.endpoint
            )
        self._exchange = None
        self._queue.clear()
        self._cancel_timer()
        self._spliced = channel
        channel.set_receiver(_Splice(self))
        pending, self._upgrade_buffer = self._upgrade_buffer or [], None
        for chunk in pending:
            channel.write(chunk)
        if self._client_eof or self._drain:
            channel.write_eof()  # the client is done, or the node is stopping (close_when_idle)
        self._resume(_PAUSE_UPGRADE)
        if self._write_paused:
            channel.pause_reading()

    def _token_expired(self, endpoint: str) -> None:
        self._expiry = None
        if self.transport is None:
            return
        TOKEN_EXPIRIES.warn(
            "token expired",
            "upgraded connection closed: its token expired",
            endpoint=endpoint,
            client=self.client_ip,
        )
        self.transport.abort()  # connection_lost resets the spliced stream

    def splice_closed(self) -> None:
        self._spliced = None
        self._close()

    def pause_reading_for_channel(self) -> None:
        self._pause(_PAUSE_CHANNEL)

    def resume_reading_for_channel(self) -> None:
        self._resume(_PAUSE_CHANNEL)

    def write(self, data: bytes | memoryview) -> None:
        self._write(data)

    def writelines(self, parts: tuple[bytes | memoryview, ...]) -> None:
        if self._cork is not None and sum(map(len, parts)) < _CORK_LIMIT:
            self._cork.extend(bytes(p) if type(p) is memoryview else p for p in parts)
            return
        if self._cork:
            self.uncork()
            self._cork = []
        if self.transport is not None:
            if self.transport.get_write_buffer_size():  # it would keep views: copy them
                parts = tuple(bytes(p) if type(p) is memoryview else p for p in parts)
            self.transport.writelines(parts)

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    def abort(self) -> None:
        """Drop the client connection (an upstream failed after the response started)."""
        self._closing = True
        self._cork = None
        self._timer.close()
        self.response_timer.close()
        if self.transport is not None:
            self.transport.abort()

    # -- plumbing --------------------------------------------------------------------------------

    def _close(self) -> None:
        self._closing = True
        if self._cork is not None:
            self.uncork()
        self._timer.close()
        self.response_timer.close()
        if self.transport is not None:
            self.transport.close()

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self._closing:
            self.transport.resume_reading()

    def _arm_timer(self, delay: float) -> None:
        self._timer.arm(delay)

    def _cancel_timer(self) -> None:
        self._timer.cancel()

    def _on_response_timeout(self) -> None:
        if self._exchange is not None:
            self._exchange.on_timeout()

    def _on_timeout(self) -> None:
        if self._in_head and not self._queue:
            self._reject(408, "request head not received in time")
        else:
            self._close()


class _Splice:
    """Receiver for a channel spliced to the client after an upgrade."""

    __slots__ = ("conn",)

    def __init__(self, conn: ProxyConnection) -> None:
        self.conn = conn

    def data_received(self, data: bytes | memoryview) -> None:
        self.conn.write(data)

    def writelines(self, parts: tuple[bytes | memoryview, ...]) -> None:
        """Pieces in one write (pico.server.tcp: a frame header and its payload)."""
        self.conn.writelines(parts)

    def eof_received(self) -> None:
        transport = self.conn.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()

    def connection_lost(self, reason: ResetReason | None) -> None:
        self.conn.splice_closed()

    def pause_writing(self) -> None:
        self.conn.pause_reading_for_channel()

    def resume_writing(self) -> None:
        self.conn.resume_reading_for_channel()
