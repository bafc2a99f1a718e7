"""The failover checker on recorded histories: a pure function from events to figures and a verdict."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from congressctl.failover import FAULTS, Event, Thresholds, check, faults
from congressctl.failover.check import executor_overlaps, percentile
from congressctl.failover.report import read_events, write_scenario

T_FAULT = 2.0
OLD, NEW = "n1/1", "n2/7"


class History:
    """A scenario's events built by hand: pushes every 0.1 s, each applied push's window of rows acted on."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def add(self, t: float, kind: str, **fields: object) -> History:
        self.events.append(Event(t, kind, **fields))
        return self

    def pushes(self, ks: range, *, failed: tuple[int, ...] = ()) -> History:
        for k in ks:
            outcome = "failed" if k in failed else "ok"
            self.add(k * 0.1, "push", k=k, outcome=outcome, ok=outcome == "ok", duration=0.01)
        return self

    def actions(self, ks: list[int], *, executor: str = OLD, at: float | None = None) -> History:
        for k in ks:
            self.add(at if at is not None else k * 0.1 + 0.05, "action", k=k, action_id=f"a{k}", executor=executor)
        return self

    def gets(self, start: float, end: float, *, failing: tuple[float, float] | None = None) -> History:
        for t in _every(start, end, 0.1):
            ok = failing is None or not failing[0] <= t < failing[1]
            self.add(t, "request", ok=ok, duration=0.02)
        return self

    def writes(self, start: float, end: float, *, failing: tuple[float, float] | None = None,
               missing: tuple[str, ...] = ()) -> History:
        for n, t in enumerate(_every(start, end, 0.2)):
            name, ok = f"w{n}", failing is None or not failing[0] <= t < failing[1]
            self.add(t, "write", name=name, ok=ok)
            if ok:
                self.add(30.0, "read-back", name=name, ok=name not in missing)
        return self

    def course(self, *, recovered: float) -> History:
        """The fault, the live recovery, and converged tables."""
        return self.add(T_FAULT, "fault", host="n1").add(recovered, "recovered").add(31.0, "tables")


def _every(start: float, end: float, step: float) -> list[float]:
    return [round(start + i * step, 2) for i in range(round((end - start) / step))]


def fault(name: str, *, target: str = "n1", limit_s: float = 5.0) -> faults.Fault:
    f = FAULTS[name](cluster=None, thresholds=Thresholds(), history=None)
    f.target, f.limit_s = SimpleNamespace(name=target), limit_s
    return f


def pe_kill(*, actions: list[int] | None = None) -> History:
    h = History().pushes(range(60)).course(recovered=2.6)
    h.add(2.4, "leader", host="n2", stamped=2.3)
    h.actions(list(range(60)) if actions is None else actions)
    return h.gets(0.0, 6.0).writes(0.0, 6.0)


def test_a_clean_history_passes_with_its_figures():
    result = check(pe_kill().events, fault=fault("pe-leader-kill"), thresholds=Thresholds())
    assert result.passed, result.failures
    assert (result.pushed, result.expected_actions, result.executed) == (60, 60, 60)
    assert (result.lost, result.duplicated, result.executor_overlaps) == (0, 0, 0)
    assert result.detect_s == pytest.approx(0.3)          # the DSD's own stamp, between the fault and the sighting
    assert result.recover_s == pytest.approx(0.6)
    assert (result.requests, result.failed_requests, result.writes, result.acked_writes_lost) == (60, 0, 30, 0)
    assert result.tables_equal and result.target == "n1"
    assert result.limits == {"recover_s": 1.5, "lost": 0, "duplicated": 0, "acked_writes_lost": 0,
                             "executor_overlaps": 0}


def test_a_lost_action_fails():
    result = check(pe_kill(actions=[k for k in range(60) if k != 41]).events, fault=fault("pe-leader-kill"),
                   thresholds=Thresholds())
    assert (result.lost, result.executed, result.expected_actions) == (1, 59, 60)
    assert not result.passed and result.failures == ["lost 1 > 0"]


def test_a_duplicated_action_fails():
    h = pe_kill().actions([33], at=3.5)
    result = check(h.events, fault=fault("pe-leader-kill"), thresholds=Thresholds())
    assert (result.duplicated, result.lost) == (1, 0)
    assert result.failures == ["duplicated 1 > 0"]


def test_rows_only_a_failed_push_brought_are_not_expected():
    h = History().pushes(range(20), failed=(19,)).course(recovered=2.6).actions(list(range(19)))
    result = check(h.events, fault=fault("pe-leader-kill"), thresholds=Thresholds())
    assert (result.expected_actions, result.lost) == (19, 0)


def test_two_dsds_executing_at_once_is_an_overlap_in_any_scenario():
    # the old DSD runs rows 0..19, a new one takes over after the fault, then the old one resumes
    h = History().pushes(range(60)).course(recovered=3.05)
    h.actions(list(range(20))).actions(list(range(30, 45)), executor=NEW).actions([45, 46], executor=OLD)
    h.actions(list(range(47, 60)), executor=NEW)
    result = check(h.events, fault=fault("dsd-node-fail"), thresholds=Thresholds())
    assert result.dsd_replaced and result.executor_overlaps == 1
    assert result.expected_actions == 29 and result.lost == 0   # rows pushed once the new DSD ran one
    assert result.failures == ["executor_overlaps 1 > 0"]


def test_an_overlap_counts_each_time_an_older_executor_resumes():
    def acts(*executors: str) -> list[Event]:
        return [Event(i, "action", k=i, executor=e) for i, e in enumerate(executors)]
    assert executor_overlaps(acts("a", "a", "b", "b")) == 0
    assert executor_overlaps(acts("a", "b", "a", "a", "b", "a", "c", "b")) == 3
    assert executor_overlaps([*acts("a", "b"), Event(5, "action", k=5)]) == 0   # no executor known


def test_an_old_dsds_action_delivered_late_is_ordered_by_when_it_was_sent():
    """The old DSD sent row 2 before its host was cut; the network delivered it after the new DSD's first
    action (the lab's kernel retransmitting once the link is back): not two DSDs executing at once. The same
    arrival sent after the new DSD began is an overlap."""
    early = [Event(0, "action", k=0, executor="old", stamped=0.0), Event(7, "action", k=1, executor="new", stamped=7.0),
             Event(9, "action", k=2, executor="old", stamped=2.5), Event(10, "action", k=3, executor="new", stamped=10)]
    assert executor_overlaps(early) == 0
    late = [e if e.k != 2 else Event(9, "action", k=2, executor="old", stamped=8.5) for e in early]
    assert executor_overlaps(late) == 1


def test_a_lost_acknowledged_write_fails():
    h = History().pushes(range(60)).course(recovered=2.6).add(2.4, "leader", host="n2").actions(list(range(60)))
    h.writes(0.0, 6.0, missing=("w7",))
    result = check(h.events, fault=fault("pe-leader-kill"), thresholds=Thresholds())
    assert result.acked_writes_lost == 1 and result.failures == ["acked_writes_lost 1 > 0"]


def test_write_outage_and_recovery_come_from_the_whole_history():
    # writes fail from 2.2 to 4.6; live, recovery was seen at 3.0 (a write in flight had not failed yet)
    h = History().pushes(range(80)).course(recovered=3.0).add(2.5, "detected").actions(list(range(80)))
    h.gets(0.0, 8.0).writes(0.0, 8.0, failing=(2.2, 4.6))
    result = check(h.events, fault=fault("bus-kill", limit_s=4.0), thresholds=Thresholds())
    assert result.write_outage_s == pytest.approx(2.4)
    assert result.recover_s == pytest.approx(4.6 - T_FAULT)
    assert result.detect_s == pytest.approx(0.5)
    assert result.failed_writes == 12 and result.passed, result.failures
    assert "duplicated" in result.limits    # the DSD stayed: its duplicates are judged
    slow = check(h.events, fault=fault("bus-kill", limit_s=2.0), thresholds=Thresholds())
    assert slow.failures == ["write_outage_s 2.4 > 2.0"]


def test_a_read_outage_is_the_recovery_of_a_vip_fault():
    h = History().pushes(range(80)).course(recovered=3.0).actions(list(range(80))).gets(0.0, 8.0, failing=(2.3, 5.5))
    result = check(h.events, fault=fault("vip-node-fail", limit_s=4.0), thresholds=Thresholds())
    assert result.recover_s == pytest.approx(5.5 - T_FAULT) and result.failed_requests == 32
    assert result.passed and result.limits["recover_s"] == 4.0


def test_a_recovery_never_seen_fails():
    h = History().pushes(range(40)).add(T_FAULT, "fault").add(9.0, "tables").actions(list(range(40)))
    result = check(h.events, fault=fault("pe-leader-kill"), thresholds=Thresholds())
    assert result.recover_s is None and result.detect_s is None
    assert "recover_s: never happened (limit 1.5)" in result.failures


def test_bus_faults_expect_only_rows_pushed_once_the_dsd_is_heard_again():
    h = History().pushes(range(80)).course(recovered=4.0).add(2.5, "detected")
    for t in (1.0, 1.5, 2.5, 3.0, 3.9, 4.0, 5.0):
        h.add(t, "status", host="n2", ok=not 2.0 < t < 4.0)
    h.actions([k for k in range(80) if not 20 <= k < 40]).writes(0.0, 8.0)
    result = check(h.events, fault=fault("bus-node-fail"), thresholds=Thresholds())
    assert not result.dsd_replaced and result.expected_actions == 40 and result.lost == 0, result.failures


def test_a_returning_bus_host_that_takes_the_promotion_back_fails():
    h = History().pushes(range(40)).course(recovered=2.5).actions(list(range(40)))
    h.add(20.0, "bus-promoted", host="n1", ok=False)
    result = check(h.events, fault=fault("bus-failback"), thresholds=Thresholds())
    assert result.bus_moved_back is True
    assert result.failures[0] == "the bus promotion moved back to n1 when it returned"


def test_a_history_without_a_fault_is_refused():
    with pytest.raises(Exception, match="records no fault"):
        check(History().pushes(range(5)).events, fault=fault("pe-leader-kill"), thresholds=Thresholds())


def test_the_events_file_checks_again_to_the_same_figures(tmp_path):
    h = pe_kill().actions([33], at=3.5).add(3.0, "stray", executor=OLD, action_id="x")
    result = check(h.events, fault=fault("pe-leader-kill"), thresholds=Thresholds())
    write_scenario(tmp_path, result, h.events, "timings")
    again = check(read_events(tmp_path / "pe-leader-kill.events.jsonl"), fault=fault("pe-leader-kill"),
                  thresholds=Thresholds())
    assert again.row() == result.row() and again.limits == result.limits
    page = (tmp_path / "pe-leader-kill.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page


def test_every_scenario_is_one_registered_fault_class():
    assert list(faults.SCENARIOS)[:12] == [
        "pe-leader-kill", "pe-leader-pause", "dsd-node-fail", "api-node-fail", "vip-node-fail", "bus-node-fail",
        "bus-kill", "bus-failback", "partition-one", "partition-bus", "packet-loss", "packet-delay"]
    assert faults.SCENARIOS[-1] == "rolling-upgrade" and set(faults.SCENARIOS) == set(FAULTS)
    for name, cls in FAULTS.items():
        assert cls.name == name and cls.description and cls.recovery in faults.RECOVERIES
    assert not FAULTS["pe-leader-pause"].heals_itself and FAULTS["dsd-node-fail"].heals_itself


def slow_gets(h: History, start: float, end: float, *, ms: float, retried: tuple[float, float] | None = None,
              failing: tuple[float, float] | None = None) -> History:
    """GETs every 0.1 s taking `ms`; those started within `retried` took two tries, within `failing` failed."""
    for t in _every(start, end, 0.1):
        tries = 2 if retried and retried[0] <= t < retried[1] else None
        ok = not (failing and failing[0] <= t < failing[1])
        h.add(t, "request", ok=ok, duration=ms / 1000, attempt=tries)
    return h


def packet_fault(*, failing: tuple[float, float] | None = None) -> History:
    """A packet fault on the VIP's host from T_FAULT to 7.0: GETs slow (and some retried) while it lasts."""
    h = History().pushes(range(90)).add(T_FAULT, "fault", host="n1").add(T_FAULT, "recovered")
    h.add(7.0, "restore", host="n1").add(31.0, "tables").actions(list(range(90)))
    slow_gets(h, 0.0, T_FAULT, ms=4.0)
    slow_gets(h, T_FAULT, 5.0, ms=120.0, retried=(3.0, 3.5), failing=failing)
    slow_gets(h, 5.0, 7.0, ms=350.0)
    slow_gets(h, 7.0, 9.0, ms=4.0)
    return h.writes(0.0, 9.0, failing=(3.0, 3.4))


def test_nearest_rank_percentiles():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_a_packet_fault_reports_what_it_costs_in_get_latency():
    result = check(packet_fault().events, fault=fault("packet-loss"), thresholds=Thresholds())
    assert result.passed, result.failures
    assert (result.get_p50_before_ms, result.get_p99_before_ms) == (4.0, 4.0)
    assert (result.get_p50_fault_ms, result.get_p99_fault_ms) == (120.0, 350.0)   # 30 at 120 ms, 20 at 350 ms
    assert result.retried_requests == 5 and result.failed_requests == 0
    assert result.failed_writes == 2        # writes are not retried, nor judged beyond their acknowledgement
    assert result.row()["get_ms"] == "p50 4->120 p99 4->350"
    assert result.detect_s is None          # nothing in the cluster is meant to notice
    assert result.limits == {"failed_requests": 0, "lost": 0, "duplicated": 0, "acked_writes_lost": 0,
                             "executor_overlaps": 0}


def test_a_get_that_failed_after_its_retries_fails_a_packet_fault():
    result = check(packet_fault(failing=(4.0, 4.2)).events, fault=fault("packet-delay"), thresholds=Thresholds())
    assert result.failed_requests == 2 and result.failures == ["failed_requests 2 > 0"]


def test_without_a_restore_the_fault_window_ends_at_recovery():
    # pe_kill: recovered at 2.6, GETs every 0.1 s of 20 ms
    result = check(pe_kill().events, fault=fault("pe-leader-kill"), thresholds=Thresholds())
    assert (result.get_p50_fault_ms, result.get_p99_fault_ms) == (20.0, 20.0)
    assert result.retried_requests == 0


def bus_partition(*, out_at: float | None) -> History:
    """partition-bus: the DSD on n1 replaced by one on n2 (first action 14.0), HAProxy's view of n1 recorded."""
    h = History().pushes(range(300)).course(recovered=14.0).add(13.0, "detected").add(27.0, "restore", host="n1")
    h.actions(list(range(0, 20))).actions(list(range(135, 300)), executor=NEW)
    h.add(2.1, "pool", host="n1", ok=True).add(2.1, "pool", host="n2", ok=True)
    if out_at is not None:
        h.add(out_at, "pool", host="n1", ok=False).add(27.6, "pool", host="n1", ok=True)
    return h.gets(0.0, 30.0).writes(0.0, 30.0)


def bus_cut() -> faults.Fault:
    return fault("partition-bus", limit_s=faults.PARTITION_BUS_RECOVERY_S)


def test_the_bus_partition_judges_that_its_api_pe_left_the_pool():
    result = check(bus_partition(out_at=13.5).events, fault=bus_cut(), thresholds=Thresholds())
    assert result.passed, result.failures
    assert result.pool_exit_s == pytest.approx(11.5) and result.recover_s == pytest.approx(12.0)
    assert result.dsd_replaced and result.expected_actions == 164 and result.lost == 0   # rows from k=136 on
    assert result.limits == {"recover_s": faults.PARTITION_BUS_RECOVERY_S, "pool_exit_s": faults.POOL_EXIT_S,
                             "lost": 0, "acked_writes_lost": 0, "executor_overlaps": 0}
    stayed = check(bus_partition(out_at=None).events, fault=bus_cut(), thresholds=Thresholds())
    assert stayed.pool_exit_s is None
    assert stayed.failures == [f"pool_exit_s: never happened (limit {faults.POOL_EXIT_S})"]
    slow = check(bus_partition(out_at=16.0).events, fault=bus_cut(), thresholds=Thresholds())
    assert slow.failures == [f"pool_exit_s 14 > {faults.POOL_EXIT_S}"]


def test_an_isolated_dsd_that_keeps_executing_is_two_executors():
    # partition-one: the isolated host's DSD still reaches the sink (the test's machine) after a new one began
    h = History().pushes(range(120)).course(recovered=6.0).add(4.0, "detected")
    h.actions(list(range(20))).actions(list(range(60, 80)), executor=NEW).actions([80], executor=OLD)
    h.actions(list(range(81, 120)), executor=NEW).add(12.0, "restore", host="n1")
    result = check(h.events, fault=fault("partition-one", limit_s=5.0), thresholds=Thresholds())
    assert result.executor_overlaps == 1 and result.failures == ["executor_overlaps 1 > 0"]
