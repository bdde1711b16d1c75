"""`python -m bench.pair [1k|1m]`: the nginx hop and Pico on one node, measured alternately.

For A/B work on the data path: each pair is measured back to back, so the ratio does not
swing with the machine's load the way separate runs do, and the CPU each Pico process spends
per request (user and system, in µs) shows where a change helped. Environment: PAIRS (default
4), PAIR_DURATION (seconds per run, default 4), PAIR_AUTH=1 (tokens on the proxy and upstream
ports: every request carries one; and gossip keys), PAIR_TLS=1 (the tunnel over wss),
PAIR_SETUP=two (Pico forwarded: the client's node B forwards to node A, which holds the tunnel).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from bench import wrk
from bench.run import Bench, find_tools
from pico.native import build_mode


def main() -> int:
    size = sys.argv[1] if len(sys.argv) > 1 else "1m"
    if size not in ("1k", "1m"):
        print("usage: python -m bench.pair [1k|1m]", file=sys.stderr)
        return 2
    pairs = int(os.environ.get("PAIRS", "4"))
    duration = int(os.environ.get("PAIR_DURATION", "4"))
    cfg = find_tools()
    tmp = Path(tempfile.mkdtemp(prefix="pico-pair-"))
    tmp.chmod(0o755)
    (tmp / "logs").mkdir()
    bench = Bench(cfg, tmp)
    bench.configure_from_env()

    def run(url: str, headers: list[str]) -> wrk.WrkResult:
        argv = [cfg.wrk, "-t1", "-c50", f"-d{duration}s", "--latency", *headers, url]
        return wrk.parse(subprocess.run(argv, capture_output=True, text=True).stdout)

    print(f"pico build: {build_mode()}", flush=True)
    try:
        origin = bench.origin = bench.start_origin()
        hop = bench.start_hop(origin)
        if os.environ.get("PAIR_SETUP", "one") == "two":
            one = bench.start_pico_two(origin)
            roles = ("node B", "node A", "agent")
        else:
            one = bench.start_pico_one(origin)
            roles = ("server", "agent")
        procs = {role: psutil.Process(one.roles[role].pid) for role in roles}
        pico_url = f"http://{one.host}:{one.port}/{size}.bin"
        hop_url = f"http://{hop.host}:{hop.port}/{size}.bin"
        pico_headers = [a for k, v in one.headers.items() for a in ("-H", f"{k}: {v}")]
        run(pico_url, pico_headers)  # warm-up
        ratios = []
        for i in range(pairs):
            base = run(hop_url, [])
            before = {role: p.cpu_times() for role, p in procs.items()}
            result = run(pico_url, pico_headers)
            after = {role: p.cpu_times() for role, p in procs.items()}
            cpu = "  ".join(
                f"{role} u{(after[role].user - before[role].user) / result.requests * 1e6:.0f}"
                f" s{(after[role].system - before[role].system) / result.requests * 1e6:.0f}"
                for role in procs
            )
            ratios.append(result.rps / base.rps)
            print(
                f"pair {i}: hop {base.rps:8.0f}  pico {result.rps:8.0f} req/s"
                f"  ratio {ratios[-1]:.2f}  µs/req: {cpu}  {result.problems() or ''}",
                flush=True,
            )
        print(f"median ratio {statistics.median(ratios):.3f}")
    finally:
        bench.procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
