"""One request carried through one upstream channel, and its response relayed back.

`Exchange` sends a parsed client `Request` through a `Channel`, retries where that is safe
(retry.py decides), and waits (bounded) for an upstream of an endpoint that just lost all of
its own. The response direction is its `ResponseReader` (response.py). Each direction is one
state enum (states.py). `ProxyConnection` (proxy.py) owns the exchange and is seen here only
through `ClientSide`.
"""

from __future__ import annotations

from pico import log
from pico.http.channel import (
    Cancellable,
    Channel,
    ClientSide,
    ResetReason,
    Upstream,
    UpstreamBusy,
    UpstreamUnavailable,
)
from pico.http.head import error_response, render_trailers, rewrite_request_head
from pico.http.request import Request
from pico.http.response import ResponseReader
from pico.http.retry import IDEMPOTENT, Action, after_failure
from pico.http.states import (
    AWAITING_HEAD,
    CONNECTING,
    FAILED,
    FINAL,
    HELD,
    RELAYING,
    SEND_DONE,
    SEND_TRANSITIONS,
    SENDING,
    SENT,
    UPGRADED,
    Receive,
    Send,
    TransitionError,
)

_log = log.get_logger("proxy")


class Exchange:
    """One request carried through one channel, and its response relayed back."""

    __slots__ = (
        "candidates",
        "channel",
        "conn",
        "feeding",
        "held_once",
        "hold",
        "hold_failure",
        "progress_mark",
        "replay",
        "replay_complete",
        "replay_size",
        "request",
        "response",
        "retire",
        "retried_fresh",
        "reused",
        "send",
        "tried",
        "upstream",
    )

    def __init__(self, conn: ClientSide, request: Request, candidates: list[Upstream]) -> None:
        self.conn = conn
        self.request = request
        self.candidates = candidates
        self.send = CONNECTING
        self.response = ResponseReader(conn, request, self)
        self.channel: Channel | None = None
        self.upstream: Upstream | None = None
        # Facts of the current attempt, which decide whether a failure may be retried.
        self.reused = False  # the channel came from the idle pool
        self.retried_fresh = False  # a stale pooled channel was already retried once
        self.replay: list[bytes] | None = []  # request bytes sent, while they fit the limit
        self.replay_size = 0
        self.replay_complete = False  # the replay ends with the end of the body
        self.progress_mark = 0  # request bytes received when the response timer last fired
        # While the response parser is being fed, the fate of a finished channel waits for
        # the end of the chunk (bytes after the response make it unusable).
        self.feeding = False
        self.retire: tuple[Channel, bool] | None = None
        # Waiting for an upstream to (re)appear (a node restart or failure): the hold, and
        # the answer to give if none appears in time.
        self.hold: Cancellable | None = None
        self.held_once = False
        self.tried: set[int] = set()  # ids of the upstreams this request was sent to
        self.hold_failure = (502, "no available upstreams")

    @property
    def head_sent(self) -> bool:
        """True once a response head reached the client (errors can no longer be answered)."""
        state = self.response.state
        return state is RELAYING or state is UPGRADED

    def _to_send(self, new: Send) -> None:
        old = self.send
        if new not in SEND_TRANSITIONS[old]:  # states.check_send, inlined: per request
            raise TransitionError(f"request side: {old.value} -> {new.value} is not allowed")
        self.send = new

    def _end(self, state: Receive) -> None:
        """The response ended (`state` is final): nothing more is sent either."""
        self.response.to(state)
        self.send = SEND_DONE  # every request state may end (SEND_TRANSITIONS says so)
        self._cancel_timer()

    # -- request side ----------------------------------------------------------------------------

    def start(self) -> None:
        """Send the request to the best candidate that can open a channel."""
        busy = False
        while self.candidates:
            upstream = self.candidates[0]
            try:
                # A non-idempotent request never rides a pooled connection the service may
                # have closed meanwhile: it could not be retried safely.
                fresh = self.retried_fresh or self.request.method not in IDEMPOTENT
                channel, reused = upstream.open_channel(fresh=fresh)
            except UpstreamUnavailable as exc:
                busy = busy or isinstance(exc, UpstreamBusy)
                self.candidates.pop(0)
                continue
            self.tried.add(id(upstream))
            self._attach(upstream, channel, reused)
            return
        if busy:
            # Every upstream left is at its stream limit: no point waiting for another.
            self._fail(503, "upstream busy: too many requests in flight", undelivered=True)
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
        if self.held_once or wait <= 0 or self.replay is None or self.response.got_bytes:
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
        self._to_send(HELD)
        self.held_once = True
        self.hold = hold
        self.hold_failure = failure
        self.conn.response_timer.arm(wait)
        return True

    def _hold_over(self) -> None:
        """An upstream of the endpoint appeared: route the request again."""
        self.hold = None
        if self.send is not HELD:
            return
        self._to_send(CONNECTING)
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
        self.response.new_channel(upstream.remote)
        channel.set_receiver(self)
        # A pooled channel keeps the read state its last exchange left: set it for this client.
        if self.conn.write_paused:
            channel.pause_reading()
        else:
            channel.resume_reading()
        self._to_send(SENDING)
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
                forward_mark=self._forward_mark() if upstream.remote else None,
                trusted_client=self.conn.trusted_client,
                scheme=self.conn.scheme,
            )
        )
        for chunk in self.replay or ():
            channel.write(chunk)
        if self.replay_complete:
            # The replay ends with the end of the body (a retry after SENT): it is all out.
            self._to_send(SENT)
            if not self.conn.response_timer.armed:
                self._arm_timer()
            return
        body, req.body = req.body, []
        if body:
            self.conn.release_held_body(req)
        for chunk in body:
            self.send_body(chunk)
        if req.body_done:
            self.end_body()
        if not self.conn.response_timer.armed:
            self._arm_timer()

    def _forward_mark(self) -> bytes:
        proof = self.conn.forward_proof
        req = self.request
        return b"true" if proof is None else proof.mark(req.method, req.url)

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
        if send is SENDING:
            if self.request.chunked:
                self._send(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))  # one copy
            else:
                self._send(data)
        elif send is CONNECTING or send is HELD:
            self.conn.hold_body(self.request, data)

    def end_body(self) -> None:
        """The client's request body is complete (its trailers, if any, are in)."""
        if self.send is not SENDING:
            return  # no channel yet (`_attach` ends it), or the exchange is over
        req = self.request
        if req.chunked:
            self._send(render_trailers(req.trailers))
        # Kept while the replay holds every byte: a retry then sends it all, and nothing more.
        self.replay_complete = self.replay is not None
        self._to_send(SENT)
        if req.expects_body and self.response.state is AWAITING_HEAD:
            self._arm_timer()  # the wait for the response head starts now

    # -- channel receiver ------------------------------------------------------------------------

    def data_received(self, data: bytes | memoryview) -> None:
        if self.response.state in FINAL:
            return
        conn = self.conn
        corked = conn.cork()
        self.feeding = True
        try:
            response = self.response
            response.feed(data)
            self.feeding = False
            if response.undelivered and response.state is AWAITING_HEAD:
                self._reroute()
            retire, self.retire = self.retire, None
            if retire is not None:
                self._retire(retire[0], retire[1] and not response.stray_bytes)
        finally:
            self.feeding = False
            if corked:
                conn.uncork()  # whatever happened, what was written goes out

    def eof_received(self) -> None:
        if self.response.state in FINAL:
            return
        if self.response.ends_by_close:
            self.response.complete()
        else:
            self._channel_failed(None)

    def connection_lost(self, reason: ResetReason | None) -> None:
        if self.response.state in FINAL:
            return
        self.channel = None
        if self.response.ends_by_close and reason is None:
            self.response.complete()
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
        if self.response.state in FINAL:
            return
        self._end(FAILED)
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.reset(ResetReason.CANCELLED)
        self._record(status, close=True)

    # -- response events (ResponseEvents) --------------------------------------------------------

    def completed(self, keep_alive: bool) -> None:
        # Reusable only if the whole request went out: a service that answered early may
        # still be waiting for the rest of the body, and would read the next request as it.
        reusable = keep_alive and self.send is SENT
        self.send = SEND_DONE
        self._cancel_timer()
        channel, self.channel = self.channel, None
        if channel is not None and not channel.closed:
            if self.feeding:
                # Bytes after this response may still be in the chunk being parsed: decide
                # once it is done (a channel with stray bytes must not be reused).
                self.retire = (channel, reusable)
            else:
                self._retire(channel, reusable)
        self._record(self.response.status, close=self.response.close_client)

    def upgraded(self) -> None:
        self.send = SEND_DONE
        self._cancel_timer()
        channel, self.channel = self.channel, None
        assert channel is not None
        self.conn.start_splice(channel)
        self._record(101)

    def broken(self, why: str) -> None:
        """The response cannot be relayed: the client gets 502, or is dropped mid-response."""
        _log.warn("bad upstream response", endpoint=self.request.endpoint, error=why)
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.reset(ResetReason.PROTOCOL)
        state = self.response.state
        if state is RELAYING:
            self._abort_client()
        elif state is AWAITING_HEAD:
            self._fail(502, "upstream unreachable")

    # -- endings ---------------------------------------------------------------------------------

    def _reroute(self) -> None:
        """The node we forwarded to could not deliver the request: try the next candidate."""
        self.response.new_channel(remote=False)  # what came back was only its "not delivered"
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
        if self.response.state is RELAYING:
            self._abort_client()
            return
        upstream = self.upstream
        decision = after_failure(
            reason,
            replayable=self.replay is not None and not self.response.got_bytes,
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
                self._to_send(CONNECTING)
                self.start()
            case Action.FRESH:
                self.retried_fresh = True
                self._to_send(CONNECTING)
                self.start()
            case Action.HOLD:
                self.candidates.clear()
                self._to_send(CONNECTING)
                failure = (decision.status, decision.message)
                if not self._hold(failure, known=reason is ResetReason.REJECTED):
                    self._fail(*failure, undelivered=decision.undelivered)
            case Action.FAIL:
                self._fail(decision.status, decision.message, undelivered=decision.undelivered)

    def _abort_client(self) -> None:
        self._end(FAILED)
        self._record(self.response.status or 502, close=True)
        self.conn.abort()

    def _fail(self, status: int, message: str, *, undelivered: bool = False) -> None:
        self._end(FAILED)
        req = self.request
        unread = req.expects_body and not req.body_done
        close = not req.keep_alive or unread or req.upgrade is not None
        # Tell the node that forwarded the request that no service saw it: it may try another.
        mark = undelivered and req.forwarded
        self.conn.write(
            error_response(
                status,
                message,
                close=close,
                undelivered=mark,
                head_request=req.method == b"HEAD",
            )
        )
        self._record(status, close=close)

    def _arm_timer(self) -> None:
        self.conn.response_timer.arm(self.conn.limits.response_timeout)

    def on_timeout(self) -> None:
        """The response head did not arrive within `proxy.timeout` (or a hold ran out)."""
        if self.response.state is not AWAITING_HEAD:
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
        if self.hold is not None and self.response.state in FINAL:
            self.hold.cancel()
            self.hold = None

    def _record(self, status: int, *, close: bool = False) -> None:
        response = self.response
        response.detach()
        upstream = self.upstream
        label = upstream.label if upstream is not None else ""
        remote = upstream.remote if upstream is not None else False
        self.conn.finish_exchange(
            self.request,
            status,
            response.bytes_out,
            label,
            remote=remote,
            close=close,
            response_headers=response.received_headers,
        )
