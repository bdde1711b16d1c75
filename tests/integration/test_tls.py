"""TLS and mTLS on every port, between nodes, and to an https JWKS (certificates by trustme)."""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pico.config import AgentConfig, ConfigError, ServerConfig, load_config_dict
from pico.mux.handshake import open_websocket
from pico.server.node import Node
from tests.integration.test_cluster import gossip_addr
from tests.support.cluster import Harness, agent_tunnel, proxy_url, start_agent, wait_for
from tests.support.procs import REPO
from tests.support.services import sample_app


class Pki:
    """A CA, a certificate for 127.0.0.1 (every node's), a client certificate, and a CA that
    signed none of them; each written as PEM files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ca = trustme.CA()
        self.ca = self._write(ca.cert_pem, "ca.pem")
        server = ca.issue_cert("127.0.0.1", "localhost")
        self.cert = self._write(server.cert_chain_pems[0], "node.pem")
        self.key = self._write(server.private_key_pem, "node-key.pem")
        client = ca.issue_cert("client@example.com")
        self.client_cert = self._write(client.cert_chain_pems[0], "client.pem")
        self.client_key = self._write(client.private_key_pem, "client-key.pem")
        self.other_ca = self._write(trustme.CA().cert_pem, "other-ca.pem")
        self._server = server

    def _write(self, blob: trustme.Blob, name: str) -> str:
        path = self.root / name
        blob.write_to_path(str(path))
        return str(path)

    def port(self, mtls: bool = False) -> dict[str, Any]:
        """A `<port>.tls` section."""
        tls = {"cert": self.cert, "key": self.key}
        return {"tls": {**tls, "client_cas": self.ca} if mtls else tls}

    def node(self, mtls: bool = False, **cluster: Any) -> dict[str, Any]:
        """Sections for a node with TLS on every port that trusts (and, with mTLS, presents
        a certificate of) the CA."""
        peer: dict[str, Any] = {"root_ca": self.ca}
        if mtls:
            peer |= {"cert": self.cert, "key": self.key}
        return {
            "proxy": self.port(mtls),
            "upstream": self.port(mtls),
            "admin": self.port(mtls),
            "cluster": {"tls": peer, **cluster},
        }

    def client(self, with_cert: bool = False, ca: str = "") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=ca or self.ca)
        if with_cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def https(addr: tuple[str, int], path: str = "") -> str:
    return f"https://{addr[0]}:{addr[1]}{path}"


async def tls_agent(h: Harness, pki: Pki, node: Node, port: int, **tls: Any) -> None:
    assert node.addrs is not None
    await h.agent(
        node,
        [f"ep/127.0.0.1:{port}"],
        server={"url": https(node.addrs.upstream), "tls": {"root_ca": pki.ca, **tls}},
    )


async def get(
    url: str, context: ssl.SSLContext, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers or {}, ssl=context) as resp:
            return resp.status, await resp.read()


def status_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pico", "status", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )


async def test_every_port_speaks_tls_and_nodes_forward_over_it(h: Harness, pki: Pki) -> None:
    a = await h.node(**pki.node())
    b = await h.node(**pki.node(join=[gossip_addr(a)]))
    await tls_agent(h, pki, a, await h.service(sample_app()))
    await h.tunnel_up(a, "ep")
    await wait_for(lambda: "ep" in b.cluster.remotes.get(a.node_id, a.cluster.local).endpoints)
    assert b.cluster.remotes[a.node_id].tls == {"proxy", "admin"}
    assert not (await agent_tunnel(h.agents[-1])).splicing  # wss is copied, not spliced
    assert b.addrs is not None and a.addrs is not None
    client = pki.client()
    ep = {"x-pico-endpoint": "ep"}
    # Through node b, which forwards to a over TLS; the service sees what the client spoke.
    status, body = await get(https(b.addrs.proxy, "/headers"), client, ep)
    assert status == 200
    headers = {k.lower(): v for k, v in json.loads(body).items()}
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    status, body = await get(https(b.addrs.proxy, "/download?size=1048576"), client, ep)
    assert status == 200 and len(body) == 1 << 20
    assert b.metrics.proxy.forwarded_remote.get(a.node_id, 0) >= 2
    # Admin over TLS, and ?forward= to a node whose admin port speaks TLS.
    status, body = await get(
        https(b.addrs.admin, f"/status/proxy/endpoints?forward={a.node_id}"), client
    )
    assert status == 200 and "ep" in json.loads(body)
    # `pico status` verifies the admin port with --server.tls.root-ca, and fails without it.
    url = https(b.addrs.admin)
    ok = await asyncio.to_thread(
        status_cli, "proxy", "endpoints", "--server.url", url, "--server.tls.root-ca", pki.ca,
        "--forward", a.node_id, "-o", "json",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ep" in json.loads(ok.stdout)["endpoints"]
    bad = await asyncio.to_thread(status_cli, "proxy", "endpoints", "--server.url", url)
    assert bad.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in bad.stdout


async def test_mtls_on_every_port_and_between_nodes(h: Harness, pki: Pki) -> None:
    a = await h.node(**pki.node(mtls=True))
    b = await h.node(**pki.node(mtls=True, join=[gossip_addr(a)]))
    port = await h.service(sample_app())
    assert a.addrs is not None and b.addrs is not None
    # An agent without a client certificate cannot open a tunnel...
    url = https(a.addrs.upstream, "/pico/v1/upstream/ep").replace("https", "wss", 1)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        transport, _ = await open_websocket(url, ssl_context=pki.client())
        transport.close()  # pragma: no cover - only if the handshake wrongly succeeded
    # ...one with a certificate signed by client_cas can.
    await tls_agent(h, pki, a, port, cert=pki.client_cert, key=pki.client_key)
    await h.tunnel_up(a, "ep")
    await wait_for(lambda: "ep" in b.cluster.remotes.get(a.node_id, b.cluster.local).endpoints)
    ep = {"x-pico-endpoint": "ep"}
    with pytest.raises(aiohttp.ClientError):
        await get(https(b.addrs.proxy, "/"), pki.client(), ep)
    # b presents its cluster certificate to a's proxy port when it forwards.
    status, body = await get(https(b.addrs.proxy, "/"), pki.client(with_cert=True), ep)
    assert (status, body) == (200, b"hello")
    with pytest.raises(aiohttp.ClientError):
        await get(https(b.addrs.admin, "/status/cluster/nodes"), pki.client())
    status, body = await get(
        https(b.addrs.admin, f"/status/cluster/nodes?forward={a.node_id}"),
        pki.client(with_cert=True),
    )
    assert status == 200 and {n["id"] for n in json.loads(body)} == {a.node_id, b.node_id}
    ok = await asyncio.to_thread(
        status_cli, "cluster", "nodes", "--server.url", https(b.addrs.admin),
        "--server.tls.root-ca", pki.ca, "--server.tls.cert", pki.client_cert,
        "--server.tls.key", pki.client_key, "-o", "json",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr


async def test_a_node_that_cannot_verify_its_peer_does_not_forward(h: Harness, pki: Pki) -> None:
    a = await h.node(**pki.node())
    b = await h.node(
        proxy=pki.port(),
        cluster={"tls": {"root_ca": pki.other_ca}, "join": [gossip_addr(a)]},
    )
    await tls_agent(h, pki, a, await h.service(sample_app()))
    await h.tunnel_up(a, "ep")
    await wait_for(lambda: "ep" in b.cluster.remotes.get(a.node_id, b.cluster.local).endpoints)
    assert b.addrs is not None
    # Never in clear to a TLS port, never to a peer whose certificate b cannot verify.
    status, body = await get(https(b.addrs.proxy, "/"), pki.client(), {"x-pico-endpoint": "ep"})
    assert status == 502, body


async def test_clients_that_do_not_speak_tls_get_nothing_and_the_node_stays_quiet(
    h: Harness, pki: Pki
) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        node = await h.node(**pki.node())
        await tls_agent(h, pki, node, await h.service(sample_app()))
        await h.tunnel_up(node, "ep")
        assert node.addrs is not None
        for addr in (node.addrs.proxy, node.addrs.upstream, node.addrs.admin):
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\n\r\n")
            assert b"HTTP/1.1 200" not in await asyncio.wait_for(reader.read(), 10)
            writer.close()
        # A client trusting another CA is refused by its own side; the node serves on.
        with pytest.raises(aiohttp.ClientError):
            await get(https(node.addrs.proxy, "/"), pki.client(ca=pki.other_ca))
        ep = {"x-pico-endpoint": "ep"}
        assert (await get(https(node.addrs.proxy, "/"), pki.client(), ep))[0] == 200
    finally:
        loop.set_exception_handler(None)
    assert errors == []


async def test_an_https_jwks_is_fetched_verified_against_its_root_ca(h: Harness, pki: Pki) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwks = {"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}
    app = web.Application()

    async def serve_jwks(_: web.Request) -> web.Response:
        return web.json_response(jwks)

    app.router.add_get("/jwks.json", serve_jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_server_context(pki))
    await site.start()
    h.runners.append(runner)
    jwks_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    auth = {"jwks": {"endpoint": f"https://127.0.0.1:{jwks_port}/jwks.json", "root_ca": pki.ca}}
    node = await h.node(upstream={"auth": auth})
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    token = jwt.encode(
        {"exp": int(time.time()) + 60}, pem, algorithm="RS256", headers={"kid": "k1"}
    )
    port = await h.service(sample_app())
    await h.agent(node, [f"ep/127.0.0.1:{port}"], auth={"api_key": token})
    await h.tunnel_up(node, "ep")


def _server_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert, pki.key)
    return context


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"proxy": {"tls": {"cert": "CERT"}}}, "proxy.tls: cert and key must be set together"),
        ({"admin": {"tls": {"cert": "CERT", "key": "/x"}}}, "admin.tls: no such file: '/x'"),
        (
            {"upstream": {"tls": {"client_cas": "CA"}}},
            "upstream.tls: client_cas: needs cert and key",
        ),
        ({"cluster": {"tls": {"root_ca": "/x"}}}, "cluster.tls: root_ca: no such file: '/x'"),
        ({"proxy": {"tls": {"cert": "CA", "key": "CA"}}}, "cannot load cert"),
    ],
)
def test_bad_tls_config_names_the_key(pki: Pki, section: dict[str, Any], message: str) -> None:
    text = json.dumps(section).replace("CERT", pki.cert).replace("CA", pki.ca)
    with pytest.raises(ConfigError) as err:
        load_config_dict(ServerConfig, json.loads(text))
    assert message in str(err.value)


async def https_service(h: Harness, pki: Pki) -> int:
    """The sample service over TLS (a certificate of `pki.ca`), with /close that closes its
    connection after the response; returns its port."""

    async def close(_: web.Request) -> web.Response:
        resp = web.Response(text="closed")
        resp.force_close()
        return resp

    app = sample_app("tls-service")
    app.router.add_get("/close", close)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    h.runners.append(runner)
    return int(runner.addresses[0][1])


async def https_listener_agent(h: Harness, node: Node, port: int, root_ca: str) -> None:
    assert node.addrs is not None
    host, upstream = node.addrs.upstream
    config = load_config_dict(
        AgentConfig,
        {
            "listeners": [{"endpoint_id": "sec", "addr": f"https://127.0.0.1:{port}"}],
            "server": {"url": f"http://{host}:{upstream}"},
            "tls": {"root_ca": root_ca},
            "admin": {"bind_addr": "127.0.0.1:0"},
        },
    )
    h.agents.append(await start_agent(config))
    await h.tunnel_up(node, "sec")


async def test_an_https_service_that_closes_its_connections_adds_no_log_line(
    h: Harness, pki: Pki, logs: io.StringIO
) -> None:
    node = await h.node()
    await https_listener_agent(h, node, await https_service(h, pki), pki.ca)
    agent = h.agents[-1].agent
    async with aiohttp.ClientSession() as http:
        for _ in range(5):  # the service closes each connection after its response
            async with http.get(
                proxy_url(node) + "/close", headers={"x-pico-endpoint": "sec"}
            ) as r:
                assert (r.status, await r.text()) == (200, "closed")
    active = {"endpoint": "sec"}
    value = agent.metrics.registry.get_sample_value
    await wait_for(lambda: value("pico_agent_active_streams", active) == 0, what="all closed")
    records = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert [r for r in records if r["subsystem"] == "asyncio"] == []


async def test_an_https_service_with_a_certificate_we_cannot_verify_is_a_502(
    h: Harness, pki: Pki
) -> None:
    node = await h.node()
    await https_listener_agent(h, node, await https_service(h, pki), pki.other_ca)
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node) + "/", headers={"x-pico-endpoint": "sec"}) as resp:
            assert resp.status == 502
            assert await resp.json() == {"error": "upstream unreachable"}
