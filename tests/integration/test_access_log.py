"""The access log: one line per request, headers redacted, 5xx at warn, can be disabled."""

from __future__ import annotations

import io
import json

import aiohttp

from tests.support.cluster import Harness, proxy_url
from tests.support.services import sample_app


def access_lines(stream: io.StringIO) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line]
    return [line for line in lines if line["subsystem"] == "proxy.access"]


async def test_each_request_gets_one_line_with_blocked_headers_removed(
    h: Harness, logs: io.StringIO
) -> None:
    node = await h.node(
        proxy={"access_log": {"request_headers": {"block_list": ["Authorization", "cookie"]}}}
    )
    port = await h.service(sample_app())
    await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    headers = {"x-pico-endpoint": "ep", "Authorization": "Bearer secret", "X-Trace": "t1"}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy_url(node) + "/echo?q=1", data=b"hello", headers=headers) as r:
            assert r.status == 200
    (line,) = access_lines(logs)
    assert line["level"] == "info"
    assert line["msg"] == "request"
    assert line["method"] == "POST" and line["path"] == "/echo" and line["status"] == 200
    assert line["endpoint"] == "ep" and line["upstream-kind"] == "tunnel"
    assert line["bytes-in"] == 5 and line["bytes-out"] == 5
    assert line["forwarded"] is False
    request_headers = line["request-headers"]
    assert isinstance(request_headers, dict)
    assert "Authorization" not in request_headers and request_headers["X-Trace"] == "t1"
    assert "secret" not in logs.getvalue()
    response_headers = line["response-headers"]
    assert isinstance(response_headers, dict) and response_headers["x-method"] == "POST"


async def test_5xx_is_logged_at_warn(h: Harness, logs: io.StringIO) -> None:
    node = await h.node()
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node), headers={"x-pico-endpoint": "nope"}) as r:
            assert r.status == 502
    (line,) = access_lines(logs)
    assert line["level"] == "warn" and line["status"] == 502


async def test_allow_list_keeps_only_named_headers(h: Harness, logs: io.StringIO) -> None:
    node = await h.node(proxy={"access_log": {"request_headers": {"allow_list": ["x-keep"]}}})
    async with aiohttp.ClientSession() as http:
        headers = {"x-pico-endpoint": "nope", "X-Keep": "yes", "X-Drop": "no"}
        async with http.get(proxy_url(node), headers=headers) as r:
            await r.read()
    (line,) = access_lines(logs)
    assert line["request-headers"] == {"X-Keep": "yes"}


async def test_disabled_access_log_writes_nothing(h: Harness, logs: io.StringIO) -> None:
    node = await h.node(proxy={"access_log": {"disable": True}})
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node), headers={"x-pico-endpoint": "nope"}) as r:
            await r.read()
    assert access_lines(logs) == []


async def test_credentials_are_never_logged_unless_allowed(h: Harness, logs: io.StringIO) -> None:
    secrets = {
        "Authorization": "Bearer tok-1",
        "x-pico-authorization": "Bearer tok-2",
        "Proxy-Authorization": "Basic tok-3",
        "Cookie": "session=tok-4",
    }
    node, _, _ = await h.with_service()
    async with aiohttp.ClientSession() as http:
        headers = {"x-pico-endpoint": "ep", "X-Trace": "t1", **secrets}
        async with http.get(proxy_url(node) + "/echo", headers=headers) as r:
            assert r.status == 200
    (line,) = access_lines(logs)
    assert line["request-headers"] == {
        "Host": line["host"],
        "x-pico-endpoint": "ep",
        "X-Trace": "t1",
        "Accept": "*/*",
        "Accept-Encoding": "gzip, deflate",
        "User-Agent": line["request-headers"]["User-Agent"],  # type: ignore[index]
    }
    assert "tok-" not in logs.getvalue()


async def test_an_allow_list_may_name_a_credential(h: Harness, logs: io.StringIO) -> None:
    node = await h.node(proxy={"access_log": {"request_headers": {"allow_list": ["cookie"]}}})
    async with aiohttp.ClientSession() as http:
        headers = {"x-pico-endpoint": "nope", "Cookie": "a=1", "Authorization": "Bearer x"}
        async with http.get(proxy_url(node), headers=headers) as r:
            await r.read()
    (line,) = access_lines(logs)
    assert line["request-headers"] == {"Cookie": "a=1"}
