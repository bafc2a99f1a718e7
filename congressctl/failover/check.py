"""The checker: a pure function from a scenario's recorded history (and its fault's pass marks) to its results.

Nothing here asks the cluster or the clock: whatever was observed live (recovery seen, Pacemaker's detection,
the read-back of acknowledged writes, the PEs' tables) is an event of the history, so a saved events file
checks again to the same figures.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from congressctl.errors import FailoverError
from congressctl.failover.history import Event

if TYPE_CHECKING:
    from congressctl.failover.faults import Fault

WINDOW = 5    # a push replaces the table with its last WINDOW rows (workload.window)
MAX_REFUSALS = 5


@dataclass
class Thresholds:
    """Pass marks; node-level recovery limits are corosync token + consensus + `node_slack_s`."""

    pe_recovery_s: float = 1.5
    node_slack_s: float = 2.0
    bus_slack_s: float = 1.5        # bus faults: writes answer again within token + consensus + this
    # a lost host's faults, when the cluster fences: Pacemaker fences the host before it recovers anything that
    # ran there (lab: the fence op took 0.5 s, the transition that starts the resources came 0.9 s after it)
    fence_slack_s: float = 1.5
    max_lost: int = 0
    max_duplicated: int = 0
    max_failed_gets: int = 0
    max_acked_writes_lost: int = 0
    max_executor_overlaps: int = 0  # two DSDs executing at once, in every scenario


@dataclass
class ScenarioResult:
    name: str
    description: str
    target: str = ""
    pushed_to: str = ""
    passed: bool = False
    detect_s: float | None = None
    recover_s: float | None = None
    pushed: int = 0
    expected_actions: int = 0
    executed: int = 0
    lost: int = 0
    duplicated: int = 0
    requests: int = 0
    failed_requests: int = 0
    writes: int = 0
    failed_writes: int = 0
    acked_writes_lost: int = 0
    write_outage_s: float = 0.0
    read_outage_s: float = 0.0      # the longest stretch of failed GETs (judged in a chaos run only)
    bad_write_answers: int = 0      # failed writes not answered 503 (a 500, another status, no answer at all)
    refusals: list[str] = field(default_factory=list)   # the distinct messages of writes answered 503
    retried_requests: int = 0       # GETs that took more than one try (the client retries only under some faults)
    # GET latency (ms, every try of a request included) of the requests started before the fault, and of those
    # started while it was in force (up to its restore, or its recovery when nothing is restored)
    get_p50_before_ms: float | None = None
    get_p99_before_ms: float | None = None
    get_p50_fault_ms: float | None = None
    get_p99_fault_ms: float | None = None
    pool_exit_s: float | None = None    # when HAProxy on the VIP's host first showed the target's server not UP
    executor_overlaps: int = 0      # an older DSD instance's actions resumed after a newer one's began
    bus_moved_back: bool | None = None
    dsd_replaced: bool = False      # another DSD instance ran actions after the fault (its host was hit too)
    duplicates_excused: int = 0     # chaos: duplicates a new DSD ran just after it replaced the old one
    tables_equal: bool = False
    limits: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    timeline: str | None = None
    events_file: str | None = None
    started_at: float | None = None  # wall clock of the history's zero, to place it on the run's clock

    def row(self) -> dict:
        return {"scenario": self.name, "target": self.target, "ok": self.passed,
                "detect_s": _round(self.detect_s), "recover_s": _round(self.recover_s),
                "actions": f"{self.executed}/{self.expected_actions}", "lost": self.lost,
                "duplicated": self.duplicated, "failed_requests": f"{self.failed_requests}/{self.requests}",
                "writes_ok": f"{self.writes - self.failed_writes}/{self.writes}",
                "acked_writes_lost": self.acked_writes_lost, "write_outage_s": _round(self.write_outage_s),
                "read_outage_s": _round(self.read_outage_s),
                "executor_overlaps": self.executor_overlaps, "tables_equal": self.tables_equal,
                "get_ms": _latency_text(self), "why": "; ".join(self.failures)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _latency_text(r: ScenarioResult) -> str:
    """p50 and p99 of GETs before the fault -> while it was in force, e.g. "p50 3->105 p99 9->230"."""
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"
    return (f"p50 {ms(r.get_p50_before_ms)}->{ms(r.get_p50_fault_ms)} "
            f"p99 {ms(r.get_p99_before_ms)}->{ms(r.get_p99_fault_ms)}")


@dataclass
class Write:
    """One rule create through the VIP: acknowledged (201) or not; an acknowledged one must exist afterwards."""

    t: float
    name: str
    acked: bool


def check(events: Sequence[Event], *, fault: Fault, thresholds: Thresholds) -> ScenarioResult:
    """The scenario's figures and verdict from its history; `fault` gives its name, what recovery and detection
    mean for it, and its limits."""
    events = sorted(events, key=lambda e: e.t)
    t_fault = next((e.t for e in events if e.kind == "fault"), None)
    if t_fault is None:
        raise FailoverError(f"{fault.name}: the history records no fault")
    result = ScenarioResult(fault.name, fault.description, target=fault.target_name)
    _count_actions(result, events, fault=fault, t_fault=t_fault)
    _count_requests(result, events, rolling=fault.rolling)
    _outages(result, events)
    _get_latency(result, events, t_fault=t_fault)
    result.pool_exit_s = pool_exit_s(events, server=result.target, t_fault=t_fault)
    result.executor_overlaps = executor_overlaps(_of(events, "action"))
    result.detect_s = detect_s(events, detection=fault.detection, t_fault=t_fault)
    result.recover_s = recover_s(events, recovery=fault.recovery, t_fault=t_fault)
    _observed(result, events)
    _judge(result, fault.limits(thresholds, result) | {
        "acked_writes_lost": thresholds.max_acked_writes_lost,
        "executor_overlaps": thresholds.max_executor_overlaps})
    return result


def _of(events: Sequence[Event], kind: str) -> list[Event]:
    return [e for e in events if e.kind == kind]


def _count_actions(result: ScenarioResult, events: Sequence[Event], *, fault: Fault, t_fault: float) -> None:
    """Expected actions (every row an applied push brought, less those no DSD could see), executed, lost and
    duplicated ones, and whether another DSD took over."""
    pushes = _of(events, "push")
    arrivals = [e for e in events if e.kind in ("action", "stray")]
    first_push, answered, expected = _expected_rows(pushes)
    ks = [e.k for e in _of(events, "action") if e.k is not None]
    dsd_back = None if fault.rolling else new_dsd_at(arrivals, t_fault=t_fault)
    result.dsd_replaced = dsd_back is not None
    if dsd_back is None and fault.dsd_off_bus:
        # the DSD was off the bus as long as the api-pes did not hear it (back at the fault: it never was)
        heard = [(e.t, e.ok) for e in _of(events, "status")]
        heard_again = back_at(heard, t_fault=t_fault, now=float("inf"))
        dsd_back = heard_again if heard_again is not None and heard_again > t_fault else None
    if dsd_back is not None:
        # a push replaces the table: rows that came and went while no DSD ran, or while it was off the bus,
        # never reached one. Only changes after it is back count
        expected = {k for k in expected if first_push.get(k, 0.0) >= dsd_back}
    if fault.rolling:
        # a planned DSD restart: only the rows pushed and replaced within its gap never reached a DSD
        gaps = dsd_gaps(arrivals, first_push)
        expected = {k for k in expected if not any(_lived_within(first_push, answered, k, gap) for gap in gaps)}
    result.pushed = len(pushes)
    result.expected_actions = len(expected)
    result.executed = len(set(ks) & expected)
    result.lost = len(expected - set(ks))
    result.duplicated = len(ks) - len(set(ks))


def _expected_rows(pushes: Sequence[Event]) -> tuple[dict[int, float], dict[int, float], set[int]]:
    """When each row's first push began and when it was answered, and every row an applied push brought."""
    first_push: dict[int, float] = {}
    answered: dict[int, float] = {}
    expected: set[int] = set()
    for p in pushes:
        assert p.k is not None
        first_push.setdefault(p.k, p.t)
        answered.setdefault(p.k, p.t + (p.duration or 0.0))
        if p.outcome == "ok":
            expected.update(range(max(0, p.k - WINDOW + 1), p.k + 1))
    return first_push, answered, expected


def _count_requests(result: ScenarioResult, events: Sequence[Event], *, rolling: bool) -> None:
    gets = _of(events, "request")
    writes = [Write(e.t, e.name or "", e.ok) for e in _of(events, "write")]
    result.requests = len(gets)
    result.failed_requests = sum(1 for e in gets if not e.ok)
    result.writes = len(writes)
    result.failed_writes = sum(1 for w in writes if not w.acked)
    refused = [e for e in _of(events, "write") if not e.ok]
    result.bad_write_answers = sum(1 for e in refused if e.status != 503)
    result.refusals = list(dict.fromkeys(e.message or "" for e in refused if e.status == 503))[:MAX_REFUSALS]
    found = {e.name for e in _of(events, "read-back") if e.ok}
    result.acked_writes_lost = sum(1 for w in writes if w.acked and w.name not in found)
    if rolling:   # its pushes go through the VIP too
        pushes = _of(events, "push")
        result.requests += len(pushes)
        result.failed_requests += sum(1 for p in pushes if p.outcome != "ok")


def _outages(result: ScenarioResult, events: Sequence[Event]) -> None:
    """A scenario's longest runs of failed writes and GETs (a chaos run judges its stretches one by one)."""
    result.write_outage_s = write_outage([Write(e.t, e.name or "", e.ok) for e in _of(events, "write")])
    result.read_outage_s = outage_s([(e.t, e.ok) for e in _of(events, "request")])


def _get_latency(result: ScenarioResult, events: Sequence[Event], *, t_fault: float) -> None:
    gets = _of(events, "request")
    result.retried_requests = sum(1 for e in gets if (e.attempt or 1) > 1)
    end = fault_end(events, t_fault=t_fault)
    before = [1000 * (e.duration or 0.0) for e in gets if e.t < t_fault]
    during = [1000 * (e.duration or 0.0) for e in gets if t_fault <= e.t < end]
    result.get_p50_before_ms, result.get_p99_before_ms = percentile(before, 50), percentile(before, 99)
    result.get_p50_fault_ms, result.get_p99_fault_ms = percentile(during, 50), percentile(during, 99)


def fault_end(events: Sequence[Event], *, t_fault: float) -> float:
    """When the fault stopped being in force: its first restore, else its recovery, else the history's end."""
    restored = next((e.t for e in events if e.kind == "restore" and e.t >= t_fault), None)
    recovered = next((e.t for e in events if e.kind == "recovered"), None)
    ends = [t for t in (restored, recovered) if t is not None]
    return ends[0] if ends else max(e.t for e in events)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank percentile (the smallest value with p% of them at or below it); None of no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def pool_exit_s(events: Sequence[Event], *, server: str, t_fault: float) -> float | None:
    """Seconds from the fault until HAProxy showed `server` out of its pool (None: never, or never asked)."""
    out = next((e.t for e in events if e.kind == "pool" and e.host == server and not e.ok and e.t >= t_fault), None)
    return None if out is None else out - t_fault


def _observed(result: ScenarioResult, events: Sequence[Event]) -> None:
    """What was seen beside the workload: the PEs' tables, the fault's own problems, the bus promotion."""
    for e in _of(events, "tables"):
        result.tables_equal = e.ok
        if not e.ok:
            result.failures.append(e.detail)
    result.failures += [e.detail for e in _of(events, "problem")]
    promoted = _of(events, "bus-promoted")
    if promoted:
        result.bus_moved_back = not all(e.ok for e in promoted)
    for e in promoted:
        if not e.ok:
            result.failures.append(f"the bus promotion moved back to {e.host or result.target} when it returned")


def _judge(result: ScenarioResult, limits: dict) -> None:
    result.limits = limits
    for key, limit in limits.items():
        value = getattr(result, key)
        if value is None:
            result.failures.append(f"{key}: never happened (limit {limit})")
        elif value > limit:
            result.failures.append(f"{key} {value:.3g} > {limit}" if isinstance(value, float)
                                   else f"{key} {value} > {limit}")
    result.passed = not result.failures


def detect_s(events: Sequence[Event], *, detection: str, t_fault: float) -> float | None:
    """When the system noticed, after the fault: the DSD changed leader ("leader"), Pacemaker saw the fault
    ("pacemaker": its "detected" event), the deploy restarted a first process ("restart") or a write was first
    answered 503 ("refused"); never for a fault nothing in the cluster is meant to notice ("none": packet loss
    and delay the client's retries ride out).

    The DSD stamps its leader change with its own clock; that stamp is used when it falls between the fault
    and the moment it was seen (same clock in the lab, NTP on real hosts), else the observation time."""
    if detection == "none":
        return None
    if detection == "pacemaker":
        seen = next((e.t for e in events if e.kind == "detected"), None)
        return None if seen is None else seen - t_fault
    if detection == "restart":
        seen = next((e.t for e in events if e.kind == "restore"), None)
        return None if seen is None else seen - t_fault
    if detection == "refused":
        answered = [e.t + (e.duration or 0.0) for e in _of(events, "write") if e.t >= t_fault and e.status == 503]
        return min(answered) - t_fault if answered else None
    for e in _of(events, "leader"):
        if e.t >= t_fault:
            stamped = e.stamped
            return (stamped if stamped is not None and t_fault <= stamped <= e.t else e.t) - t_fault
    return None


def recover_s(events: Sequence[Event], *, recovery: str, t_fault: float) -> float | None:
    """Recovery from the whole history: while the scenario ran, a request still in flight (it may fail at its
    timeout) was not known yet, so the moment seen then (the "recovered" event) can be too early."""
    seen = next((e.t for e in events if e.kind == "recovered"), None)
    if seen is None:
        return None
    samples = {"api-back": "request", "write-back": "write"}.get(recovery)
    if samples is not None:
        seen_again = back_at([(e.t, e.ok) for e in _of(events, samples)], t_fault=t_fault, now=float("inf"))
        if seen_again is None:
            return None
        seen = seen_again
    return seen - t_fault


def back_at(samples: list[tuple[float, bool]], *, t_fault: float, now: float) -> float | None:
    """When requests (start time, succeeded) succeeded again after the last failure since the fault: the fault
    itself when none failed (once 2 s have shown it), None while the last one still failed."""
    samples = sorted(samples)
    failed = [t for t, ok in samples if not ok and t > t_fault]
    if not failed:
        return t_fault if now > t_fault + 2.0 and samples and samples[-1][1] else None
    return next((t for t, ok in samples if ok and t > failed[-1]), None)


def write_outage(writes: list[Write]) -> float:
    """The longest stretch of failed writes: from the first of a run of failures to the next acknowledged write
    (or to the last failure, when none followed)."""
    return outage_s([(w.t, w.acked) for w in writes])


def outage_s(samples: list[tuple[float, bool]]) -> float:
    """The longest stretch of failures among (start time, succeeded) samples, as `write_outage` measures it."""
    return max((end - start for start, end in stretches(samples)), default=0.0)


def stretches(samples: list[tuple[float, bool]]) -> list[tuple[float, float]]:
    """Every stretch of failures among (start time, succeeded) samples: from the first of a run of failures to
    the next success (or to the last sample, when none followed)."""
    found, since = [], None
    for t, ok in sorted(samples):
        if not ok and since is None:
            since = t
        elif ok and since is not None:
            found.append((since, t))
            since = None
    if since is not None:
        found.append((since, max(t for t, _ in samples)))
    return found


def new_dsd_at(arrivals: Sequence[Event], *, t_fault: float) -> float | None:
    """When the first action run by another DSD instance than before the fault arrived (None: same DSD)."""
    before = [e.executor for e in arrivals if e.t < t_fault]
    if not before:
        return None
    return next((e.t for e in arrivals if e.t >= t_fault and e.executor != before[-1]), None)


def dsd_gaps(arrivals: Sequence[Event], first_push: dict[int, float]) -> list[tuple[float, float]]:
    """For each change of executor at the sink: from when the row of the last action of a DSD instance was
    pushed (the last push it is known to have heard: a stopping or cut DSD runs its last actions after it stopped
    hearing) to the first action of the next one."""
    return [(first_push.get(a.k, a.t) if a.k is not None else a.t, b.t)
            for a, b in itertools.pairwise(arrivals) if a.executor != b.executor]


def _lived_within(first_push: dict[int, float], answered: dict[int, float], k: int, gap: tuple[float, float]) -> bool:
    """Row k may have come after `gap` began (its push was answered after that: a push in flight when the bus
    went away is applied, if at all, by the next master) and was replaced (WINDOW pushes later) before it
    ended."""
    gone = first_push.get(k + WINDOW)
    return gap[0] <= answered.get(k, -1.0) and gone is not None and gone <= gap[1]


def executor_overlaps(actions: Sequence[Event]) -> int:
    """How many times an older DSD instance's actions resumed after a newer one's had begun (two DSDs executing
    at once): instances are ordered by their first action; a run of actions counts once. Actions are taken in the
    order the DSDs sent them (`stamped`), arrival where unknown: an old DSD's last POST that the network delivers
    late (a segment retransmitted once a cut host's link is back) was sent before the new DSD began."""
    order: dict[str, int] = {}
    overlaps, previous = 0, None
    for e in sorted(actions, key=lambda e: e.t if e.stamped is None else e.stamped):
        if e.executor is None:
            continue
        rank = order.setdefault(e.executor, len(order))
        if rank < len(order) - 1 and e.executor != previous:
            overlaps += 1
        previous = e.executor
    return overlaps


# ------------------------------------------------------------------------------------------- chaos runs

# the watcher calls the DSD unheard once its heartbeat is 1 s old: it went quiet up to that long before
DSD_SILENT_LEAD_S = 1.0
# every api-pe is asked each 0.1 s: a shorter run of "does not hear the DSD" is one api-pe catching up (a host
# back from a cut), not the DSD off the bus
MIN_BLIND_S = 0.5
# a new DSD re-runs what it finds undone when it takes over: the DSD's at-least-once window, which the
# dsd-node-fail scenario does not judge duplicates in either
TAKEOVER_S = 5.0


def check_chaos(events: Sequence[Event], *, thresholds: Thresholds, outage_limit_s: float,
                refusing: Sequence[str] = (), description: str = "", target: str = "") -> ScenarioResult:
    """A chaos run's figures and verdict from its one history, whatever faults it held: lost and duplicated
    actions, acknowledged writes lost, the longest stretches without successful reads and writes (each within
    `outage_limit_s`), two DSDs executing at once, the PEs' tables, the faults' own problems.

    A row is not expected when it lived only while no DSD could see it (between two DSD instances' actions, or
    while no api-pe heard the DSD); a duplicate is excused only when a newer DSD instance ran it again within
    TAKEOVER_S of its first action (the window of a DSD replacement, as dsd-node-fail's judge excuses it).
    Writes made while a fault named in `refusing` held (one that refuses writes by design) are left out of the
    write outage. Each stretch of failed reads or writes is judged against the sum of the `limit_s` of the slots it
    overlaps (the faults that may have caused it), `outage_limit_s` when it overlaps none; the figures are the
    longest stretches, `limits` names what each was judged against."""
    events = sorted(events, key=lambda e: e.t)
    result = ScenarioResult("chaos", description, target=target)
    _count_chaos_actions(result, events)
    _count_requests(result, events, rolling=False)
    result.executor_overlaps = executor_overlaps(_of(events, "action"))
    _observed(result, events)
    _judge(result, {"lost": thresholds.max_lost, "duplicated": thresholds.max_duplicated,
                    "acked_writes_lost": thresholds.max_acked_writes_lost,
                    "executor_overlaps": thresholds.max_executor_overlaps})
    _judge_outages(result, events, default_s=outage_limit_s, refusing=refusing)
    return result


def _judge_outages(result: ScenarioResult, events: Sequence[Event], *, default_s: float,
                   refusing: Sequence[str]) -> None:
    slots = _of(events, "slot")
    windows = [(e.t, e.t + (e.duration or 0.0)) for e in slots if e.name in refusing]
    writes = [(e.t, e.ok) for e in _of(events, "write") if not any(start <= e.t <= end for start, end in windows)]
    reads = [(e.t, e.ok) for e in _of(events, "request")]
    result.limits["outage_s"] = default_s
    for key, samples in (("read_outage_s", reads), ("write_outage_s", writes)):
        judged = [(end - start, _outage_limit(slots, start, end, default_s), start)
                  for start, end in stretches(samples)]
        longest, limit, _ = max(judged, default=(0.0, default_s, 0.0))
        setattr(result, key, longest)
        result.limits[key] = limit
        result.failures += [f"{key} {length:.3g} > {allowed:.3g} (from {start:.1f}s)"
                            for length, allowed, start in judged if length > allowed]
    result.passed = not result.failures


def _outage_limit(slots: Sequence[Event], start: float, end: float, default_s: float) -> float:
    """What the faults that held at some time within [start, end] may cost together: the sum of their limits (a
    second fault in the middle of the first one's recovery starts a recovery of its own), `default_s` when none
    held."""
    held = [e.limit_s or default_s for e in slots if e.t <= end and start <= e.t + (e.duration or 0.0)]
    return round(sum(held), 3) if held else default_s


def _count_chaos_actions(result: ScenarioResult, events: Sequence[Event]) -> None:
    pushes = _of(events, "push")
    actions = _of(events, "action")
    arrivals = [e for e in events if e.kind in ("action", "stray")]
    first_push, answered, expected = _expected_rows(pushes)
    gaps = dsd_gaps(arrivals, first_push)
    blind = gaps + blind_windows(_of(events, "status"))
    expected = {k for k in expected if not any(_lived_within(first_push, answered, k, w) for w in blind)}
    ks = [e.k for e in actions if e.k is not None]
    result.dsd_replaced = bool(gaps)
    result.pushed = len(pushes)
    result.expected_actions = len(expected)
    result.executed = len(set(ks) & expected)
    result.lost = len(expected - set(ks))
    result.duplicates_excused = excused_duplicates(actions)
    result.duplicated = len(ks) - len(set(ks)) - result.duplicates_excused


def blind_windows(status: Sequence[Event]) -> list[tuple[float, float]]:
    """Stretches in which no api-pe asked heard the DSD: from DSD_SILENT_LEAD_S before the first "does not
    hear" answer of a run of them to the next "hears" (runs shorter than MIN_BLIND_S left out)."""
    windows, since = [], None
    for e in sorted(status, key=lambda e: e.t):
        if not e.ok and since is None:
            since = e.t
        elif e.ok and since is not None:
            if e.t - since >= MIN_BLIND_S:
                windows.append((since - DSD_SILENT_LEAD_S, e.t))
            since = None
    if since is not None:
        windows.append((since - DSD_SILENT_LEAD_S, float("inf")))
    return windows


def excused_duplicates(actions: Sequence[Event]) -> int:
    """How many actions were run again by a newer DSD instance than the one that ran them first, within
    TAKEOVER_S of that newer instance's first action."""
    began: dict[str, float] = {}
    first_by: dict[int, str | None] = {}
    excused = 0
    for e in sorted(actions, key=lambda e: e.t):
        if e.executor is not None:
            began.setdefault(e.executor, e.t)
        if e.k is None:
            continue
        if e.k not in first_by:
            first_by[e.k] = e.executor
            continue
        first = first_by[e.k]
        if e.executor is None or first is None or e.executor == first:
            continue
        if began[e.executor] > began[first] and e.t - began[e.executor] <= TAKEOVER_S:
            excused += 1
    return excused
