"""TLS on the lab: HTTPS through the VIP verified by the cluster CA, nothing served in plain HTTP, status over
TLS, python-congressclient with a keystoneauth session, and bus.tls end to end."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import httpx
import pytest
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint

from congressctl import lab as labmod
from congressctl import pacemaker, tls
from congressctl.inventory import load_inventory
from fixtures_cluster import congressctl, inventory_with

pytestmark = pytest.mark.lab


def _exec(cluster, host: str, *argv: str, check: bool = True) -> tuple[int, str]:
    proc = labmod.lab_exec(cluster.lab, host, list(argv), timeout=60)
    out = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
    err = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
    assert not check or proc.returncode == 0, f"{argv} on {host}: {err}"
    return proc.returncode, out + err


def _healthy_status(inventory: Path, limit_s: float = 60) -> dict:
    """`congressctl status --output json` once it says healthy (exit 0)."""
    deadline = time.monotonic() + limit_s
    while True:
        proc = congressctl("status", "-i", str(inventory), "--output", "json", timeout=120)
        if proc.returncode == 0 or time.monotonic() > deadline:
            assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
            return json.loads(proc.stdout)
        time.sleep(1)


def test_the_first_deploy_names_the_ca_and_the_vip_answers_https_verified_by_it(cluster) -> None:
    ca = tls.state_folder(cluster.inv) / "ca.crt"
    assert cluster.first_deploy["ca_file"] == str(ca)
    vip = cluster.inv.api_url()
    assert vip.startswith("https://")
    response = httpx.get(f"{vip}/v1", timeout=5, verify=tls.client_context(ca), headers=cluster.headers)
    assert response.status_code == 200
    created = httpx.post(f"{vip}/v1/policies", json={"name": "overtls"}, timeout=5, verify=cluster.verify,
                         headers=cluster.headers)
    assert created.status_code == 201, created.text
    for node in cluster.inv.with_role("api-pe"):
        status = httpx.get(f"{cluster.inv.api_url(node.address)}/v1/status", timeout=5, verify=cluster.verify,
                           headers=cluster.headers)
        assert status.status_code == 200


def test_nothing_answers_plain_http_nor_an_unknown_ca(cluster) -> None:
    for address in [cluster.inv.vip.address] + [n.address for n in cluster.inv.with_role("api-pe")]:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://{address}:{cluster.inv.api_port}/healthz", timeout=5)
    other = tls.make_ca("other")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{cluster.inv.api_url()}/healthz", timeout=5,
                  verify=ssl.create_default_context(cadata=other.cert.decode()))


def test_haproxy_checks_the_nodes_over_tls(cluster) -> None:
    placement = pacemaker.parse_crm_mon(_exec(cluster, "n1", "crm_mon", "-1", "--output-as=xml")[1])
    vip_host = placement.on("haproxy")[0]
    _, stat = _exec(cluster, vip_host, "sh", "-c", "echo 'show servers state congress_api_pe' | "
                    "socat stdio /run/haproxy/admin.sock")
    _, cfg = _exec(cluster, vip_host, "cat", "/etc/haproxy/haproxy.cfg")
    assert cfg.count("ssl verify required") == len(cluster.inv.with_role("api-pe"))
    rc, out = _exec(cluster, vip_host, "haproxy", "-c", "-f", "/etc/haproxy/haproxy.cfg", check=False)
    assert rc == 0, out
    report = _healthy_status(cluster.inventory_path)
    assert report["api"]["ok"] and report["api"]["url"].startswith("https://"), report["api"]
    ups = [b for h in report["hosts"] for b in h["backends"] if b["status"] == "UP"]
    assert len(ups) == len(cluster.inv.with_role("api-pe")), stat


def test_python_congressclient_through_a_keystoneauth_session_verified_by_the_ca(cluster) -> None:
    from congressclient.v1 import client

    # keystoneauth's token-endpoint plugin with the admin token, and the session verifying with the CA path
    auth = token_endpoint.Token(cluster.inv.api_url(), cluster.headers["X-Auth-Token"])
    sess = ks_session.Session(auth=auth, verify=str(tls.ca_path(cluster.inv)))
    congress = client.Client(session=sess, service_type="policy")
    congress.create_policy({"name": "fromclient"})
    assert "fromclient" in {p["name"] for p in congress.list_policy()["results"]}


def _switch_bus_tls(cluster, inventory: Path) -> dict:
    """Turn bus.tls on or off: a rolling restart cannot bridge a plain and a TLS Redis (a replica of the other
    kind never syncs), so every resource stops first, the deploy pushes the files, and they start again."""
    crm = ("crm_attribute", "--type", "crm_config", "--name", "stop-all-resources")
    _exec(cluster, "n1", *crm, "--update", "true")
    deadline = time.monotonic() + 120
    while pacemaker.parse_crm_mon(_exec(cluster, "n1", "crm_mon", "-1", "--output-as=xml")[1]).running:
        assert time.monotonic() < deadline, "resources did not stop"
        time.sleep(1)
    pushed = congressctl("deploy", "-i", str(inventory), "--output", "json", "--timeout", "15", timeout=600)
    assert json.loads(pushed.stdout)["hosts"]["n1"]["ok"], pushed.stdout[-3000:]
    _exec(cluster, "n1", *crm, "--delete")
    done = congressctl("deploy", "-i", str(inventory), "--output", "json", timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def test_a_live_bus_tls_switch_is_refused_and_changes_nothing(cluster, tmp_path: Path) -> None:
    on = inventory_with(cluster, tmp_path, "bus", tls=True)
    bus_hosts = [n.name for n in cluster.inv.with_role("bus")]
    before = {h: _exec(cluster, h, "cat", "/etc/congressctl/redis.conf")[1] for h in bus_hosts}
    proc = congressctl("deploy", "-i", str(on), "--output", "json", timeout=600)
    assert proc.returncode != 0, proc.stdout[-2000:]
    hosts = json.loads(proc.stdout)["hosts"]
    for h in bus_hosts:
        assert not hosts[h]["ok"] and hosts[h]["step"] == "check the bus", hosts[h]
        assert "bus.tls" in hosts[h]["error"] and "stop-all-resources" in hosts[h]["error"], hosts[h]["error"]
        assert hosts[h]["changed"] == [] and not hosts[h]["installed"], hosts[h]
    assert {h: _exec(cluster, h, "cat", "/etc/congressctl/redis.conf")[1] for h in bus_hosts} == before


@pytest.mark.slow
def test_bus_tls_end_to_end(cluster, tmp_path: Path) -> None:
    on = inventory_with(cluster, tmp_path, "bus", tls=True)
    inv = load_inventory(on)
    try:
        _switch_bus_tls(cluster, on)
        bus_vip = inv.bus.vip
        password = "$(cat /etc/congressctl/bus.password)"
        plain = f'REDISCLI_AUTH="{password}" redis-cli --no-auth-warning -h {bus_vip} -p {inv.bus.port} PING'
        secure = (f'REDISCLI_AUTH="{password}" redis-cli --no-auth-warning --tls --cacert {tls.BUS_CA} '
                  f"-h {bus_vip} -p {inv.bus.port} INFO replication")
        _, refused = _exec(cluster, "n1", "sh", "-c", plain, check=False)
        assert "PONG" not in refused
        _, info = _exec(cluster, "n1", "sh", "-c", secure)
        assert "role:master" in info and f"connected_slaves:{len(inv.with_role('bus')) - 1}" in info, info
        vip = inv.api_url()
        created = httpx.post(f"{vip}/v1/policies", json={"name": "overbustls"}, timeout=5, verify=cluster.verify,
                             headers=cluster.headers)
        assert created.status_code == 201, created.text
        for node in inv.with_role("api-pe"):
            status = httpx.get(f"{inv.api_url(node.address)}/v1/status", timeout=5, verify=cluster.verify,
                               headers=cluster.headers).json()
            assert status["bus"]["connected"], status
        report = _healthy_status(on)
        assert not report["problems"] and report["api"]["ok"], report["problems"]
    finally:
        _switch_bus_tls(cluster, cluster.inventory_path)
    report = _healthy_status(cluster.inventory_path)
    kept = httpx.get(f"{cluster.inv.api_url()}/v1/policies/overbustls", timeout=5, verify=cluster.verify,
                     headers=cluster.headers)
    assert kept.status_code == 200, (kept.text, report)
