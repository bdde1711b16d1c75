"""The tunnel's WebSocket upgrade, both ends, with bytes alone (`pico.mux.upgrade`)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

import jwt
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pico.auth import AuthFailure, Token, TokenVerifier
from pico.config import load_config_dict
from pico.config.schema import AuthConfig
from pico.mux.upgrade import (
    MAX_ERROR_BODY,
    MAX_REQUEST_HEAD,
    MAX_RESPONSE_HEAD,
    Accepted,
    ClientHandshake,
    Rejected,
    ServerHandshake,
    State,
    Switched,
    Target,
    accept_response,
    reject_response,
    upgrade_request,
)
from pico.mux.websocket import OP_BINARY, accept_key, encode_frame

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
FRAME = encode_frame(OP_BINARY, b"\x00\x01first frame", mask=True)
CHALLENGE = ((b"WWW-Authenticate", b"Bearer"),)

Result = Accepted | Switched | Rejected | None


def request(
    path: str = "/pico/v1/upstream/ep", method: str = "GET", **changes: str | None
) -> bytes:
    """An upgrade request; `changes` replace (or, with None, drop) headers by name."""
    headers: dict[str, str | None] = {
        "Host": "node:8001",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    headers.update({name.replace("_", "-"): value for name, value in changes.items()})
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items() if value is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client(key: str = KEY) -> ClientHandshake:
    return ClientHandshake(Target.parse("ws://node:8001/pico/v1/upstream/ep"), key=key)


def split(raw: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`raw` cut at each offset in `cuts` (those past its end are ignored)."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(raw)}), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def feed(handshake: ClientHandshake | ServerHandshake, pieces: list[bytes]) -> Result:
    """Feed `pieces` until a result; bytes not fed (the shim hands them to the tunnel) are
    added to its `rest`, so that results of different splits compare equal."""
    for i, piece in enumerate(pieces):
        result = handshake.receive_data(piece)
        if result is not None:
            unread = b"".join(pieces[i + 1 :])
            match result:
                case Switched(rest):
                    return Switched(rest + unread)
                case Accepted(endpoint_id, key, token, rest):
                    return Accepted(endpoint_id, key, token, rest + unread)
            return result
    return None


# --------------------------------------------------------------------------- the request


def test_upgrade_request_asks_for_a_websocket_with_the_extra_headers() -> None:
    handshake = ClientHandshake(
        Target.parse("ws://node:8001/pico/v1/upstream/ep?v=1"),
        {"Authorization": "Bearer t0ken"},
        key=KEY,
    )
    assert handshake.request == (
        b"GET /pico/v1/upstream/ep?v=1 HTTP/1.1\r\n"
        b"Host: node:8001\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Authorization: Bearer t0ken\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("url", "secure", "host", "port", "authority", "path"),
    [
        ("ws://node/pico", False, "node", 80, "node", "/pico"),
        ("wss://node", True, "node", 443, "node", "/"),
        ("https://node:8443/a?b=c", True, "node", 8443, "node:8443", "/a?b=c"),
        ("ws://[::1]:8001/x", False, "::1", 8001, "[::1]:8001", "/x"),
        ("wss://[fe80::1]/x", True, "fe80::1", 443, "[fe80::1]", "/x"),
    ],
)
def test_target_says_where_to_connect_and_what_host_to_name(
    url: str, secure: bool, host: str, port: int, authority: str, path: str
) -> None:
    assert Target.parse(url) == Target(secure, host, port, authority, path)


def test_each_handshake_has_its_own_random_16_byte_key() -> None:
    a, b = client(key=""), client(key="")
    assert a.key != b.key
    assert ServerHandshake().receive_data(a.request) == Accepted("ep", a.key, None, b"")


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer x\r\nX-Forged: 1"}, {"X-A\nB": "v"}])
def test_a_header_with_a_line_break_is_refused_before_sending(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="line break"):
        upgrade_request(Target.parse("ws://node/"), KEY, headers)


# --------------------------------------------------------------------------- the node's end


def test_a_valid_upgrade_request_is_accepted() -> None:
    handshake = ServerHandshake()
    assert handshake.receive_data(request()) == Accepted("ep", KEY, None, b"")
    assert handshake.state is State.DONE


def test_the_query_is_ignored_and_the_path_is_percent_decoded() -> None:
    result = ServerHandshake().receive_data(request("/pico/v1/upstream/my%2Dep?x=1"))
    assert result == Accepted("my-ep", KEY, None, b"")


def test_a_frame_right_after_the_request_is_kept_for_the_tunnel() -> None:
    assert ServerHandshake().receive_data(request() + FRAME) == Accepted("ep", KEY, None, FRAME)


def test_bytes_after_the_head_do_not_count_against_the_head_limit() -> None:
    head = request()
    big_frame = encode_frame(OP_BINARY, b"x" * 100_000, mask=True)
    handshake = ServerHandshake(max_head=len(head))
    assert handshake.receive_data(head + big_frame) == Accepted("ep", KEY, None, big_frame)


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (request(method="POST"), 400, "expected GET for a WebSocket upgrade"),
        (request(Upgrade=None), 400, "expected a WebSocket upgrade"),
        (request(Upgrade="h2c"), 400, "expected a WebSocket upgrade"),
        (request(Connection=None), 400, "expected Connection: Upgrade"),
        (request(Connection="keep-alive"), 400, "expected Connection: Upgrade"),
        (
            request(Sec_WebSocket_Version=None),
            400,
            "unsupported Sec-WebSocket-Version (expected 13)",
        ),
        (
            request(Sec_WebSocket_Version="8"),
            400,
            "unsupported Sec-WebSocket-Version (expected 13)",
        ),
        (request(Sec_WebSocket_Key=None), 400, "missing Sec-WebSocket-Key"),
        (
            request(Sec_WebSocket_Key="c2hvcnQ="),
            400,
            "invalid Sec-WebSocket-Key (expected 16 bytes in base64)",
        ),
        (
            request(Sec_WebSocket_Key="not base64 at all!!!!!!="),
            400,
            "invalid Sec-WebSocket-Key (expected 16 bytes in base64)",
        ),
        (request("/pico/v1/other/ep"), 404, "not found"),
        (request("/"), 404, "not found"),
        (
            request("/pico/v1/upstream/bad!id"),
            400,
            "invalid endpoint id: use 1-128 characters of [A-Za-z0-9._-]",
        ),
        (
            request("/pico/v1/upstream/" + "a" * 129),
            400,
            "invalid endpoint id: use 1-128 characters of [A-Za-z0-9._-]",
        ),
        (
            request("/pico/v1/upstream/"),
            400,
            "invalid endpoint id: use 1-128 characters of [A-Za-z0-9._-]",
        ),
        (
            b"GET /pico/v1/upstream/ep HTTP/1.1\r\nHost: n\r\n\r\n",
            400,
            "expected a WebSocket upgrade",
        ),
    ],
)
def test_each_invalid_request_is_rejected_with_its_reason(
    raw: bytes, status: int, reason: str
) -> None:
    assert ServerHandshake().receive_data(raw) == Rejected(status, reason)


def test_garbage_is_rejected_as_a_malformed_request() -> None:
    result = ServerHandshake().receive_data(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert isinstance(result, Rejected)
    assert result.status == 400 and result.reason.startswith("malformed request: ")


def test_a_plain_request_with_a_body_is_answered_after_its_body() -> None:
    head = b"POST /pico/v1/upstream/ep HTTP/1.1\r\nHost: n\r\nContent-Length: 5\r\n\r\n"
    handshake = ServerHandshake()
    assert handshake.receive_data(head + b"abc") is None
    # What follows the request (a pipelined one) changes nothing.
    result = handshake.receive_data(b"de" + request("/elsewhere"))
    assert result == Rejected(400, "expected GET for a WebSocket upgrade")


def test_a_node_shutting_down_refuses_valid_requests_with_503() -> None:
    handshake = ServerHandshake(accepting=lambda: False)
    assert handshake.receive_data(request()) == Rejected(503, "node shutting down")
    # ...but a path that is not ours is still not found.
    handshake = ServerHandshake(accepting=lambda: False)
    assert handshake.receive_data(request("/")) == Rejected(404, "not found")


def test_an_endless_head_fed_a_byte_at_a_time_is_refused_at_the_limit() -> None:
    raw = b"GET /pico/v1/upstream/ep HTTP/1.1\r\nX-Junk: " + b"j" * MAX_REQUEST_HEAD
    handshake = ServerHandshake()
    for i in range(MAX_REQUEST_HEAD):
        assert handshake.receive_data(raw[i : i + 1]) is None, i
    result = handshake.receive_data(raw[MAX_REQUEST_HEAD : MAX_REQUEST_HEAD + 1])
    assert result == Rejected(431, "request header fields too large (over 16384 bytes)")
    assert handshake.state is State.DONE


def test_a_head_of_exactly_the_limit_is_accepted() -> None:
    raw = request()
    assert ServerHandshake(max_head=len(raw)).receive_data(raw) == Accepted("ep", KEY, None, b"")
    assert ServerHandshake(max_head=len(raw) - 1).receive_data(raw) == Rejected(
        431, f"request header fields too large (over {len(raw) - 1} bytes)"
    )


def test_the_token_check_sees_the_authorization_and_endpoint_and_its_token_is_kept() -> None:
    seen: list[tuple[str | None, str]] = []
    token = Token(expires=123.0, endpoints=("ep",))

    def authorize(authorization: str | None, endpoint_id: str) -> Token:
        seen.append((authorization, endpoint_id))
        return token

    result = ServerHandshake(authorize).receive_data(request(Authorization="Bearer abc"))
    assert result == Accepted("ep", KEY, token, b"")
    assert seen == [("Bearer abc", "ep")]


@pytest.mark.parametrize(
    ("failure", "headers"),
    [
        (AuthFailure(401, "missing token", "missing"), CHALLENGE),
        (AuthFailure(401, "expired token", "expired"), CHALLENGE),
        (AuthFailure(403, "endpoint not permitted", "not_permitted"), ()),
    ],
)
def test_a_refused_token_is_rejected_with_its_status_and_a_challenge_on_401(
    failure: AuthFailure, headers: tuple[tuple[bytes, bytes], ...]
) -> None:
    def authorize(authorization: str | None, endpoint_id: str) -> Token:
        raise failure

    result = ServerHandshake(authorize).receive_data(request())
    assert result == Rejected(failure.status, failure.message, headers)


def test_the_token_is_not_checked_for_a_request_rejected_anyway() -> None:
    calls: list[str] = []

    def authorize(authorization: str | None, endpoint_id: str) -> None:
        calls.append(endpoint_id)

    for raw in (request(method="PUT"), request("/nope"), request(Sec_WebSocket_Key=None)):
        assert isinstance(ServerHandshake(authorize).receive_data(raw), Rejected)
    assert calls == []


def test_the_nodes_token_verifier_plugs_in_as_the_check() -> None:
    secret = "s3cret-for-tests-only-" + "x" * 64
    verifier = TokenVerifier(load_config_dict(AuthConfig, {"hmac_secret_key": secret}))
    exp = int(time.time()) + 60
    token = jwt.encode({"exp": exp, "pico": {"endpoints": ["ep"]}}, secret, algorithm="HS256")
    good = request(Authorization=f"Bearer {token}")
    assert ServerHandshake(verifier.check).receive_data(good) == Accepted(
        "ep", KEY, Token(float(exp), ("ep",)), b""
    )
    other = request("/pico/v1/upstream/other", Authorization=f"Bearer {token}")
    assert ServerHandshake(verifier.check).receive_data(other) == Rejected(
        403, "endpoint not permitted"
    )
    assert ServerHandshake(verifier.check).receive_data(request()) == Rejected(
        401, "missing token", CHALLENGE
    )


def test_the_handshake_takes_no_input_once_decided() -> None:
    handshake = ServerHandshake()
    handshake.receive_data(request())
    with pytest.raises(RuntimeError, match="decided"):
        handshake.receive_data(FRAME)


def test_the_answers_are_a_101_with_the_accept_key_and_a_json_error() -> None:
    assert accept_response(KEY) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ACCEPT.encode() + b"\r\n\r\n"
    )
    head, body = reject_response(Rejected(401, "missing token", CHALLENGE)).split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 401 Unauthorized"
    assert b"WWW-Authenticate: Bearer" in lines and b"Connection: close" in lines
    assert orjson.loads(body) == {"error": "missing token"}


@given(st.sets(st.integers(min_value=1, max_value=len(request()) + len(FRAME) - 1)))
def test_a_request_split_anywhere_gives_the_same_result(cuts: set[int]) -> None:
    raw = request() + FRAME
    assert feed(ServerHandshake(), split(raw, cuts)) == Accepted("ep", KEY, None, FRAME)


# --------------------------------------------------------------------------- the agent's end


SWITCHED = accept_response(KEY)


def answer(status_line: bytes, body: bytes) -> bytes:
    """A response with `body` and its Content-Length."""
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status_line, len(body), body)


def test_a_101_with_the_right_accept_key_switches_and_keeps_what_follows() -> None:
    handshake = client()
    assert handshake.state is State.HEAD
    assert handshake.receive_data(SWITCHED + FRAME) == Switched(FRAME)
    assert handshake.state is State.DONE


def test_a_frame_larger_than_the_head_limit_arriving_with_the_101_is_kept_whole() -> None:
    big_frame = encode_frame(OP_BINARY, b"y" * (2 * MAX_RESPONSE_HEAD), mask=False)
    assert client().receive_data(SWITCHED + big_frame) == Switched(big_frame)


def test_an_error_body_arriving_with_the_head_past_the_head_limit_is_read() -> None:
    body = orjson.dumps({"error": "no"}).ljust(MAX_RESPONSE_HEAD + 10)
    assert client().receive_data(answer(b"400 Bad Request", body)) == Rejected(400, "no")


def test_a_101_with_a_wrong_accept_key_is_rejected() -> None:
    wrong = SWITCHED.replace(ACCEPT.encode(), accept_key("c29tZSBvdGhlciBub25jZQ==").encode())
    assert client().receive_data(wrong) == Rejected(502, "bad Sec-WebSocket-Accept from server")
    missing = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    assert client().receive_data(missing) == Rejected(502, "bad Sec-WebSocket-Accept from server")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: "
            + ACCEPT.encode()
            + b"\r\n\r\n",
            "101 without Upgrade: websocket and Connection: Upgrade",
        ),
        (
            SWITCHED.replace(b"Upgrade: websocket", b"Upgrade: h2c"),
            "101 without Upgrade: websocket",
        ),
    ],
)
def test_a_101_that_is_no_websocket_upgrade_is_malformed(raw: bytes, problem: str) -> None:
    assert client().receive_data(raw) == Rejected(502, f"malformed handshake response: {problem}")


def test_the_nodes_json_error_is_the_reason() -> None:
    answer = reject_response(Rejected(403, "endpoint not permitted"))
    assert client().receive_data(answer) == Rejected(403, "endpoint not permitted")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            answer(
                b"502 Bad Gateway", b"<html>\r\n<b>Bad\t\tGateway</b>\x1b[31m\x00\r\n</html>\r\n"
            ),
            "<html> <b>Bad Gateway</b>[31m </html>",
        ),
        (answer(b"400 Bad Request", b'{"detail": "x"'), '{"detail": "x"'),
        (answer(b"400 Bad Request", b'{"e": 1}\n'), '{"e": 1}'),
        (answer(b"400 Bad Request", b'{"error": 7}'), '{"error": 7}'),
        (
            answer(b"400 Bad Request", "caf\u00e9 \u2603".encode() + b"\xff"),
            "caf\u00e9 \u2603\ufffd",
        ),
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", "Service Unavailable"),
        (b"HTTP/1.1 503 Go Away\r\nContent-Length: 0\r\n\r\n", "Go Away"),
        (b"HTTP/1.1 429 \r\nContent-Length: 0\r\n\r\n", "Too Many Requests"),
        (b"HTTP/1.1 599 \r\nContent-Length: 0\r\n\r\n", "status 599"),
        (
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"err\r\n15\r\nor": "expired token"}\r\n0\r\n\r\n',
            "expired token",
        ),
    ],
)
def test_an_error_without_a_json_message_gets_a_clean_text_reason(raw: bytes, reason: str) -> None:
    status = int(raw.split(b" ")[1])
    assert client().receive_data(raw) == Rejected(status, reason)


def test_a_huge_error_body_is_read_only_to_its_bound() -> None:
    head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1048576\r\n\r\n"
    handshake = client()
    assert handshake.receive_data(head + b"x" * (MAX_ERROR_BODY - 1)) is None
    assert handshake.state is State.BODY
    # The bound is reached: no need to wait for the other ~960 KiB.
    assert handshake.receive_data(b"x" * 100_000) == Rejected(500, "x" * 200)
    assert handshake.state is State.DONE


def test_an_error_body_ended_by_the_close_is_the_reason() -> None:
    handshake = client()
    assert handshake.receive_data(b"HTTP/1.1 502 Bad Gateway\r\n\r\nno upstream") is None
    assert handshake.receive_eof() == Rejected(502, "no upstream")


@pytest.mark.parametrize("raw", [b"", b"HTTP/1.1 200 O", b"HTTP/1.1 101 Switching Protocols\r\n"])
def test_a_close_before_a_whole_head_is_no_answer(raw: bytes) -> None:
    handshake = client()
    assert handshake.receive_data(raw) is None
    assert handshake.receive_eof() is None
    assert handshake.state is State.DONE


@pytest.mark.parametrize(
    "raw", [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"\x88\x02\x03\xe8"]
)
def test_an_answer_that_is_not_http_is_malformed(raw: bytes) -> None:
    result = client().receive_data(raw)
    assert isinstance(result, Rejected)
    assert result.status == 502
    assert result.reason.startswith("malformed handshake response: ")


def test_an_endless_response_head_is_malformed_at_the_limit() -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nX-Junk: " + b"j" * MAX_RESPONSE_HEAD
    handshake = client()
    assert handshake.receive_data(raw[: MAX_RESPONSE_HEAD - 1]) is None
    assert handshake.receive_data(raw[MAX_RESPONSE_HEAD - 1 :]) == Rejected(
        502, f"malformed handshake response: response head over {MAX_RESPONSE_HEAD} bytes"
    )


def test_interim_1xx_responses_are_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\n" + SWITCHED + FRAME
    assert client().receive_data(answer) == Switched(FRAME)


def test_the_client_takes_no_input_once_decided() -> None:
    handshake = client()
    handshake.receive_data(SWITCHED)
    with pytest.raises(RuntimeError, match="decided"):
        handshake.receive_data(FRAME)
    with pytest.raises(RuntimeError, match="decided"):
        handshake.receive_eof()


ANSWERS = [
    (SWITCHED + FRAME, Switched(FRAME)),
    (reject_response(Rejected(401, "expired token", CHALLENGE)), Rejected(401, "expired token")),
    (
        b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"err\r\n15\r\nor": "expired token"}\r\n0\r\n\r\n',
        Rejected(401, "expired token"),
    ),
    (
        b"HTTP/1.1 100 Continue\r\n\r\n" + SWITCHED.replace(ACCEPT.encode(), b"wrong"),
        Rejected(502, "bad Sec-WebSocket-Accept from server"),
    ),
]


@pytest.mark.parametrize(("raw", "expected"), ANSWERS)
def test_an_answer_split_at_every_byte_gives_the_same_result(raw: bytes, expected: Result) -> None:
    for cut in range(len(raw) + 1):
        assert feed(client(), [raw[:cut], raw[cut:]]) == expected, cut
    assert feed(client(), [raw[i : i + 1] for i in range(len(raw))]) == expected


@given(st.sampled_from(ANSWERS), st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_an_answer_split_anywhere_gives_the_same_result(
    case: tuple[bytes, Result], cuts: list[int]
) -> None:
    raw, expected = case
    assert feed(client(), split(raw, cuts)) == expected
