"""`pico agent`: register endpoints and forward their traffic to local services."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from pico import log
from pico.agent.agent import Agent, AgentRejected
from pico.cli.runtime import configure_logging, fail, load_or_exit, raise_fd_limit, run
from pico.config import AgentConfig, config_options
from pico.webapp import BindError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_options(AgentConfig)
def agent(**params: Any) -> None:
    """Start the Pico agent.

    Example: pico agent --endpoints my-endpoint/localhost:4000 registers endpoint
    'my-endpoint' and forwards its requests to localhost:4000. Several endpoints are
    comma-separated: --endpoints a/4000,b/localhost:5000.
    """
    config = load_or_exit(AgentConfig, params)
    configure_logging(config.log.level, list(config.log.subsystems))
    open_files = raise_fd_limit()

    async def main(stop: asyncio.Event) -> int:
        instance = Agent(config)
        try:
            await instance.start_admin()
        except BindError as exc:
            fail(str(exc))
        log.get_logger("agent").info("open file limit", soft_limit=open_files)
        try:
            await instance.run(stop)
        except AgentRejected as exc:
            fail(str(exc))
        return 0

    raise SystemExit(run(main))
