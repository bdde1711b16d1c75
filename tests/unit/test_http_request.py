"""`inspect_head`: the endpoint, the target and the framing of a client request head."""

from __future__ import annotations

import pytest

from pico.http.framing import BadRequest, Body
from pico.http.request import Request, inspect_head


def head(
    headers: list[tuple[bytes, bytes]],
    *,
    method: bytes = b"GET",
    url: bytes = b"/",
    version: str = "1.1",
    upgrade: bool = False,
) -> Request:
    req = Request(0.0)
    req.method, req.url, req.version, req.headers = method, url, version, list(headers)
    inspect_head(req, upgrade=upgrade)
    return req


def refused(status: int, message: str, headers: list[tuple[bytes, bytes]], **kw: object) -> None:
    with pytest.raises(BadRequest) as err:
        head(headers, **kw)  # type: ignore[arg-type]
    assert (err.value.status, err.value.message) == (status, message)


HOST = (b"Host", b"ep.example.com")


def test_connect_is_405_with_allow() -> None:
    with pytest.raises(BadRequest) as err:
        head([HOST], method=b"CONNECT", url=b"ep.example.com:443", upgrade=True)
    assert err.value.status == 405
    assert dict(err.value.headers)[b"Allow"].startswith(b"GET, HEAD, POST")


def test_host_is_routed_case_insensitively() -> None:
    assert head([(b"host", b"WEB.Example.COM")]).endpoint == "web"


def test_absolute_form_target_is_routed_by_its_authority_and_sent_in_origin_form() -> None:
    req = head([(b"Host", b"other.example.com")], url=b"http://A.example.com:8000/x?q=1")
    assert (req.endpoint, req.url, req.host) == ("a", b"/x?q=1", b"A.example.com:8000")
    assert [v for n, v in req.headers if n.lower() == b"host"] == [b"A.example.com:8000"]
    assert head([], url=b"https://a.example.com").url == b"/"
    assert head([], url=b"http://a.example.com?x").url == b"/?x"


def test_an_absolute_form_target_on_the_tcp_route_names_its_tcp_endpoint() -> None:
    # As its origin form does: the path names the endpoint, whatever the authority says.
    req = head([HOST], url=b"http://web.example.com/_pico/v1/tcp/my-db?x", upgrade=True)
    assert (req.tcp, req.endpoint, req.url) == (True, "my-db", b"/_pico/v1/tcp/my-db?x")


@pytest.mark.parametrize(
    "url", [b"ftp://a.example.com/", b"http:///x", b"http://user@a.example.com/", b"x/y"]
)
def test_other_request_targets_are_400(url: bytes) -> None:
    refused(400, "invalid request target", [HOST], url=url)


def test_options_asterisk_passes() -> None:
    assert head([HOST], method=b"OPTIONS", url=b"*").endpoint == "ep"


def test_http11_without_host_is_400() -> None:
    refused(400, "missing Host", [(b"x-pico-endpoint", b"ep")])


def test_http10_without_host_gets_the_endpoint_as_host_or_400() -> None:
    req = head([(b"x-pico-endpoint", b"Ep")], version="1.0")
    assert req.endpoint == "ep"
    assert (b"Host", b"Ep") in req.headers
    refused(400, "missing Host", [], version="1.0")


def test_duplicate_host_is_400() -> None:
    refused(400, "duplicate Host header", [HOST, HOST])


def test_upgrade_counts_only_with_an_upgrade_header_the_parser_accepted() -> None:
    req = head([HOST, (b"Upgrade", b"websocket")], upgrade=True)
    assert req.upgrade == b"websocket"
    plain = head([HOST, (b"Upgrade", b"h2c"), (b"Content-Length", b"4")])
    assert plain.upgrade is None and plain.framing.body is Body.LENGTH
    refused(
        400,
        "Upgrade request with a body",
        [HOST, (b"Upgrade", b"h2c"), (b"Content-Length", b"400")],
        upgrade=True,
    )


@pytest.mark.parametrize("version", ["2.0", "0.9"])
def test_http_versions_other_than_1x_are_505(version: str) -> None:
    refused(505, "HTTP version not supported", [HOST], version=version)


def test_asterisk_form_is_for_options_only() -> None:
    refused(400, "invalid request target", [HOST], url=b"*")


def test_duplicate_endpoint_headers_are_400() -> None:
    refused(
        400,
        "duplicate x-pico-endpoint header",
        [HOST, (b"x-pico-endpoint", b"a"), (b"x-pico-endpoint", b"b")],
    )
