"""nginx configs: an origin serving static files, a keep-alive reverse-proxy hop, and a TCP
proxy (the `stream` module, dynamic on Debian: package libnginx-mod-stream)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.procs import Proc, ProcessGroup


def _main_conf(prefix: Path, body: str) -> str:
    # As root the workers would switch to `nobody`; stay root so they can read the temp prefix.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"  {kind}_temp_path {prefix / (kind + '_temp')};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
  worker_connections 4096;
}}
http {{
  access_log off;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 65;
  keepalive_requests 1000000;
{temp}
{body}
}}
"""


def origin_conf(prefix: Path, www: Path, host: str, port: int) -> str:
    return _main_conf(
        prefix,
        f"""  server {{
    listen {host}:{port};
    root {www};
  }}""",
    )


def hop_conf(prefix: Path, host: str, port: int, origin_host: str, origin_port: int) -> str:
    # proxy_max_temp_file_size 0: relay 1 MB bodies through memory instead of spooling to disk.
    return _main_conf(
        prefix,
        f"""  upstream origin {{
    server {origin_host}:{origin_port};
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen {host}:{port};
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffers 16 16k;
      proxy_buffer_size 16k;
      proxy_max_temp_file_size 0;
    }}
  }}""",
    )


# Where Debian's libnginx-mod-stream puts the module (`dpkg -L libnginx-mod-stream`).
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def stream_conf(prefix: Path, host: str, port: int, service_host: str, service_port: int) -> str:
    """A plain TCP proxy: each connection to host:port is copied to the service and back."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""load_module {STREAM_MODULE};
{user}daemon off;
master_process on;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
  worker_connections 4096;
}}
stream {{
  server {{
    listen {host}:{port};
    proxy_pass {service_host}:{service_port};
    # 64 KiB copies (the default is 16 KiB): what a bulk copy should use, so the bar is fair.
    proxy_buffer_size 64k;
  }}
}}
"""


def start(procs: ProcessGroup, nginx: str, name: str, prefix: Path, conf: str) -> Proc:
    """Write `conf` under `prefix` and start nginx in the foreground (master + 1 worker)."""
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    argv = [nginx, "-p", str(prefix), "-c", str(conf_path), "-e", str(prefix / "error.log")]
    return procs.start(name, argv)
