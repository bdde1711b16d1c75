"""`pico server`: run one cluster node."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from pico import log
from pico.cli.runtime import configure_logging, fail, load_or_exit, raise_fd_limit, run
from pico.config import ServerConfig, config_options
from pico.server.node import Node, StartupError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_options(ServerConfig)
def server(**params: Any) -> None:
    """Start a Pico server node.

    Ports: proxy 8000 (client requests), upstream 8001 (agent tunnels), admin 8002 (metrics,
    status, health), gossip 8003. Every flag is also a YAML key (--proxy.bind-addr is
    proxy.bind_addr); flags given explicitly override the file.
    """
    config = load_or_exit(ServerConfig, params)
    configure_logging(config.log.level, list(config.log.subsystems))
    open_files = raise_fd_limit()

    async def main(stop: asyncio.Event) -> int:
        node = Node(config)
        try:
            await node.start()
        except StartupError as exc:
            fail(str(exc))
        log.get_logger("server").info("open file limit", soft_limit=open_files)
        stopped: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
        fatal: asyncio.Future[object] = node.fatal  # type: ignore[assignment]
        await asyncio.wait({stopped, fatal}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if node.fatal.done():
            await node.shutdown()
            fail(node.fatal.result())
        log.get_logger("server").info("received shutdown signal")
        await node.shutdown()
        return 0

    raise SystemExit(run(main))
