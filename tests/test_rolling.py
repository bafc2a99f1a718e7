"""Rolling restarts: the plan (order, batches), reading bans and HAProxy's sessions; on the lab, the roll itself
observed from HAProxy's stats socket (also --serial 2), a host that never comes back, an HAProxy reload under a
client, a redis.conf change rolled over the bus (replicas, then a switchover) under acknowledged writes, and a
CIB-only change applied as a patch."""

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
from fixtures_cluster import congressctl, inventory_with, retimed_inventory

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


def test_plan_restarts_bus_replicas_one_by_one_then_switches_the_promoted_one_over_before_api_pe() -> None:
    stale = {"n1": ["api-pe", "bus"], "n2": ["bus"], "n3": ["bus"]}
    placement = _placement(["n1", "n2", "n3"], "n2")
    placement.running["bus"], placement.promoted["bus"] = ["n1", "n2", "n3"], ["n2"]
    plan = rolling.make_plan(stale, placement, leader=None, serial=1)
    assert (plan.bus_replicas, plan.bus_promoted, plan.bus_alone) == (["n1", "n3"], "n2", None)
    steps = plan.steps()
    assert steps[0].startswith("restart the bus replica on n1") and steps[1].startswith("restart the bus replica on n3")
    assert steps[2].startswith("switch the bus over from n2") and steps[3] == "restart api-pe on n1"
    alone = rolling.make_plan({"n1": ["bus"]}, pacemaker.Placement(running={"bus": ["n1"]}, promoted={"bus": ["n1"]}),
                              leader=None, serial=1, multi_bus=False)
    assert (alone.bus_replicas, alone.bus_promoted, alone.bus_alone) == ([], None, "n1")
    assert rolling.make_plan({"n1": ["api-pe"]}, placement, leader=None, serial=1).bus_replicas == []


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
        self.url = f"{cluster.inv.api_url()}/v1/policies"
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
        with httpx.Client(timeout=3, headers=self.cluster.headers, verify=self.cluster.verify) as client:
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
            rc, result = _deploy(changed, "--timeout", "30")
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
    conn = http.client.HTTPSConnection(cluster.inv.vip.address, cluster.inv.api_port, timeout=5,
                                       context=cluster.verify)
    conn.request("GET", "/v1/policies", headers=cluster.headers)
    first = conn.getresponse()
    assert first.status == 200
    first.read()
    _exec(cluster, vip, "sh", "-c", "echo '# edited by hand' >> /etc/haproxy/haproxy.cfg")
    with Watch(cluster) as watch:
        rc, result = _deploy(cluster.inventory_path)
    assert rc == 0, result
    assert result["hosts"][vip]["restarted"] == ["reloaded haproxy"]
    assert all(not h["restarted"] for name, h in result["hosts"].items() if name != vip)
    conn.request("GET", "/v1/policies", headers=cluster.headers)
    after = conn.getresponse()
    assert after.status == 200 and after.getheader("connection") == "close"
    after.read()
    conn.close()
    assert watch.failed == [] and watch.gets > 10


@pytest.mark.lab
@pytest.mark.slow
def test_serial_2_takes_two_api_pe_out_at_a_time_never_more(cluster, tmp_path: Path) -> None:
    changed = retimed_inventory(cluster, tmp_path, full_sync_interval_s=34)
    with Watch(cluster) as watch:
        rc, result = _deploy(changed, "--serial", "2")
    assert rc == 0, result
    assert result["plan"][0].startswith("restart api-pe on ") and ", " in result["plan"][0], result["plan"]
    out = watch.out_of_service()
    assert max(len(o) for o in out) == 2, f"more than two api-pe out at once: {[o for o in out if len(o) > 2][:3]}"
    assert watch.failed == [] and watch.gets > 50
    rc, back = _deploy(cluster.inventory_path, "--serial", "2")
    assert rc == 0, back


class BusWatch(Watch):
    """Watch, and besides: the bus node Pacemaker promotes, every 0.2 s (crm_mon on n1, with the time), and one
    rule create after another through the VIP (the names of those acknowledged: 201)."""

    def __init__(self, cluster, policy: str):
        super().__init__(cluster)
        self.policy = policy
        self.promoted: list[tuple[float, list[str]]] = []
        self.acked: list[str] = []
        self.writes = 0
        self.threads += [threading.Thread(target=self._promoted, daemon=True),
                         threading.Thread(target=self._write, daemon=True)]

    def _promoted(self) -> None:
        while not self.stop.is_set():
            proc = labmod.lab_exec(self.cluster.lab, "n1", ["crm_mon", "-1", "--output-as=xml"], timeout=10)
            out = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
            if proc.returncode == 0:
                self.promoted.append((time.monotonic(), pacemaker.parse_crm_mon(out).promoted.get("bus", [])))
            self.stop.wait(0.2)

    def _write(self) -> None:
        url = f"{self.cluster.inv.api_url()}/v1/policies/{self.policy}/rules"
        with httpx.Client(timeout=3, headers=self.cluster.headers, verify=self.cluster.verify) as client:
            while not self.stop.is_set():
                name = f"w{self.writes}"
                self.writes += 1
                try:
                    if client.post(url, json={"rule": f"acked(x) :- q(x), equal(x, {self.writes})",
                                              "name": name}).status_code == 201:
                        self.acked.append(name)
                except httpx.HTTPError:
                    pass
                self.stop.wait(0.1)

    def promotions(self) -> list[tuple[str | None, float]]:
        """The promoted node (None: none) in runs, each with how long it lasted, from the samples."""
        runs: list[tuple[str | None, float, float]] = []
        for t, promoted in self.promoted:
            assert len(promoted) <= 1, f"two bus nodes promoted at once: {promoted}"
            node = promoted[0] if promoted else None
            if runs and runs[-1][0] == node:
                runs[-1] = (node, runs[-1][1], t)
            else:
                runs.append((node, runs[-1][2] if runs else t, t))
        return [(node, round(end - start, 2)) for node, start, end in runs]


@pytest.mark.lab
@pytest.mark.slow
def test_a_changed_redis_conf_rolls_the_bus_replicas_then_switches_over_and_no_acknowledged_write_is_lost(
        cluster) -> None:
    """Every host's redis.conf edited by hand: the deploy puts ours back, so every bus node must restart. The
    replicas go first, one at a time; then the promotion moves once, to a replica, and the old one restarts."""
    call = httpx.Client(base_url=cluster.inv.api_url(), timeout=5, headers=cluster.headers, verify=cluster.verify)
    policy = "rolling_bus_writes"
    assert call.post("/v1/policies", json={"name": policy}).status_code == 201
    bus_hosts = sorted(n.name for n in cluster.inv.with_role("bus"))
    for host in bus_hosts:
        _exec(cluster, host, "sh", "-c", "echo '# edited by hand' >> /etc/congressctl/redis.conf")
    try:
        with BusWatch(cluster, policy) as watch:
            rc, result = _deploy(cluster.inventory_path)
        assert rc == 0, result
        runs = watch.promotions()
        promoted = [node for node, _ in runs if node]
        assert len(promoted) == 2 and promoted[0] != promoted[1], f"the promotion moved other than once: {runs}"
        old, new = promoted
        assert [node for node, _ in runs] in ([old, new], [old, None, new]), runs
        assert all(took < 10 for node, took in runs if node is None), f"no bus promoted for too long: {runs}"
        restarted = {h: result["hosts"][h]["restarted"] for h in bus_hosts}
        assert restarted[old] == [f"restarted bus (switchover to {new})"], restarted
        assert all(restarted[h] == ["restarted bus (replica)"] for h in bus_hosts if h != old), restarted
        assert [s.split(" on ")[1].split(",")[0] for s in result["plan"][:2]] == [h for h in bus_hosts if h != old]
        assert result["plan"][2].startswith(f"switch the bus over from {old}") and len(result["plan"]) == 3
        assert watch.failed == [] and len(watch.acked) > 20, (watch.failed[:5], len(watch.acked), watch.writes)
        deadline = time.monotonic() + 30
        while (lost := set(watch.acked) - _rule_names(call, policy)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert lost == set(), f"acknowledged writes lost: {sorted(lost)[:10]}"
        assert "bus" not in _exec(cluster, old, "/opt/congressctl/sbin/congressctl-cluster", "stale").split()
        assert not pacemaker.parse_bans(_exec(cluster, "n1", "cibadmin", "--query", "--scope", "constraints"))
    finally:
        call.delete(f"/v1/policies/{policy}")
        call.close()


@pytest.mark.lab
@pytest.mark.slow
def test_a_cib_only_change_is_applied_as_a_patch_and_restarts_nothing(cluster, tmp_path: Path) -> None:
    """A ban of someone else's making (on the frontend, where it does not run) survives the load: the CIB was
    patched, not replaced; no process restarted."""
    changed = inventory_with(cluster, tmp_path, "pacemaker", resource_stickiness=101)
    vip = _vip_host(cluster)
    elsewhere = next(n.name for n in cluster.inv.nodes if n.name != vip)
    incarnations = {n.name: _incarnation(cluster, n) for n in cluster.inv.with_role("api-pe")}
    _exec(cluster, vip, "crm_resource", "--resource", "frontend", "--ban", "--node", elsewhere, "--lifetime", "PT10M",
          "--quiet")
    try:
        for inventory, stickiness in ((changed, "101"), (cluster.inventory_path, "100")):
            rc, result = _deploy(inventory)
            assert rc == 0 and result["cib_loaded"], result
            assert all(h["changed"] == ["/etc/congressctl/cib.xml"] and not h["restarted"]
                       for h in result["hosts"].values()), result["hosts"]
            constraints = _exec(cluster, vip, "cibadmin", "--query", "--scope", "constraints")
            assert ("frontend", elsewhere) in pacemaker.parse_bans(constraints)
            live = _exec(cluster, vip, "crm_attribute", "--type", "rsc_defaults", "--name", "resource-stickiness",
                         "--query", "--quiet")
            assert live.strip() == stickiness
        assert {n.name: _incarnation(cluster, n) for n in cluster.inv.with_role("api-pe")} == incarnations
    finally:
        _exec(cluster, vip, "crm_resource", "--resource", "frontend", "--clear", "--quiet")


def _incarnation(cluster, node) -> str:
    status = httpx.get(f"{cluster.inv.api_url(node.address)}/v1/status", timeout=5, headers=cluster.headers,
                       verify=cluster.verify).json()
    return status["incarnation"]


def _rule_names(call: httpx.Client, policy: str) -> set[str]:
    return {r["name"] for r in call.get(f"/v1/policies/{policy}/rules").json()["results"]}
