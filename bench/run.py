"""`make bench`: wrk against nginx direct, one nginx hop, Pico on one node and through two nodes.

Every setup runs at once (idle while another is measured), and the cases are measured in
rounds: each round measures every setup and size once, so a case and the nginx hop it is
compared with are measured minutes apart at most, under the same machine load. A ratio is the
median of the per-round ratios; the other columns are the median run.

Environment: BENCH_DURATION (seconds per run, default 5), BENCH_WARMUP (default 1),
BENCH_CONNECTIONS (default 50), BENCH_REPEAT (rounds, default 5), BENCH_SECURE=1 (Pico with
tokens on the proxy and upstream ports and gossip keys: what an Internet-facing cluster runs),
BENCH_TLS=1 (the tunnels over wss: the agent copies instead of splicing), PICO_BENCH_PEERS=DIR
(Piko one node and forwarded, and frp, from the `piko`, `frps` and `frpc` in DIR, in the same
rounds; `x pico` is each setup over Pico on one node). The TCP rows (bench.tcp: 1 MiB
transfers through `pico forward tcp` and `pico agent tcp` against an nginx `stream` proxy)
run in the same rounds: BENCH_TCP=0 leaves them out, BENCH_TCP_CONNECTIONS (default 8),
BENCH_TCP_SIZE (bytes per transfer, default 1 MiB); `python -m bench.tcp` runs only them.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from bench import nginx, peers, wrk
from bench.procs import BenchError, Proc, ProcessGroup, free_port, http_get, wait_until
from bench.rss import Sampler
from bench.tcp import TcpBench
from pico.native import build_mode

SIZES: dict[str, int] = {"1 KB": 1024, "1 MB": 1024 * 1024}
PATHS: dict[str, str] = {"1 KB": "/1k.bin", "1 MB": "/1m.bin"}
ORIGIN_HOST = "127.0.0.2"
HOP_HOST = "127.0.0.3"
PICO_HOST = "127.0.0.1"
ENDPOINT = "bench"
HOP = "nginx hop"
# nginx hops in a row, each its own process: the shapes of Pico one node (node, agent) and
# forwarded (node B, node A, agent). Not bars: they show what the topology alone costs.
CHAINS = {2: "nginx 2 hops (one node's shape)", 3: "nginx 3 hops (forwarded's shape)"}
ONE_NODE = "pico one node"
TWO_NODES = "pico two nodes (forwarded)"
# The SDK row: one minimal ASGI app (bench.asgi_app) under uvicorn behind `pico agent`, and
# the same app through pico.sdk.serve_asgi (no port, no agent), each on a node of its own.
UVICORN = "uvicorn behind pico agent"
SDK = "pico.sdk serve_asgi"
# Bars from the task (and DESIGN.md section 7 targets), as ratios to the nginx hop.
BARS = {"req/s @ 1 KB": (0.3, 0.5), "MB/s @ 1 MB": (0.7, 1.0)}
# The SDK's bar (issue 14): its req/s at 1 KB over uvicorn's behind the agent.
SDK_BAR = 0.9


@dataclass
class Config:
    nginx: str
    wrk: str
    pico: str
    duration: float
    warmup: float
    connections: int
    repeat: int


@dataclass
class Setup:
    """A running setup: where wrk points, which processes to sample and keep alive."""

    name: str
    host: str
    port: int
    headers: dict[str, str]
    roles: dict[str, Proc]  # role -> process (tree) sampled for RSS and CPU
    shown: list[str]  # roles whose RSS/CPU are reported (the origin is not, except for direct)


@dataclass
class Case:
    setup: str
    size: str
    result: wrk.WrkResult | None = None
    rss: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    shown: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    note: str = ""  # "skipped ..." or "failed ..." when there is no result
    runs: list[Case] = field(default_factory=list)  # one per round, in order

    def pick_median(self) -> None:
        """Take the median run (by req/s) as the case's result."""
        done = [r for r in self.runs if r.result is not None]
        if not done:
            return
        best = sorted(done, key=lambda r: r.result.rps if r.result else 0.0)[len(done) // 2]
        self.result, self.rss, self.cpu = best.result, best.rss, best.cpu
        self.problems = sorted({p for r in done for p in r.problems})


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        sys.exit(f"bench: {name}={raw!r} is not a number")


def find_tools() -> Config:
    missing = []
    ng = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    wk = shutil.which("wrk")
    if ng is None:
        missing.append("nginx (apt-get install nginx-light, or nginx)")
    if wk is None:
        missing.append("wrk (apt-get install wrk)")
    pico = Path(sys.executable).parent / "pico"
    pico_bin = str(pico) if pico.exists() else shutil.which("pico")
    if pico_bin is None:
        missing.append("pico (pip install -e . in the venv)")
    if missing or ng is None or wk is None or pico_bin is None:
        print("bench: required tools are missing: " + "; ".join(missing), file=sys.stderr)
        sys.exit(1)
    return Config(
        nginx=ng,
        wrk=wk,
        pico=pico_bin,
        duration=env_float("BENCH_DURATION", 5.0),
        warmup=env_float("BENCH_WARMUP", 1.0),
        connections=int(env_float("BENCH_CONNECTIONS", 50)),
        repeat=max(1, int(env_float("BENCH_REPEAT", 5))),
    )


def probe_body(host: str, port: int, headers: dict[str, str]) -> bool:
    """True when every size is served with status 200 and the exact length."""
    for size, path in PATHS.items():
        status, body = http_get(host, port, path, headers)
        if status != 200 or len(body) != SIZES[size]:
            return False
    return True


class ClusterUnavailable(BenchError):
    """The two-node setup started but node B never forwarded: clustering is not there yet."""


class Bench:
    def __init__(self, cfg: Config, tmp: Path) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.procs = ProcessGroup(tmp / "logs")
        self.cases: list[Case] = []
        self.www = tmp / "www"
        self.origin: Setup | None = None
        self.notes: list[str] = []
        # With a secret, Pico runs with tokens on the proxy and upstream ports (HS256): the
        # agent and every request carry one (bench.pair's PAIR_AUTH=1).
        self.auth_secret = ""
        self.auth_token = ""
        self.gossip_key = ""  # with a key, gossip and forwarding are sealed/authenticated
        self.tunnel_ca = ""  # with a CA, the upstream port speaks TLS and agents use wss
        self.tcp: TcpBench | None = None  # the TCP rows, unless BENCH_TCP=0

    def enable_gossip_keys(self) -> None:
        """Seal gossip and sign forwarded requests in the Pico setups started afterwards."""
        import base64

        self.gossip_key = base64.b64encode(os.urandom(32)).decode()

    def enable_tunnel_tls(self) -> None:
        """Serve the upstream port over TLS (a trustme certificate): tunnels are wss."""
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert(PICO_HOST)
        self.tunnel_ca = str(self.tmp / "ca.pem")
        ca.cert_pem.write_to_path(self.tunnel_ca)
        cert.cert_chain_pems[0].write_to_path(str(self.tmp / "cert.pem"))
        cert.private_key_pem.write_to_path(str(self.tmp / "key.pem"))

    def configure_from_env(self) -> None:
        """BENCH_SECURE / PAIR_AUTH: tokens and gossip keys; BENCH_TLS / PAIR_TLS: wss."""
        if "1" in (os.environ.get("BENCH_SECURE"), os.environ.get("PAIR_AUTH")):
            self.enable_auth()
            self.enable_gossip_keys()
            self.notes.append("tokens on the proxy and upstream ports, gossip keys set")
        if "1" in (os.environ.get("BENCH_TLS"), os.environ.get("PAIR_TLS")):
            self.enable_tunnel_tls()
            self.notes.append("tunnels over TLS (wss)")

    def enable_auth(self) -> None:
        """Turn proxy and upstream auth on for the Pico setups started afterwards."""
        import jwt

        self.auth_secret = os.urandom(32).hex()
        self.auth_token = jwt.encode(
            {"exp": int(time.time()) + 86400}, self.auth_secret, algorithm="HS256"
        )

    def _endpoint_headers(self) -> dict[str, str]:
        headers = {"x-pico-endpoint": ENDPOINT}
        if self.auth_token:
            headers["x-pico-authorization"] = f"Bearer {self.auth_token}"
        return headers

    # ---- setups -------------------------------------------------------------------------------

    def start_origin(self) -> Setup:
        self.www.mkdir(mode=0o755)
        for size, path in PATHS.items():
            f = self.www / path.lstrip("/")
            f.write_bytes(os.urandom(SIZES[size]))
            f.chmod(0o644)
        port = free_port(ORIGIN_HOST)
        prefix = self.tmp / "nginx-origin"
        conf = nginx.origin_conf(prefix, self.www, ORIGIN_HOST, port)
        proc = nginx.start(self.procs, self.cfg.nginx, "nginx-origin", prefix, conf)
        wait_until(
            "nginx origin",
            lambda: probe_body(ORIGIN_HOST, port, {}),
            10,
            lambda: self.procs.check_alive(proc),
        )
        return Setup("nginx direct", ORIGIN_HOST, port, {}, {"nginx": proc}, ["nginx"])

    def start_hop(self, origin: Setup, hops: int = 1) -> Setup:
        """The nginx hop to the origin; with `hops` > 1, that many in a row (a chain)."""
        host, port = origin.host, origin.port
        roles: dict[str, Proc] = {}
        for n in range(hops, 0, -1):  # from the origin's end back to the client's
            listen = free_port(HOP_HOST)
            name = "nginx hop" if hops == 1 else f"hop {n}"
            prefix = self.tmp / ("nginx-hop" if hops == 1 else f"nginx-chain{hops}-{n}")
            conf = nginx.hop_conf(prefix, HOP_HOST, listen, host, port)
            roles[name] = nginx.start(self.procs, self.cfg.nginx, prefix.name, prefix, conf)
            host, port = HOP_HOST, listen
        wait_until(
            "nginx hop" if hops == 1 else f"{hops} nginx hops",
            lambda: probe_body(HOP_HOST, port, {}),
            10,
            lambda: self.procs.check_alive(*roles.values()),
        )
        shown = list(reversed(roles))
        roles["origin"] = origin.roles["nginx"]
        return Setup(HOP if hops == 1 else CHAINS[hops], HOP_HOST, port, {}, roles, shown)

    def start_server(self, name: str, join: str | None = None) -> tuple[Proc, dict[str, int]]:
        ports = {k: free_port(PICO_HOST) for k in ("proxy", "upstream", "admin", "gossip")}
        argv = [self.cfg.pico, "server"]
        for k, port in ports.items():
            argv += [f"--{k}.bind-addr", f"{PICO_HOST}:{port}"]
        argv += ["--log.level", "warn", "--server.graceful-shutdown-timeout", "2s"]
        argv += ["--cluster.node-id", name]
        if self.auth_secret:
            for port in ("proxy", "upstream"):
                argv += [f"--{port}.auth.hmac-secret-key", self.auth_secret]
        if self.gossip_key:
            argv += ["--gossip.secret-keys", self.gossip_key]
        if self.tunnel_ca:
            argv += ["--upstream.tls.cert", str(self.tmp / "cert.pem")]
            argv += ["--upstream.tls.key", str(self.tmp / "key.pem")]
        if join:
            argv += ["--cluster.join", join]
        proc = self.procs.start(name, argv)
        admin = ports["admin"]
        wait_until(
            f"{name} admin /health",
            lambda: http_get(PICO_HOST, admin, "/health")[0] == 200,
            15,
            lambda: self.procs.check_alive(proc),
        )
        return proc, ports

    def upstream_url(self, server_ports: dict[str, int]) -> str:
        return f"{'https' if self.tunnel_ca else 'http'}://{PICO_HOST}:{server_ports['upstream']}"

    def start_agent(self, server_ports: dict[str, int], origin: Setup) -> Proc:
        argv = [
            self.cfg.pico,
            "agent",
            "--endpoints",
            f"{ENDPOINT}/{origin.host}:{origin.port}",
            "--server.url",
            self.upstream_url(server_ports),
            "--admin.bind-addr",
            f"{PICO_HOST}:0",
            "--log.level",
            "warn",
        ]
        if self.auth_token:
            argv += ["--auth.api-key", self.auth_token]
        if self.tunnel_ca:
            argv += ["--server.tls.root-ca", self.tunnel_ca]
        return self.procs.start("pico-agent", argv)

    def start_pico_one(self, origin: Setup) -> Setup:
        server, ports = self.start_server("pico-server")
        agent = self.start_agent(ports, origin)
        self.wait_registered(ports, server, agent)
        roles = {"server": server, "agent": agent, "origin": origin.roles["nginx"]}
        return Setup(ONE_NODE, PICO_HOST, ports["proxy"], self._endpoint_headers(), roles,
                     ["server", "agent"])  # fmt: skip

    def wait_registered(self, ports: dict[str, int], *procs: Proc) -> None:
        """Wait until endpoint 'bench' is registered on the node of `ports` and serves both
        sizes; `procs` must stay alive meanwhile."""

        def registered() -> bool:
            status, body = http_get(PICO_HOST, ports["admin"], "/status/proxy/endpoints")
            return status == 200 and ENDPOINT in json.loads(body)

        def alive() -> None:
            self.procs.check_alive(*procs)

        wait_until("endpoint 'bench' to be registered", registered, 15, alive)
        headers = self._endpoint_headers()
        wait_until(
            "a 200 through the tunnel",
            lambda: probe_body(PICO_HOST, ports["proxy"], headers),
            10,
            alive,
        )

    def start_uvicorn(self) -> Setup:
        """bench.asgi_app under uvicorn (httptools, uvloop) on a port, behind `pico agent`."""
        port = free_port(ORIGIN_HOST)
        app = self.procs.start(
            "uvicorn",
            [sys.executable, "-m", "uvicorn", "bench.asgi_app:app", "--host", ORIGIN_HOST,
             "--port", str(port), "--http", "httptools", "--loop", "uvloop",
             "--no-access-log", "--log-level", "warning", "--lifespan", "off"],
        )  # fmt: skip
        wait_until(
            "uvicorn",
            lambda: probe_body(ORIGIN_HOST, port, {}),
            15,
            lambda: self.procs.check_alive(app),
        )
        server, ports = self.start_server("pico-server-uvicorn")
        origin = Setup("uvicorn", ORIGIN_HOST, port, {}, {"uvicorn": app}, ["uvicorn"])
        agent = self.start_agent(ports, origin)
        self.wait_registered(ports, server, agent, app)
        roles = {"server": server, "agent": agent, "uvicorn": app}
        return Setup(UVICORN, PICO_HOST, ports["proxy"], self._endpoint_headers(), roles,
                     ["server", "agent", "uvicorn"])  # fmt: skip

    def start_sdk(self) -> Setup:
        """bench.asgi_app through pico.sdk.serve_asgi: the app is its own agent."""
        server, ports = self.start_server("pico-server-sdk")
        argv = [sys.executable, "-m", "bench.asgi_app", ENDPOINT, self.upstream_url(ports)]
        if self.auth_token:
            argv.append(self.auth_token)
        app = self.procs.start("pico-sdk-app", argv)
        self.wait_registered(ports, server, app)
        roles = {"server": server, "sdk app": app}
        return Setup(SDK, PICO_HOST, ports["proxy"], self._endpoint_headers(), roles,
                     ["server", "sdk app"])  # fmt: skip

    def start_pico_two(self, origin: Setup) -> Setup:
        server_a, ports_a = self.start_server("pico-node-a")
        agent = self.start_agent(ports_a, origin)
        server_b, ports_b = self.start_server(
            "pico-node-b", join=f"{PICO_HOST}:{ports_a['gossip']}"
        )

        def alive() -> None:
            self.procs.check_alive(server_a, server_b, agent)

        headers = self._endpoint_headers()
        try:
            wait_until(
                "a 200 forwarded by node B to node A",
                lambda: probe_body(PICO_HOST, ports_b["proxy"], headers),
                15,
                alive,
            )
        except BenchError as exc:
            alive()  # a crash is a failure, not a missing feature
            _, body = http_get(PICO_HOST, ports_b["admin"], "/status/cluster/nodes")
            status, reply = http_get(PICO_HOST, ports_b["proxy"], PATHS["1 KB"], headers)
            raise ClusterUnavailable(
                f"node B lists {len(json.loads(body))} cluster node(s) 15 s after "
                f"--cluster.join and answers {status} {reply[:60].decode(errors='replace')!r}"
            ) from exc
        roles = {
            "node B": server_b,
            "node A": server_a,
            "agent": agent,
            "origin": origin.roles["nginx"],
        }
        return Setup(
            TWO_NODES, PICO_HOST, ports_b["proxy"], headers, roles, ["node B", "node A", "agent"]
        )

    def stop(self, setup: Setup, keep: Proc | None = None) -> None:
        for proc in setup.roles.values():
            if proc is not keep:
                self.procs.stop(proc)

    # ---- measuring ----------------------------------------------------------------------------

    def run_wrk(self, setup: Setup, size: str, duration: float) -> wrk.WrkResult:
        url = f"http://{setup.host}:{setup.port}{PATHS[size]}"
        argv = wrk.wrk_argv(self.cfg.wrk, url, duration, setup.headers, self.cfg.connections)
        proc = self.procs.start("wrk", argv)
        try:
            proc.popen.wait(duration + 30)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not finish: {' '.join(argv)}") from None
        finally:
            self.procs.stop(proc)
        out = proc.log_path.read_text(errors="replace")
        proc.log_path.unlink()
        if proc.popen.returncode != 0:
            raise BenchError(f"wrk exited with {proc.popen.returncode}: {out.strip()}")
        return wrk.parse(out)

    def measure_once(self, setup: Setup, case: Case, warmup: bool) -> None:
        """One run of `case` on `setup`, appended to case.runs (a failure ends the case)."""
        if case.note:
            return
        try:
            if warmup and self.cfg.warmup > 0:
                self.run_wrk(setup, case.size, self.cfg.warmup)
            run = Case(setup.name, case.size, shown=setup.shown)
            roles = {role: proc.pid for role, proc in setup.roles.items()}
            with Sampler(roles) as sampler:
                run.result = self.run_wrk(setup, case.size, self.cfg.duration)
            run.rss, run.cpu = sampler.peak_rss(), sampler.cpu_seconds()
            run.problems = run.result.problems()
            case.runs.append(run)
            self.procs.check_alive(*setup.roles.values())
        except BenchError as failure:
            exc = failure
            try:  # a dead process explains a wrk failure better than wrk does
                self.procs.check_alive(*setup.roles.values())
            except BenchError as dead:
                exc = dead
            case.note = f"failed: {first_line(exc)}"
            print(f"bench: {setup.name} {case.size}: {exc}", file=sys.stderr)
            return
        print(
            f"  round {len(case.runs)} {setup.name:28} {case.size}: {summary(run)}",
            file=sys.stderr,
            flush=True,
        )

    def attempt(self, name: str, start: Callable[[], Setup]) -> Setup | None:
        """Start a setup; on failure stop what it started, record both sizes, and go on."""
        print(f"bench: starting {name}", file=sys.stderr, flush=True)
        running = list(self.procs.procs)
        try:
            setup: Setup = start()
            return setup
        except ClusterUnavailable as exc:
            print(f"bench: {name} skipped: {exc}", file=sys.stderr)
            self.notes.append(f"{name}: skipped (cluster not available): {exc}")
            note = "skipped (cluster not available)"
        except BenchError as exc:
            print(f"bench: {name} failed to start: {exc}", file=sys.stderr)
            note = f"failed to start: {first_line(exc)}"
        self.procs.stop_all(keep=running)
        for size in SIZES:
            self.cases.append(Case(name, size, note=note))
        return None

    def run(self) -> None:
        origin = self.origin = self.start_origin()
        print("bench: nginx origin ready", file=sys.stderr, flush=True)
        setups: list[Setup] = [origin]
        for name, start in (
            (HOP, lambda: self.start_hop(origin)),
            *((name, lambda n=n: self.start_hop(origin, n)) for n, name in CHAINS.items()),
            (ONE_NODE, lambda: self.start_pico_one(origin)),
        ):
            started = self.attempt(name, start)
            if started:
                setups.append(started)
        if cluster_available(self.cfg.pico):
            two = self.attempt(TWO_NODES, lambda: self.start_pico_two(origin))
            if two:
                setups.append(two)
        else:
            for size in SIZES:
                self.cases.append(Case(TWO_NODES, size, note="skipped (cluster not available)"))
        if not self.tunnel_ca:  # the SDK row (the bench app takes no CA)
            for name, start in ((UVICORN, self.start_uvicorn), (SDK, self.start_sdk)):
                started = self.attempt(name, start)
                if started:
                    setups.append(started)
        folder = peers.peers_dir()
        if folder is not None:
            for name, start_peer in (
                (peers.PIKO_ONE, peers.start_piko_one),
                (peers.PIKO_TWO, peers.start_piko_two),
                (peers.FRP, peers.start_frp),
            ):
                started = self.attempt(
                    name, lambda start_peer=start_peer: start_peer(self, folder, origin)
                )
                if started:
                    setups.append(started)
        if os.environ.get("BENCH_TCP", "1") != "0":
            self.tcp = TcpBench(self)
            self.tcp.start()
        measured = [
            (setup, Case(setup.name, size, shown=setup.shown)) for setup in setups for size in SIZES
        ]
        self.cases[:0] = [case for _, case in measured]
        for round_no in range(self.cfg.repeat):
            print(f"bench: round {round_no + 1} of {self.cfg.repeat}", file=sys.stderr, flush=True)
            for setup, case in measured:
                self.measure_once(setup, case, warmup=round_no == 0)
            if self.tcp is not None:
                self.tcp.measure_round(warmup=round_no == 0)
        for _, case in measured:
            case.pick_median()
        names = ("nginx direct", HOP, *CHAINS.values(), ONE_NODE, TWO_NODES, UVICORN, SDK,
                 *peers.NAMES)  # fmt: skip
        order = {name: i for i, name in enumerate(names)}
        self.cases.sort(key=lambda c: (order.get(c.setup, 9), list(SIZES).index(c.size)))
        for setup in reversed(setups):
            self.stop(setup)


def cluster_available(pico: str) -> bool:
    try:
        out = subprocess.run(
            [pico, "server", "-h"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--cluster.join" in out


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def summary(case: Case) -> str:
    r = case.result
    if r is None:
        return case.note
    flag = f"  [{', '.join(case.problems)}]" if case.problems else ""
    return f"{r.rps:,.0f} req/s, {r.mib_per_sec:,.1f} MB/s, p99 {fmt_time(r.p99)}{flag}"


def round_ratios(case: Case, hop: Case | None, metric: str) -> list[float]:
    """`case` over the nginx hop, round by round (runs of the same round pair up)."""
    if hop is None:
        return []
    out = []
    for mine, base in zip(case.runs, hop.runs, strict=False):
        if mine.result is not None and base.result is not None:
            value, ref = getattr(mine.result, metric), getattr(base.result, metric)
            if ref:
                out.append(value / ref)
    return out


def ratio(case: Case, hop: Case | None, metric: str) -> float | None:
    """The median of the per-round ratios (None without a hop to compare with)."""
    values = sorted(round_ratios(case, hop, metric))
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"


def cpu_per_req(case: Case) -> str:
    if case.result is None or not case.result.requests:
        return ""
    used = sum(case.cpu.get(role, 0.0) for role in case.shown)
    return f"{used / case.result.requests * 1e6:,.1f}"


def render(cases: list[Case], cfg: Config, notes: list[str], tcp: TcpBench | None = None) -> str:
    hop = {c.size: c for c in cases if c.setup == HOP and c.result}
    pico = {c.size: c for c in cases if c.setup == ONE_NODE and c.result}
    lines = [
        "# Pico bench",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} · {platform.node()} · {os.cpu_count()} CPUs · "
        f"wrk -t1 -c{cfg.connections} -d{cfg.duration:g}s --latency (warm-up {cfg.warmup:g}s"
        f") · {cfg.repeat} round(s), each measuring every case once; values are the median "
        "run, ratios (x) the median of the per-round ratios to the nginx hop · MB = MiB as wrk "
        "reports it · CPU µs/req and peak RSS cover the processes named in the RSS column (not "
        f"the origin nginx, except for nginx direct) · pico build: {build_mode()} "
        "(`make bench` measures the mypyc build; `BENCH_PURE=1` the plain sources)",
        "",
        "| setup | size | req/s | x hop | x pico | p50 | p99 | MB/s | x hop | CPU µs/req "
        "| peak RSS (MB) | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for c in cases:
        r = c.result
        if r is None:
            lines.append(f"| {c.setup} | {c.size} | {c.note} | | | | | | | | | |")
            continue
        base = hop.get(c.size)
        rss = ", ".join(f"{role} {c.rss.get(role, 0) / 2**20:.1f}" for role in c.shown)
        errors = "**" + "; ".join(c.problems) + "**" if c.problems else "none"
        lines.append(
            f"| {c.setup} | {c.size} | {r.rps:,.0f} | {fmt_ratio(ratio(c, base, 'rps'))} "
            f"| {fmt_ratio(ratio(c, pico.get(c.size), 'rps'))} | {fmt_time(r.p50)} "
            f"| {fmt_time(r.p99)} | {r.mib_per_sec:,.1f} "
            f"| {fmt_ratio(ratio(c, base, 'mib_per_sec'))} | {cpu_per_req(c)} "
            f"| {rss} | {errors} |"
        )
    lines += [
        "",
        "| bar (vs nginx hop) | setup | ratio | per round | task bar | result | DESIGN §7 "
        "| result |",
        "|---|---|--:|---|--:|---|--:|---|",
    ]
    for setup in (ONE_NODE, TWO_NODES):
        for bar, (task, design) in BARS.items():
            size = "1 KB" if "1 KB" in bar else "1 MB"
            m = next((x for x in cases if x.setup == setup and x.size == size), None)
            base = hop.get(size)
            metric = "rps" if "req/s" in bar else "mib_per_sec"
            value = ratio(m, base, metric) if m is not None and m.result is not None else None
            if m is None or value is None:
                lines.append(f"| {bar} | {setup} | n/a | | {task} | n/a | {design} | n/a |")
                continue
            rounds = ", ".join(f"{v:.2f}" for v in round_ratios(m, base, metric))
            ok = "PASS" if value >= task and not m.problems else "FAIL"
            ok_d = "PASS" if value >= design and not m.problems else "FAIL"
            lines.append(
                f"| {bar} | {setup} | {value:.2f}x | {rounds} | {task}x | {ok} | {design}x "
                f"| {ok_d} |"
            )
    lines += sdk_bar(cases)
    if tcp is not None:
        lines += tcp.render()
    if notes:
        lines += ["", *(f"* {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def sdk_bar(cases: list[Case]) -> list[str]:
    """The SDK's bar: its req/s at 1 KB over uvicorn's behind the agent, round by round."""
    sdk = next((c for c in cases if c.setup == SDK and c.size == "1 KB" and c.result), None)
    base = next((c for c in cases if c.setup == UVICORN and c.size == "1 KB" and c.result), None)
    value = ratio(sdk, base, "rps") if sdk is not None else None
    if sdk is None or value is None:
        header = f"| bar (vs {UVICORN}) | setup | ratio |"
        return ["", header, "|---|---|--:|", f"| req/s @ 1 KB | {SDK} | n/a |"]
    rounds = ", ".join(f"{v:.2f}" for v in round_ratios(sdk, base, "rps"))
    ok = "PASS" if value >= SDK_BAR and not sdk.problems else "FAIL"
    return [
        "",
        f"| bar (vs {UVICORN}) | setup | ratio | per round | bar | result |",
        "|---|---|--:|---|--:|---|",
        f"| req/s @ 1 KB | {SDK} | {value:.2f}x | {rounds} | {SDK_BAR}x | {ok} |",
    ]


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    cfg = find_tools()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    tmp = Path(tempfile.mkdtemp(prefix="pico-bench-"))
    tmp.chmod(0o755)  # nginx workers (which may not be our user) read files below it
    (tmp / "logs").mkdir()
    bench = Bench(cfg, tmp)
    bench.configure_from_env()
    ok = False
    try:
        bench.run()
        ok = True
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.procs.stop_all()
        ok = ok and not any(c.note.startswith("failed") for c in bench.cases)
        if bench.tcp is not None:
            ok = ok and not any(c.note.startswith("failed") for c in bench.tcp.cases)
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"bench: logs kept in {tmp / 'logs'}", file=sys.stderr)
    table = render(bench.cases, cfg, bench.notes, bench.tcp)
    print(table)
    out = Path(__file__).resolve().parent / "results" / "latest.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table)
    print(f"bench: written to {out}", file=sys.stderr)
    failed = [c for c in bench.cases if c.note.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
