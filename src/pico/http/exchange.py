"""One request carried through one upstream channel, and its response relayed back.

`Request` is a parsed client request; `Exchange` sends it through a `Channel`, retries where that
is safe (retry.py decides), parses the response only to find where it ends (framing.py), and
relays it to the client as it arrives. Its lifecycle is one state per direction (states.py).
`ProxyConnection` (proxy.py) owns both and is seen here only through `ClientSide`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import httptools

from pico import log
from pico.http.channel import (
    Cancellable,
    Channel,
    ResetReason,
    Router,
    Upstream,
    UpstreamUnavailable,
)
from pico.http.framing import NO_BODY, BadResponse, Body, Framing, response_framing
from pico.http.head import (
    UNDELIVERED_HEADER,
    Headers,
    error_response,
    render_trailers,
    rewrite_request_head,
    rewrite_response_head,
)
from pico.http.request import Request
from pico.http.retry import IDEMPOTENT, Action, after_failure
from pico.http.states import FINAL, Receive, Send, check_receive, check_send

if TYPE_CHECKING:
    from pico.http.settings import ProxyLimits
    from pico.http.timer import LazyTimer

_log = log.get_logger("proxy")

# A response head (or its trailers) bigger than this is refused (502): it protects the node's
# memory.
_MAX_RESPONSE_HEAD = 256 * 1024


class ClientSide(Protocol):
    """What an exchange needs of its client connection (ProxyConnection)."""

    limits: ProxyLimits
    router: Router
    client_ip: str
    response_timer: LazyTimer

    @property
    def write_paused(self) -> bool: ...
    def write(self, data: bytes | memoryview) -> None: ...
    def writelines(self, parts: tuple[bytes, ...]) -> None: ...
    def cork(self) -> bool: ...
    def uncork(self) -> None: ...
    def hold_body(self, req: Request, data: bytes) -> None: ...
    def release_held_body(self, req: Request) -> None: ...
    def pause_reading_for_channel(self) -> None: ...
    def resume_reading_for_channel(self) -> None: ...
    def start_splice(self, channel: Channel) -> None: ...
    def abort(self) -> None: ...
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
    ) -> None: ...


class Exchange:
    """One request carried through one channel, and its response relayed back."""

    __slots__ = (
        "body_left",
        "bytes_out",
        "candidates",
        "channel",
        "chunked_out",
        "close_client",
        "conn",
        "feeding",
        "framing",
        "got_bytes",
        "head_bytes",
        "head_size",
        "headers",
        "held_once",
        "hold",
        "hold_failure",
        "parser",
        "progress_mark",
        "progressed",
        "reason",
        "recv",
        "replay",
        "replay_size",
        "request",
        "response_headers",
        "retire",
        "retried_fresh",
        "reused",
        "send",
        "stalled",
        "status",
        "stray_bytes",
        "trailers",
        "tried",
        "undelivered",
        "upstream",
    )

    def __init__(self, conn: ClientSide, request: Request, candidates: list[Upstream]) -> None:
        self.conn = conn
        self.request = request
        self.candidates = candidates
        self.send = Send.CONNECTING
        self.recv = Receive.AWAITING_HEAD
        self.channel: Channel | None = None
        self.upstream: Upstream | None = None
        # Facts of the current attempt, which decide whether a failure may be retried.
        self.reused = False  # the channel came from the idle pool
        self.retried_fresh = False  # a stale pooled channel was already retried once
        self.got_bytes = False  # a response byte came back on this channel
        self.replay: list[bytes] | None = []  # request bytes sent, while they fit the limit
        self.replay_size = 0
        self.progress_mark = 0  # request bytes received when the response timer last fired
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.reason = b""
        self.headers: Headers = []
        self.trailers: Headers = []
        self.response_headers: Headers = []  # as received, for the access log
        self.framing: Framing = NO_BODY  # of the response, once its head is in
        self.chunked_out = False
        self.close_client = False
        # Bytes of a Content-Length response body still to come: once the parser is past the
        # head, they are relayed as they arrive without it (no copy, no callbacks).
        self.body_left = 0
        self.bytes_out = 0
        self.head_bytes = 0  # response bytes received before the head was complete
        self.head_size = 0  # status, header names and values parsed so far (then trailers)
        self.stalled = 0  # bytes fed to the parser since it last reported a body or a field
        self.progressed = False
        # While the parser is being fed, the fate of a finished channel waits for the end of
        # the chunk (bytes after the response make it unusable).
        self.feeding = False
        self.retire: tuple[Channel, bool] | None = None
        self.stray_bytes = False  # the upstream sent more than one response
        self.undelivered = False  # the node we forwarded to answered "not delivered"
        # Waiting for an upstream to (re)appear (a node restart or failure): the hold, and
        # the answer to give if none appears in time.
        self.hold: Cancellable | None = None
        self.held_once = False
        self.tried: set[int] = set()  # ids of the upstreams this request was sent to
        self.hold_failure = (502, "no available upstreams")

    @property
    def head_sent(self) -> bool:
        """True once a response head reached the client (errors can no longer be answered)."""
        return self.recv is Receive.RELAYING or self.recv is Receive.UPGRADED

    def _to_send(self, new: Send) -> None:
        check_send(self.send, new)
        self.send = new

    def _to_recv(self, new: Receive) -> None:
        check_receive(self.recv, new)
        self.recv = new
        if new in FINAL and self.send is not Send.DONE:
            self.send = Send.DONE  # every state may end (SEND_TRANSITIONS says so)

    # -- request side ----------------------------------------------------------------------------

    def start(self) -> None:
        """Send the request to the best candidate that can open a channel."""
        while self.candidates:
            upstream = self.candidates[0]
            try:
                # A non-idempotent request never rides a pooled connection the service may
                # have closed meanwhile: it could not be retried safely.
                fresh = self.retried_fresh or self.request.method not in IDEMPOTENT
                channel, reused = upstream.open_channel(fresh=fresh)
            except UpstreamUnavailable:
                self.candidates.pop(0)
                continue
            self.tried.add(id(upstream))
            self._attach(upstream, channel, reused)
            return
        failure = (502, "upstream unreachable" if self.upstream else "no available upstreams")
        if not self._hold(failure):
            self._fail(*failure, undelivered=True)

    def _hold(self, failure: tuple[int, str], *, known: bool = False) -> bool:
        """Wait (once, bounded) for an upstream of an endpoint that just lost all of its own.

        Only a request that never reached a service is held, and only if the router knows the
        endpoint was served recently: an unknown endpoint still gets its 502 at once.
        """
        wait = self.conn.limits.upstream_wait
        if self.held_once or wait <= 0 or self.replay is None or self.got_bytes:
            return False
        req = self.request
        if req.forwarded:
            return False  # the node that forwarded it decided; answer it at once
        # An upstream may have appeared while this request was trying the others (an agent
        # re-registered, gossip announced another node): use it now rather than wait.
        fresh = [
            u
            for u in self.conn.router.candidates(req.endpoint, req.forwarded)
            if id(u) not in self.tried
        ]
        if fresh:
            self.held_once = True
            self.candidates = fresh
            self.retried_fresh = False
            self.start()
            return True
        # `known`: the upstream refused it while leaving, which proves the endpoint is served.
        hold = self.conn.router.wait_for_upstream(req.endpoint, self._hold_over, known=known)
        if hold is None:
            return False
        self._to_send(Send.HELD)
        self.held_once = True
        self.hold = hold
        self.hold_failure = failure
        self.conn.response_timer.arm(wait)
        return True

    def _hold_over(self) -> None:
        """An upstream of the endpoint appeared: route the request again."""
        self.hold = None
        if self.send is not Send.HELD:
            return
        self._to_send(Send.CONNECTING)
        self._cancel_timer()
        req = self.request
        self.candidates = list(self.conn.router.candidates(req.endpoint, req.forwarded))
        self.upstream = None
        self.retried_fresh = False
        self.start()

    def _attach(self, upstream: Upstream, channel: Channel, reused: bool) -> None:
        req = self.request
        self.upstream = upstream
        self.channel = channel
        self.reused = reused
        self.got_bytes = False
        self.parser = None
        self.headers = []
        self.reason = b""
        channel.set_receiver(self)
        # A pooled channel keeps the read state its last exchange left: set it for this client.
        if self.conn.write_paused:
            channel.pause_reading()
        else:
            channel.resume_reading()
        self._to_send(Send.SENDING)
        # The head is rendered for this upstream (a retry may go to another node, or come back
        # to a local tunnel); the body sent so far is replayed after it.
        channel.write(
            rewrite_request_head(
                req.method,
                req.url,
                req.headers,
                framing=req.framing,
                client_ip=self.conn.client_ip,
                upgrade=req.upgrade,
                forwarded=req.forwarded,
                mark_forward=upstream.remote,
            )
        )
        for chunk in self.replay or ():
            channel.write(chunk)
        body, req.body = req.body, []
        if body:
            self.conn.release_held_body(req)
        for chunk in body:
            self.send_body(chunk)
        if req.body_done:
            self.end_body()
        if not self.conn.response_timer.armed:
            self._arm_timer()

    def _send(self, data: bytes) -> None:
        if self.replay is not None:
            self.replay.append(data)
            self.replay_size += len(data)
            if self.replay_size > self.conn.limits.replay_limit:
                self.replay = None
        assert self.channel is not None
        self.channel.write(data)

    def send_body(self, data: bytes) -> None:
        """Relay a piece of the client's request body (kept until a channel is attached)."""
        send = self.send
        if send is Send.SENDING:
            if self.request.chunked:
                self._send(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))  # one copy
            else:
                self._send(data)
        elif send is Send.CONNECTING or send is Send.HELD:
            self.conn.hold_body(self.request, data)

    def end_body(self) -> None:
        """The client's request body is complete (its trailers, if any, are in)."""
        if self.send is not Send.SENDING:
            return  # no channel yet (`_attach` ends it), or the exchange is over
        req = self.request
        if req.chunked:
            self._send(render_trailers(req.trailers))
        self._to_send(Send.SENT)
        if req.expects_body and self.recv is Receive.AWAITING_HEAD:
            self._arm_timer()  # the wait for the response head starts now

    # -- channel receiver ------------------------------------------------------------------------

    def data_received(self, data: bytes | memoryview) -> None:
        if self.recv in FINAL:
            return
        self.got_bytes = True
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpResponseParser(self)
        conn = self.conn
        corked = conn.cork()
        self.feeding = True
        try:
            if self.body_left and self.recv is Receive.RELAYING:
                self._relay_body(data)
            else:
                self.progressed = False
                parser.feed_data(data)
                self._bound_unparsed(len(data))
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._broken(f"malformed response from upstream: {exc}")
        finally:
            self.feeding = False
            if self.undelivered:
                self._reroute()
            retire, self.retire = self.retire, None
            if retire is not None:
                self._retire(retire[0], retire[1] and not self.stray_bytes)
            if corked:
                conn.uncork()

    def _bound_unparsed(self, n: int) -> None:
        """httptools holds an unfinished header or trailer line whole: bound what it may hold
        by the raw bytes fed while one is unfinished (body bytes never count)."""
        if self.recv is Receive.AWAITING_HEAD:
            self.head_bytes += n
            if self.head_bytes > _MAX_RESPONSE_HEAD:
                self._broken("response head too large")
        elif self.recv is Receive.RELAYING:
            self.stalled = 0 if self.progressed else self.stalled + n
            if self.stalled > _MAX_RESPONSE_HEAD:
                self._broken("response trailers too large")

    def eof_received(self) -> None:
        if self.recv in FINAL:
            return
        if self.recv is Receive.RELAYING and self.framing.body is Body.UNTIL_CLOSE:
            self._complete()
        else:
            self._channel_failed(None)

    def connection_lost(self, reason: ResetReason | None) -> None:
        if self.recv in FINAL:
            return
        self.channel = None
        if (
            self.recv is Receive.RELAYING
            and self.framing.body is Body.UNTIL_CLOSE
            and reason is None
        ):
            self._complete()
        else:
            self._channel_failed(reason)

    def pause_writing(self) -> None:
        self.conn.pause_reading_for_channel()

    def resume_writing(self) -> None:
        self.conn.resume_reading_for_channel()

    # -- client flow control ---------------------------------------------------------------------

    def client_paused(self) -> None:
        if self.channel is not None:
            self.channel.pause_reading()

    def client_resumed(self) -> None:
        if self.channel is not None:
            self.channel.resume_reading()

    def abandon(self, status: int) -> None:
        """The client connection is going away: free the channel and record `status`."""
        if self.recv in FINAL:
            return
        self._to_recv(Receive.FAILED)
        self._cancel_timer()
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.reset(ResetReason.CANCELLED)
        self._record(status, close=True)

    # -- response parsing (httptools callbacks) --------------------------------------------------

    def on_message_begin(self) -> None:
        if self.recv in FINAL:
            self.stray_bytes = True  # another response after ours: the channel is unusable

    def on_status(self, reason: bytes) -> None:
        if self.recv is Receive.AWAITING_HEAD:
            self.reason += reason
            self.head_size += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.progressed = True
        recv = self.recv
        if recv is Receive.AWAITING_HEAD:
            self.headers.append((name, value))
            self.head_size += len(name) + len(value) + 4
        elif recv is Receive.RELAYING and not self.undelivered:
            self.trailers.append((name, value))
            self.head_size += len(name) + len(value) + 4
            if self.head_size > _MAX_RESPONSE_HEAD:
                self._broken("response trailers too large")

    def on_headers_complete(self) -> None:
        if self.recv is not Receive.AWAITING_HEAD:
            return
        if self.head_size > _MAX_RESPONSE_HEAD:  # a head that came whole in one piece
            self._broken("response head too large")
            return
        assert self.parser is not None
        status = self.parser.get_status_code()
        req = self.request
        if 100 <= status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): relay it and keep waiting.
            if req.version != "1.0":
                self.conn.write(
                    rewrite_response_head(
                        status,
                        self.reason,
                        self.headers,
                        framing=NO_BODY,
                        chunked=False,
                        close=False,
                        upgrade=False,
                    )
                )
            self.headers, self.reason = [], b""
            return
        if (
            status >= 500
            and self.upstream is not None
            and self.upstream.remote
            and any(n.lower() == UNDELIVERED_HEADER for n, _ in self.headers)
        ):
            # The other node could not deliver it either (its agent left, its endpoint moved):
            # no service saw the request, so route it again here instead of passing the 502 on.
            self.undelivered = True
            return
        self._cancel_timer()
        self.status = status
        if status == 101:
            if req.upgrade is None:
                self._broken("unexpected upgrade from upstream")
            return  # the parser stops here: `_on_upgrade` relays the head
        self._relay_head(status)

    def _relay_head(self, status: int) -> None:
        req = self.request
        assert self.parser is not None
        cls: list[bytes] = []
        tes: list[bytes] = []
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length":
                cls.append(value)
            elif lname == b"transfer-encoding":
                tes.append(value)
        try:
            framing = response_framing(req.method, status, cls, tes)
        except BadResponse as exc:
            self._broken(f"ambiguous response framing: {exc}")
            return
        old_client = req.version == "1.0"
        chunked = framing.body is Body.CHUNKED
        if chunked and old_client and framing.codings:
            # De-chunked, the body would still be coded and nothing could say so.
            self._broken("transfer coding an HTTP/1.0 client cannot take")
            return
        self.framing = framing
        self.chunked_out = chunked and not old_client
        self.close_client = (
            not req.keep_alive
            or framing.body is Body.UNTIL_CLOSE
            or (chunked and old_client)  # de-chunked: it ends by closing
            or req.upgrade is not None
            or not self.parser.should_keep_alive()
        )
        head = rewrite_response_head(
            status,
            self.reason,
            self.headers,
            framing=framing,
            chunked=self.chunked_out,
            close=self.close_client,
            upgrade=False,
        )
        self._to_recv(Receive.RELAYING)
        self.head_size = 0  # trailers have a budget of their own
        self.response_headers, self.headers = self.headers, []
        self.conn.write(head)
        if framing.body is Body.NONE:
            self._complete()
        elif framing.body is Body.LENGTH:
            self.body_left = framing.length

    def on_body(self, body: bytes) -> None:
        if self.recv is not Receive.RELAYING:
            return
        self.progressed = True
        self.bytes_out += len(body)
        if self.body_left:
            self.body_left -= len(body)
        if self.chunked_out:
            # writelines: no concatenated copy of the body (uvloop sends it with writev).
            self.conn.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            self.conn.write(body)

    def on_message_complete(self) -> None:
        if self.undelivered:
            return
        # A 101 ends its message too; the parser then stops with HttpParserUpgrade.
        if self.recv is Receive.RELAYING:
            self._complete()

    def _relay_body(self, data: bytes | memoryview) -> None:
        """The next bytes of a Content-Length body, past the parser (it saw the head only)."""
        left = self.body_left
        n = len(data)
        if n > left:
            self.stray_bytes = True  # bytes after the response: the channel is unusable
            data = data[:left]
            n = left
        self.body_left = left - n
        self.bytes_out += n
        self.conn.write(data)
        if not self.body_left:
            self._complete()

    # -- endings ---------------------------------------------------------------------------------

    def _on_upgrade(self, rest: bytes | memoryview) -> None:
        """The parser stopped at a 101: relay its head, then splice both ways."""
        req = self.request
        if self.status != 101 or req.upgrade is None or self.recv is not Receive.AWAITING_HEAD:
            self._broken("unexpected upgrade from upstream")
            return
        self.conn.write(
            rewrite_response_head(
                101,
                self.reason,
                self.headers,
                framing=NO_BODY,
                chunked=False,
                close=False,
                upgrade=True,
            )
        )
        self.response_headers, self.headers = self.headers, []
        if rest:
            self.conn.write(rest)
        self._to_recv(Receive.UPGRADED)
        channel, self.channel = self.channel, None
        self._cancel_timer()
        assert channel is not None
        self.conn.start_splice(channel)
        self._record(101)

    def _complete(self) -> None:
        # Reusable only if the whole request went out: a service that answered early may
        # still be waiting for the rest of the body, and would read the next request as it.
        sent_all = self.send is Send.SENT
        self._to_recv(Receive.DONE)
        self._cancel_timer()
        if self.chunked_out:
            self.conn.write(render_trailers(self.trailers))
        channel, self.channel = self.channel, None
        if channel is not None and not channel.closed:
            reusable = (
                sent_all
                and self.framing.body is not Body.UNTIL_CLOSE
                and self.parser is not None
                and self.parser.should_keep_alive()
            )
            if self.feeding:
                # Bytes after this response may still be in the chunk being parsed: decide
                # once it is done (a channel with stray bytes must not be reused).
                self.retire = (channel, reusable)
            else:
                self._retire(channel, reusable)
        self._record(self.status, close=self.close_client)

    def _reroute(self) -> None:
        """The node we forwarded to could not deliver the request: try the next candidate."""
        self.undelivered = False
        self.got_bytes = False  # what came back was only the other node's "not delivered"
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.reset(ResetReason.NORMAL)  # its answer (an error) is not needed
        self._channel_failed(ResetReason.REJECTED)

    def _retire(self, channel: Channel, reusable: bool) -> None:
        if reusable and self.upstream is not None and not channel.closed:
            self.upstream.release_channel(channel)
        else:
            channel.reset(ResetReason.NORMAL)

    def _channel_failed(self, reason: ResetReason | None) -> None:
        """The channel ended before the response did."""
        channel, self.channel = self.channel, None
        if channel is not None and not channel.closed:
            channel.reset(ResetReason.CANCELLED)
        if self.recv is Receive.RELAYING:
            self._abort_client("upstream closed mid-response")
            return
        upstream = self.upstream
        decision = after_failure(
            reason,
            replayable=self.replay is not None and not self.got_bytes,
            reused=self.reused,
            retried_fresh=self.retried_fresh,
            method=self.request.method,
            more_candidates=len(self.candidates) > 1,
            remote=upstream is not None and upstream.remote,
        )
        match decision.action:
            case Action.NEXT:
                self.candidates.pop(0)
                self.retried_fresh = False
                self._to_send(Send.CONNECTING)
                self.start()
            case Action.FRESH:
                self.retried_fresh = True
                self._to_send(Send.CONNECTING)
                self.start()
            case Action.HOLD:
                self.candidates.clear()
                self._to_send(Send.CONNECTING)
                failure = (decision.status, decision.message)
                if not self._hold(failure, known=reason is ResetReason.REJECTED):
                    self._fail(*failure, undelivered=True)
            case Action.FAIL:
                self._fail(decision.status, decision.message, undelivered=decision.undelivered)

    def _broken(self, why: str) -> None:
        _log.warn("bad upstream response", endpoint=self.request.endpoint, error=why)
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.reset(ResetReason.PROTOCOL)
        if self.recv is Receive.RELAYING:
            self._abort_client(why)
        elif self.recv is Receive.AWAITING_HEAD:
            self._fail(502, "upstream unreachable")

    def _abort_client(self, why: str) -> None:
        self._to_recv(Receive.FAILED)
        self._cancel_timer()
        self._record(self.status or 502, close=True)
        self.conn.abort()

    def _fail(self, status: int, message: str, *, undelivered: bool = False) -> None:
        self._to_recv(Receive.FAILED)
        self._cancel_timer()
        req = self.request
        unread = req.expects_body and not req.body_done
        close = not req.keep_alive or unread or req.upgrade is not None
        # Tell the node that forwarded the request that no service saw it: it may try another.
        mark = undelivered and req.forwarded
        self.conn.write(error_response(status, message, close=close, undelivered=mark))
        self._record(status, close=close)

    def _arm_timer(self) -> None:
        self.conn.response_timer.arm(self.conn.limits.response_timeout)

    def on_timeout(self) -> None:
        """The response head did not arrive within `proxy.timeout` (or a hold ran out)."""
        if self.recv is not Receive.AWAITING_HEAD:
            return
        if self.hold is not None:
            self.hold.cancel()
            self.hold = None
            self._fail(*self.hold_failure, undelivered=True)
            return
        req = self.request
        if not req.body_done and req.bytes_in != self.progress_mark:
            # Still uploading: the wait for the response head starts after the last byte.
            self.progress_mark = req.bytes_in
            self._arm_timer()
            return
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.reset(ResetReason.CANCELLED)
        self._fail(504, "upstream timeout")

    def _cancel_timer(self) -> None:
        self.conn.response_timer.cancel()
        if self.hold is not None and self.recv in FINAL:
            self.hold.cancel()
            self.hold = None

    def _record(self, status: int, *, close: bool = False) -> None:
        # The parser refers back to this exchange: drop it, so the exchange is freed by its
        # reference count instead of waiting for the cycle collector.
        self.parser = None
        upstream = self.upstream
        label = upstream.label if upstream is not None else ""
        remote = upstream.remote if upstream is not None else False
        self.conn.finish_exchange(
            self.request,
            status,
            self.bytes_out,
            label,
            remote=remote,
            close=close,
            response_headers=self.response_headers,
        )
