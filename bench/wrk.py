"""Running wrk and parsing its `--latency` report."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {"B": 1.0, "KB": 1024.0, "MB": 1024.0**2, "GB": 1024.0**3, "TB": 1024.0**4}


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    bytes_per_sec: float  # wrk's Transfer/sec, in bytes
    p50: float  # seconds
    p99: float  # seconds
    socket_errors: dict[str, int]
    non_2xx: int
    raw: str

    @property
    def mib_per_sec(self) -> float:
        return self.bytes_per_sec / 1024.0**2

    def problems(self) -> list[str]:
        out = [f"{name} errors {n}" for name, n in self.socket_errors.items() if n]
        if self.non_2xx:
            out.append(f"non-2xx/3xx {self.non_2xx}")
        if self.requests == 0:
            out.append("no requests completed")
        return out


def _time(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"cannot parse wrk time {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def _size(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(B|KB|MB|GB|TB)", text)
    if not m:
        raise ValueError(f"cannot parse wrk size {text!r}")
    return float(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse(out: str) -> WrkResult:
    """Parse wrk 4.x output (run with --latency)."""
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    total = re.search(r"^\s*(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read", out, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    tps = re.search(r"^Transfer/sec:\s+([\d.]+\w+)", out, re.M)
    if not (total and rps and tps and "50" in lat and "99" in lat):
        raise ValueError(f"unexpected wrk output:\n{out}")
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors = dict(zip(errors, map(int, sock.groups()), strict=True))
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        requests=int(total.group(1)),
        seconds=_time(total.group(2)),
        rps=float(rps.group(1)),
        bytes_per_sec=_size(tps.group(1)),
        p50=_time(lat["50"]),
        p99=_time(lat["99"]),
        socket_errors=errors,
        non_2xx=int(non.group(1)) if non else 0,
        raw=out,
    )


def wrk_argv(
    wrk: str, url: str, duration: float, headers: dict[str, str], connections: int = 50
) -> list[str]:
    seconds = max(1, math.ceil(duration))  # wrk takes whole seconds only
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    return [*argv, url]
