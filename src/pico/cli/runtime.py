"""Running a long-lived command: the event loop, signals, config errors as one clear line."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from pico import log
from pico.config import ConfigError, load_config

M = TypeVar("M", bound=BaseModel)


def fail(message: str) -> None:
    """Print one line on stderr and exit 1."""
    print(f"pico: {message}", file=sys.stderr)
    raise SystemExit(1)


def load_or_exit(model: type[M], params: Mapping[str, Any]) -> M:
    """Load the command's config, or exit 1 with a message naming the key."""
    try:
        return load_config(model, params)
    except ConfigError as exc:
        fail(f"invalid config: {exc}")
        raise AssertionError from None


def configure_logging(level: str, subsystems: list[str]) -> None:
    """Set up JSON logs on stderr."""
    log.configure(level, subsystems)


def run(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run `main(stop)` on uvloop (when installed); SIGINT/SIGTERM set `stop`."""

    async def wrapper() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    try:
        import uvloop
    except ImportError:  # plain asyncio works too, just slower
        return int(asyncio.run(wrapper()))
    return int(uvloop.run(wrapper()))
