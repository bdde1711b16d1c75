"""The agent's listeners: YAML `listeners`, `pico agent http|tcp ENDPOINT ADDR`, and what the
node's upgrade makes of the protocol an agent asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pico.cli.main import cli
from pico.config import AgentConfig, ConfigError, EndpointSpec, load_config_dict
from pico.config.loader import load_config
from pico.mux.upgrade import Accepted, Rejected, ServerHandshake
from tests.unit.test_handshake import request


def listeners(*entries: dict[str, Any]) -> AgentConfig:
    return load_config_dict(AgentConfig, {"listeners": list(entries)})


def test_listeners_of_both_protocols_are_registered_in_order() -> None:
    cfg = load_config_dict(
        AgentConfig,
        {
            "endpoints": ["web/4000"],
            "listeners": [
                {"endpoint_id": "my-db", "addr": "localhost:5432", "protocol": "tcp"},
                {"endpoint_id": "cache", "addr": "6379", "protocol": "tcp", "timeout": "3s"},
                {"endpoint_id": "app", "addr": "https://svc.local:8443", "access_log": True},
                {"endpoint_id": "plain", "addr": "http://10.0.0.1"},
                {"endpoint_id": "sock", "addr": "unix:/run/db.sock", "protocol": "tcp"},
            ],
        },
    )
    assert cfg.listener_specs() == [
        EndpointSpec("web", "localhost", 4000),
        EndpointSpec("my-db", "localhost", 5432, "tcp"),
        EndpointSpec("cache", "localhost", 6379, "tcp", timeout=3.0),
        EndpointSpec("app", "svc.local", 8443, "http", tls=True, access_log=True),
        EndpointSpec("plain", "10.0.0.1", 80, "http"),
        EndpointSpec("sock", "", 0, "tcp", unix_path="/run/db.sock"),
    ]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [{"endpoint_id": "my-db", "addr": "5432", "protocol": "udp"}],
            "listeners[0]: listener 'my-db': unknown protocol 'udp' (use http or tcp)",
        ),
        (
            [{"endpoint_id": "my-db", "addr": "https://db:5432", "protocol": "tcp"}],
            "listeners[0]: listener 'my-db': addr 'https://db:5432': a URL is for http listeners",
        ),
        (
            [
                {"endpoint_id": "a", "addr": "1", "protocol": "tcp"},
                {"endpoint_id": "A", "addr": "2"},
            ],
            "listeners: listener 'A' is given twice",
        ),
        ([{"endpoint_id": "x", "addr": "nowhere"}], "listener 'x': addr 'nowhere'"),
        ([{"endpoint_id": "x", "addr": "70000"}], "port 70000 out of range"),
        ([{"endpoint_id": "x", "addr": "ftp://h:1"}], "expected http://host[:port]"),
        ([{"endpoint_id": "bad id", "addr": "1"}], "listeners[0].endpoint_id: invalid endpoint"),
        ([{"addr": "1"}], "listeners[0].endpoint_id"),
        ([{"endpoint_id": "x", "addr": "1", "color": "red"}], "unknown key 'listeners[0].color'"),
    ],
)
def test_bad_listeners_are_errors_naming_the_listener(
    entries: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        listeners(*entries)
    assert message in str(info.value)


def test_an_endpoint_and_a_listener_may_not_share_an_id() -> None:
    with pytest.raises(ConfigError, match="listener 'web' is given twice"):
        load_config_dict(
            AgentConfig,
            {"endpoints": ["web/1"], "listeners": [{"endpoint_id": "web", "addr": "2"}]},
        )


def test_listeners_have_no_flag() -> None:
    result = CliRunner().invoke(cli, ["agent", "-h"])
    assert result.exit_code == 0
    assert "--listeners" not in result.output
    assert "--endpoints" in result.output
    assert "http" in result.output and "tcp" in result.output  # the subcommands


def test_agent_tcp_with_a_url_exits_1_naming_the_listener() -> None:
    result = CliRunner().invoke(cli, ["agent", "tcp", "my-db", "https://db:5432"])
    assert result.exit_code == 1
    assert "listener 'my-db'" in result.output
    assert "a URL is for http listeners" in result.output


def test_agent_without_anything_to_register_still_exits_1() -> None:
    result = CliRunner().invoke(cli, ["agent", "--admin.bind-addr", "127.0.0.1:0"])
    assert result.exit_code == 1
    assert "endpoints: at least one endpoint is required" in result.output


def test_the_subcommand_replaces_the_listeners_of_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "endpoints: [old/1]\n"
        "listeners:\n"
        "  - {endpoint_id: other, addr: '2', protocol: tcp}\n"
        "server: {url: 'http://node:8001'}\n"
    )
    cfg = load_config(
        AgentConfig,
        {"config__path": str(path)},
        {
            "endpoints": [],
            "listeners": [{"endpoint_id": "my-db", "addr": "5432", "protocol": "tcp"}],
        },
    )
    assert cfg.listener_specs() == [EndpointSpec("my-db", "localhost", 5432, "tcp")]
    assert cfg.server.url == "http://node:8001"  # the rest of the file still counts


def test_node_accepts_a_tcp_tunnel_and_says_so() -> None:
    result = ServerHandshake().receive_data(request("/pico/v1/upstream/my-db?protocol=tcp"))
    assert isinstance(result, Accepted)
    assert (result.endpoint_id, result.protocol) == ("my-db", "tcp")


def test_a_tunnel_without_a_protocol_is_http() -> None:
    result = ServerHandshake().receive_data(request("/pico/v1/upstream/web"))
    assert isinstance(result, Accepted)
    assert result.protocol == "http"


@pytest.mark.parametrize("query", ["protocol=udp", "protocol=tcp&protocol=http", "protocol="])
def test_an_unknown_or_repeated_protocol_is_refused_with_400(query: str) -> None:
    result = ServerHandshake().receive_data(request(f"/pico/v1/upstream/my-db?{query}"))
    assert isinstance(result, Rejected)
    assert result.status == 400
    assert "protocol" in result.reason


def test_mixing_protocols_for_one_endpoint_on_one_node_is_refused_with_409() -> None:
    served = {"my-db": "tcp"}
    handshake = ServerHandshake(protocol_of=served.get)
    result = handshake.receive_data(request("/pico/v1/upstream/my-db"))
    assert result == Rejected(409, "endpoint 'my-db' is registered as tcp on this node, not http")
    again = ServerHandshake(protocol_of=served.get)
    assert isinstance(again.receive_data(request("/pico/v1/upstream/my-db?protocol=tcp")), Accepted)


def test_forward_tcp_has_the_proxy_url_and_token_flags() -> None:
    result = CliRunner().invoke(cli, ["forward", "tcp", "-h"])
    assert result.exit_code == 0
    for flag in ("--server.url", "--server.tls.root-ca", "--auth.api-key", "LOCAL_ADDR ENDPOINT"):
        assert flag in result.output


def test_forward_tcp_with_a_bad_local_address_exits_1() -> None:
    result = CliRunner().invoke(cli, ["forward", "tcp", "nowhere", "my-db"])
    assert result.exit_code == 1
    assert "invalid local address" in result.output


def test_forward_tls_flags_need_an_https_url() -> None:
    result = CliRunner().invoke(
        cli, ["forward", "tcp", "6000", "my-db", "--server.tls.insecure-skip-verify"]
    )
    assert result.exit_code == 1
    assert "server.tls: set, but server.url is not https://" in result.output
