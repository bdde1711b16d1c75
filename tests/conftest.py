"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.cluster import Harness


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    """A harness that stops every node, agent and service the test started."""
    harness = Harness()
    try:
        yield harness
    finally:
        await harness.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Expose each phase's report on the item, so fixtures can dump logs after a failure."""
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report
