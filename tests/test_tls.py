"""TLS without a lab: the cluster CA and its certificates (tls.py), what render makes of api.tls and bus.tls,
an api-pe serving HTTPS, a node and the congress-bus agent on a TLS-only redis-server."""

from __future__ import annotations

import datetime
import io
import json
import os
import secrets
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
import yaml
from cryptography import x509
from rich.console import Console

from congressctl import auth, cli, status, tls, verify
from congressctl.deploy import DeployResult, HostReport, load_or_create_secrets
from congressctl.errors import InventoryError, TlsError
from congressctl.inventory import generate, parse_inventory
from congressctl.node.config import load_node_config
from congressctl.render import render_cib, render_node

from conftest import free_port, require
from fixtures_redis import ADMIN_TOKEN, REPO, NodeCluster, RedisServer, wait_for, write_test_tls
from test_bus_agent import OCF_RUNNING_PROMOTED, OCF_SUCCESS, BusAgent, Instance


def _inv(tmp_path: Path, nodes: int = 3, *, api: dict | None = None, bus: dict | None = None, **kw):
    data = generate(nodes, **kw)
    data["api"].update(api or {})
    data["bus"].update(bus or {})
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_inventory(path.read_text(), path)


def _files(inv, node: str) -> dict[str, bytes]:
    return {f.path: f.content for f in render_node(inv, inv.node(node), load_or_create_secrets(inv))}


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


# ---------------------------------------------------------------------------------------------- the CA module


def test_the_server_certificates_name_the_vip_and_the_nodes_and_verify_with_the_ca(tmp_path: Path) -> None:
    inv = _inv(tmp_path, 4, api_pe=3, bus={"tls": True})
    material = tls.load_material(inv)
    assert tls.addresses_of(material.api.cert) == {inv.vip.address, "10.213.0.12", "10.213.0.13", "10.213.0.14"}
    assert tls.addresses_of(material.bus.cert) == {inv.bus.vip, "10.213.0.11", "10.213.0.12", "10.213.0.13",
                                                   "127.0.0.1"}
    ca = _cert(material.api_ca)
    for pair in (material.api, material.bus):
        cert = _cert(pair.cert)
        cert.verify_directly_issued_by(ca)
        left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        assert datetime.timedelta(days=tls.CERT_DAYS - 1) < left <= datetime.timedelta(days=tls.CERT_DAYS)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    folder = tls.state_folder(inv)
    for key in ("ca.key", "api.key", "bus.key"):
        assert (folder / key).stat().st_mode & 0o777 == 0o600
    # a TLS client checks the chain and the address
    context = ssl.create_default_context(cadata=material.api_ca.decode())
    assert context.get_ca_certs()[0]["subject"]


def test_a_second_load_keeps_the_ca_and_the_certificates(tmp_path: Path) -> None:
    inv = _inv(tmp_path)
    first = tls.load_material(inv)
    again = tls.load_material(inv)
    assert first == again


def test_a_changed_address_reissues_the_certificate_under_the_same_ca(tmp_path: Path) -> None:
    inv = _inv(tmp_path, 3)
    first = tls.load_material(inv)
    moved = _inv(tmp_path, 4)    # the same state dir, one more api-pe node
    second = tls.load_material(moved)
    assert second.api_ca == first.api_ca and second.api != first.api
    assert "10.213.0.14" in tls.addresses_of(second.api.cert)
    assert tls.load_material(moved) == second


def test_a_certificate_near_its_end_or_from_another_ca_is_issued_again(tmp_path: Path) -> None:
    ca, other = tls.make_ca("a"), tls.make_ca("b")
    addresses = ["10.0.0.1"]
    assert tls.still_good(tls.issue(ca, name="x", addresses=addresses), ca, addresses)
    assert not tls.still_good(tls.issue(ca, name="x", addresses=addresses, days=tls.RENEW_DAYS - 1), ca, addresses)
    assert not tls.still_good(tls.issue(other, name="x", addresses=addresses), ca, addresses)
    assert not tls.still_good(tls.issue(ca, name="x", addresses=["10.0.0.2"]), ca, addresses)


def test_a_dry_run_writes_no_certificate(tmp_path: Path) -> None:
    inv = _inv(tmp_path)
    assert tls.load_material(inv, create=False) is None
    assert not tls.state_folder(inv).exists()


def test_the_operators_certificate_is_used_as_it_is(tmp_path: Path) -> None:
    ca = tls.make_ca("operator")
    pair = tls.issue(ca, name="api.example", addresses=["10.213.0.250"])
    (tmp_path / "api.crt").write_bytes(pair.cert)
    (tmp_path / "api.key").write_bytes(pair.key)
    (tmp_path / "ca.crt").write_bytes(ca.cert)
    inv = _inv(tmp_path, api={"cert_file": "api.crt", "key_file": "api.key", "ca_file": "ca.crt"})
    material = tls.load_material(inv)
    assert material.api == pair and material.api_ca == ca.cert
    assert tls.ca_path(inv) == tmp_path / "ca.crt"
    files = _files(inv, "n1")
    assert files[tls.API_CERT] == pair.cert and files[tls.API_CA] == ca.cert
    (tmp_path / "api.key").unlink()
    with pytest.raises(TlsError, match="api.key_file"):
        tls.load_material(inv)


def test_the_inventory_takes_the_operators_files_together_or_not_at_all(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="cert_file, key_file and ca_file together"):
        _inv(tmp_path, api={"cert_file": "api.crt"})
    with pytest.raises(InventoryError, match="need api.tls on"):
        _inv(tmp_path, api={"tls": False, "cert_file": "a", "key_file": "b", "ca_file": "c"})
    with pytest.raises(InventoryError, match="expected bool"):
        _inv(tmp_path, api={"tls": "maybe"})
    assert _inv(tmp_path).api_tls.enabled and _inv(tmp_path).api_url() == "https://10.213.0.250:1789"
    assert _inv(tmp_path, api={"tls": False}).api_url("10.213.0.11") == "http://10.213.0.11:1789"


def test_a_missing_ca_file_is_a_named_error() -> None:
    with pytest.raises(TlsError, match="congressctl deploy"):
        tls.client_context("/nonexistent/ca.crt")


# ---------------------------------------------------------------------------------------------- render


def test_haproxy_terminates_https_and_reaches_the_nodes_over_verified_tls(tmp_path: Path) -> None:
    inv = _inv(tmp_path, 3)
    cfg = _files(inv, "n1")["/etc/haproxy/haproxy.cfg"].decode()
    assert f"bind {inv.vip.address}:1789 ssl crt {tls.API_PEM}\n" in cfg
    servers = [line.strip() for line in cfg.splitlines() if line.strip().startswith("server ")]
    assert len(servers) == 3
    assert all(s.endswith(f"check ssl verify required ca-file {tls.API_CA} check-ssl") for s in servers)
    require(shutil.which("haproxy") is not None, "haproxy is not installed")
    result = verify.check_haproxy(cfg.encode(), "n1")
    assert result.ok, result.detail


def test_api_tls_false_keeps_plain_http(tmp_path: Path) -> None:
    inv = _inv(tmp_path, 3, api={"tls": False})
    files = _files(inv, "n2")
    cfg = files["/etc/haproxy/haproxy.cfg"].decode()
    assert "ssl" not in cfg.replace("ssl_", "")
    assert "api_tls" not in yaml.safe_load(files["/etc/congressctl/congress.yaml"])
    assert not any(path.startswith(tls.TLS_DIR) for path in files)
    require(shutil.which("haproxy") is not None, "haproxy is not installed")
    assert verify.check_haproxy(cfg.encode(), "n2").ok


def test_the_tls_files_their_modes_and_the_node_config(tmp_path: Path) -> None:
    inv = _inv(tmp_path, 4, bus={"tls": True}, api_pe=3)
    secrets_ = load_or_create_secrets(inv)
    n1 = {f.path: f for f in render_node(inv, inv.node("n1"), secrets_)}
    n4 = {f.path: f for f in render_node(inv, inv.node("n4"), secrets_)}
    for path in (tls.API_KEY, tls.API_PEM, tls.BUS_KEY):
        assert n1[path].mode == 0o600 and n1[path].secret
    assert n1[tls.BUS_KEY].owner == "redis" and n1[tls.BUS_CERT].owner == "redis"
    assert tls.BUS_KEY not in n4 and tls.BUS_CA in n4      # n4 is no bus node, but its clients verify the bus
    config = yaml.safe_load(n1["/etc/congressctl/congress.yaml"].content)
    assert config["api_tls"] == {"cert_file": tls.API_CERT, "key_file": tls.API_KEY}
    assert config["bus"]["tls"] is True and config["bus"]["tls_ca_file"] == tls.BUS_CA
    conf = n1["/etc/congressctl/redis.conf"].content.decode()
    for line in ("port 0", f"tls-port {inv.bus.port}", "tls-replication yes", "tls-auth-clients no",
                 f"tls-cert-file {tls.BUS_CERT}", f"tls-ca-cert-file {tls.BUS_CA}"):
        assert line + "\n" in conf
    assert f'name="tls_ca_file" value="{tls.BUS_CA}"' in render_cib(inv).decode()
    public = {f.path for f in render_node(inv, inv.node("n1"))}
    assert not any(path.startswith(tls.TLS_DIR) for path in public)   # `congressctl render` carries no key


def test_status_asks_a_tls_bus_with_the_cluster_ca() -> None:
    command = status.bus_command("10.0.0.1", 6379, "INFO replication", budget=2, tls_on=True)
    assert f"redis-cli --no-auth-warning --tls --cacert {tls.BUS_CA} -h 10.0.0.1 -p 6379 INFO" in command
    assert "--tls" not in status.bus_command("10.0.0.1", 6379, "PING", budget=2)


def test_without_bus_tls_redis_keeps_its_plain_port(tmp_path: Path) -> None:
    inv = _inv(tmp_path, 3)
    conf = _files(inv, "n1")["/etc/congressctl/redis.conf"].decode()
    assert f"port {inv.bus.port}\n" in conf and "tls-port" not in conf
    assert "tls_ca_file" not in render_cib(inv).decode()


# ---------------------------------------------------------------------------------------------- real processes


def test_an_api_pe_serves_https_verified_by_the_ca(redis_server, tmp_path: Path) -> None:
    certs = write_test_tls(tmp_path / "tls")
    cluster = NodeCluster(redis=redis_server, dir=tmp_path, api_tls_dir=certs)
    try:
        node = cluster.add("api-pe", "n1")
        assert node.url.startswith("https://")
        assert node.request("POST", "/v1/policies", {"name": "p"})[0] == 201
        assert node.get("/v1/policies/p")[0] == 200
        config = load_node_config(node.config)
        assert config.api_tls and config.api_tls.cert_file.endswith("api.crt")
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"{node.url}/healthz", timeout=5,
                                   context=ssl.create_default_context(cadata=tls.make_ca("other").cert.decode()))
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/healthz", timeout=5).read()
        # status's probe on a host: curl verifying with the CA file
        probe = subprocess.run(status.probe_command("tok", f"{node.url}/v1/status", 5, cacert=str(certs / "ca.crt"),
                                                    api_header=True),
                               shell=True, capture_output=True, text=True, timeout=30, check=False,
                               input=auth.curl_header(ADMIN_TOKEN))
        api = status.parse_probes(probe.stdout, "tok")["api"]
        assert api.rc == 0 and json.loads(api.out)["node"] == "n1", api.err
    finally:
        cluster.stop_all()


def test_the_api_pe_agent_checks_healthz_over_https(redis_server, tmp_path: Path) -> None:
    require(Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(), "resource-agents is not installed")
    certs = write_test_tls(tmp_path / "tls")
    cluster = NodeCluster(redis=redis_server, dir=tmp_path, api_tls_dir=certs)
    try:
        node = cluster.add("api-pe", "n1")
        env = {**os.environ, "OCF_ROOT": "/usr/lib/ocf", "OCF_RESKEY_config": str(node.config),
               "OCF_RESKEY_pidfile": str(tmp_path / "api.pid"), "OCF_RESKEY_ca_file": str(certs / "ca.crt")}
        (tmp_path / "api.pid").write_text(str(node.pid))
        agent = REPO / "templates" / "ocf" / "congress-api-pe"
        ok = subprocess.run([str(agent), "monitor"], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert ok.returncode == OCF_SUCCESS, ok.stderr
        other = tmp_path / "other-ca.crt"
        other.write_bytes(tls.make_ca("other").cert)
        wrong = subprocess.run([str(agent), "monitor"], env={**env, "OCF_RESKEY_ca_file": str(other)},
                               capture_output=True, text=True, timeout=30, check=False)
        assert wrong.returncode != OCF_SUCCESS and "does not answer" in wrong.stderr
    finally:
        cluster.stop_all()


@pytest.fixture
def tls_redis(tmp_path_factory):
    require(shutil.which("redis-server") is not None, "redis-server is not installed (make install)")
    d = tmp_path_factory.mktemp("redis-tls")
    server = RedisServer(dir=d, port=free_port(), password=secrets.token_hex(16), tls_dir=write_test_tls(d / "tls"))
    server.password_file.write_text(server.password + "\n")
    server.password_file.chmod(0o600)
    server.start()
    yield server
    server.stop()


def test_nodes_use_a_tls_only_bus(tls_redis, tmp_path: Path) -> None:
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=tls_redis.port, password=tls_redis.password, socket_timeout=2).ping()
    cluster = NodeCluster(redis=tls_redis, dir=tmp_path)
    try:
        api = cluster.add("api-pe", "n1")
        cluster.add("dsd", "n2")
        assert api.request("POST", "/v1/policies", {"name": "overtls"})[0] == 201
        assert tls_redis.client().keys("congress:t:*")
        other = cluster.add("api-pe", "n3")
        wait_for(lambda: other.get("/v1/policies/overtls")[0] == 200, 10, what="n3 synced over TLS")
    finally:
        cluster.stop_all()


class _TlsInstance(Instance):
    tls_dir: Path

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5,
                           socket_connect_timeout=2, decode_responses=True, ssl=True,
                           ssl_ca_certs=str(self.tls_dir / "ca.crt"))

    def write_conf(self) -> Path:
        conf = super().write_conf()
        d = self.tls_dir
        text = conf.read_text().replace(f"port {self.port}\n", "")
        conf.write_text(text + "\n".join([f"tls-cert-file {d / 'bus.crt'}", f"tls-key-file {d / 'bus.key'}",
                                          f"tls-ca-cert-file {d / 'ca.crt'}", "tls-auth-clients no",
                                          "tls-replication yes", ""]))
        return conf


def test_the_bus_agent_runs_a_tls_only_replica_and_promotes_it(tmp_path: Path) -> None:
    require(shutil.which("redis-server") is not None, "redis-server is not installed (make install)")
    require(Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(), "resource-agents is not installed")
    certs = write_test_tls(tmp_path / "tls")
    password = secrets.token_hex(16)
    password_file = tmp_path / "bus.password"
    password_file.write_text(password + "\n")
    m, a = (_TlsInstance(name, free_port(), tmp_path / name, password) for name in ("m", "a"))
    for instance in (m, a):
        instance.tls_dir = certs
        instance.dir.mkdir()
    master = subprocess.Popen(["redis-server", str(m.write_conf()), "--port", "0", "--tls-port", str(m.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agent = BusAgent(a, m, [m, a], password_file)
    agent.env["OCF_RESKEY_tls_ca_file"] = str(certs / "ca.crt")
    try:
        wait_for(lambda: m.client().ping(), 10, what="master M over TLS")
        started = agent.run("start")
        assert started.returncode == OCF_SUCCESS, started.stderr
        wait_for(lambda: a.replication()["master_link_status"] == "up", 15, what="A in sync with M over TLS")
        m.client().set("k", "v")
        assert m.client().execute_command("WAIT", 1, 2000) == 1
        assert agent.run("monitor").returncode == OCF_SUCCESS
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis(port=a.port, password=password, socket_timeout=2).ping()   # no plain port
        master.kill()
        master.wait(timeout=5)
        promoted = agent.run("promote")
        assert promoted.returncode == OCF_SUCCESS, promoted.stderr
        assert agent.run("monitor").returncode == OCF_RUNNING_PROMOTED
        assert a.client().get("k") == "v"
    finally:
        agent.run("stop")
        if master.poll() is None:
            master.kill()
        master.wait(timeout=5)


def test_deploy_ends_by_naming_the_ca_for_clients(monkeypatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=buffer, width=200, color_system=None))
    cli._deploy_summary(DeployResult(hosts={"n1": HostReport("n1")}, ready=True, ca_file="/s/tls/ca.crt"))
    assert buffer.getvalue().splitlines()[-1] == "clients: --os-cacert /s/tls/ca.crt"
