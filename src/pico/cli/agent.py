"""`pico agent`: register endpoints and forward their traffic to local services.

`pico agent --endpoints id/addr` (and YAML `endpoints` / `listeners`) registers any number of
endpoints; `pico agent http ENDPOINT ADDR` and `pico agent tcp ENDPOINT ADDR` register one,
replacing the listeners of the config file.
"""

from __future__ import annotations

import asyncio
from typing import Any

import click

from pico import log
from pico.agent.agent import Agent, AgentRejected
from pico.cli.runtime import configure_logging, fail, load_or_exit, raise_fd_limit, run
from pico.config import AgentConfig, config_options
from pico.webapp import BindError

_CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=_CONTEXT, invoke_without_command=True)
@config_options(AgentConfig)
@click.pass_context
def agent(ctx: click.Context, /, **params: Any) -> None:
    """Start the Pico agent.

    Example: pico agent --endpoints my-endpoint/localhost:4000 registers endpoint
    'my-endpoint' and forwards its requests to localhost:4000. Several endpoints are
    comma-separated: --endpoints a/4000,b/localhost:5000; a service on a Unix socket is
    --endpoints my-app/unix:/run/app.sock. The config file may list
    listeners: [{endpoint_id, addr, protocol: http|tcp, access_log, timeout}].
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = params  # flags before the subcommand count too
        return
    _run(load_or_exit(AgentConfig, params))


def _listener_command(protocol: str, addr_help: str) -> click.Command:
    @click.command(protocol, context_settings=_CONTEXT, help=addr_help)
    @click.argument("endpoint")
    @click.argument("addr")
    @click.option(
        "--timeout",
        "listener_timeout",
        default=None,
        metavar="DURATION",
        help="How long to wait connecting to the service. (default: forwarder.timeout)",
    )
    @click.option(
        "--access-log",
        "access_log",
        is_flag=False,
        flag_value="true",
        default=None,
        metavar="[BOOL]",
        help="Log one line per connection to the service. (default: false)",
    )
    @config_options(AgentConfig)
    @click.pass_context
    def command(
        ctx: click.Context,
        /,
        endpoint: str,
        addr: str,
        listener_timeout: str | None,
        access_log: str | None,
        **params: Any,
    ) -> None:
        merged = {**(ctx.obj or {}), **{k: v for k, v in params.items() if v not in (None, ())}}
        listener: dict[str, Any] = {"endpoint_id": endpoint, "addr": addr, "protocol": protocol}
        if listener_timeout is not None:
            listener["timeout"] = listener_timeout
        if access_log is not None:
            listener["access_log"] = access_log
        # The arguments replace whatever the config file registers.
        overrides = {"endpoints": [], "listeners": [listener]}
        _run(load_or_exit(AgentConfig, merged, overrides))

    return command


agent.add_command(
    _listener_command(
        "http",
        "Register ENDPOINT and serve its HTTP requests from ADDR.\n\n"
        "ADDR is a port, host:port, unix:PATH (a Unix socket) or a URL: "
        "pico agent http my-app https://localhost:8443 "
        "--tls.root-ca ca.pem speaks TLS to the service.",
    )
)
agent.add_command(
    _listener_command(
        "tcp",
        "Register ENDPOINT and carry its TCP connections to ADDR (a port, host:port or "
        "unix:PATH).\n\n"
        "Example: pico agent tcp my-db localhost:5432; reach it with "
        "pico forward tcp 6000 my-db.",
    )
)


def _run(config: AgentConfig) -> None:
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
