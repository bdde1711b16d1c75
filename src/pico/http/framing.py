"""Where a message body ends, decided once from the parsed head (RFC 9112 §6, h11's
`_body_framing`).

Pure functions, one per direction: they take the framing fields as the parser saw them and
return a `Framing`, or raise `BadRequest` / `BadResponse` for a message two parties could read
differently. The node never relays the client's or the service's framing headers: it writes
its own from the `Framing` (head.py), so no header filtering (a `Connection` token naming
`Content-Length`, say) can change where a relayed body ends.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass


class BadRequest(Exception):
    """A request the proxy answers with `status` (and closes the connection on); `headers`
    go in the answer (`Allow` on a 405)."""

    def __init__(
        self, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class BadResponse(Exception):
    """A response the proxy cannot relay safely: the client gets 502."""


class Body(enum.Enum):
    NONE = "none"  # no body (GET without framing, HEAD responses, 204, 304, 1xx)
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # chunked transfer coding
    UNTIL_CLOSE = "until-close"  # a response without framing: ends when the service closes


# The members under plain names, for the hot path (see states.py on enum access in 3.11).
BODY_NONE = Body.NONE
BODY_LENGTH = Body.LENGTH
BODY_CHUNKED = Body.CHUNKED
BODY_UNTIL_CLOSE = Body.UNTIL_CLOSE


@dataclass(frozen=True, slots=True)
class Framing:
    """How a body is delimited, and what the node writes to say so."""

    body: Body
    length: int = 0
    # Transfer codings applied before chunked (`gzip` of `gzip, chunked`): relayed as is.
    codings: bytes = b""
    # The Content-Length a bodiless response states (HEAD, 304) and relays unchanged.
    stated_length: bytes | None = None


NO_BODY = Framing(Body.NONE)
CHUNKED = Framing(Body.CHUNKED)
UNTIL_CLOSE = Framing(Body.UNTIL_CLOSE)

# Content-Length values up to this many digits (10^18 - 1 bytes); longer ones are refused.
_MAX_LENGTH_DIGITS = 18


@functools.lru_cache(maxsize=1024)
def _length(n: int) -> Framing:
    """The Framing of an n-byte body (one object per common length, not one per message)."""
    return Framing(Body.LENGTH, n)


def _content_length(values: Sequence[bytes]) -> int | None:
    """The one length `values` agree on; None if they are not all the same 1*DIGIT."""
    if len(values) == 1:  # the common case, without the list handling below
        value = values[0]
        if value.isdigit() and len(value) <= _MAX_LENGTH_DIGITS:
            return int(value)
    length: bytes | None = None
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item.isdigit() or len(item) > _MAX_LENGTH_DIGITS:
                return None
            if length is not None and int(item) != int(length):
                return None
            length = item
    return None if length is None else int(length)


def _codings(values: Sequence[bytes]) -> list[bytes]:
    """The transfer codings of every Transfer-Encoding field, in order, lowercased."""
    out = []
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t").lower()
            if item:
                out.append(item)
    return out


def request_framing(
    version: str,
    content_lengths: Sequence[bytes],
    transfer_encodings: Sequence[bytes],
    *,
    upgrade: bool,
) -> Framing:
    """The framing of a client request. Raises BadRequest for anything ambiguous.

    A request is delimited by Content-Length or by chunked, never by the connection closing.
    """
    if transfer_encodings:
        if version == "1.0":
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        if content_lengths:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        codings = _codings(transfer_encodings)
        if not codings or codings[-1] != b"chunked":
            raise BadRequest(400, "Transfer-Encoding does not end in chunked")
        if b"chunked" in codings[:-1]:
            raise BadRequest(400, "chunked applied more than once")
        if len(codings) > 1:
            # We would have to undo them to find the body: RFC 9112 §6.1 says 501.
            raise BadRequest(501, "unsupported transfer coding")
        framing = CHUNKED
    elif content_lengths:
        length = _content_length(content_lengths)
        if length is None:
            raise BadRequest(400, "conflicting Content-Length headers")
        framing = _length(length)
    else:
        return NO_BODY
    if upgrade and (framing.body is BODY_CHUNKED or framing.length):
        # The body and the new protocol's first bytes would be indistinguishable.
        raise BadRequest(400, "Upgrade request with a body")
    return framing


def response_framing(
    request_method: bytes,
    status: int,
    content_lengths: Sequence[bytes],
    transfer_encodings: Sequence[bytes],
) -> Framing:
    """The framing of a service's response. Raises BadResponse for anything ambiguous."""
    if request_method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        if status == 204 or status < 200:
            return NO_BODY
        # HEAD and 304 state the length of the body they do not have: relay that if valid.
        stated = _content_length(content_lengths) if content_lengths else None
        if stated is None:
            return NO_BODY
        return Framing(Body.NONE, stated_length=b"%d" % stated)
    if transfer_encodings:
        if content_lengths:
            raise BadResponse("both Content-Length and Transfer-Encoding")
        codings = _codings(transfer_encodings)
        if not codings or codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
            raise BadResponse("Transfer-Encoding does not end in chunked once")
        if len(codings) == 1:
            return CHUNKED
        return Framing(Body.CHUNKED, codings=b", ".join(codings[:-1]))
    if content_lengths:
        length = _content_length(content_lengths)
        if length is None:
            raise BadResponse("conflicting Content-Length headers")
        return _length(length)
    return UNTIL_CLOSE
