"""What the SDK raises: one small hierarchy under `PicoError`, each with the node's reason."""

from __future__ import annotations


class PicoError(Exception):
    """Anything the SDK raises about Pico itself (not about bad arguments: ValueError)."""


class EndpointRejected(PicoError):
    """The node refused to register the endpoint for a reason retrying will not fix
    (a bad or missing token, a token that does not permit the endpoint, a wrong URL)."""


class StartupFailed(PicoError):
    """The ASGI app's lifespan startup failed (the app said so, or raised): the endpoint was
    never registered."""


class ConnectError(PicoError, ConnectionError):
    """`connect()` failed; `status` is the node's HTTP status (0: no node answered) and
    `reason` what it said."""

    def __init__(self, endpoint: str, status: int, reason: str) -> None:
        what = f"{status} {reason}" if status else reason
        super().__init__(f"cannot connect to endpoint {endpoint!r}: {what}")
        self.endpoint = endpoint
        self.status = status
        self.reason = reason


class UnknownEndpoint(ConnectError):
    """No agent has registered the endpoint (the node answered 502 no available upstreams)."""


class NotPermitted(ConnectError):
    """The node wants a token that permits the endpoint (401 / 403)."""


class Unreachable(ConnectError):
    """The node, or the endpoint's service behind its agent, could not be reached."""


class WrongProtocol(ConnectError):
    """The endpoint is served as HTTP, not TCP (use an HTTP client on the proxy port)."""
