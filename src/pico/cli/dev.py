"""`pico dev ...`: local development tools (the demo cluster, a TCP load balancer)."""

from __future__ import annotations

import asyncio

import click

from pico.cli.runtime import fail


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def dev() -> None:
    """Development tools: a local demo cluster and a TCP load balancer."""


@dev.command("demo")
@click.option(
    "--lb",
    type=click.Choice(["auto", "nginx", "builtin"]),
    default="auto",
    show_default=True,
    help="Load balancer in front of the nodes.",
)
def demo(lb: str) -> None:
    """Start a local 3-node cluster behind a load balancer, a sample service and an agent."""
    from pico.devtools.demo import run_demo

    raise SystemExit(run_demo(lb))


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


@dev.command("lb")
@click.option(
    "--route",
    "routes",
    multiple=True,
    required=True,
    metavar="LISTEN=BACKEND[,BACKEND...]",
    help="e.g. 127.0.0.1:8000=127.0.0.11:8000,127.0.0.12:8000 (repeatable).",
)
def lb(routes: tuple[str, ...]) -> None:
    """A TCP load balancer: round-robin over backends, skipping ones that refuse."""
    from pico.cli.runtime import run
    from pico.devtools.lb import run_lb

    parsed = []
    for route in routes:
        listen, sep, backends = route.partition("=")
        try:
            if not sep or not backends:
                raise ValueError("missing '='")
            parsed.append((_addr(listen), [_addr(b) for b in backends.split(",")]))
        except ValueError as exc:
            fail(f"--route {route!r}: {exc} (use LISTEN=BACKEND[,BACKEND...])")

    async def main(stop: asyncio.Event) -> int:
        task = asyncio.ensure_future(run_lb(parsed))
        await asyncio.wait(
            {task, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except OSError as exc:
            fail(f"cannot listen: {exc}")
        return 0

    raise SystemExit(run(main))
