"""Rolling restarts: the plan (order, batches), reading bans and HAProxy's sessions; on the lab, the roll itself
observed from HAProxy's stats socket, a host that never comes back, and an HAProxy reload under a client."""

from __future__ import annotations

from pathlib import Path

from congressctl import haproxy, pacemaker, rolling

DATA = Path(__file__).parent / "data"

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
    dropped = '<change operation="delete" path="/cib/configuration/constraints/rsc_location[@id=&apos;dsd-prefers-n9&apos;]"/>'
    for extra in (missing, changed, dropped):
        assert len(pacemaker.live_lacks(LIVE_VS_OURS.format(extra=extra), OLD_CIB)) == 1, extra
    assert pacemaker.live_lacks('<diff format="1"/>', OLD_CIB) != []
