"""An nginx configuration for a local Pico cluster (the demo and the end-to-end tests)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

_TEMPLATE = """\
worker_processes 1;
daemon off;
master_process {master_process};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
{upstreams}
    # Proxy port: keep the client's Host (endpoint routing) and stream both ways.
    server {{
        listen {listen}:{proxy_port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://pico_proxy;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 1h;
            proxy_next_upstream error timeout;
            proxy_connect_timeout 1s;
        }}
    }}
    # Upstream port: long-lived agent WebSockets.
    server {{
        listen {listen}:{upstream_port};
        location / {{
            proxy_pass http://pico_upstream;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            proxy_connect_timeout 1s;
        }}
    }}
    # Admin port.
    server {{
        listen {listen}:{admin_port};
        location / {{
            proxy_pass http://pico_admin;
            proxy_connect_timeout 1s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    """The nginx executable, if installed."""
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


def render(
    prefix: Path,
    nodes: Sequence[str],
    *,
    listen: str = "127.0.0.1",
    ports: tuple[int, int, int] = (8000, 8001, 8002),
    node_ports: tuple[int, int, int] = (8000, 8001, 8002),
    single_process: bool = False,
) -> Path:
    """Write nginx.conf into `prefix` balancing over `nodes` (IP addresses); returns its path.

    `single_process` runs nginx without a master (`master_process off`): one process to
    stop, and one that dies with its parent (the demo), where workers would outlive a master
    killed with SIGKILL.
    """
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    blocks = []
    for name, port in zip(("pico_proxy", "pico_upstream", "pico_admin"), node_ports, strict=True):
        servers = "".join(
            f"        server {ip}:{port} max_fails=1 fail_timeout=1s;\n" for ip in nodes
        )
        keepalive = "        keepalive 64;\n" if name == "pico_proxy" else ""
        blocks.append(f"    upstream {name} {{\n{servers}{keepalive}    }}\n")
    conf = _TEMPLATE.format(
        prefix=prefix,
        upstreams="".join(blocks),
        listen=listen,
        proxy_port=ports[0],
        upstream_port=ports[1],
        admin_port=ports[2],
        master_process="off" if single_process else "on",
    )
    path = prefix / "nginx.conf"
    path.write_text(conf)
    return path
