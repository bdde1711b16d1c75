"""`pico forward tcp LOCAL_ADDR ENDPOINT`: a local port that reaches a TCP endpoint."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from pico import log
from pico.cli.runtime import configure_logging, fail, load_or_exit, run
from pico.config import ForwardConfig, config_options, parse_listener_addr
from pico.forward import Forwarder
from pico.tls import client_context

_CONTEXT = {"help_option_names": ["-h", "--help"]}
_log = log.get_logger("forward")


@click.group(context_settings=_CONTEXT)
def forward() -> None:
    """Reach endpoints of the cluster from this machine through the proxy port."""


@forward.command("tcp", context_settings=_CONTEXT)
@click.argument("local_addr")
@click.argument("endpoint")
@config_options(ForwardConfig)
def forward_tcp(local_addr: str, endpoint: str, **params: Any) -> None:
    """Listen on LOCAL_ADDR (a port, on localhost, or host:port) and carry each connection
    to the TCP endpoint ENDPOINT through --server.url (the proxy port).

    Example: pico forward tcp 127.0.0.1:6000 my-db --server.url http://localhost:8000
    """
    config = load_or_exit(ForwardConfig, params)
    configure_logging(config.log.level, list(config.log.subsystems))
    try:
        host, port, _ = parse_listener_addr(local_addr, "tcp")
    except ValueError as exc:
        fail(f"invalid local address: {exc}")
        return
    tls = config.server.tls
    context = (
        client_context(
            tls.root_ca, tls.cert, tls.key, insecure_skip_verify=tls.insecure_skip_verify
        )
        if config.server.url.startswith("https")
        else None
    )

    async def main(stop: asyncio.Event) -> int:
        forwarder = Forwarder(
            endpoint,
            url=config.server.url,
            api_key=config.auth.api_key,
            ssl=context,
            timeout=config.server.timeout,
            max_connections=config.max_connections,
        )
        try:
            bound = await forwarder.start(host, port)
        except OSError as exc:
            fail(f"cannot listen on {local_addr}: {exc.strerror or exc}")
        _log.info(
            "forwarding",
            addr=f"{bound[0]}:{bound[1]}",
            endpoint_id=endpoint,
            server_url=config.server.url,
        )
        try:
            await stop.wait()
        finally:
            await forwarder.close()
        return 0

    raise SystemExit(run(main))
