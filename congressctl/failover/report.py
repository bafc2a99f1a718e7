"""The report of a run: per scenario its events (jsonl, every field) and its timeline as one self-contained HTML
page (inline SVG, no scripts, no downloads); summary.json for the whole run; and the run's own page
(index.html): every request's latency and the throughput over the run, each fault shaded (Jepsen's perf plot),
above links to the timelines."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from congressctl.failover.check import ScenarioResult
from congressctl.failover.history import Event
from congressctl.render import render_template

LANES = ("fault", "leader", "push", "action", "request")
COLORS = {"fault": "#b42318", "restore": "#17803d", "leader": "#6941c6", "dsd": "#6941c6", "push": "#667085",
          "action": "#1570ef", "duplicate": "#f79009", "request": "#98a2b3", "failed": "#d92d20",
          "detected": "#b54708", "recovered": "#17803d"}
LANE_OF = {"fault": "fault", "restore": "fault", "detected": "fault", "recovered": "fault", "leader": "leader",
           "dsd": "leader", "push": "push", "action": "action", "request": "request"}
# what the timeline draws; of the requests and writes only the failed ones (thousands succeed)
TIMELINE_KINDS = {"fault", "restore", "detected", "recovered", "leader", "dsd", "push", "action", "pool"}
FAILURE_KINDS = {"request", "write"}


def write_scenario(report_dir: Path, result: ScenarioResult, events: Sequence[Event], timings: str) -> None:
    """`<scenario>.events.jsonl` and `<scenario>.html`; their paths go into the result."""
    events = sorted(events, key=lambda e: e.t)
    raw = report_dir / f"{result.name}.events.jsonl"
    report_dir.mkdir(parents=True, exist_ok=True)
    raw.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in events))
    figures = {k: v for k, v in result.row().items() if k not in ("scenario", "ok", "why")}
    drawn = [e for e in events if e.kind in TIMELINE_KINDS or (e.kind in FAILURE_KINDS and not e.ok)]
    html = render_html(result.name, result.description, result.passed, figures, drawn, timings)
    result.timeline = str(write_html(report_dir / f"{result.name}.html", html))
    result.events_file = str(raw)


def read_events(path: Path) -> list[Event]:
    return [Event.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def write_summary(report_dir: Path, summary: dict) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _fenced(t: dict) -> str:
    slack = t.get("fence_slack_s_in_force") or 0.0
    return f" (a lost host's: {slack:g} s more, the cluster fences first)" if slack else ""


def timings_summary(t: dict) -> str:
    return (f"heartbeat {t['heartbeat_interval_ms']} ms, peer_timeout {t['peer_timeout_ms']} ms; corosync token "
            f"{t['corosync_token_in_force_ms']} ms + consensus {t['corosync_consensus_in_force_ms']} ms in force "
            f"(inventory: {t['corosync_token_ms']} + {t['corosync_consensus_ms']}); node faults must recover within "
            f"{t['node_recovery_limit_s']:.2f} s, PE faults within {t['thresholds']['pe_recovery_s']} s, bus writes "
            f"within {t['bus_recovery_limit_s']:.2f} s{_fenced(t)}; workload {t['push_rate']:g} pushes/s, "
            f"{t['get_rate']:g} GETs/s, {t['write_rate']:g} acknowledged writes/s")


def render_html(scenario: str, description: str, passed: bool, figures: dict, events: list[Event],
                timings: str, width: int = 1100) -> str:
    left, top, lane_gap = 70, 24, 34
    height = top + lane_gap * len(LANES) + 30
    end = max([e.t for e in events] + [1.0])
    scale = (width - left - 20) / end

    def x(t: float) -> float:
        return round(left + t * scale, 1)

    lanes = [{"label": name, "y": top + i * lane_gap + 10} for i, name in enumerate(LANES)]
    lane_y = {lane["label"]: lane["y"] for lane in lanes}
    marks, spans = [], []
    fault_start = None
    for e in events:
        lane = LANE_OF.get(e.kind, "fault")
        color = COLORS.get(e.kind if e.ok else "failed", "#444")
        if e.kind == "action" and not e.ok:
            color = COLORS["duplicate"]
        if e.kind == "fault":
            fault_start = e.t
        if e.kind == "restore" and fault_start is not None:
            spans.append({"x": x(fault_start), "y": lane_y["fault"], "w": max(1.0, x(e.t) - x(fault_start)),
                          "color": COLORS["fault"], "title": f"fault {fault_start:.2f}s .. {e.t:.2f}s"})
        radius = 5 if lane == "fault" or lane == "leader" else 2.5
        marks.append({"x": x(e.t), "y": lane_y[lane], "r": radius, "color": color,
                      "title": f"{e.t:.3f}s {e.kind}: {e.detail}"})
    step = _tick_step(end)
    ticks = [{"x": x(i * step), "label": f"{i * step:g}"} for i in range(int(end / step) + 1)]
    return render_template(
        "timeline.html.j2", scenario=scenario, description=description, passed=passed, figures=figures, events=events,
        width=width, height=height, left=left, top=top, lanes=lanes, ticks=ticks, spans=spans, marks=marks,
        timings=timings)


def _tick_step(end: float) -> float:
    for step in (0.5, 1, 2, 5, 10, 20, 30, 60):
        if end / step <= 20:
            return step
    return 120


def write_html(path: Path, html: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    return path


# ------------------------------------------------------------------------------------------- the run's page

# the perf plot's series: a point per request of these kinds (label, color)
PERF_SERIES = {"request": ("GET", "#98a2b3"), "write": ("write", "#17803d"), "push": ("push", "#1570ef")}
FAILED_COLOR = "#d92d20"


@dataclass(frozen=True)
class Band:
    """A fault in force, on the run's clock."""

    start: float
    end: float
    label: str


def write_index(report_dir: Path, results: Sequence[ScenarioResult], *, passed: bool, title: str,
                timings: str) -> Path:
    """index.html: the run's perf plot over every scenario's events file, the rows, links to the timelines."""
    events, bands = run_events(results)
    html = render_template("report.html.j2", title=title, passed=passed, rows=[r.row() for r in results],
                           plot=perf_plot(events, bands), bands=bands, timings=timings,
                           pages=[{"name": r.name, "timeline": Path(r.timeline).name if r.timeline else None,
                                   "events": Path(r.events_file).name if r.events_file else None}
                                  for r in results])
    return write_html(report_dir / "index.html", html)


def run_events(results: Sequence[ScenarioResult]) -> tuple[list[Event], list[Band]]:
    """Every scenario's requests, writes and pushes, and its faults, on the run's clock (seconds since the first
    scenario's history began)."""
    recorded = [r for r in results if r.events_file and r.started_at is not None]
    zero = min((r.started_at for r in recorded if r.started_at is not None), default=0.0)
    events: list[Event] = []
    bands: list[Band] = []
    for r in recorded:
        assert r.events_file is not None and r.started_at is not None
        offset = r.started_at - zero
        own = read_events(Path(r.events_file))
        events += [replace(e, t=e.t + offset) for e in own if e.kind in PERF_SERIES]
        bands += fault_bands(own, label=r.name, offset=offset)
    return events, bands


def fault_bands(events: Sequence[Event], *, label: str, offset: float = 0.0) -> list[Band]:
    """A chaos run's slots, each a band; else the scenario's fault, from its injection to its last restore or
    recovery."""
    slots = [e for e in events if e.kind == "slot"]
    if slots:
        return [Band(e.t + offset, e.t + (e.duration or 0.0) + offset, f"{e.name} on {e.host}") for e in slots]
    course = [e.t for e in events if e.kind in ("fault", "restore", "recovered")]
    start = next((e.t for e in events if e.kind == "fault"), None)
    if start is None:
        return []
    return [Band(start + offset, max(course) + offset, label)]


def throughput(events: Sequence[Event]) -> dict[str, list[int]]:
    """Requests completed in each second of the run: the successful ones per series label, the failed ones of
    every series under "failed"."""
    ends = [(e.t + (e.duration or 0.0), e) for e in events if e.kind in PERF_SERIES]
    seconds = int(max((t for t, _ in ends), default=0.0)) + 1
    counts = {label: [0] * seconds for label, _ in PERF_SERIES.values()} | {"failed": [0] * seconds}
    for t, e in ends:
        counts[PERF_SERIES[e.kind][0] if e.ok else "failed"][int(t)] += 1
    return counts


def perf_plot(events: Sequence[Event], bands: Sequence[Band], *, width: int = 1100) -> dict:
    """The perf plot's geometry: latency (log scale) a point per request, failed ones crossed; below, the
    throughput per second; each fault a shaded band across both."""
    left, right, top, lat_h, gap, rate_h = 60, 20, 30, 260, 40, 140
    rate_top = top + lat_h + gap
    height = rate_top + rate_h + 30
    end = max([e.t + (e.duration or 0.0) for e in events] + [b.end for b in bands] + [1.0])
    scale = (width - left - right) / end

    def x(t: float) -> float:
        return round(left + t * scale, 1)

    ms = [max((e.duration or 0.0) * 1000, 0.1) for e in events]
    lo, hi = math.floor(math.log10(min(ms, default=1.0))), math.ceil(math.log10(max(ms, default=1000.0)))
    hi = max(hi, lo + 1)

    def y(latency_ms: float) -> float:
        return round(top + lat_h - (math.log10(latency_ms) - lo) / (hi - lo) * lat_h, 1)

    points: dict[str, list[str]] = {kind: [] for kind in PERF_SERIES}
    crosses: list[str] = []
    for e, m in zip(events, ms, strict=True):
        px, py = x(e.t), y(m)
        if e.ok:
            points[e.kind].append(f"M{px} {py}h0")
        else:
            crosses.append(f"M{px - 3} {py - 3}l6 6m0 -6l-6 6")
    counts = throughput(events)
    top_rate = max([max(c, default=0) for c in counts.values()] + [1])

    def rate_line(per_second: list[int]) -> str:
        return " ".join(f"{x(i + 0.5)},{round(rate_top + rate_h - n / top_rate * rate_h, 1)}"
                        for i, n in enumerate(per_second))

    series = [{"label": label, "color": color, "path": "".join(points[kind]), "count": len(points[kind]),
               "rate": rate_line(counts[label])} for kind, (label, color) in PERF_SERIES.items()]
    step = _tick_step(end)
    return {
        "width": width, "height": height, "left": left, "right": right, "top": top, "lat_h": lat_h,
        "rate_top": rate_top, "rate_h": rate_h, "series": series, "failed_path": "".join(crosses),
        "failed_count": len(crosses), "failed_rate": rate_line(counts["failed"]), "failed_color": FAILED_COLOR,
        "bands": [{"x": x(b.start), "w": max(1.0, x(b.end) - x(b.start)), "label": b.label,
                   "label_y": top - 6 - 11 * (i % 2), "title": f"{b.label}: {b.start:.1f}s .. {b.end:.1f}s"}
                  for i, b in enumerate(bands)],
        "x_ticks": [{"x": x(i * step), "label": f"{i * step:g}"} for i in range(int(end / step) + 1)],
        "lat_ticks": [{"y": y(10.0 ** d), "label": _ms(10.0 ** d)} for d in range(lo, hi + 1)],
        "rate_ticks": [{"y": round(rate_top + rate_h - f * rate_h, 1), "label": f"{f * top_rate:g}"}
                       for f in (0.0, 0.5, 1.0)],
    }


def _ms(value: float) -> str:
    return f"{value / 1000:g} s" if value >= 1000 else f"{value:g} ms"
