"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import Procs


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    """Processes the test starts; all stopped afterwards, their logs printed if it failed."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(p.dump())
