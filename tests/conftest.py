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
