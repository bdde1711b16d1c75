"""The fuzz targets (fuzz/targets.py) under hypothesis, and under atheris for a bounded number
of inputs each (`make fuzz` runs them for longer)."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.seeds import SEEDS
from fuzz.targets import TARGETS, _Service
from pico.mux.websocket import FrameDecoder
from tests.support.procs import REPO

EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
ATHERIS_RUNS = 4000


@st.composite
def mutated(draw: st.DrawFn, name: str) -> bytes:
    """A seed of the target with a few bytes replaced, inserted or cut (or random bytes)."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=1024))
    data = bytearray(draw(st.sampled_from(SEEDS[name])))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(("set", "insert", "cut")))
        if op == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_pass(name: str) -> None:
    for seed in SEEDS[name]:
        TARGETS[name](seed)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_hypothesis_finds_nothing(name: str) -> None:
    @EXAMPLES
    @given(mutated(name))
    def check(data: bytes) -> None:
        TARGETS[name](data)

    check()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_atheris_finds_nothing_in_a_bounded_run(name: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "fuzz.run", name, f"-runs={ATHERIS_RUNS}", "-max_len=4096"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    done = re.search(r"Done (\d+) runs", run.stderr)
    assert done is not None and int(done.group(1)) == ATHERIS_RUNS, run.stderr[-2000:]


def test_the_targets_catch_what_they_claim_to(monkeypatch: pytest.MonkeyPatch) -> None:
    # The service side refuses ambiguous framing (as a smuggling victim would not)...
    with pytest.raises(AssertionError, match="ambiguous"):
        _Service().write(
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 9\r\n\r\n"
        )
    # ...and a decoder whose output depends on how its input is cut is caught.
    feed = FrameDecoder.feed

    def lossy(self: FrameDecoder, data: bytes | memoryview) -> Any:
        return feed(self, bytes(data)[:-1] if len(data) == 5 else data)

    monkeypatch.setattr(FrameDecoder, "feed", lossy)
    with pytest.raises(AssertionError, match="split at"):
        TARGETS["websocket"](SEEDS["websocket"][0])
