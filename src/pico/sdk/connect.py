"""`connect()`: asyncio streams to a TCP endpoint through a node's proxy port.

The connection is `pico.forward.open_connection`'s (the node's TCP route, one WebSocket per
connection); this module turns its failures into the SDK's exceptions, with the node's reason.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module

from pico.config import check_endpoint_id
from pico.forward import CONNECT_TIMEOUT, ForwardError, open_connection
from pico.sdk.errors import ConnectError, NotPermitted, UnknownEndpoint, Unreachable, WrongProtocol

# The node's answers (pico.server.tcp, pico.http.proxy) and what they mean to a caller.
_UNKNOWN = "no available upstreams"
_WRONG_PROTOCOL = "endpoint is http"


def _error(endpoint: str, exc: ForwardError) -> ConnectError:
    status, reason = exc.status, exc.message
    if status in (401, 403):
        return NotPermitted(endpoint, status, reason)
    if status == 502 and reason == _UNKNOWN:
        return UnknownEndpoint(endpoint, status, reason)
    if status in (502, 503, 504):
        return Unreachable(endpoint, status, reason)
    if reason == _WRONG_PROTOCOL:
        return WrongProtocol(endpoint, status, reason)
    return ConnectError(endpoint, status, reason)


async def connect(
    endpoint: str,
    *,
    url: str = "http://localhost:8000",
    api_key: str = "",
    ssl: ssl_module.SSLContext | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection to the TCP endpoint `endpoint` through the proxy port at `url`.

    Returns (reader, writer): `writer.write_eof()` half-closes (the service reads EOF),
    `writer.close()` closes. Raises UnknownEndpoint (nobody registered it), NotPermitted
    (the node wants a token that permits it: `api_key`), Unreachable (the node, or the
    service behind the agent), WrongProtocol (an HTTP endpoint), ValueError for a bad
    endpoint id or URL. Safe to cancel: nothing stays open.
    """
    check_endpoint_id(endpoint)
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"url={url!r}: use the proxy port's http:// or https:// URL")
    try:
        return await open_connection(endpoint, url=url, api_key=api_key, ssl=ssl, timeout=timeout)
    except ForwardError as exc:
        raise _error(endpoint, exc) from None
    except TimeoutError:
        raise Unreachable(endpoint, 0, f"no answer from {url} within {timeout}s") from None
    except OSError as exc:
        raise Unreachable(endpoint, 0, f"cannot reach {url}: {exc}") from None
