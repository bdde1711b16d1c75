"""`make demo`: a local 3-node Pico cluster behind a load balancer, a sample service and an agent.

No docker and no root: the nodes listen on 127.0.0.11-13 (ports 8000-8003 each), the load
balancer (nginx when installed, else `pico dev lb`) on localhost:8000-8002, as in the getting
started guide, and Prometheus on localhost:9090 when it is installed. Everything stops within
2 s on Ctrl-C, SIGINT or SIGTERM, and dies with the demo if it is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from pico.devtools.nginx import nginx_binary
from pico.devtools.nginx import render as render_nginx

_SERVICE_PORT = 4000
_READY_TIMEOUT = 20.0
# Ctrl-C stops the demo within 2 s: nodes drain for up to 1 s, whatever is left at 1.2 s
# (the agent still waiting for nodes that are gone) is killed.
_NODE_GRACE = "1s"
_STOP_GRACE = 1.2
_PR_SET_PDEATHSIG = 1
PROMETHEUS_ADDR = "127.0.0.1:9090"
AGENT_ADMIN = "127.0.0.1:9000"


def _pico(*args: str) -> list[str]:
    return [sys.executable, "-m", "pico", *args]


def _wait_http(url: str, ok: Sequence[int] = (200,), timeout: float = _READY_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status in ok:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _wait_endpoint(admin: str, endpoint: str, timeout: float = _READY_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{admin}/status/proxy/endpoints", timeout=1) as resp:
                if endpoint.encode() in resp.read():
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


class Processes:
    """Child processes started by the demo, stopped together.

    Each child runs in its own process group (Ctrl-C reaches only the demo, which then stops
    them in order) and is killed by the kernel if the demo dies first (PR_SET_PDEATHSIG):
    however the demo ends, nothing it started keeps running.
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], cwd: str | None = None) -> None:
        log = (self.logdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
        self.procs.append((name, proc))

    def check(self) -> str | None:
        """The name of a process that exited, if any."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                return name
        return None

    def stop(self, grace: float = _STOP_GRACE) -> None:
        """SIGTERM everything at once, SIGKILL what is left after `grace` seconds."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A `preexec_fn`: the child gets SIGKILL when the demo dies (Linux); elsewhere a no-op."""

    def arm() -> None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the demo died before the prctl: nobody would kill us
            os._exit(1)

    return arm


NODES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")


def _start_lb(procs: Processes, choice: str, logdir: Path) -> str:
    nginx = nginx_binary()
    if choice == "nginx" or (choice == "auto" and nginx is not None):
        if nginx is None:
            raise SystemExit("demo: nginx is not installed (use --lb builtin)")
        prefix = logdir / "nginx"
        prefix.mkdir()
        conf = render_nginx(prefix, NODES, single_process=True)
        procs.start("load-balancer", [nginx, "-c", str(conf), "-p", str(prefix)])
        return "nginx"
    routes = []
    for port in (8000, 8001, 8002):
        backends = ",".join(f"{ip}:{port}" for ip in NODES)
        routes += ["--route", f"127.0.0.1:{port}={backends}"]
    procs.start("load-balancer", _pico("dev", "lb", *routes))
    return "pico dev lb"


def run_demo(lb: str = "auto") -> int:
    """Start everything, print the commands to try, wait for Ctrl-C. Returns an exit code."""
    logdir = Path(tempfile.mkdtemp(prefix="pico-demo-"))
    site = logdir / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>Hello from the service behind Pico</h1>\n")
    procs = Processes(logdir)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # SIGTERM (docker stop, kill) and SIGINT sent to the demo alone clean up like Ctrl-C (a
    # demo started in the background inherits SIGINT ignored: set it whatever it was).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    join = ",".join(f"{ip}:8003" for ip in NODES)
    try:
        procs.start(
            "service",
            [sys.executable, "-m", "http.server", str(_SERVICE_PORT), "--bind", "127.0.0.1"],
            cwd=str(site),
        )
        for i, ip in enumerate(NODES, start=1):
            procs.start(
                f"pico-{i}",
                _pico(
                    "server",
                    "--cluster.node-id-prefix",
                    f"pico-{i}-",
                    "--cluster.join",
                    join,
                    "--proxy.bind-addr",
                    f"{ip}:8000",
                    "--upstream.bind-addr",
                    f"{ip}:8001",
                    "--admin.bind-addr",
                    f"{ip}:8002",
                    "--gossip.bind-addr",
                    f"{ip}:8003",
                    "--server.graceful-shutdown-timeout",
                    _NODE_GRACE,
                ),
            )
        for ip in NODES:
            if not _wait_http(f"http://{ip}:8002/ready"):
                return _failed(procs, logdir, f"the node on {ip} did not become ready")
        balancer = _start_lb(procs, lb, logdir)
        if not _wait_http("http://127.0.0.1:8002/ready"):
            return _failed(procs, logdir, "the load balancer did not start")
        procs.start(
            "agent",
            _pico(
                "agent",
                "--endpoints",
                f"my-endpoint/localhost:{_SERVICE_PORT}",
                "--admin.bind-addr",
                AGENT_ADMIN,
            ),
        )
        if not _wait_registered():
            return _failed(procs, logdir, "the agent did not register my-endpoint")
        metrics = _start_prometheus(procs, logdir)
        print(_BANNER.format(logdir=logdir, balancer=balancer, metrics=metrics), flush=True)
        while True:
            exited = procs.check()
            if exited:
                return _failed(procs, logdir, f"{exited} exited unexpectedly")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        procs.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def prometheus_config() -> dict[str, object]:
    """Scrape the three nodes and the agent every second (the demo wants live numbers)."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "pico", "static_configs": [{"targets": [f"{ip}:8002" for ip in NODES]}]},
            {"job_name": "pico-agent", "static_configs": [{"targets": [AGENT_ADMIN]}]},
        ],
    }


def _start_prometheus(procs: Processes, logdir: Path) -> str:
    """Start Prometheus when it is installed; the banner line that says where (or how)."""
    binary = shutil.which("prometheus")
    if binary is None:
        return "  (install prometheus to get it here on :9090; deploy/ has Grafana dashboards)"
    config = logdir / "prometheus.yml"
    config.write_text(json.dumps(prometheus_config()))  # JSON is YAML
    procs.start(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={logdir / 'prometheus'}",
            f"--web.listen-address={PROMETHEUS_ADDR}",
            "--log.level=warn",
        ],
    )
    if not _wait_http(f"http://{PROMETHEUS_ADDR}/-/ready"):
        return "  (prometheus did not start: see its log)"
    return "  metrics  http://localhost:9090   (Prometheus, scraping the nodes and the agent)"


def _wait_registered() -> bool:
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        if any(_wait_endpoint(f"http://{ip}:8002", "my-endpoint", 0.2) for ip in NODES):
            return True
    return False


def _failed(procs: Processes, logdir: Path, why: str) -> int:
    print(f"demo failed: {why}; logs in {logdir}", file=sys.stderr)
    for name, _ in procs.procs:
        tail = (logdir / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
        for line in tail:
            print(f"  {name}: {line}", file=sys.stderr)
    return 1


_BANNER = """
Pico demo is running: 3 nodes (127.0.0.11-13) behind a load balancer ({balancer}):
  proxy    http://localhost:8000   (client requests)
  upstream http://localhost:8001   (agent tunnels)
  admin    http://localhost:8002   (metrics, status, health)
  service  http://localhost:4000   (python3 -m http.server), registered as endpoint my-endpoint
{metrics}

Try:
  curl http://localhost:8000 -H "x-pico-endpoint: my-endpoint"
  curl --connect-to my-endpoint.example.com:8000:localhost:8000 http://my-endpoint.example.com:8000
  .venv/bin/pico status cluster nodes
  .venv/bin/pico status proxy endpoints --forward <node id with endpoints: 1>
  curl http://localhost:8002/metrics

Logs: {logdir}
Press Ctrl-C to stop.
"""
