"""The ASGI app's lifespan around an SDK service: a failure at its end is said, whichever
lifespan mode found it."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from pico.sdk.asgi import AsgiService


def app_failing_at_shutdown(how: str) -> Any:
    """A bare ASGI app that supports lifespan, and whose shutdown fails (`how`: it raises, or
    it says lifespan.shutdown.failed)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        assert (await receive())["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})
        assert (await receive())["type"] == "lifespan.shutdown"
        if how == "raises":
            raise RuntimeError("could not flush the cache")
        await send({"type": "lifespan.shutdown.failed", "message": "could not flush"})

    return app


@pytest.mark.parametrize("lifespan", ["auto", "on"])
@pytest.mark.parametrize("how", ["raises", "says so"])
async def test_a_lifespan_shutdown_that_fails_is_logged(
    lifespan: str, how: str, logs: io.StringIO
) -> None:
    service = AsgiService(app_failing_at_shutdown(how), lifespan=lifespan)
    await service.startup()
    await service.finish()
    records = [json.loads(line) for line in logs.getvalue().splitlines()]
    said = [r for r in records if r["msg"] == "the ASGI app's lifespan shutdown failed"]
    assert [r["level"] for r in said] == ["warn"]
