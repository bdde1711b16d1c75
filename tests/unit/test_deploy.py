"""Checks of the deployment files under deploy/ (compose demo, nginx, Prometheus, Kubernetes).

Docker is not needed: the files are parsed and cross-checked against each other and against
the real `pico server` flags and config model. `nginx -t` validates nginx.conf when nginx is
installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pico.cli.server import server as server_command
from pico.config import (
    ServerConfig,
    describe,
    expand_env,
    flag_name,
    load_config,
    load_config_dict,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"

PICO_NODES = ["pico-1", "pico-2", "pico-3"]
NAMESPACE = "pico"
SAMPLE_POD = "pico-0"

YAML_FILES = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))


def _rel(path: Path) -> str:
    return str(path.relative_to(DEPLOY))


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _server_keys() -> set[str]:
    return {key for key, _default, _description in describe(ServerConfig)}


def _server_flags() -> set[str]:
    return {flag_name(key) for key in _server_keys()} | {"--config.path", "--config.expand-env"}


def _leaf_keys(data: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys of the leaves of a nested mapping ({"a": {"b": 1}} -> "a.b")."""
    assert isinstance(data, dict), f"{prefix or 'config'}: expected a mapping"
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaf_keys(value, dotted + ".")
        else:
            yield dotted


def _flags(args: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in args if arg.startswith("--")]


def _parse_server_args(args: list[str], config_file: Path) -> ServerConfig:
    """Parse ``args`` with the real `pico server` command, reading ``config_file`` instead
    of the in-container --config.path, and build the config the node would run with."""
    assert args[0] == "server", args
    ctx = server_command.make_context("server", list(args[1:]))
    params = dict(ctx.params)
    assert params.get("config__path"), f"{args}: no --config.path"
    params["config__path"] = str(config_file)
    return load_config(ServerConfig, params)


# ---------------------------------------------------------------------------
# Every file parses
# ---------------------------------------------------------------------------


def test_deploy_files_exist() -> None:
    expected = [
        "Dockerfile",
        "docker-compose.yaml",
        "pico.yaml",
        "nginx.conf",
        "prometheus.yaml",
        "README.md",
        "grafana/provisioning/datasources/prometheus.yaml",
        "grafana/provisioning/dashboards/pico.yaml",
        "kubernetes/namespace.yaml",
        "kubernetes/configmap.yaml",
        "kubernetes/statefulset.yaml",
        "kubernetes/service-headless.yaml",
        "kubernetes/service.yaml",
    ]
    missing = [name for name in expected if not (DEPLOY / name).is_file()]
    assert not missing, f"missing from deploy/: {missing}"


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert docs, f"{_rel(path)}: empty"
    assert all(isinstance(doc, dict) for doc in docs), f"{_rel(path)}: a document is not a mapping"


def test_dashboard_json_parses() -> None:
    for path in sorted(DEPLOY.rglob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(dashboard, dict), _rel(path)


# ---------------------------------------------------------------------------
# Server configuration: pico.yaml and the compose commands
# ---------------------------------------------------------------------------


def test_pico_yaml_keys_exist_and_validate() -> None:
    data = _load(DEPLOY / "pico.yaml")
    unknown = set(_leaf_keys(data)) - _server_keys()
    assert not unknown, f"pico.yaml: keys unknown to `pico server`: {sorted(unknown)}"
    cfg = load_config_dict(ServerConfig, data)
    assert list(cfg.cluster.join) == PICO_NODES
    for section in (cfg.proxy, cfg.upstream, cfg.admin, cfg.gossip):
        assert section.bind_addr.startswith("0.0.0.0:")
    assert [cfg.proxy.bind_addr, cfg.upstream.bind_addr, cfg.admin.bind_addr] == [
        "0.0.0.0:8000",
        "0.0.0.0:8001",
        "0.0.0.0:8002",
    ]
    assert cfg.gossip.bind_addr == "0.0.0.0:8003"


def _compose() -> dict[str, Any]:
    compose = _load(DEPLOY / "docker-compose.yaml")
    assert isinstance(compose, dict)
    return compose


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def test_compose_services() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) >= {*PICO_NODES, "load-balancer", "prometheus", "grafana"}
    assert "pico-network" in compose["networks"]
    for name, service in services.items():
        assert "pico-network" in service["networks"], f"{name} is not on pico-network"

    lb = services["load-balancer"]
    assert lb["image"].startswith("nginx")
    published = {str(p).split(":")[0] for p in lb["ports"]}
    assert published >= {"8000", "8001", "8002"}
    assert any(v.startswith("./nginx.conf:") for v in lb["volumes"])

    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert any(str(p).startswith("9090") for p in prometheus["ports"])

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    assert any(str(p).startswith("3000") for p in grafana["ports"])
    env = grafana["environment"]
    assert str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Admin"


@pytest.mark.parametrize("node", PICO_NODES)
def test_compose_pico_node(node: str) -> None:
    service = _compose()["services"][node]
    assert service["image"] == "pico:latest"
    assert service["hostname"] == node
    build = service["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"

    args = _command(service)
    unknown = set(_flags(args)) - _server_flags()
    assert not unknown, f"{node}: unknown `pico server` flags {sorted(unknown)}"

    mounts = dict(v.split(":")[:2][::-1] for v in service["volumes"])  # target -> source
    config_path = args[args.index("--config.path") + 1]
    assert mounts.get(config_path) == "./pico.yaml", f"{node}: {config_path} is not pico.yaml"

    cfg = _parse_server_args(args, DEPLOY / "pico.yaml")
    assert cfg.cluster.node_id_prefix == f"{node}-"
    assert node in cfg.cluster.join


def test_compose_host_paths_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"


def test_compose_help_lists_every_flag() -> None:
    """The flags used by the deploy files appear in `pico server -h` (what users read)."""
    result = subprocess.run(
        [sys.executable, "-m", "pico", "server", "-h"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    used = {flag for node in PICO_NODES for flag in _flags(_command(_compose()["services"][node]))}
    used |= set(_flags(_statefulset_container()["args"]))
    missing = [flag for flag in sorted(used) if flag not in result.stdout]
    assert not missing, f"not in `pico server -h`: {missing}"


# ---------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------


def _nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def test_nginx_upstreams() -> None:
    conf = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    assert re.search(r"worker_connections\s+4096;", conf)
    assert re.search(r"^\s*access_log\s+off;", conf, re.MULTILINE)
    for port in (8000, 8001, 8002):
        assert re.search(rf"^\s*listen\s+{port};", conf, re.MULTILINE), f"no listen {port}"
        for node in PICO_NODES:
            line = rf"^\s*server\s+{node}:{port}\s+max_fails=1\s+fail_timeout=1s;"
            assert re.search(line, conf, re.MULTILINE), f"no upstream server {node}:{port}"
    for directive in (
        "proxy_buffering off;",
        "proxy_request_buffering off;",
        "proxy_http_version 1.1;",
        "proxy_set_header Host $http_host;",
        "proxy_set_header Upgrade $http_upgrade;",
        'proxy_set_header Connection "upgrade";',
        "proxy_read_timeout 1h;",
    ):
        assert directive in conf, f"nginx.conf lacks {directive!r}"


def test_nginx_config_test(tmp_path: Path) -> None:
    nginx = _nginx_binary()
    # CI installs nginx (.ci/run): a missing binary is a broken setup, not a reason to skip.
    assert nginx is not None, "nginx not found (PATH or /usr/sbin/nginx): apt-get install nginx"
    conf = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    # Upstream host names are resolved when the config is tested: point them at localhost.
    conf = re.sub(r"\bpico-[123]\b", "127.0.0.1", conf)
    # Keep the pid file, logs and temp files inside tmp_path so this runs as any user.
    conf = re.sub(r"^\s*(pid|error_log)\s+[^;]*;", "", conf, flags=re.MULTILINE)
    conf = f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n" + conf
    temp_paths = "".join(
        f"    {kind}_temp_path {tmp_path}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf, count = re.subn(r"^http\s*\{\n", "http {\n" + temp_paths, conf, flags=re.MULTILINE)
    assert count == 1, "nginx.conf: no top-level http block"
    (tmp_path / "nginx.conf").write_text(conf, encoding="utf-8")
    result = subprocess.run(
        [nginx, "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, f"nginx -t failed:\n{result.stderr}{result.stdout}"


# ---------------------------------------------------------------------------
# Prometheus and Grafana
# ---------------------------------------------------------------------------


def test_prometheus_scrapes_every_node() -> None:
    config = _load(DEPLOY / "prometheus.yaml")
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "pico"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert sorted(targets) == [f"{node}:8002" for node in PICO_NODES]


def test_grafana_provisioning() -> None:
    datasources = _load(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"

    dashboards = _load(DEPLOY / "grafana/provisioning/dashboards/pico.yaml")
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"

    volumes = _compose()["services"]["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in volumes


# ---------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------


def _k8s_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        objects += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return objects


def _k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in _k8s_objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _statefulset_container() -> dict[str, Any]:
    (container,) = _k8s("StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def _headless_service() -> dict[str, Any]:
    (svc,) = [
        o for o in _k8s_objects() if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None"
    ]
    return svc


def test_k8s_objects_are_namespaced() -> None:
    assert _k8s("Namespace")["metadata"]["name"] == NAMESPACE
    for obj in _k8s_objects():
        assert obj.get("apiVersion"), obj["kind"]
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]


def _configmap_server_yaml() -> str:
    data = _k8s("ConfigMap")["data"]["server.yaml"]
    assert isinstance(data, str)
    return data


def test_k8s_configmap_server_yaml() -> None:
    expanded = expand_env(_configmap_server_yaml(), {"POD_NAME": SAMPLE_POD})
    data = yaml.safe_load(expanded)
    unknown = set(_leaf_keys(data)) - _server_keys()
    assert not unknown, f"server.yaml: keys unknown to `pico server`: {sorted(unknown)}"
    cfg = load_config_dict(ServerConfig, data)
    assert cfg.cluster.node_id_prefix == f"{SAMPLE_POD}-"
    headless = _headless_service()["metadata"]["name"]
    assert list(cfg.cluster.join) == [f"{headless}.{NAMESPACE}.svc.cluster.local"]
    grace = _k8s("StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert cfg.server.graceful_shutdown_timeout <= grace


def test_k8s_statefulset_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    container = _statefulset_container()
    args = [str(a) for a in container["args"]]
    unknown = set(_flags(args)) - _server_flags()
    assert not unknown, f"statefulset: unknown `pico server` flags {sorted(unknown)}"
    assert "--config.expand-env" in args

    config_path = args[args.index("--config.path") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    mount_dir, file_name = config_path.rsplit("/", 1)
    assert mount_dir in mounts, f"{config_path} is not in a mounted volume"
    volumes = {v["name"]: v for v in _k8s("StatefulSet")["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[mount_dir]]["configMap"]["name"] == _k8s("ConfigMap")["metadata"]["name"]
    assert file_name == "server.yaml"

    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    (tmp_path / "server.yaml").write_text(_configmap_server_yaml(), encoding="utf-8")
    monkeypatch.setenv("POD_NAME", SAMPLE_POD)
    cfg = _parse_server_args(args, tmp_path / "server.yaml")
    assert cfg.cluster.node_id_prefix == f"{SAMPLE_POD}-"


def test_k8s_statefulset_spec() -> None:
    sts = _k8s("StatefulSet")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 3
    assert spec["serviceName"] == _headless_service()["metadata"]["name"]
    assert pod["terminationGracePeriodSeconds"] == 60
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()

    container = _statefulset_container()
    assert container["image"] == "pico:latest"
    ports = {(p["containerPort"], p.get("protocol", "TCP")): p["name"] for p in container["ports"]}
    assert set(ports) == {(8000, "TCP"), (8001, "TCP"), (8002, "TCP"), (8003, "TCP"), (8003, "UDP")}
    assert ports[(8000, "TCP")] == "proxy"
    assert ports[(8001, "TCP")] == "upstream"
    assert ports[(8002, "TCP")] == "admin"
    assert all(len(name) <= 15 for name in ports.values())
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "admin"}
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][bound])


def test_k8s_services_match_pods() -> None:
    container = _statefulset_container()
    port_names = {p["name"]: p.get("protocol", "TCP") for p in container["ports"]}
    labels = _k8s("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    services = [o for o in _k8s_objects() if o["kind"] == "Service"]
    assert len(services) == 2
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            target = port["targetPort"]
            assert target in port_names, f"{svc['metadata']['name']}: no container port {target}"
            assert port_names[target] == port.get("protocol", "TCP")

    headless = _headless_service()
    assert headless["spec"]["publishNotReadyAddresses"] is True
    gossip = {(p["port"], p.get("protocol", "TCP")) for p in headless["spec"]["ports"]}
    assert {(8003, "TCP"), (8003, "UDP")} <= gossip

    (public,) = [s for s in services if s["metadata"]["name"] != headless["metadata"]["name"]]
    assert {p["port"] for p in public["spec"]["ports"]} >= {8000, 8001}


# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    by_name: dict[str, list[str]] = {}
    for name, rest in instructions:
        by_name.setdefault(name, []).append(rest)

    assert all(base.startswith("python:3.11-slim") for base in by_name["FROM"])
    assert json.loads(by_name["ENTRYPOINT"][-1]) == ["pico"]
    exposed = {p for rest in by_name["EXPOSE"] for p in rest.split()}
    normalized = {p if "/" in p else f"{p}/tcp" for p in exposed}
    assert normalized >= {"8000/tcp", "8001/tcp", "8002/tcp", "8003/tcp", "8003/udp"}

    user = by_name["USER"][-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    # The image runs the compiled build, and checks that it is one.
    assert any(
        "PICO_COMPILE=1 pip install --no-cache-dir --no-build-isolation ." in rest
        and "build_mode() == 'compiled'" in rest
        for rest in by_name["RUN"]
    )

    healthcheck = by_name["HEALTHCHECK"][-1]
    cmd = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert cmd[:2] == ["python", "-c"]
    assert "/health" in healthcheck
    compile(cmd[2], "<healthcheck>", "exec")


def test_dockerfile_copies_what_the_build_needs() -> None:
    """The COPY sources exist relative to the build context (the repository root)."""
    for name, rest in _dockerfile_instructions():
        if name != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository root"


# Kubernetes version the manifests are validated against (kubernetes-validate ships the schemas).
K8S_VERSION = "1.34.0"


@pytest.mark.parametrize(
    "path", sorted((DEPLOY / "kubernetes").glob("*.yaml")), ids=lambda p: p.name
)
def test_k8s_manifests_validate_against_the_kubernetes_schemas(path: Path) -> None:
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc.get('kind')} {exc.message} at {list(exc.path)}")


def test_k8s_validation_catches_a_broken_manifest() -> None:
    import kubernetes_validate

    statefulset = yaml.safe_load((DEPLOY / "kubernetes" / "statefulset.yaml").read_text())
    statefulset["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)
    statefulset["spec"]["replicas"] = 3
    statefulset["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: unknown fields fail
        kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)
