"""Body framing decided from the parsed head: the pure rules, one direction at a time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pico.http.framing import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    BadRequest,
    BadResponse,
    Body,
    Framing,
    request_framing,
    response_framing,
)


def req(
    cls: list[bytes] | None = None,
    tes: list[bytes] | None = None,
    *,
    version: str = "1.1",
    upgrade: bool = False,
) -> Framing:
    return request_framing(version, cls or [], tes or [], upgrade=upgrade)


def rejected(status: int, message: str, **kwargs: object) -> None:
    with pytest.raises(BadRequest) as err:
        req(**kwargs)  # type: ignore[arg-type]
    assert (err.value.status, err.value.message) == (status, message)


def test_request_without_framing_has_no_body() -> None:
    assert req() is NO_BODY


@pytest.mark.parametrize(
    ("values", "length"),
    [([b"0"], 0), ([b"12"], 12), ([b"12", b"12"], 12), ([b"7, 7"], 7), ([b"007"], 7)],
)
def test_request_content_length_values_that_agree_give_one_length(
    values: list[bytes], length: int
) -> None:
    assert req(values) == Framing(Body.LENGTH, length)


@pytest.mark.parametrize(
    "values",
    [[b"4", b"5"], [b"4, 5"], [b"+3"], [b"-1"], [b"0x10"], [b""], [b"1 2"], [b"9" * 19]],
)
def test_request_content_length_that_is_not_one_number_is_400(values: list[bytes]) -> None:
    rejected(400, "conflicting Content-Length headers", cls=values)


def test_request_chunked_is_chunked_with_any_case_and_whitespace() -> None:
    assert req(tes=[b"chunked"]) is CHUNKED
    assert req(tes=[b" Chunked\t"]) is CHUNKED


def test_request_with_content_length_and_transfer_encoding_is_400() -> None:
    rejected(400, "both Content-Length and Transfer-Encoding", cls=[b"3"], tes=[b"chunked"])


@pytest.mark.parametrize(
    "tes", [[b"xchunked"], [b"chunked, identity"], [b"identity"], [b"gzip"], [b""], [b","]]
)
def test_request_transfer_encoding_not_ending_in_chunked_is_400(tes: list[bytes]) -> None:
    rejected(400, "Transfer-Encoding does not end in chunked", tes=tes)


@pytest.mark.parametrize("tes", [[b"chunked", b"chunked"], [b"chunked, chunked"]])
def test_request_chunked_twice_is_400(tes: list[bytes]) -> None:
    rejected(400, "chunked applied more than once", tes=tes)


@pytest.mark.parametrize("tes", [[b"gzip, chunked"], [b"gzip", b"chunked"], [b"br,chunked"]])
def test_request_codings_other_than_chunked_are_501(tes: list[bytes]) -> None:
    rejected(501, "unsupported transfer coding", tes=tes)


def test_request_transfer_encoding_in_http10_is_400() -> None:
    rejected(400, "Transfer-Encoding in an HTTP/1.0 request", tes=[b"chunked"], version="1.0")


def test_upgrade_request_with_a_body_is_400_and_without_one_passes() -> None:
    rejected(400, "Upgrade request with a body", cls=[b"400"], upgrade=True)
    rejected(400, "Upgrade request with a body", tes=[b"chunked"], upgrade=True)
    assert req([b"0"], upgrade=True) == Framing(Body.LENGTH, 0)
    assert req(upgrade=True) is NO_BODY


def resp(
    status: int = 200,
    cls: list[bytes] | None = None,
    tes: list[bytes] | None = None,
    method: bytes = b"GET",
) -> Framing:
    return response_framing(method, status, cls or [], tes or [])


def test_response_framing_by_content_length_chunked_or_close() -> None:
    assert resp(cls=[b"5"]) == Framing(Body.LENGTH, 5)
    assert resp(tes=[b"chunked"]) is CHUNKED
    assert resp() is UNTIL_CLOSE


def test_response_keeps_codings_applied_before_chunked() -> None:
    assert resp(tes=[b"gzip, chunked"]) == Framing(Body.CHUNKED, codings=b"gzip")
    assert resp(tes=[b"GZIP", b"chunked"]) == Framing(Body.CHUNKED, codings=b"gzip")


@pytest.mark.parametrize(
    ("cls", "tes"),
    [
        ([b"5"], [b"chunked"]),
        ([b"5", b"6"], []),
        ([b"x"], []),
        ([], [b"gzip"]),
        ([], [b"chunked, gzip"]),
        ([], [b"chunked", b"chunked"]),
    ],
)
def test_ambiguous_response_framing_is_refused(cls: list[bytes], tes: list[bytes]) -> None:
    with pytest.raises(BadResponse):
        resp(cls=cls, tes=tes)


@pytest.mark.parametrize(("status", "method"), [(204, b"GET"), (304, b"GET"), (200, b"HEAD")])
def test_bodiless_responses_have_no_body_whatever_they_state(status: int, method: bytes) -> None:
    framing = resp(status, cls=[b"10"], method=method)
    assert framing.body is Body.NONE
    assert framing.stated_length == (None if status == 204 else b"10")
    assert resp(status, tes=[b"chunked"], method=method).body is Body.NONE


@given(
    st.lists(st.sampled_from([b"chunked", b"gzip", b"identity", b"x", b" ", b""]), max_size=4),
    st.lists(st.sampled_from([b"0", b"3", b"4", b"+3", b"3,3", b""]), max_size=3),
    st.sampled_from(["1.0", "1.1"]),
    st.booleans(),
)
def test_a_request_framing_is_unambiguous_or_refused(
    tes: list[bytes], cls: list[bytes], version: str, upgrade: bool
) -> None:
    """Whatever the fields, the answer is one framing both parties agree on, or a refusal."""
    try:
        framing = request_framing(version, cls, tes, upgrade=upgrade)
    except BadRequest as exc:
        assert exc.status in (400, 501)
        return
    if framing.body is Body.CHUNKED:
        assert not cls and version == "1.1" and not upgrade
    elif framing.body is Body.LENGTH:
        assert not tes and len({int(v) for c in cls for v in c.split(b",")}) == 1
    else:
        assert framing is NO_BODY and not cls and not tes
