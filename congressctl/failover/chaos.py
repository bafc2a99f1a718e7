"""Chaos runs (Jepsen's generator over its nemesis): a random, reproducible schedule of the registry's faults
under ONE workload, judged as ONE history (check.check_chaos).

The schedule is a pure function of the seed, the run's length and the fault classes: faults one at a time,
sometimes two overlapping (only classes with `overlaps`), each held for a random, bounded time. The driver
starts each slot no earlier than scheduled, never two faults on one host (a second one that would hit the
first one's host is skipped), heals each when its hold is over, and after each episode waits (bounded) until
the cluster is healthy again before the next; a slot that can no longer end within the run is skipped.
Planned restarts of everything (`rolling`) are no chaos: they are left out.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from congressctl.errors import CongressctlError, FailoverError
from congressctl.failover import report
from congressctl.failover.check import ScenarioResult, Thresholds, check_chaos
from congressctl.failover.cluster import Cluster, Log, Options
from congressctl.failover.faults import FAULTS, Fault
from congressctl.failover.history import Event, History
from congressctl.failover.run import FailoverReport, session, timings_of, wind_down, write_report
from congressctl.failover.workload import SCENARIO_SPAN, ProbeSetup, Sink, Watcher, Workload
from congressctl.inventory import Inventory

FIRST_S = 2.0              # the workload's warm-up before the first fault
HOLD_S = (3.0, 12.0)       # how long a slot holds its fault (one that heals itself may take longer: a host cut)
PAUSE_S = (3.0, 10.0)      # quiet time between episodes, besides the wait until healthy
OVERLAP_P = 0.3            # how often an overlapping fault gets a second one during its hold
HEALTHY_S = 90.0           # bound of the wait until healthy after an episode
# the client retries its GETs throughout a chaos run, as the packet faults' scenarios do (any fault may be held)
CLIENT_GET_ATTEMPTS = max(cls.get_attempts for cls in FAULTS.values())
SWITCH_S = 5.0             # bound of the wait for the push in flight when pushes move to another host


@dataclass(frozen=True)
class Slot:
    at_s: float       # when it starts, on the run's clock (the driver starts it no earlier)
    fault: str
    hold_s: float

    @property
    def end_s(self) -> float:
        return self.at_s + self.hold_s

    def to_dict(self) -> dict:
        return {key: round(value, 3) if isinstance(value, float) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Slot:
        return cls(at_s=d["at_s"], fault=d["fault"], hold_s=d["hold_s"])


def new_seed() -> int:
    return random.SystemRandom().randrange(1, 1_000_000)


def chaos_faults(faults: Mapping[str, type[Fault]]) -> list[str]:
    """The faults a chaos run picks from: every registered one but planned restarts, in name order (a schedule
    does not change when classes move within faults.py)."""
    return sorted(name for name, cls in faults.items() if not cls.rolling)


def schedule(seed: int, seconds: float, faults: Mapping[str, type[Fault]]) -> list[Slot]:
    """The slots of a run of `seconds`, all ending within it; the same seed and faults give the same slots."""
    rng = random.Random(seed)
    names = chaos_faults(faults)
    overlapping = [n for n in names if faults[n].overlaps]
    slots: list[Slot] = []
    t = FIRST_S
    while names:
        first = Slot(round(t, 3), rng.choice(names), round(rng.uniform(*HOLD_S), 3))
        if first.end_s > seconds:
            break
        slots.append(first)
        end = first.end_s
        others = [n for n in overlapping if n != first.fault]
        if first.fault in overlapping and others and rng.random() < OVERLAP_P:
            second = Slot(round(first.at_s + rng.uniform(0.2, 0.8) * first.hold_s, 3), rng.choice(others),
                          round(rng.uniform(*HOLD_S), 3))
            if second.end_s <= seconds:
                slots.append(second)
                end = max(end, second.end_s)
        t = end + rng.uniform(*PAUSE_S)
    return slots


def episodes(slots: Sequence[Slot]) -> list[list[Slot]]:
    """The slots grouped into runs that overlap in time (in start order)."""
    groups: list[list[Slot]] = []
    for slot in sorted(slots, key=lambda s: s.at_s):
        if groups and slot.at_s < max(s.end_s for s in groups[-1]):
            groups[-1].append(slot)
        else:
            groups.append([slot])
    return groups


@dataclass
class _Active:
    slot: Slot
    fault: Fault
    started: float
    healed: bool


class Nemesis:
    """Drives the schedule's faults on the history's clock; moves the workload's pushes off every hit host."""

    def __init__(self, cluster: Cluster, workload: Workload, history: History, thresholds: Thresholds):
        self.cluster, self.workload, self.history, self.thresholds = cluster, workload, history, thresholds
        self.push_host = next(iter(cluster.node_apis))
        self.hit: set[str] = set()

    def run(self, slots: Sequence[Slot], seconds: float) -> None:
        lag = 0.0
        for episode in episodes(slots):
            lag = max(lag, self.history.now() - episode[0].at_s)
            if max(s.end_s for s in episode) + lag > seconds:
                for slot in episode:
                    self._skip(slot, "no time left in the run")
                continue
            self._episode(episode, lag)
            self._recover(episode)

    def _episode(self, episode: list[Slot], lag: float) -> None:
        pending, active = list(episode), list[_Active]()
        while pending or active:
            now = self.history.now()
            while pending and now >= pending[0].at_s + lag:
                started = self._start(pending.pop(0), active)
                if started:
                    active.append(started)
            active = [a for a in active if not self._over(a, now)]
            time.sleep(0.05)

    def _start(self, slot: Slot, active: list[_Active]) -> _Active | None:
        fault = FAULTS[slot.fault](self.cluster, self.thresholds, self.history)
        try:
            fault.pick_target()
        except CongressctlError as exc:
            self._skip(slot, str(exc))
            return None
        hosts = _hosts(fault, self.cluster)
        busy = {name for a in active for name in _hosts(a.fault, self.cluster)}
        if hosts & busy:
            self._skip(slot, f"{', '.join(sorted(hosts & busy))} is hit already")
            return None
        self._push_away_from(hosts | busy)
        self.cluster.log(f"chaos {self.history.now():.1f}s: {slot.fault} on {fault.target_name} "
                         f"(hold {slot.hold_s:.1f}s)")
        started = self.history.now()
        try:
            fault.inject()
        except CongressctlError as exc:
            self.history.add("problem", f"{slot.fault} on {fault.target_name}: injecting failed: {exc}", ok=False)
            return None
        self.hit |= hosts
        if not fault.heals_itself:
            fault.heal_at = started + slot.hold_s
        return _Active(slot, fault, started, healed=fault.heals_itself)

    def _over(self, active: _Active, now: float) -> bool:
        """Heal when due; True once the slot is over (held, healed, and its own hold_until passed)."""
        fault = active.fault
        if not active.healed and now >= (fault.heal_at or 0.0):
            active.healed = True
            self._guarded(fault, "healing", fault.heal)
        if not active.healed or now < max(active.started + active.slot.hold_s, fault.heal_at or 0.0,
                                          fault.hold_until or 0.0):
            return False
        self._guarded(fault, "observing", fault.observe)
        for failure in fault.finish():
            self.history.add("problem", f"{fault.name}: {failure}", ok=False)
        self.history.add("slot", f"{fault.name} on {fault.target_name}", t=active.started,
                         duration=now - active.started, name=fault.name, host=fault.target_name,
                         limit_s=fault.outage_limit_s())
        return True

    def _guarded(self, fault: Fault, doing: str, step: Callable[[], None]) -> None:
        try:
            step()
        except CongressctlError as exc:
            self.history.add("problem", f"{fault.name} on {fault.target_name}: {doing} failed: {exc}", ok=False)

    def _skip(self, slot: Slot, why: str) -> None:
        self.history.add("skip", f"{slot.fault} skipped: {why}", name=slot.fault)
        self.cluster.log(f"chaos {self.history.now():.1f}s: {slot.fault} skipped: {why}")

    def _push_away_from(self, hosts: set[str]) -> None:
        """Pushes go to an api-pe no fault in force hits (as in a scenario: a replace held up by a paused
        process and applied when it resumes would bring old rows back, each a new action)."""
        if self.push_host not in hosts:
            return
        self.push_host = next(name for name in self.cluster.node_apis if name not in hosts)
        switched = self.history.now()
        self.workload.push_api = self.cluster.node_apis[self.push_host]
        # wait for the push in flight to the old host: the next one starts only once it is done
        deadline = time.monotonic() + SWITCH_S
        while time.monotonic() < deadline and self.history.first("push", after=switched) is None:
            time.sleep(0.05)

    def _recover(self, episode: list[Slot]) -> None:
        self.cluster.cleanup()
        try:
            self.cluster.wait_healthy(HEALTHY_S)
        except FailoverError as exc:
            names = ", ".join(s.fault for s in episode)
            self.history.add("problem", f"after {names}: {exc.message}", ok=False)


def _hosts(fault: Fault, cluster: Cluster) -> set[str]:
    return {fault.target.name} if fault.target else set(cluster.node_apis)


def run_chaos(inv: Inventory, seconds: float, *, seed: int, options: Options | None = None,
              thresholds: Thresholds | None = None, report_dir: Path | None = None,
              log: Log = lambda _: None) -> FailoverReport:
    """The schedule of `seed` over `seconds` under one workload, then its history checked as one (the "chaos"
    row); the report's page shades each fault on the run's latency plot."""
    options, thresholds = options or Options(), thresholds or Thresholds()
    started = time.monotonic()
    slots = schedule(seed, seconds, FAULTS)
    with session(inv, options, log) as (cluster, sink, probe):
        log(f"chaos: seed {seed}, {len(slots)} fault(s) scheduled over {seconds:g}s")
        result, events = _chaos(cluster, sink, probe, slots, seconds=seconds, seed=seed, thresholds=thresholds)
        timings = timings_of(cluster, thresholds)
    if report_dir:
        report.write_scenario(report_dir, result, events, report.timings_summary(timings))
    failover_report = FailoverReport([result], timings, str(report_dir) if report_dir else None,
                                     duration_s=time.monotonic() - started, seed=seed,
                                     schedule=[s.to_dict() for s in slots])
    write_report(failover_report, report_dir)
    return failover_report


def _chaos(cluster: Cluster, sink: Sink, probe: ProbeSetup, slots: list[Slot], *, seconds: float, seed: int,
           thresholds: Thresholds) -> tuple[ScenarioResult, list[Event]]:
    """The run's one history, and its check."""
    options = cluster.options
    history = History()
    sink_start = time.monotonic()
    workload = Workload(cluster.api, next(iter(cluster.node_apis.values())), probe, SCENARIO_SPAN,
                        push_rate=options.push_rate, get_rate=options.get_rate, write_rate=options.write_rate,
                        history=history, headers=cluster.headers, get_attempts=CLIENT_GET_ATTEMPTS,
                        verify=cluster.verify)
    nemesis = Nemesis(cluster, workload, history, thresholds)
    watcher = Watcher(cluster.node_apis, history, headers=cluster.headers, verify=cluster.verify)
    watcher.start()
    workload.start()
    try:
        nemesis.run(slots, seconds)
        time.sleep(options.after_s)
    finally:
        workload.stop()
        watcher.stop()
    wind_down(cluster, probe, history, workload=workload, sink=sink, sink_start=sink_start, base=SCENARIO_SPAN)
    held = len(history.of("slot"))
    result = check_chaos(history.events(), thresholds=thresholds,
                         outage_limit_s=cluster.node_limit(thresholds.node_slack_s),
                         refusing=[name for name, cls in FAULTS.items() if cls.refuses_writes],
                         description=f"seed {seed}: {held} of {len(slots)} scheduled faults held over {seconds:g}s "
                                     "under one workload", target=", ".join(sorted(nemesis.hit)))
    result.pushed_to, result.started_at = "a host no fault hit", history.wall0
    return result, history.events()
