"""The process and host faults of issue 12 (dsd-pause, bus-pause, disk-full, host-crash): what in them is pure.
How long a pause lasts is read from the CIB the render makes, targets from placements crm_simulate computes,
the disk-full verdict from recorded histories, host-crash's lab from an inventory folder and fencing under way
from the fencer's XML."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import require_tool

from congressctl import pacemaker, verify
from congressctl.errors import FailoverError
from congressctl.failover import FAULTS, Event, Thresholds, check, faults
from congressctl.failover.cluster import Cluster
from congressctl.failover.history import History
from congressctl.inventory import generate, load_inventory, parse_inventory
from congressctl.render import render_cib

T_FAULT, HEALED = 2.0, 12.0


def _cib(tmp_path: Path) -> bytes:
    inv = parse_inventory(yaml.safe_dump(generate(3, dsd=3, bus=3)), tmp_path / "inv.yaml")
    return render_cib(inv)


def test_the_scenarios_are_registered_in_order_with_what_they_need():
    names = list(FAULTS)
    assert names[names.index("dsd-pause"):names.index("disk-full") + 1] == ["dsd-pause", "bus-pause", "disk-full"]
    assert FAULTS["dsd-pause"].new_dsd and FAULTS["dsd-pause"].killed == "dsd"
    assert FAULTS["bus-pause"].dsd_off_bus and FAULTS["bus-pause"].killed == "bus"
    assert FAULTS["disk-full"].detection == "refused" and FAULTS["disk-full"].recovery == "write-back"
    assert not any(FAULTS[n].heals_itself for n in ("dsd-pause", "bus-pause", "disk-full"))
    assert "bus-pause" in faults.BUS_SCENARIOS and "disk-full" not in faults.BUS_SCENARIOS


@pytest.mark.parametrize("text, seconds", [("2s", 2.0), ("500ms", 0.5), ("10", 10.0), ("1min", 60.0),
                                           ("1.5s", 1.5), ("2h", 7200.0), ("PT5S", None), ("soon", None)])
def test_pacemaker_durations(text, seconds):
    assert pacemaker.duration_s(text) == seconds


def test_the_monitors_are_read_from_the_rendered_cib(tmp_path):
    cib = _cib(tmp_path).decode()
    assert pacemaker.op_timing(cib, "dsd-monitor") == pacemaker.OpTiming(interval_s=2.0, timeout_s=10.0)
    assert pacemaker.op_timing(cib, "bus-monitor-promoted") == pacemaker.OpTiming(interval_s=1.0, timeout_s=5.0)
    assert pacemaker.op_timing(cib, "no-such-op") is None
    assert pacemaker.op_timing('<resources><op id="x" name="monitor" interval="2s"/></resources>',
                               "x") == pacemaker.OpTiming(2.0, 20.0)   # Pacemaker's default timeout


def test_a_pause_outlasts_what_the_monitor_takes_to_notice():
    dsd = pacemaker.OpTiming(interval_s=2.0, timeout_s=10.0)
    # liveness stale after 3 peer timeouts (never under 2 s), a second more, the next monitor, its timeout
    assert faults.dsd_pause_s(dsd, 1.0) == 3 + 1 + 2 + 10
    assert faults.dsd_pause_s(dsd, 0.5) == 2 + 1 + 2 + 10
    assert faults.dsd_pause_s(dsd, 1.1) == 4 + 1 + 2 + 10
    assert faults.bus_pause_s(pacemaker.OpTiming(interval_s=1.0, timeout_s=5.0)) == 7.0


def test_bus_faults_target_the_promoted_redis(tmp_path):
    require_tool("crm_simulate")
    cib, names = _cib(tmp_path), ["n1", "n2", "n3"]
    up = verify.simulate(cib, names)
    target = faults.bus_target(up)
    assert target is not None and [target] == up.promoted["bus"]
    moved = verify.simulate(cib, names, [target])
    assert faults.bus_target(moved) not in (None, target)
    assert faults.bus_target(pacemaker.Placement()) is None
    assert faults.bus_target(pacemaker.Placement(promoted={"bus": ["n1", "n2"]})) is None   # two: no target


@pytest.mark.parametrize("line, why", [
    ("tmpfs 65536 1024 64512 2% /var/lib/redis", None),
    ("/dev/sda1 41152736 9000000 30000000 24% /", "on the filesystem mounted at /, not a filesystem of its own"),
    ("/dev/sdb1 10485760 100 10485660 1% /var/lib/redis", "10240 MB, more than the 1024 MB"),
    ("df: /var/lib/redis: No such file or directory", "df printed no filesystem"),
])
def test_disk_full_fills_only_a_small_filesystem_of_its_own(line, why):
    found = faults.disk_refusal(line)
    assert (found is None) if why is None else (found is not None and why in found), found


def _disk_full(*, answers: list[tuple[float, int | None, str | None]]) -> list[Event]:
    """Writes every 0.5 s (answered 201 but those in `answers`), GETs, pushes and actions around a full disk."""
    failing = {t: (status, message) for t, status, message in answers}
    events = [Event(T_FAULT, "fault", host="n1"), Event(HEALED, "restore", host="n1"), Event(13.0, "recovered"),
              Event(31.0, "tables")]
    for i in range(40):
        t = i * 0.5
        status, message = failing.get(t, (201, None))
        events.append(Event(t, "write", name=f"w{i}", ok=status == 201, status=status, message=message,
                            duration=0.01))
        if status == 201:
            events.append(Event(30.0, "read-back", name=f"w{i}"))
        events.append(Event(t, "request", duration=0.01))
    for k in range(100):
        events.append(Event(k * 0.2, "push", k=k, outcome="ok", duration=0.01))
        events.append(Event(k * 0.2 + 0.05, "action", k=k, action_id=f"a{k}", executor="n2/1"))
    return events


def _fault(name: str) -> faults.Fault:
    f = FAULTS[name](cluster=None, thresholds=Thresholds(), history=None)
    f.target, f.limit_s = SimpleNamespace(name="n1"), faults.FULL_S + faults.WRITES_BACK_S
    return f


FULL = "control bus 10.0.0.50:6379: it refuses writes while it cannot save them (Redis: MISCONF ...No space left)"


def test_a_disk_full_that_refuses_writes_with_503_passes_and_keeps_their_message():
    refused = [(t / 2, 503, FULL) for t in range(5, 24)]    # 2.5 .. 11.5 s
    result = check(_disk_full(answers=refused), fault=_fault("disk-full"), thresholds=Thresholds())
    assert result.passed, result.failures
    assert result.detect_s == pytest.approx(0.51) and result.recover_s == pytest.approx(10.0)
    assert result.failed_writes == 19 and result.bad_write_answers == 0 and result.refusals == [FULL]
    assert result.limits["bad_write_answers"] == 0


def test_a_disk_full_write_answered_500_or_not_at_all_fails():
    answers = [(3.0, 503, FULL), (3.5, 500, "Internal Server Error"), (4.0, None, None)]
    result = check(_disk_full(answers=answers), fault=_fault("disk-full"), thresholds=Thresholds())
    assert not result.passed and result.bad_write_answers == 2
    assert "bad_write_answers 2 > 0" in result.failures


def test_writes_that_never_come_back_fail_disk_full():
    answers = [(t / 2, 503, FULL) for t in range(5, 40)]
    result = check(_disk_full(answers=answers), fault=_fault("disk-full"), thresholds=Thresholds())
    assert result.recover_s is None and any(f.startswith("recover_s: never happened") for f in result.failures)


# ------------------------------------------------------------------------------------------- host-crash


def test_host_crash_is_registered_like_a_dsd_host_loss():
    crash = FAULTS["host-crash"]
    assert list(FAULTS).index("host-crash") > list(FAULTS).index("disk-full")
    assert crash.recovery == "first-action" and crash.new_dsd and crash.detection == "pacemaker"
    assert not crash.heals_itself and not crash.overlaps and not crash.dsd_off_bus
    f = crash(cluster=None, thresholds=Thresholds(), history=None)
    f.limit_s = 4.85
    assert f.limits(Thresholds(), None) == {"recover_s": 4.85, "lost": 0}   # duplicates: at-least-once window


def _inventory(folder: Path, *, fencing: object, name: str = "crashlab") -> Path:
    folder.mkdir(exist_ok=True)
    data = generate(3, cluster=name, subnet="10.213.77")
    data["pacemaker"]["fencing"] = fencing
    (folder / "inventory.yaml").write_text(yaml.safe_dump(data))
    return folder / "inventory.yaml"


def _lab_device(ipaddr: str) -> dict:
    return {"devices": [{"name": "lab", "agent": "fence_congresslab", "hosts": ["n1", "n2", "n3"],
                         "params": {"ipaddr": ipaddr, "ipport": "1229", "key_file": "/etc/congressctl/k"}}]}


def _lab_json(folder: Path, name: str = "crashlab") -> None:
    hosts = [{"name": f"n{i}", "address": f"10.213.77.{10 + i}", "netns": f"{name}-n{i}", "pid": 0} for i in (1, 2, 3)]
    (folder / "lab.json").write_text(json.dumps({"name": name, "dir": str(folder), "owns_dir": True,
                                                 "subnet": "10.213.77.0/24", "bridge": f"clb-{name}",
                                                 "vip": "10.213.77.100", "hosts": hosts}))


def test_host_crash_refuses_hosts_without_the_lab_power_switch(tmp_path):
    inv = load_inventory(_inventory(tmp_path / "plain", fencing="disabled"))
    with pytest.raises(FailoverError, match="no fence device of the inventory uses fence_congresslab"):
        faults.lab_of(inv)
    inv = load_inventory(_inventory(tmp_path / "nolab", fencing=_lab_device("10.213.77.1"), name="nosuchlabx"))
    with pytest.raises(FailoverError, match="uses fence_congresslab, but no lab named nosuchlabx"):
        faults.lab_of(inv)
    elsewhere = tmp_path / "elsewhere"
    inv = load_inventory(_inventory(elsewhere, fencing=_lab_device("10.213.99.1")))
    _lab_json(elsewhere)
    with pytest.raises(FailoverError, match="a power switch at 10.213.99.1, not lab crashlab's at 10.213.77.1"):
        faults.lab_of(inv)


def test_host_crash_finds_the_lab_in_the_inventory_folder(tmp_path):
    inv = load_inventory(_inventory(tmp_path, fencing=_lab_device("10.213.77.1")))
    _lab_json(tmp_path)
    found = faults.lab_of(inv)
    assert (found.name, found.dir, found.gateway) == ("crashlab", tmp_path, "10.213.77.1")


FENCE_HISTORY = """<pacemaker-result api-version="2.25" request="stonith_admin --history n2 --output-as=xml">
  <fence_history>
    <fence_event action="reboot" target="n2" client="pacemaker-controld.812" origin="n1" status="pending"
                 extended-status="1"/>
    <fence_event action="reboot" target="n2" client="pacemaker-controld.812" origin="n1" status="success"
                 delegate="n3" completed="2024-12-01 20:01:02 +00:00"/>
  </fence_history>
  <status code="0" message="OK"/>
</pacemaker-result>"""


def test_fencing_under_way_is_a_pending_action_against_the_host():
    assert pacemaker.fencing_pending(FENCE_HISTORY, "n2")
    assert not pacemaker.fencing_pending(FENCE_HISTORY, "n3")
    assert not pacemaker.fencing_pending(FENCE_HISTORY.replace('status="pending"', 'status="failed"'), "n2")
    empty = '<pacemaker-result><list name="fencing history" count="0"/><status code="0"/></pacemaker-result>'
    assert not pacemaker.fencing_pending(empty, "n2")


@pytest.mark.parametrize("fencing, limit", [("enabled", 2.85 + 2.0 + 1.5), ("disabled", 2.85 + 2.0)])
def test_a_lost_host_may_take_a_fence_action_longer_with_fencing_on(fencing, limit):
    cluster = SimpleNamespace(inv=SimpleNamespace(pacemaker=SimpleNamespace(fencing=fencing)),
                              totem=lambda: (1650, 1200))
    cluster.fences = Cluster.fences.fget(cluster)
    th = Thresholds()
    assert Cluster.node_limit(cluster, th.node_slack_s, fenced_s=th.fence_slack_s) == pytest.approx(limit)
    assert Cluster.node_limit(cluster, th.node_slack_s) == pytest.approx(2.85 + 2.0)


def _observed_disk_full(*, refused_at: list[float]) -> list[str]:
    """DiskFull.observe over a chaos-like history: an earlier fault's inject and restore come first."""
    history = History()
    f = FAULTS["disk-full"](cluster=None, thresholds=Thresholds(), history=history)
    history.add("fault", "n1 delays what it sends", t=1.0)
    history.add("restore", "n1: rule removed", t=2.0)
    f.filling_from, f.freed_at = 40.0, 44.0
    for t in (3.0, *refused_at, 50.0):
        history.add("write", ok=False, t=t, status=503 if t in refused_at else 201)
    f.observe()
    return [e.detail for e in history.of("problem")]


def test_disk_full_judges_its_own_window_not_the_first_fault_of_a_chaos_run():
    assert _observed_disk_full(refused_at=[40.1, 43.0]) == []
    assert _observed_disk_full(refused_at=[]) == ["no write was answered 503 while the disk was full"]
    # a 503 outside its window (while another fault held) is not this fault's
    assert _observed_disk_full(refused_at=[1.5]) == ["no write was answered 503 while the disk was full"]
