"""`pico dev ...`: local development tools (the demo cluster)."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def dev() -> None:
    """Development tools: a local demo cluster."""


@dev.command("demo")
def demo() -> None:
    """Start a local node, a sample service and an agent; print commands to try."""
    from pico.devtools.demo import run_demo

    raise SystemExit(run_demo())
