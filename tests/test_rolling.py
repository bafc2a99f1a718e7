"""Rolling restarts: the plan (order, batches), reading bans and HAProxy's sessions; on the lab, the roll itself
observed from HAProxy's stats socket, a host that never comes back, and an HAProxy reload under a client."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from congressctl import haproxy, pacemaker, rolling
from congressctl import lab as labmod
from fixtures_cluster import congressctl, retimed_inventory

BANS = """<constraints>
  <rsc_location id="dsd-prefers-n1" rsc="dsd" node="n1" score="10"/>
  <rsc_location id="cli-ban-dsd-on-n1" rsc="dsd" role="Started">
    <rule id="cli-ban-dsd-on-n1-rule" score="-INFINITY" boolean-op="and">
      <expression id="cli-ban-dsd-on-n1-expr" attribute="#uname" operation="eq" value="n1" type="string"/>
      <date_expression id="cli-ban-dsd-on-n1-lifetime" operation="lt" end="2026-12-01 20:10:18Z"/>
    </rule>
  </rsc_location>
  <rsc_location id="cli-ban-api-pe-clone-on-n3" rsc="api-pe-clone" role="Started" node="n3" score="-INFINITY"/>
</constraints>"""


def _placement(api: list[str], dsd: str) -> pacemaker.Placement:
    return pacemaker.Placement(running={"api-pe": api, "dsd": [dsd]}, online=sorted(api))


def test_plan_restarts_api_pe_host_by_host_the_leader_last_then_the_dsd() -> None:
    stale = {"n1": ["api-pe"], "n2": ["api-pe", "dsd"], "n3": ["api-pe"]}
    plan = rolling.make_plan(stale, _placement(["n1", "n2", "n3"], "n2"), leader="n1", serial=1)
    assert plan.api_pe == [["n2"], ["n3"], ["n1"]] and plan.dsd == "n2"
    assert plan.steps()[:3] == ["restart api-pe on n2", "restart api-pe on n3", "restart api-pe on n1"]
    assert plan.steps()[3].startswith("restart the DSD (now on n2")


def test_plan_batches_serial_hosts_and_skips_what_is_not_stale_or_not_running() -> None:
    stale = {"n1": ["api-pe"], "n2": ["api-pe"], "n3": ["api-pe", "haproxy"], "n4": ["api-pe"], "n5": ["dsd"]}
    plan = rolling.make_plan(stale, _placement(["n1", "n2", "n3", "n5"], "n1"), leader=None, serial=2)
    assert plan.api_pe == [["n1", "n2"], ["n3"]]     # n4 runs no api-pe now; n5's DSD is not the one running
    assert plan.dsd is None
    assert rolling.make_plan({}, _placement(["n1"], "n1"), leader="n1", serial=1).empty


def test_bans_left_by_crm_resource_are_found_with_or_without_a_lifetime() -> None:
    assert pacemaker.parse_bans(BANS) == [("dsd", "n1"), ("api-pe-clone", "n3")]


def test_show_stat_gives_each_servers_state_and_sessions() -> None:
    header = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status"
    lines = [header,
             "congress_api,FRONTEND,,,4,9,4096,100,0,0,0,0,0,,,,,OPEN",
             "congress_api_pe,n1,0,0,2,5,,50,0,0,,0,,0,0,0,0,DRAIN",
             "congress_api_pe,n2,0,0,0,5,,50,0,0,,0,,0,0,0,0,UP",
             "congress_api_pe,BACKEND,0,0,2,9,410,100,0,0,0,0,,0,0,0,0,UP"]
    servers = {b.server: b for b in haproxy.parse_stat("\n".join(lines))}
    assert sorted(servers) == ["n1", "n2"]
    assert (servers["n1"].status, servers["n1"].sessions, servers["n1"].up) == ("DRAIN", 2, False)
    assert (servers["n2"].status, servers["n2"].sessions, servers["n2"].up) == ("UP", 0, True)


LIVE_VS_OURS = """<diff format="2">
  <change operation="delete" path="/cib/status/node_state[@id=&apos;3&apos;]"/>
  <change operation="modify" path="/cib">
    <change-list><change-attr name="crm_feature_set" operation="unset"/></change-list>
    <change-result><cib validate-with="pacemaker-3.9" epoch="59" num_updates="0" admin_epoch="0"/></change-result>
  </change>
  <change operation="create" path="/cib/configuration/constraints" position="5">
    <!-- a comment of ours -->
  </change>
  <change operation="delete" path="/cib/configuration/constraints/rsc_location[@id=&apos;cli-ban-bus-on-n3&apos;]"/>
  {extra}
</diff>"""
OLD_CIB = """<cib><configuration><constraints>
  <rsc_location id="dsd-prefers-n9" rsc="dsd" node="n9" score="10"/>
</constraints></configuration></cib>"""


def test_a_live_cib_with_bans_and_pacemakers_own_additions_holds_ours() -> None:
    assert pacemaker.live_lacks(LIVE_VS_OURS.format(extra=""), OLD_CIB) == []


def test_a_live_cib_missing_part_of_ours_or_keeping_what_we_dropped_does_not() -> None:
    missing = ('<change operation="create" path="/cib/configuration/resources" position="1">'
               '<primitive id="haproxy"/></change>')
    changed = ('<change operation="modify" path="/cib/configuration/rsc_defaults/meta_attributes'
               '[@id=&apos;rsc-defaults&apos;]/nvpair[@id=&apos;rsc-defaults-stickiness&apos;]"/>')
    dropped = ('<change operation="delete" '
               'path="/cib/configuration/constraints/rsc_location[@id=&apos;dsd-prefers-n9&apos;]"/>')
    for extra in (missing, changed, dropped):
        assert len(pacemaker.live_lacks(LIVE_VS_OURS.format(extra=extra), OLD_CIB)) == 1, extra
    assert pacemaker.live_lacks('<diff format="1"/>', OLD_CIB) != []


# ---------------------------------------------------------------------------------------------- on the lab


def _exec(cluster, host: str, *argv: str) -> str:
    proc = labmod.lab_exec(cluster.lab, host, list(argv), timeout=60)
    out = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
    assert proc.returncode == 0, f"{argv} on {host}: {proc.stderr}"
    return out


def _vip_host(cluster) -> str:
    placement = pacemaker.parse_crm_mon(_exec(cluster, "n1", "crm_mon", "-1", "--output-as=xml"))
    return placement.on("haproxy")[0]




def _deploy(inventory: Path, *args: str) -> tuple[int, dict]:
    proc = congressctl("deploy", "-i", str(inventory), "--output", "json", *args, timeout=900)
    return proc.returncode, json.loads(proc.stdout)


class Watch:
    """While a deploy runs: HAProxy's server states every 0.1 s from the stats socket of the host holding the VIP,
    and GETs through the VIP on one kept-alive client (its failures)."""

    def __init__(self, cluster):
        self.cluster, self.vip = cluster, _vip_host(cluster)
        self.url = f"http://{cluster.inv.vip.address}:{cluster.inv.api_port}/v1/policies"
        self.states: list[dict[str, str]] = []
        self.gets, self.failed = 0, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._stats, daemon=True),
                        threading.Thread(target=self._get, daemon=True)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        time.sleep(1)
        return self

    def __exit__(self, *exc):
        time.sleep(1)
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _stats(self) -> None:
        command = ["sh", "-c", haproxy.socket_command("show stat")]
        while not self.stop.is_set():
            proc = labmod.lab_exec(self.cluster.lab, self.vip, command, timeout=10)
            out = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
            servers = {b.server: b.status for b in haproxy.parse_stat(out) if b.proxy == haproxy.API_BACKEND}
            if servers:
                self.states.append(servers)
            self.stop.wait(0.1)

    def _get(self) -> None:
        with httpx.Client(timeout=3) as client:
            while not self.stop.is_set():
                try:
                    status = client.get(self.url).status_code
                except httpx.HTTPError as exc:
                    status = repr(exc)
                self.gets += 1
                if status != 200:
                    self.failed.append(status)
                self.stop.wait(0.05)

    def out_of_service(self) -> list[set[str]]:
        """Per sample, the servers not taking requests (drained, down, in maintenance)."""
        return [{name for name, state in sample.items() if not state.startswith("UP")} for sample in self.states]


@pytest.mark.lab
@pytest.mark.slow
def test_a_changed_config_restarts_one_host_at_a_time_and_no_request_fails(cluster, tmp_path: Path) -> None:
    changed = retimed_inventory(cluster, tmp_path, full_sync_interval_s=31)
    with Watch(cluster) as watch:
        rc, result = _deploy(changed)
    assert rc == 0, result
    api_hosts = sorted(n.name for n in cluster.inv.with_role("api-pe"))
    out = watch.out_of_service()
    assert max(len(o) for o in out) == 1, f"two api-pe out at once: {[o for o in out if len(o) > 1][:3]}"
    assert sorted(set().union(*out)) == api_hosts, "every api-pe host was taken out once"
    assert watch.failed == [] and watch.gets > 100
    assert all("restarted api-pe" in result["hosts"][h]["restarted"] for h in api_hosts)
    assert sum(1 for h in result["hosts"].values() for r in h["restarted"] if r.startswith("restarted dsd")) == 1
    assert result["plan"][-1].startswith("restart the DSD")
    rc, back = _deploy(cluster.inventory_path)
    assert rc == 0 and all("restarted api-pe" in back["hosts"][h]["restarted"] for h in api_hosts), back
    rc, noop = _deploy(cluster.inventory_path)
    assert rc == 0 and not noop["changed"] and all(not h["restarted"] for h in noop["hosts"].values())


BLOCK_BUS = ("nft add table inet rolltest && nft add chain inet rolltest out '{{ type filter hook output priority 0; }}'"
             " && nft add rule inet rolltest out tcp dport {port} ct state new drop")


@pytest.mark.lab
@pytest.mark.slow
def test_a_host_that_never_comes_back_stops_the_roll_and_the_next_deploy_goes_on(cluster, tmp_path: Path) -> None:
    """The second host of the roll cannot reach the bus any more with a new connection (its running processes
    keep theirs): its new api-pe never gets healthy. The roll stops there, naming it; the host after it keeps its
    old process and serves; once the host can reach the bus again, the next deploy restarts what is left."""
    changed = retimed_inventory(cluster, tmp_path, full_sync_interval_s=32)
    plan = congressctl("deploy", "-i", str(changed), "--dry-run", check=True).stdout
    order = [line.split(" on ")[1] for line in plan.splitlines() if ". restart api-pe on " in line]
    assert len(order) == 3, plan
    first, failing, after = order
    _exec(cluster, failing, "sh", "-c", BLOCK_BUS.format(port=cluster.inv.bus.port))
    try:
        with Watch(cluster) as watch:
            rc, result = _deploy(changed, "--timeout", "45")
        assert rc != 0
        hosts = result["hosts"]
        assert not hosts[failing]["ok"] and hosts[failing]["step"] == "start api-pe", hosts[failing]
        assert failing in hosts[failing]["error"] and "healthy" in hosts[failing]["error"]
        assert hosts[first]["ok"] and hosts[first]["restarted"] == ["restarted api-pe"]
        assert hosts[after]["ok"] and hosts[after]["restarted"] == []
        assert "api-pe" in _exec(cluster, after, "/opt/congressctl/sbin/congressctl-cluster", "stale").split()
        assert watch.failed == [], watch.failed[:5]
    finally:
        _exec(cluster, failing, "sh", "-c", "nft delete table inet rolltest; true")
    rc, again = _deploy(changed)
    assert rc == 0, again
    assert again["hosts"][after]["restarted"][:1] == ["restarted api-pe"]
    assert again["hosts"][first]["restarted"] == [] and "restarted api-pe" not in again["hosts"][failing]["restarted"]
    rc, back = _deploy(cluster.inventory_path)
    assert rc == 0, back


@pytest.mark.lab
@pytest.mark.slow
def test_an_haproxy_config_change_reloads_it_and_a_kept_alive_connection_goes_on(cluster) -> None:
    vip = _vip_host(cluster)
    conn = http.client.HTTPConnection(cluster.inv.vip.address, cluster.inv.api_port, timeout=5)
    conn.request("GET", "/v1/policies")
    first = conn.getresponse()
    assert first.status == 200
    first.read()
    _exec(cluster, vip, "sh", "-c", "echo '# edited by hand' >> /etc/haproxy/haproxy.cfg")
    with Watch(cluster) as watch:
        rc, result = _deploy(cluster.inventory_path)
    assert rc == 0, result
    assert result["hosts"][vip]["restarted"] == ["reloaded haproxy"]
    assert all(not h["restarted"] for name, h in result["hosts"].items() if name != vip)
    conn.request("GET", "/v1/policies")
    after = conn.getresponse()
    assert after.status == 200 and after.getheader("connection") == "close"
    after.read()
    conn.close()
    assert watch.failed == [] and watch.gets > 10
