"""Serving an aiohttp app on a configured `host:port` (the admin ports of nodes and agents)."""

from __future__ import annotations

import ssl

from aiohttp import web

from pico.config import parse_host_port


class BindError(Exception):
    """The address could not be bound; the message names the config key."""


async def serve_app(
    app: web.Application, bind: str, key: str, tls: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, tuple[str, int]]:
    """Start `app` on `bind` (TLS with `tls`); returns the runner and the bound (host, port)."""
    host, port = parse_host_port(bind, key=key)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host or None, port, reuse_address=True, ssl_context=tls)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise BindError(f"{key}: cannot listen on {bind!r}: {exc.strerror or exc}") from exc
    server = site._server
    assert server is not None
    return runner, (host, int(server.sockets[0].getsockname()[1]))  # type: ignore[attr-defined]
