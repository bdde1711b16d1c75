"""Shared fixtures."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from pico import log
from tests.support.cluster import Harness


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loop in-process tests run on: asyncio's, or uvloop's (what `pico` runs on) with
    PICO_TEST_LOOP=uvloop, as `make test-compiled` does, so both loops are covered."""
    if os.environ.get("PICO_TEST_LOOP", "asyncio") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    """A harness that stops every node, agent and service the test started."""
    harness = Harness()
    try:
        yield harness
    finally:
        await harness.close()


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """The JSON log lines written during the test (at info and above)."""
    stream = io.StringIO()
    log.configure("info", stream=stream)
    try:
        yield stream
    finally:
        log.configure("info")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Expose each phase's report on the item, so fixtures can dump logs after a failure."""
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


def pytest_configure(config: pytest.Config) -> None:
    """With PICO_EXPECT_COMPILED=1 (`make test-compiled`), refuse to run on a build that is not
    compiled: a run that silently imported the .py files would test nothing new."""
    if os.environ.get("PICO_EXPECT_COMPILED") == "1":
        from pico import native

        missing = sorted(set(native.MODULES) - set(native.compiled_modules()))
        if missing:
            raise pytest.UsageError(
                f"PICO_EXPECT_COMPILED=1 but these modules are not compiled: {missing}"
            )
