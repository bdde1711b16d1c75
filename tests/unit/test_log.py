"""Tests for pico.log: JSON line shape, level filtering, subsystem override, stdlib bridge."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from pico import log


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    log.configure("info", (), stream=buf)
    yield buf
    log.configure("info", ())


def records(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_shape(stream: io.StringIO) -> None:
    log.get_logger("proxy").info("request forwarded", endpoint_id="my-ep", status=200)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert list(rec)[:4] == ["ts", "level", "subsystem", "msg"]
    assert rec["level"] == "info"
    assert rec["subsystem"] == "proxy"
    assert rec["msg"] == "request forwarded"
    assert rec["endpoint-id"] == "my-ep"
    assert rec["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])


def test_fields_kebab_and_unserialisable(stream: io.StringIO) -> None:
    class Thing:
        def __str__(self) -> str:
            return "thing!"

    logger = log.get_logger("cluster")
    logger.warn(
        "odd values",
        **{"node-id": "n1"},
        obj=Thing(),
        err=TimeoutError(),
        err2=ValueError("boom"),
        nested={"a": [1, 2]},
        msg="not the message",
    )
    rec = records(stream)[0]
    assert rec["level"] == "warn"
    assert rec["msg"] == "odd values"
    assert rec["field-msg"] == "not the message"
    assert rec["node-id"] == "n1"
    assert rec["obj"] == "thing!"
    assert rec["err"] == "TimeoutError"
    assert rec["err2"] == "ValueError: boom"
    assert rec["nested"] == {"a": [1, 2]}


def test_level_filtering(stream: io.StringIO) -> None:
    logger = log.get_logger("gossip")
    log.configure("warn", (), stream=stream)
    logger.debug("d")
    logger.info("i")
    logger.warn("w")
    logger.error("e")
    assert [r["level"] for r in records(stream)] == ["warn", "error"]
    assert not logger.enabled("info")
    assert logger.enabled("warn")


def test_debug_level_logs_everything(stream: io.StringIO) -> None:
    log.configure("debug", (), stream=stream)
    logger = log.get_logger("x")
    for name in ("debug", "info", "warn", "error"):
        logger.log(name, name)
    assert [r["msg"] for r in records(stream)] == ["debug", "info", "warn", "error"]


def test_subsystem_override_exact_match(stream: io.StringIO) -> None:
    log.configure("error", ["rpc"], stream=stream)
    log.get_logger("rpc").debug("rpc debug")
    log.get_logger("rpc.stream").debug("not matched")
    log.get_logger("proxy").info("filtered")
    log.get_logger("proxy").error("kept")
    assert [(r["subsystem"], r["msg"]) for r in records(stream)] == [
        ("rpc", "rpc debug"),
        ("proxy", "kept"),
    ]
    assert log.get_logger("rpc").enabled("debug")
    assert not log.get_logger("rpc.stream").enabled("debug")


def test_disabled_level_does_no_work(stream: io.StringIO) -> None:
    log.configure("info", (), stream=stream)

    class Exploding:
        def __str__(self) -> str:
            raise AssertionError("should not be formatted")

    log.get_logger("proxy").debug("skipped", value=Exploding())
    assert stream.getvalue() == ""


def test_bind(stream: io.StringIO) -> None:
    logger = log.get_logger("proxy.http").bind(endpoint_id="ep1")
    logger.info("hello", status=1)
    rec = records(stream)[0]
    assert rec["endpoint-id"] == "ep1"
    assert rec["status"] == 1
    assert rec["subsystem"] == "proxy.http"


def test_get_logger_cached() -> None:
    assert log.get_logger("same") is log.get_logger("same")


def test_invalid_level() -> None:
    with pytest.raises(ValueError, match="invalid log level"):
        log.configure("verbose")


def test_default_stream_is_stderr_at_write_time(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("info", ())
    log.get_logger("main").info("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    rec = json.loads(captured.err.strip().splitlines()[-1])
    assert rec["msg"] == "to stderr"


def test_stdlib_logging_bridge(stream: io.StringIO) -> None:
    std = logging.getLogger("aiohttp.server")
    std.info("ignored info")
    std.warning("something %s", "odd")
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        std.exception("handler failed")
    recs = [r for r in records(stream) if r["subsystem"] == "aiohttp.server"]
    assert [(r["level"], r["msg"]) for r in recs] == [
        ("warn", "something odd"),
        ("error", "handler failed"),
    ]
    assert "RuntimeError: kaput" in recs[1]["exception"]


def test_stdlib_bridge_respects_level(stream: io.StringIO) -> None:
    log.configure("error", (), stream=stream)
    logging.getLogger("asyncio").warning("filtered")
    logging.getLogger("asyncio").error("kept")
    assert [r["msg"] for r in records(stream) if r["subsystem"] == "asyncio"] == ["kept"]


def test_configure_idempotent_handler(stream: io.StringIO) -> None:
    log.configure("info", (), stream=stream)
    log.configure("info", (), stream=stream)
    logging.getLogger("lib").warning("once")
    assert [r["msg"] for r in records(stream) if r["subsystem"] == "lib"] == ["once"]


def test_rate_limited_writes_one_record_per_reason_per_interval(stream: io.StringIO) -> None:
    now = [100.0]
    limited = log.RateLimited(log.get_logger("proxy"), interval=60.0, clock=lambda: now[0])
    for _ in range(1000):
        limited.warn("bad header", "bad request", client="10.0.0.1")
    limited.warn("bad method", "bad request")
    assert [(r["reason"], r.get("suppressed")) for r in records(stream)] == [
        ("bad header", None),
        ("bad method", None),
    ]
    now[0] += 60.0  # a minute later the next one is written, with the count of the rest
    limited.warn("bad header", "bad request")
    assert records(stream)[-1]["suppressed"] == 999
    assert limited.counts == {"bad header": 1001, "bad method": 1}


def test_rate_limited_bounds_the_reasons_it_keeps(stream: io.StringIO) -> None:
    limited = log.RateLimited(log.get_logger("proxy"), max_reasons=3)
    for i in range(100):
        limited.warn(f"peer text {i}", "bad request")
    assert limited.counts == {"peer text 0": 1, "peer text 1": 1, "peer text 2": 1, "other": 97}
    assert len(records(stream)) == 4
