"""Valid inputs for each target, made with Pico's own encoders: libFuzzer starts from them."""

from __future__ import annotations

from pico.gossip import codec
from pico.gossip.state import DigestEntry, Entry, NodeDelta
from pico.mux.frame import Flags, FrameType, encode_header
from pico.mux.websocket import OP_BINARY, OP_CLOSE, OP_PING, encode_frame


def _mux() -> list[bytes]:
    data, update, ping = FrameType.DATA, FrameType.WINDOW_UPDATE, FrameType.PING
    return [
        encode_header(data, Flags.SYN, 1, 5) + b"hello" + encode_header(data, Flags.FIN, 1, 0),
        encode_header(update, Flags.SYN, 3, 1024)
        + encode_header(data, Flags.NONE, 3, 3)
        + b"abc"
        + encode_header(data, Flags.RST, 3, 1)
        + b"\x02",
        encode_header(ping, Flags.SYN, 0, 7) + encode_header(FrameType.GO_AWAY, 0, 0, 0),
    ]


def _websocket() -> list[bytes]:
    return [
        encode_frame(OP_BINARY, b"x" * 200, mask=False),
        encode_frame(OP_BINARY, b"payload", mask=True) + encode_frame(OP_PING, b"p", mask=True),
        encode_frame(OP_CLOSE, b"\x03\xe8bye", mask=False),
    ]


def _gossip() -> list[bytes]:
    entries = (Entry("proxy_addr", "127.0.0.1:8000", 1), Entry("endpoint:ep", "1", 2))
    delta = NodeDelta("peer", "127.0.0.2:7946", entries, None)
    digest = [DigestEntry("peer", "127.0.0.2:7946", 2, False)]
    return [
        *codec.encode_delta("peer", "127.0.0.2:7946", [delta], 1400, 1),
        codec.encode_digest("peer", "127.0.0.2:7946", True, digest, 1400),
        codec.encode_join("peer", "127.0.0.2:7946", [delta], digest),
        codec.encode_leave("peer", "127.0.0.2:7946", [delta]),
    ]


def _http() -> list[bytes]:
    return [
        b"GET / HTTP/1.1\r\nHost: ep.example.com\r\nx-pico-endpoint: ep\r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: a\r\nx-pico-endpoint: ep\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /2 HTTP/1.1\r\nHost: a\r\nx-pico-endpoint: ep\r\nConnection: close\r\n\r\n",
        b"PUT / HTTP/1.1\r\nHost: a\r\nx-pico-endpoint: ep\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nx-pico-endpoint: ep\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n",
    ]


def _config() -> list[bytes]:
    return [
        b"proxy:\n  bind_addr: 127.0.0.1:8000\n  timeout: 30s\n  auth:\n    hmac_secret_key: k\n"
        b"gossip:\n  interval: 500ms\n  secret_keys: []\ncluster:\n  join: [a:8003, b]\n",
        b"endpoints: [my-endpoint/4000]\nserver:\n  url: https://pico:8001\n  tls:\n"
        b"    insecure_skip_verify: true\nlog:\n  level: debug\n",
    ]


SEEDS: dict[str, list[bytes]] = {
    "mux": _mux(),
    "websocket": _websocket(),
    "gossip": _gossip(),
    "http": _http(),
    "config": _config(),
}
