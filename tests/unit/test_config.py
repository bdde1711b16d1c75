"""Tests for pico.config: schema defaults, YAML, flags, env expansion and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from pico.config import (
    AgentConfig,
    ConfigError,
    EndpointSpec,
    ServerConfig,
    config_options,
    describe,
    expand_env,
    load_config,
    load_config_dict,
    parse_duration,
    parse_host_port,
)

# --- scalar parsers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (3, 3.0),
        (0.25, 0.25),
        ("1h2m3s4ms", 3723.004),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "", "1x", "m", "1 s", "s1"])
def test_parse_duration_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":8000", ("", 8000)),
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("[::1]:8000", ("::1", 8000)),
        ("localhost:4000", ("localhost", 4000)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, key="proxy.bind_addr") == expected


@pytest.mark.parametrize("text", ["8000", "abc", "host:", "host:port", ":70000", "::1:80", ""])
def test_parse_host_port_invalid(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^proxy\.bind_addr: "):
        parse_host_port(text, key="proxy.bind_addr")


def test_expand_env() -> None:
    env = {"X": "1", "EMPTY": "", "PORT": "9000"}
    assert expand_env("a $X b", env) == "a 1 b"
    assert expand_env("${X}y", env) == "1y"
    assert expand_env("${PORT:5}", env) == "9000"
    assert expand_env("${MISSING:5}", env) == "5"
    assert expand_env("${EMPTY:5}", env) == "5"
    assert expand_env("${MISSING:a:b}", env) == "a:b"
    assert expand_env("$MISSING|${MISSING}|$EMPTY", env) == "||"
    assert expand_env("cost: 5$ and $ alone $", env) == "cost: 5$ and $ alone $"
    assert expand_env("${}x", env) == "x"  # malformed ${} is dropped (Go semantics)


def test_expand_env_uses_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PICO_TEST_VAR", "hello")
    assert expand_env("$PICO_TEST_VAR") == "hello"


# --- schema -----------------------------------------------------------------


def test_server_defaults() -> None:
    cfg = load_config_dict(ServerConfig, {})
    assert cfg == ServerConfig()
    assert cfg.proxy.bind_addr == ":8000"
    assert cfg.proxy.advertise_addr == ""
    assert cfg.proxy.timeout == 30.0
    assert cfg.proxy.max_header_bytes == 65536
    assert cfg.proxy.read_header_timeout == 10.0
    assert cfg.proxy.idle_timeout == 300.0
    assert cfg.upstream.bind_addr == ":8001"
    assert cfg.admin.bind_addr == ":8002"
    assert cfg.gossip.bind_addr == ":8003"
    assert cfg.gossip.interval == 0.5
    assert cfg.gossip.max_packet_size == 1400
    assert cfg.gossip.expiry == 60.0
    assert cfg.cluster.node_id == ""
    assert cfg.cluster.join == []
    assert cfg.cluster.abort_if_join_fails is True
    assert cfg.server.graceful_shutdown_timeout == 60.0
    assert cfg.log.level == "info"
    assert cfg.log.subsystems == []


def test_agent_defaults() -> None:
    cfg = load_config_dict(AgentConfig, {"endpoints": ["my-endpoint/4000"]})
    assert cfg.server.url == "http://localhost:8001"
    assert cfg.server.heartbeat_interval == 10.0
    assert cfg.server.heartbeat_timeout == 10.0
    assert cfg.auth.api_key == ""
    assert cfg.forwarder.timeout == 10.0
    assert cfg.admin.bind_addr == ":9000"
    assert cfg.log.level == "info"


def test_config_is_frozen() -> None:
    cfg = ServerConfig()
    with pytest.raises(Exception):  # noqa: B017 - pydantic ValidationError
        cfg.proxy.bind_addr = ":1"  # type: ignore[misc]


def test_nested_dict_values() -> None:
    cfg = load_config_dict(
        ServerConfig,
        {
            "proxy": {"bind_addr": "127.0.0.1:9000", "timeout": "1m30s"},
            "gossip": {"interval": 2, "max_packet_size": "2048"},
            "cluster": {"join": "a:8003,b:8003", "abort_if_join_fails": "no"},
            "log": {"level": "DEBUG", "subsystems": ["proxy", "gossip"]},
        },
    )
    assert cfg.proxy.bind_addr == "127.0.0.1:9000"
    assert cfg.proxy.timeout == 90.0
    assert cfg.gossip.interval == 2.0
    assert cfg.gossip.max_packet_size == 2048
    assert cfg.cluster.join == ["a:8003", "b:8003"]
    assert cfg.cluster.abort_if_join_fails is False
    assert cfg.log.level == "debug"
    assert cfg.log.subsystems == ["proxy", "gossip"]


@pytest.mark.parametrize("value", ["true", "1", "yes", True])
def test_bool_true(value: Any) -> None:
    cfg = load_config_dict(ServerConfig, {"cluster": {"abort_if_join_fails": value}})
    assert cfg.cluster.abort_if_join_fails is True


@pytest.mark.parametrize("value", ["false", "0", "no", False])
def test_bool_false(value: Any) -> None:
    cfg = load_config_dict(ServerConfig, {"cluster": {"abort_if_join_fails": value}})
    assert cfg.cluster.abort_if_join_fails is False


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"proxy": {"bnd_addr": ":1"}}, "unknown key 'proxy.bnd_addr'"),
        ({"prxy": {}}, "unknown key 'prxy'"),
        ({"proxy": {"timeout": "abc"}}, "proxy.timeout: invalid duration 'abc'"),
        ({"proxy": {"timeout": "-1s"}}, "proxy.timeout: must not be negative"),
        ({"proxy": {"bind_addr": "nope"}}, "proxy.bind_addr: invalid address 'nope'"),
        ({"proxy": {"bind_addr": ":99999"}}, "proxy.bind_addr: invalid address"),
        ({"gossip": {"advertise_addr": "x"}}, "gossip.advertise_addr: invalid address"),
        ({"gossip": {"interval": "0s"}}, "gossip.interval: must be greater than 0"),
        ({"gossip": {"max_packet_size": 100}}, "gossip.max_packet_size:"),
        ({"gossip": {"max_packet_size": "big"}}, "gossip.max_packet_size:"),
        ({"server": {"graceful_shutdown_timeout": 0}}, "server.graceful_shutdown_timeout:"),
        ({"log": {"level": "verbose"}}, "log.level: invalid level 'verbose'"),
        ({"cluster": {"abort_if_join_fails": "maybe"}}, "cluster.abort_if_join_fails:"),
        ({"cluster": {"node_id": "a b"}}, "cluster.node_id: invalid node id"),
        ({"cluster": {"node_id_prefix": "a/b"}}, "cluster.node_id_prefix: invalid node id"),
        (
            {"cluster": {"node_id": "a", "node_id_prefix": "b"}},
            "cluster.node_id and cluster.node_id_prefix cannot both be set",
        ),
        ({"proxy": "oops"}, "proxy:"),
    ],
)
def test_server_errors_name_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_dict(ServerConfig, data)
    assert message in str(info.value)


def test_gossip_limits_have_defaults_flags_and_a_consistency_check() -> None:
    g = load_config_dict(ServerConfig, {}).gossip
    assert (g.max_nodes, g.max_entries_per_node, g.max_key_size, g.max_value_size) == (
        1024,
        16384,
        256,
        1024,
    )
    assert (g.max_version_step, g.max_join_size) == (2**32, 16 << 20)
    with pytest.raises(ConfigError) as info:
        load_config_dict(
            ServerConfig, {"gossip": {"max_entries_per_node": 50000, "max_version_step": 65536}}
        )
    assert "max_version_step must be at least 2 x max_entries_per_node" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config_dict(ServerConfig, {"gossip": {"max_nodes": 1}})
    assert "gossip.max_nodes:" in str(info.value)
    result = CliRunner().invoke(_server_cmd, ["-h"])
    for flag in (
        "--gossip.max-nodes",
        "--gossip.max-entries-per-node",
        "--gossip.max-key-size",
        "--gossip.max-value-size",
        "--gossip.max-version-step",
        "--gossip.max-join-size",
    ):
        assert flag in result.output
    result = CliRunner().invoke(_server_cmd, ["--gossip.max-nodes", "1"])
    assert result.exit_code != 0 and "gossip.max_nodes" in result.output


def test_zero_proxy_timeout_disables() -> None:
    cfg = load_config_dict(ServerConfig, {"proxy": {"timeout": "0"}})
    assert cfg.proxy.timeout == 0.0


# --- agent endpoints --------------------------------------------------------


def test_agent_endpoints_parsing() -> None:
    cfg = load_config_dict(
        AgentConfig,
        {"endpoints": ["my-endpoint/4000", "b.2_x/example.com:8080", "c/[::1]:80", "d/:81"]},
    )
    assert cfg.parsed_endpoints() == [
        EndpointSpec("my-endpoint", "localhost", 4000),
        EndpointSpec("b.2_x", "example.com", 8080),
        EndpointSpec("c", "::1", 80),
        EndpointSpec("d", "localhost", 81),
    ]


def test_agent_endpoint_on_a_unix_socket_keeps_the_slashes_of_its_path() -> None:
    cfg = load_config_dict(AgentConfig, {"endpoints": ["my-app/unix:/run/app.sock", "b/4000"]})
    assert cfg.parsed_endpoints() == [
        EndpointSpec("my-app", "", 0, unix_path="/run/app.sock"),
        EndpointSpec("b", "localhost", 4000),
    ]
    assert cfg.parsed_endpoints()[0].service == "unix:/run/app.sock"


def test_agent_endpoints_comma_string() -> None:
    cfg = load_config_dict(AgentConfig, {"endpoints": "a/1,b/localhost:2"})
    assert [e.endpoint_id for e in cfg.parsed_endpoints()] == ["a", "b"]


@pytest.mark.parametrize(
    ("endpoints", "message"),
    [
        ([], "endpoints: at least one endpoint is required"),
        (["no-slash"], "endpoints[0]: invalid endpoint 'no-slash'"),
        (["a/b/c"], "endpoints[0]: invalid endpoint 'a/b/c'"),
        (["ok/1", "bad id/1"], "endpoints[1]: invalid endpoint id 'bad id'"),
        (["/4000"], "invalid endpoint id ''"),
        (["x" * 129 + "/1"], "invalid endpoint id"),
        (["a/host:port"], "invalid endpoint address"),
        (["a/0"], "invalid endpoint port 0"),
        (["a/70000"], "invalid endpoint port 70000"),
        (["a/unix:"], "invalid Unix socket address 'unix:'"),
        (["a/unix"], "invalid endpoint address 'unix'"),
    ],
)
def test_agent_endpoint_errors(endpoints: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_dict(AgentConfig, {"endpoints": endpoints})
    assert message in str(info.value)


@pytest.mark.parametrize("url", ["ftp://x", "localhost:8001", "http://"])
def test_agent_bad_url(url: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.url: invalid URL"):
        load_config_dict(AgentConfig, {"endpoints": ["a/1"], "server": {"url": url}})


def test_describe() -> None:
    rows = {key: (default, desc) for key, default, desc in describe(ServerConfig)}
    assert rows["proxy.bind_addr"][0] == ":8000"
    assert rows["proxy.timeout"][0] == "30s"
    assert rows["gossip.interval"][0] == "500ms"
    assert rows["proxy.idle_timeout"][0] == "5m"
    assert rows["cluster.abort_if_join_fails"][0] == "true"
    assert all(desc for _, desc in rows.values())
    agent_keys = [key for key, _, _ in describe(AgentConfig)]
    assert "endpoints" in agent_keys
    assert "server.heartbeat_interval" in agent_keys


# --- files and flags --------------------------------------------------------


def _params(**kwargs: Any) -> dict[str, Any]:
    """Kwargs as click would pass them for ServerConfig, with nothing given."""
    captured: dict[str, Any] = {}

    @click.command()
    @config_options(ServerConfig)
    def cmd(**kw: Any) -> None:
        captured.update(kw)

    result = CliRunner().invoke(cmd, [])
    assert result.exit_code == 0, result.output
    captured.update(kwargs)
    return captured


def test_load_yaml_nested(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(
        "proxy:\n"
        "  bind_addr: 127.0.0.1:7000\n"
        "  timeout: 5s\n"
        "cluster:\n"
        "  node_id: node-1\n"
        "  join: [a:8003, b:8003]\n"
        "log:\n"
        "  level: debug\n"
        "upstream:\n"  # empty section -> defaults
    )
    cfg = load_config(ServerConfig, _params(config__path=str(path)))
    assert cfg.proxy.bind_addr == "127.0.0.1:7000"
    assert cfg.proxy.timeout == 5.0
    assert cfg.cluster.node_id == "node-1"
    assert cfg.cluster.join == ["a:8003", "b:8003"]
    assert cfg.log.level == "debug"
    assert cfg.upstream.bind_addr == ":8001"


def test_flags_override_file(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("proxy:\n  bind_addr: 127.0.0.1:7000\n  timeout: 5s\n")
    cfg = load_config(
        ServerConfig,
        _params(
            config__path=str(path),
            proxy__bind_addr="127.0.0.1:9",
            cluster__join=("a:1,b:2", "c:3"),
            cluster__abort_if_join_fails="false",
        ),
    )
    assert cfg.proxy.bind_addr == "127.0.0.1:9"
    assert cfg.proxy.timeout == 5.0  # from the file, no flag given
    assert cfg.cluster.join == ["a:1", "b:2", "c:3"]
    assert cfg.cluster.abort_if_join_fails is False


def test_expand_env_in_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PICO_T_HOST", "10.0.0.1")
    monkeypatch.setenv("PICO_T_EMPTY", "")
    monkeypatch.delenv("PICO_T_UNSET", raising=False)
    path = tmp_path / "server.yaml"
    path.write_text(
        "proxy:\n"
        "  bind_addr: $PICO_T_HOST:8000\n"
        "  advertise_addr: ${PICO_T_HOST}:8000\n"
        "  timeout: ${PICO_T_EMPTY:5}s\n"
        "  read_header_timeout: ${PICO_T_UNSET:7s}\n"
        "cluster:\n"
        "  node_id: n${PICO_T_UNSET}x\n"
    )
    cfg = load_config(ServerConfig, _params(config__path=str(path), config__expand_env="true"))
    assert cfg.proxy.bind_addr == "10.0.0.1:8000"
    assert cfg.proxy.advertise_addr == "10.0.0.1:8000"
    assert cfg.proxy.timeout == 5.0
    assert cfg.proxy.read_header_timeout == 7.0
    assert cfg.cluster.node_id == "nx"

    # Without --config.expand-env the text is used as is (and fails validation).
    with pytest.raises(ConfigError) as info:
        load_config(ServerConfig, _params(config__path=str(path)))
    assert "proxy.bind_addr: invalid address '$PICO_T_HOST:8000'" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(ServerConfig, _params(config__path=str(missing)))
    assert str(info.value).startswith(f"config.path: cannot read '{missing}'")
    assert "No such file" in str(info.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("proxy:\n  bind_addr: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^config\.path: invalid YAML"):
        load_config(ServerConfig, _params(config__path=str(path)))


def test_yaml_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"^config\.path: .*mapping"):
        load_config(ServerConfig, _params(config__path=str(path)))


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("gossip:\n  intervall: 1s\n")
    with pytest.raises(ConfigError, match=r"unknown key 'gossip\.intervall'"):
        load_config(ServerConfig, _params(config__path=str(path)))


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(ServerConfig, _params(config__path=str(path))) == ServerConfig()


def test_unrelated_kwargs_ignored() -> None:
    cfg = load_config(ServerConfig, _params(something_else=1))
    assert cfg == ServerConfig()


# --- click integration ------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_options(ServerConfig)
def _server_cmd(**kwargs: Any) -> None:
    try:
        cfg = load_config(ServerConfig, kwargs)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"bind={cfg.proxy.bind_addr}")
    click.echo(f"join={','.join(cfg.cluster.join)}")
    click.echo(f"abort={cfg.cluster.abort_if_join_fails}")
    click.echo(f"timeout={cfg.proxy.timeout}")


@click.command()
@config_options(AgentConfig)
def _agent_cmd(**kwargs: Any) -> None:
    try:
        cfg = load_config(AgentConfig, kwargs)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    for ep in cfg.parsed_endpoints():
        click.echo(f"{ep.endpoint_id} {ep.host} {ep.port}")


def test_cli_flag_overrides_yaml(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("proxy:\n  bind_addr: 127.0.0.1:7000\n  timeout: 5s\n")
    result = CliRunner().invoke(
        _server_cmd, ["--config.path", str(path), "--proxy.bind-addr", "127.0.0.1:9"]
    )
    assert result.exit_code == 0, result.output
    assert "bind=127.0.0.1:9" in result.output
    assert "timeout=5.0" in result.output


def test_cli_defaults() -> None:
    result = CliRunner().invoke(_server_cmd, [])
    assert result.exit_code == 0, result.output
    assert "bind=:8000" in result.output
    assert "abort=True" in result.output


def test_cli_lists_and_bools() -> None:
    result = CliRunner().invoke(
        _server_cmd,
        [
            "--cluster.join",
            "a:1,b:2",
            "--cluster.join",
            "c:3",
            "--cluster.abort-if-join-fails",
            "false",
            "--proxy.timeout=1m",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "join=a:1,b:2,c:3" in result.output
    assert "abort=False" in result.output
    assert "timeout=60.0" in result.output


def test_cli_bool_flag_without_value(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("cluster:\n  abort_if_join_fails: false\n")
    result = CliRunner().invoke(
        _server_cmd, ["--config.path", str(path), "--cluster.abort-if-join-fails"]
    )
    assert result.exit_code == 0, result.output
    assert "abort=True" in result.output


def test_cli_help_lists_flags() -> None:
    result = CliRunner().invoke(_server_cmd, ["-h"])
    assert result.exit_code == 0
    for flag in (
        "--config.path",
        "--config.expand-env",
        "--proxy.bind-addr",
        "--proxy.max-header-bytes",
        "--gossip.interval",
        "--cluster.abort-if-join-fails",
        "--server.graceful-shutdown-timeout",
        "--log.subsystems",
    ):
        assert flag in result.output
    assert "(default: 30s)" in " ".join(result.output.split())


def test_cli_bad_value_names_key() -> None:
    result = CliRunner().invoke(_server_cmd, ["--proxy.timeout", "abc"])
    assert result.exit_code != 0
    assert "proxy.timeout: invalid duration 'abc'" in result.output


def test_cli_bad_bool_names_key() -> None:
    result = CliRunner().invoke(_server_cmd, ["--cluster.abort-if-join-fails", "maybe"])
    assert result.exit_code != 0
    assert "cluster.abort_if_join_fails" in result.output


def test_cli_agent_endpoints() -> None:
    result = CliRunner().invoke(_agent_cmd, ["--endpoints", "a/4000,b/example.com:80"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["a localhost 4000", "b example.com 80"]


def test_cli_agent_requires_endpoints() -> None:
    result = CliRunner().invoke(_agent_cmd, [])
    assert result.exit_code != 0
    assert "endpoints" in result.output


def test_trusted_proxies_must_be_cidrs() -> None:
    from pico.config import ServerConfig, load_config_dict
    from pico.config.loader import ConfigError

    cfg = load_config_dict(ServerConfig, {"proxy": {"trusted_proxies": "10.0.0.0/8,::1"}})
    assert cfg.proxy.trusted_proxies == ["10.0.0.0/8", "::1"]
    with pytest.raises(ConfigError, match=r"proxy\.trusted_proxies"):
        load_config_dict(ServerConfig, {"proxy": {"trusted_proxies": ["10.0.0.0/33"]}})
