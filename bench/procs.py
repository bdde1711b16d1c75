"""Child processes (each in its own process group), free ports and readiness probes."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class BenchError(RuntimeError):
    """A setup could not be started or checked; the message says why."""


def free_port(host: str) -> int:
    """A TCP port that is free on `host` right now (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(
    host: str, port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, bytes]:
    """One GET; returns (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_until(
    what: str, probe: Callable[[], bool], timeout: float, check: Callable[[], None]
) -> None:
    """Poll `probe` every 50 ms until it is true; `check` raises if a process died meanwhile."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        check()
        try:
            if probe():
                return
        except (OSError, http.client.HTTPException, ValueError) as exc:
            last = exc
        time.sleep(0.05)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


@dataclass
class Proc:
    """A started child: its name (for messages), Popen and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ProcessGroup:
    """Every process the benchmark started; `stop_all` kills what is left (process groups)."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: Ctrl-C reaches only us, we kill it
                env=env,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def check_alive(self, *procs: Proc) -> None:
        """Raise BenchError (with the log tail) if one of `procs` has exited."""
        for proc in procs:
            code = proc.popen.poll()
            if code is not None:
                tail = proc.log_tail()
                last = tail.splitlines()[-1].strip() if tail else "(no output)"
                raise BenchError(
                    f"{proc.name} exited with code {code}: {last}\nlast log lines:\n{tail}"
                )

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL it after `grace` seconds."""
        if proc in self.procs:
            self.procs.remove(proc)
        pgid = proc.popen.pid  # start_new_session: pgid == pid
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group (nginx workers, a stuck leader) gets SIGKILL.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(2.0)

    def stop_all(self, keep: Sequence[Proc] = ()) -> None:
        for proc in reversed(list(self.procs)):
            if proc not in keep:
                self.stop(proc)
