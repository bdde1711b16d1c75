"""`pico`: the command-line entry point (server, agent, forward, status, dev)."""

from __future__ import annotations

import click

from pico import __version__
from pico.cli.agent import agent
from pico.cli.dev import dev
from pico.cli.forward import forward
from pico.cli.server import server
from pico.cli.status import status

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-v", "--version", prog_name="pico")
def cli() -> None:
    """Pico: a clustered reverse tunnel proxy for services that cannot be reached from outside."""


cli.add_command(server)
cli.add_command(agent)
cli.add_command(status)
cli.add_command(dev)
cli.add_command(forward)


def main() -> None:
    """Console script entry point."""
    cli()
