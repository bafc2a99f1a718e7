"""Running scenarios (Jepsen's generator and runner): for each, a fault from the registry under the workload,
driven to recovery and healed, then its history checked and reported."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from congressctl import pacemaker, remote
from congressctl.errors import CongressctlError, FailoverError
from congressctl.failover import report
from congressctl.failover.check import ScenarioResult, Thresholds, back_at, check
from congressctl.failover.cluster import Cluster, Log, Options
from congressctl.failover.faults import FAULTS, SCENARIOS, Fault
from congressctl.failover.history import History
from congressctl.failover.workload import (
    PROBE_TABLE,
    SCENARIO_SPAN,
    ProbeSetup,
    Sink,
    Watcher,
    Workload,
    local_address_towards,
    record_actions,
    window,
)
from congressctl.inventory import Inventory


def scenarios_named(names: Sequence[str]) -> list[str]:
    """The scenarios to run, in the order named (every one when none is); an unknown name is refused."""
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise FailoverError(f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return list(names) or list(SCENARIOS)


@dataclass
class FailoverReport:
    scenarios: list[ScenarioResult]
    timings: dict
    report_dir: str | None
    duration_s: float = 0.0
    seed: int | None = None                              # a chaos run's: replayed with --seed
    schedule: list[dict] = field(default_factory=list)   # a chaos run's slots (chaos.Slot.to_dict)

    @property
    def passed(self) -> bool:
        return bool(self.scenarios) and all(s.passed for s in self.scenarios)

    def rows(self) -> list[dict]:
        return [s.row() for s in self.scenarios]

    def to_dict(self) -> dict:
        chaos = {} if self.seed is None else {"seed": self.seed, "schedule": self.schedule}
        return {"passed": self.passed, "timings": self.timings, "report_dir": self.report_dir,
                "duration_s": round(self.duration_s, 1), **chaos, "scenarios": [asdict(s) for s in self.scenarios]}


@dataclass
class ScenarioRun:
    """One scenario under way, from its fault on: what driving it to recovery shares."""

    cluster: Cluster
    workload: Workload
    sink: Sink
    sink_start: float     # monotonic; the sink's arrivals before it belong to earlier scenarios
    history: History
    fault: Fault
    t_fault: float


def run_scenario(name: str, index: int, cluster: Cluster, *, probe: ProbeSetup, sink: Sink,
                 thresholds: Thresholds, report_dir: Path | None = None) -> ScenarioResult:
    options = cluster.options
    history = History()
    sink_start = time.monotonic()
    fault = FAULTS[name](cluster, thresholds, history)
    target = fault.pick_target()
    # every host restarts in an upgrade, so none is left alone to push to: pushes go through the VIP as well
    pushed_to = next(n for n in cluster.node_apis if n != target.name) if target else "the VIP"
    push_api = cluster.node_apis[pushed_to] if target else cluster.api
    base = (index + 1) * SCENARIO_SPAN
    workload = Workload(cluster.api, push_api, probe, base, push_rate=options.push_rate,
                        get_rate=options.get_rate, write_rate=options.write_rate, history=history,
                        headers=cluster.headers, get_attempts=fault.get_attempts, verify=cluster.verify)
    watcher = Watcher(cluster.node_apis, history, headers=cluster.headers, verify=cluster.verify)
    watcher.start()
    workload.start()
    try:
        time.sleep(options.warmup_s)
        fault.inject()
        t_fault = history.first("fault")
        assert t_fault is not None   # inject() recorded the fault
        _drive(ScenarioRun(cluster, workload, sink, sink_start, history, fault, t_fault))
        fault.observe()
    finally:
        workload.stop()
        watcher.stop()
    wind_down(cluster, probe, history, workload=workload, sink=sink, sink_start=sink_start, base=base)
    result = check(history.events(), fault=fault, thresholds=thresholds)
    result.pushed_to, result.started_at = pushed_to, history.wall0
    if fault.detection == "leader" and result.detect_s is not None:
        history.add("detected", f"DSD leader changed after {result.detect_s:.3f}s", t=t_fault + result.detect_s)
    if report_dir:
        report.write_scenario(report_dir, result, history.events(),
                              report.timings_summary(timings_of(cluster, thresholds)))
    result.failures += fault.finish()
    result.passed = not result.failures
    return result


def wind_down(cluster: Cluster, probe: ProbeSetup, history: History, *, workload: Workload, sink: Sink,
              sink_start: float, base: int) -> None:
    """After the faults, the workload stopped: one last push applied, the PEs' tables converged to it, the
    acknowledged writes read back and the sink's arrivals recorded, all into the history the checker reads."""
    last = workload.finish(cluster.client, time.monotonic() + 30)
    settle(cluster, probe, history, source=window(last, base))
    read_back(cluster, probe, history)
    record_actions(history, sink.since(sink_start), base)


def settle(cluster: Cluster, probe: ProbeSetup, history: History, *, source: list[list[int]]) -> None:
    """Wait for duplicates to show (the DSD's buffer window) and for every PE's table to equal the source."""
    time.sleep(2 * cluster.inv.timings.peer_timeout_ms / 1000 + 1.0)
    deadline = time.monotonic() + 20
    want = sorted(source)
    while time.monotonic() < deadline:
        views = {name: cluster.rows_on(name, probe.datasource, PROBE_TABLE) for name in cluster.node_apis}
        if all(v == want for v in views.values()):
            history.add("tables", "every PE's table equals the source")
            return
        time.sleep(0.5)
    history.add("tables", "PE tables differ from the source: " + ", ".join(
        f"{n} has {len(v) if v is not None else 'no answer'}" for n, v in views.items() if v != want), ok=False)


def read_back(cluster: Cluster, probe: ProbeSetup, history: History) -> None:
    """Each acknowledged write, looked for among the rules afterwards."""
    names = cluster.rule_names(probe.writes_policy)
    for e in history.of("write"):
        if e.ok:
            history.add("read-back", f"rule {e.name} {'found' if e.name in names else 'missing'}",
                        ok=e.name in names, name=e.name)


def _drive(scenario: ScenarioRun) -> float | None:
    """Until recovered (or timed out), healed, and `after_s` of workload after recovery: poll and heal."""
    survivor = scenario.fault.survivor
    watch = _PacemakerWatch(scenario.cluster, scenario.fault, scenario.history) if survivor else None
    try:
        return _drive_until_done(scenario, watch)
    finally:
        if watch:
            watch.close()


def _drive_until_done(scenario: ScenarioRun, watch: _PacemakerWatch | None) -> float | None:
    fault, history, t_fault = scenario.fault, scenario.history, scenario.t_fault
    options = scenario.cluster.options
    deadline = t_fault + (fault.wait_s or options.recovery_timeout_s)
    to_heal = not fault.heals_itself
    recovered = None
    while True:
        now = history.now()
        if watch:
            watch.poll()
        if to_heal and now >= (fault.heal_at or 0.0):
            fault.heal()
            to_heal = False
        if recovered is None and now <= deadline:
            recovered = _recovered_at(scenario)
            if recovered is not None:
                history.add("recovered", f"{fault.recovery} after {recovered - t_fault:.3f}s", t=recovered)
        settled = (recovered if recovered is not None else deadline) + options.after_s
        if not to_heal and now >= max(settled, fault.heal_at or 0.0, fault.hold_until or 0.0):
            return recovered
        time.sleep(0.05)


class _PacemakerWatch:
    """Asks Pacemaker on a surviving host, every 0.25 s over one SSH connection, whether it shows the fault
    (Fault.pacemaker_shows); the first time it does is the "detected" event."""

    def __init__(self, cluster: Cluster, fault: Fault, history: History):
        assert fault.survivor is not None   # _drive watches only a fault that leaves a survivor to ask
        self.cluster, self.fault, self.history, self.survivor = cluster, fault, history, fault.survivor
        self.next_poll = 0.0
        self.detected = False
        self.conn: remote.Connection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def poll(self) -> None:
        if self.detected or self.history.now() < self.next_poll:
            return
        self.next_poll = self.history.now() + 0.25
        asked = self.history.now()
        try:
            if self.conn is None:
                self.conn = remote.connect(self.cluster.inv, self.survivor, self.cluster.options.accept_new)
            xml_text = pacemaker.crm_mon_xml(self.conn, timeout=5)
        except CongressctlError:
            self.close()
            return
        if xml_text is None:
            return
        seen = self.fault.pacemaker_shows(xml_text)
        if seen:
            self.detected = True
            self.history.add("detected", f"Pacemaker on {self.survivor.name} sees {seen}", t=asked)


def _recovered_at(scenario: ScenarioRun) -> float | None:
    """Recovery as seen live, by what recovery means for the fault."""
    fault, history, t_fault = scenario.fault, scenario.history, scenario.t_fault
    if fault.recovery == "deployed":
        return fault.finished_at   # done, however it ended: the judgement reads how
    if fault.recovery == "first-action":
        return _first_action(scenario)
    if fault.recovery == "api-back":
        return back_at([(e.t, e.ok) for e in history.of("request")], t_fault=t_fault, now=history.now())
    if fault.recovery == "write-back":
        return back_at([(e.t, e.ok) for e in history.of("write")], t_fault=t_fault, now=history.now())
    answer = scenario.cluster.node_status(fault.target_name)
    return history.now() if answer and answer.healthy else None


def _first_action(scenario: ScenarioRun) -> float | None:
    """When the sink got the first action of a row pushed after the fault (from another DSD than before it, for
    a fault that replaces the DSD)."""
    history, t_fault, base = scenario.history, scenario.t_fault, scenario.workload.base
    after_fault = {e.k + base for e in history.of("push") if e.t > t_fault and e.k is not None}
    received = scenario.sink.since(scenario.sink_start)
    before = [b.get("executor") for t, b in received if t - history.t0 < t_fault]
    old_dsd = before[-1] if before and scenario.fault.new_dsd else None
    for t, body in received:
        if body["args"] and body["args"][0] in after_fault and body.get("executor") != old_dsd:
            return t - history.t0
    return None


def timings_of(cluster: Cluster, thresholds: Thresholds) -> dict:
    """The timings in force for a run (corosync's read from a host) and the pass marks derived from them."""
    token, consensus = cluster.totem()
    return asdict(cluster.inv.timings) | {
        "corosync_token_in_force_ms": token, "corosync_consensus_in_force_ms": consensus,
        "node_recovery_limit_s": (token + consensus) / 1000 + thresholds.node_slack_s,
        "bus_recovery_limit_s": (token + consensus) / 1000 + thresholds.bus_slack_s,
        "fence_slack_s_in_force": thresholds.fence_slack_s if cluster.fences else 0.0,
        "thresholds": asdict(thresholds), "push_rate": cluster.options.push_rate,
        "get_rate": cluster.options.get_rate, "write_rate": cluster.options.write_rate}


def run(inv: Inventory, scenarios: list[str], *, options: Options | None = None,
        thresholds: Thresholds | None = None, report_dir: Path | None = None,
        log: Log = lambda _: None) -> FailoverReport:
    """Run each scenario (names as `scenarios_named` returns them) in turn; the cluster is restored and healthy
    again before the next one starts."""
    options, thresholds = options or Options(), thresholds or Thresholds()
    started = time.monotonic()
    results: list[ScenarioResult] = []
    with session(inv, options, log) as (cluster, sink, probe):
        for index, name in enumerate(scenarios):
            log(f"{name}: {FAULTS[name].description}")
            result = run_scenario(name, index, cluster, probe=probe, sink=sink, thresholds=thresholds,
                                  report_dir=report_dir)
            results.append(result)
            log(f"{name}: {'passed' if result.passed else 'FAILED'}; restoring and waiting until healthy")
            cluster.cleanup()
            cluster.wait_healthy(options.healthy_timeout_s)
        timings = timings_of(cluster, thresholds)
    failover_report = FailoverReport(results, timings, str(report_dir) if report_dir else None,
                                     duration_s=time.monotonic() - started)
    write_report(failover_report, report_dir)
    return failover_report


@contextlib.contextmanager
def session(inv: Inventory, options: Options, log: Log) -> Iterator[tuple[Cluster, Sink, ProbeSetup]]:
    """The cluster, checked healthy, with the action sink and the probe datasource a run's workload needs;
    all of it closed and removed afterwards."""
    cluster = Cluster(inv, options, log)
    sink = Sink(options.sink_address or local_address_towards(inv.nodes[0].address))
    try:
        log("checking the cluster is healthy before the first fault")
        cluster.wait_healthy(options.healthy_timeout_s)
        probe = ProbeSetup(cluster, sink)
        try:
            yield cluster, sink, probe
        finally:
            probe.remove()
    finally:
        sink.close()
        cluster.close()


def write_report(failover_report: FailoverReport, report_dir: Path | None) -> None:
    """summary.json and the run's page (index.html), when there is a report folder."""
    if not report_dir:
        return
    report.write_summary(report_dir, failover_report.to_dict())
    title = f"chaos run, seed {failover_report.seed}" if failover_report.seed is not None else "scenarios"
    report.write_index(report_dir, failover_report.scenarios, passed=failover_report.passed,
                       title=title, timings=report.timings_summary(failover_report.timings))
