"""A failover scenario's timeline as one self-contained HTML page (inline SVG, no scripts, no downloads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from congressctl.render import render_template

LANES = ("fault", "leader", "push", "action", "request")
COLORS = {"fault": "#b42318", "restore": "#17803d", "leader": "#6941c6", "push": "#667085", "action": "#1570ef",
          "duplicate": "#f79009", "request": "#98a2b3", "failed": "#d92d20", "detected": "#b54708",
          "recovered": "#17803d"}
LANE_OF = {"fault": "fault", "restore": "fault", "detected": "fault", "recovered": "fault", "leader": "leader",
           "push": "push", "action": "action", "request": "request"}


@dataclass(frozen=True)
class Event:
    t: float          # seconds since the scenario started
    kind: str         # fault, restore, detected, recovered, leader, push, action, request
    detail: str = ""
    ok: bool = True


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
