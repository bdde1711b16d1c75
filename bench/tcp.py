"""The bench's TCP rows: 1 MiB transfers through Pico's TCP path and through nginx `stream`.

The measure: `bench.tcpload` keeps BENCH_TCP_CONNECTIONS (default 8) transfers in flight, each
on a new TCP connection that moves 1 MiB one way and ends (download: the service sends it;
upload: the client does, then its FIN), for BENCH_DURATION seconds, in the same rounds as the
HTTP cases. Each transfer pays what a real connection pays: the connect, and for Pico the
WebSocket upgrade and the agent's dial, as wrk's 1 MB row pays its requests. MB/s is completed
transfers x 1 MiB / time; the ratio is Pico over the nginx stream proxy of the same round.
BENCH_TCP_SIZE (bytes, default 1 MiB) changes the transfer size: 16777216 shows the bulk copy
with the per-connection setup mostly amortized.

Pico: client -> `pico forward tcp` -> node proxy port -> tunnel -> `pico agent tcp` ->
service. nginx: client -> nginx `stream { proxy_pass }` -> service. The service is the same
loopback source/sink for both (bench.tcpload serve).

The chain row (client -> nginx -> nginx -> nginx -> service, three nginx processes of one
worker each) has Pico's shape: three relaying processes and four loopback connections instead of
one and two. It is not the bar; it shows how much of the gap is the topology, which no relay
can beat, and how much is Pico's own cost (the ratio "x chain").
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bench import nginx
from bench.procs import BenchError, Proc, free_port, http_get, wait_until
from bench.rss import Sampler

if TYPE_CHECKING:
    from bench.run import Bench

SIZE = int(os.environ.get("BENCH_TCP_SIZE", "") or 1024 * 1024)
LABEL = f"{SIZE / 2**20:g} MiB" if SIZE >= 2**20 else f"{SIZE} B"
DIRECTIONS = ("down", "up")
SERVICE_HOST = "127.0.0.4"
STREAM_HOST = "127.0.0.5"
ENDPOINT = "bench-tcp"
STREAM = "nginx stream"
CHAIN = "nginx stream x3 (Pico's hops)"
PICO = "pico tcp (forward, node, agent)"
BAR = 0.7  # the task's bar: Pico's TCP path >= 0.7x the nginx stream proxy


@dataclass
class TcpSetup:
    name: str
    host: str
    port: int
    roles: dict[str, Proc]  # sampled for CPU and peak RSS


@dataclass
class TcpRun:
    mib_per_sec: float
    transfers: int
    seconds: float
    load_cpu: float  # the load generator's CPU, as a fraction of one core
    errors: int
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds
    rss: dict[str, int] = field(default_factory=dict)


@dataclass
class TcpCase:
    setup: str
    direction: str
    runs: list[TcpRun] = field(default_factory=list)
    note: str = ""

    def median(self) -> TcpRun | None:
        runs = sorted(self.runs, key=lambda r: r.mib_per_sec)
        return runs[len(runs) // 2] if runs else None


def transfer_once(host: str, port: int) -> bool:
    """One download through `host:port`: True if exactly SIZE bytes came back."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"D")
        got = 0
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
        return got == SIZE


class TcpBench:
    """Starts the TCP setups next to the HTTP ones and measures them in the same rounds."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.connections = int(os.environ.get("BENCH_TCP_CONNECTIONS", "8") or 8)
        self.setups: list[TcpSetup] = []
        self.cases: list[TcpCase] = []
        self.service: Proc | None = None

    def start(self) -> None:
        """The service, then each setup; a setup that fails is a note, not the end."""
        procs = self.bench.procs
        port = free_port(SERVICE_HOST)
        argv = [sys.executable, "-m", "bench.tcpload", "serve", SERVICE_HOST, str(port), str(SIZE)]
        service = self.service = procs.start("tcp-service", argv)
        wait_until(
            "the TCP service",
            lambda: transfer_once(SERVICE_HOST, port),
            10,
            lambda: procs.check_alive(service),
        )
        setups = (
            (STREAM, self._start_stream),
            (CHAIN, self._start_chain),
            (PICO, self._start_pico),
        )
        for name, start in setups:
            print(f"bench: starting {name}", file=sys.stderr, flush=True)
            running = list(procs.procs)
            try:
                self.setups.append(start(port))
                self.cases += [TcpCase(name, d) for d in DIRECTIONS]
            except BenchError as exc:
                print(f"bench: {name} failed to start: {exc}", file=sys.stderr)
                procs.stop_all(keep=running)
                note = f"failed to start: {str(exc).splitlines()[0]}"
                self.cases += [TcpCase(name, d, note=note) for d in DIRECTIONS]

    def _start_stream(self, service_port: int) -> TcpSetup:
        procs = self.bench.procs
        if not os.path.exists(nginx.STREAM_MODULE):
            raise BenchError(
                f"{nginx.STREAM_MODULE} is missing (apt-get install libnginx-mod-stream)"
            )
        port = free_port(STREAM_HOST)
        prefix = self.bench.tmp / "nginx-stream"
        conf = nginx.stream_conf(prefix, STREAM_HOST, port, SERVICE_HOST, service_port)
        proc = nginx.start(procs, self.bench.cfg.nginx, "nginx-stream", prefix, conf)
        wait_until(
            "nginx stream", lambda: transfer_once(STREAM_HOST, port), 10,
            lambda: procs.check_alive(proc),
        )  # fmt: skip
        return TcpSetup(STREAM, STREAM_HOST, port, {"nginx": proc})

    def _start_chain(self, service_port: int) -> TcpSetup:
        """Three nginx stream proxies in a row, each its own process, the last to the service."""
        procs = self.bench.procs
        if not os.path.exists(nginx.STREAM_MODULE):
            raise BenchError(
                f"{nginx.STREAM_MODULE} is missing (apt-get install libnginx-mod-stream)"
            )
        roles: dict[str, Proc] = {}
        host, port = SERVICE_HOST, service_port
        for hop in (3, 2, 1):  # from the service back to the client's end
            listen = free_port(STREAM_HOST)
            prefix = self.bench.tmp / f"nginx-chain-{hop}"
            conf = nginx.stream_conf(prefix, STREAM_HOST, listen, host, port)
            roles[f"nginx{hop}"] = nginx.start(procs, self.bench.cfg.nginx, f"nginx-chain-{hop}",
                                               prefix, conf)  # fmt: skip
            host, port = STREAM_HOST, listen
        wait_until(
            "the nginx stream chain", lambda: transfer_once(host, port), 10,
            lambda: procs.check_alive(*roles.values()),
        )  # fmt: skip
        return TcpSetup(CHAIN, host, port, dict(reversed(roles.items())))

    def _start_pico(self, service_port: int) -> TcpSetup:
        bench = self.bench
        procs = bench.procs
        host = "127.0.0.1"
        server, ports = bench.start_server("pico-tcp-server")
        scheme = "https" if bench.tunnel_ca else "http"
        agent_argv = [
            bench.cfg.pico, "agent", "tcp", ENDPOINT, f"{SERVICE_HOST}:{service_port}",
            "--server.url", f"{scheme}://{host}:{ports['upstream']}",
            "--admin.bind-addr", f"{host}:0", "--log.level", "warn",
        ]  # fmt: skip
        forward_port = free_port(host)
        forward_argv = [
            bench.cfg.pico, "forward", "tcp", f"{host}:{forward_port}", ENDPOINT,
            "--server.url", f"http://{host}:{ports['proxy']}", "--log.level", "warn",
        ]  # fmt: skip
        if bench.auth_token:
            agent_argv += ["--auth.api-key", bench.auth_token]
            forward_argv += ["--auth.api-key", bench.auth_token]
        if bench.tunnel_ca:
            agent_argv += ["--server.tls.root-ca", bench.tunnel_ca]
        agent = procs.start("pico-tcp-agent", agent_argv)
        forward = procs.start("pico-forward", forward_argv)

        def alive() -> None:
            procs.check_alive(server, agent, forward)

        def registered() -> bool:
            status, body = http_get(host, ports["admin"], "/status/proxy/endpoints")
            return status == 200 and ENDPOINT in json.loads(body)

        wait_until(f"the agent to register endpoint {ENDPOINT!r}", registered, 15, alive)
        wait_until(
            "a transfer through pico forward", lambda: transfer_once(host, forward_port), 10, alive
        )
        roles = {"forward": forward, "server": server, "agent": agent}
        return TcpSetup(PICO, host, forward_port, roles)

    # ---- measuring ----------------------------------------------------------------------------

    def measure_round(self, warmup: bool) -> None:
        for setup in self.setups:
            for case in self.cases:
                if case.setup == setup.name and not case.note:
                    self._measure(setup, case, warmup)

    def _load(self, setup: TcpSetup, direction: str, seconds: float) -> dict[str, float]:
        argv = [
            sys.executable, "-m", "bench.tcpload", "load", setup.host, str(setup.port),
            str(SIZE), direction, str(self.connections), str(seconds),
        ]  # fmt: skip
        try:
            out = subprocess.run(
                argv, capture_output=True, text=True, timeout=seconds + 30, check=True
            ).stdout
        except (subprocess.SubprocessError, OSError) as exc:
            raise BenchError(f"the TCP load generator failed: {exc}") from None
        result: dict[str, float] = json.loads(out)
        return result

    def _measure(self, setup: TcpSetup, case: TcpCase, warmup: bool) -> None:
        cfg = self.bench.cfg
        try:
            if warmup and cfg.warmup > 0:
                self._load(setup, case.direction, cfg.warmup)
            with Sampler({role: proc.pid for role, proc in setup.roles.items()}) as sampler:
                result = self._load(setup, case.direction, cfg.duration)
            self.bench.procs.check_alive(*setup.roles.values())
        except BenchError as exc:
            case.note = f"failed: {str(exc).splitlines()[0]}"
            print(f"bench: {setup.name} {case.direction}: {exc}", file=sys.stderr)
            return
        run = TcpRun(
            mib_per_sec=result["bytes"] / result["seconds"] / 2**20,
            transfers=int(result["transfers"]),
            seconds=result["seconds"],
            load_cpu=result["cpu_seconds"] / result["seconds"],
            errors=int(result["errors"]),
            cpu=sampler.cpu_seconds(),
            rss=sampler.peak_rss(),
        )
        case.runs.append(run)
        print(
            f"  round {len(case.runs)} {setup.name:32} tcp {LABEL} {case.direction:4}: "
            f"{run.mib_per_sec:,.1f} MB/s, load generator {run.load_cpu:.0%} of a core"
            + (f", {run.errors} errors" if run.errors else ""),
            file=sys.stderr,
            flush=True,
        )

    # ---- the table ----------------------------------------------------------------------------

    def ratios(self, case: TcpCase, against: str = STREAM) -> list[float]:
        """`case` over the setup `against` (the nginx stream proxy), round by round."""
        base = next(
            (c for c in self.cases if c.setup == against and c.direction == case.direction), None
        )
        if base is None:
            return []
        return [
            mine.mib_per_sec / ref.mib_per_sec
            for mine, ref in zip(case.runs, base.runs, strict=False)
            if ref.mib_per_sec
        ]

    def render(self) -> list[str]:
        lines = [
            "",
            f"TCP: {self.connections} concurrent transfers of {LABEL}, each on a new connection "
            "(down: the service sends, up: the client sends); MB/s of completed transfers; "
            "x stream = median of the per-round ratios to the nginx stream proxy (x chain: to the "
            "chain of three); CPU is "
            "seconds per GiB moved, for the processes named",
            "",
            "| setup | direction | MB/s | x stream | per round | x chain | transfers/s | CPU s/GiB "
            "| load generator CPU | peak RSS (MB) | errors |",
            "|---|---|--:|--:|---|--:|--:|---|--:|---|---|",
        ]
        for case in self.cases:
            run = case.median()
            if run is None:
                lines.append(f"| {case.setup} | {case.direction} | {case.note or 'no run'} "
                             "| | | | | | | | |")  # fmt: skip
                continue
            rounds = self.ratios(case)
            mid = statistics.median(rounds) if rounds else None
            chain = self.ratios(case, CHAIN)
            to_chain = f"{statistics.median(chain):.2f}x" if chain else "n/a"
            gib = run.mib_per_sec * run.seconds / 1024
            cpu = (
                ", ".join(f"{role} {sec / gib:.2f}" for role, sec in run.cpu.items()) if gib else ""
            )
            rss = ", ".join(f"{role} {b / 2**20:.1f}" for role, b in run.rss.items())
            lines.append(
                f"| {case.setup} | {case.direction} | {run.mib_per_sec:,.1f} "
                f"| {f'{mid:.2f}x' if mid is not None else 'n/a'} "
                f"| {', '.join(f'{v:.2f}' for v in rounds)} | {to_chain} "
                f"| {run.transfers / run.seconds:,.0f} | {cpu} | {run.load_cpu:.0%} | {rss} "
                f"| {run.errors or 'none'} |"
            )
        lines += ["", "| bar (vs nginx stream) | direction | ratio | task bar | result |",
                  "|---|---|--:|--:|---|"]  # fmt: skip
        for case in self.cases:
            if case.setup != PICO:
                continue
            rounds = self.ratios(case)
            if not rounds:
                lines.append(f"| MB/s @ TCP {LABEL} | {case.direction} | n/a | {BAR}x | n/a |")
                continue
            mid = statistics.median(rounds)  # as bench.run's ratio(): even counts average
            run = case.median()
            ok = "PASS" if mid >= BAR and run is not None and not run.errors else "FAIL"
            lines.append(f"| MB/s @ TCP {LABEL} | {case.direction} | {mid:.2f}x | {BAR}x | {ok} |")
        return lines


def main() -> int:
    """`python -m bench.tcp`: only the TCP rows (the same setups, rounds and table as in
    `python -m bench.run`), with its environment variables."""
    import shutil
    import tempfile
    from pathlib import Path

    from bench.run import Bench, find_tools

    cfg = find_tools()
    tmp = Path(tempfile.mkdtemp(prefix="pico-bench-tcp-"))
    tmp.chmod(0o755)  # nginx workers (which may not be our user) read files below it
    (tmp / "logs").mkdir()
    bench = Bench(cfg, tmp)
    bench.configure_from_env()
    tcp = TcpBench(bench)
    try:
        tcp.start()
        for round_no in range(cfg.repeat):
            print(f"bench: round {round_no + 1} of {cfg.repeat}", file=sys.stderr, flush=True)
            tcp.measure_round(warmup=round_no == 0)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.procs.stop_all()
    failed = any(c.note.startswith("failed") for c in tcp.cases)
    if failed:
        print(f"bench: logs kept in {tmp / 'logs'}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(tcp.render()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
