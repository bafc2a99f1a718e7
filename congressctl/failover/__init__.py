"""Failure scenarios against a deployed cluster while a workload runs; every figure is measured.

Split as Jepsen splits a test: workload (the client: pushes, GETs, acknowledged writes, the action sink, the
leader watcher), faults (the nemesis: one class per scenario), history (every event, structured), check (a pure
function from a history to results), report (timelines, raw events, summary, the run's perf plot), run (the
scenarios in turn) and chaos (a seeded random schedule of the faults under one workload, checked as one history).
Faults are ordinary commands over SSH (kill, ip link, nft, iptables), so the same scenarios run on real hosts; the
rolling-upgrade "fault" is `congressctl deploy` itself, of this tree under a new local version label.
"""

from congressctl.failover.chaos import Slot, new_seed, run_chaos, schedule
from congressctl.failover.check import (
    WINDOW,
    ScenarioResult,
    Thresholds,
    Write,
    back_at,
    check,
    check_chaos,
    write_outage,
)
from congressctl.failover.cluster import Cluster, Options
from congressctl.failover.faults import BUS_SCENARIOS, FAULTS, SCENARIOS, Fault
from congressctl.failover.history import Event, History
from congressctl.failover.report import timings_summary
from congressctl.failover.run import FailoverReport, run, run_scenario, scenarios_named
from congressctl.failover.workload import ProbeSetup, Sink

__all__ = ["BUS_SCENARIOS", "FAULTS", "SCENARIOS", "WINDOW", "Cluster", "Event", "FailoverReport", "Fault",
           "History", "Options", "ProbeSetup", "ScenarioResult", "Sink", "Slot", "Thresholds", "Write", "back_at",
           "check", "check_chaos", "new_seed", "run", "run_chaos", "run_scenario", "scenarios_named", "schedule",
           "timings_summary", "write_outage"]
