"""Every failover-test scenario on a fresh 3-host lab; last line: JSON with detection and recovery per scenario.

Targets: pe-leader-kill and pe-leader-pause recover <= 1.5 s with 0 lost and 0 duplicated;
dsd-node-fail and vip-node-fail recover <= corosync token + consensus (in force) + 2 s; api-node-fail has
0 failed GETs; bus-node-fail, bus-kill and bus-failback: writes answer again within token + consensus + 1.5 s
(write_outage_s), 0 failed reads, 0 lost and 0 duplicated actions; every scenario: 0 acknowledged writes lost.
The lab has the default topology (three bus nodes). Needs root. Run: .venv/bin/python bench/failover.py [--keep DIR] [--report DIR]

With --chaos SECONDS [--seed N]: one chaos run instead (failover-test --chaos); its JSON line has the seed, the
faults held and skipped, lost / duplicated (and excused) actions, acknowledged writes lost, the longest stretches
without successful reads and writes, executor overlaps. Target: --chaos 600 passes with 0 lost, 0 duplicated,
0 acknowledged writes lost, 0 executor overlaps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "congressctl")


def congressctl(*args: str, timeout: float = 1800, ok: tuple[int, ...] = (0,)) -> str:
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in ok:
        sys.exit(f"congressctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="make the lab in DIR and leave it up afterwards (default: a temporary folder, removed)")
    parser.add_argument("--report", metavar="DIR", type=Path,
                        help="write failover-test's report (timelines, raw events) here, to keep it")
    parser.add_argument("--chaos", metavar="SECONDS", type=float, help="one chaos run of this length instead")
    parser.add_argument("--seed", type=int, help="the chaos run's seed [default: a new one]")
    args = parser.parse_args()
    chaos = ["--chaos", f"{args.chaos:g}", *(["--seed", str(args.seed)] if args.seed is not None else [])]
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        lab = (args.keep or Path(tmp)) / "bf"
        report = args.report or lab / "report"
        congressctl("lab", "up", "--nodes", "3", "--name", "bf", "--dir", str(lab))
        try:
            inventory = str(lab / "inventory.yaml")
            congressctl("deploy", "-i", inventory)
            summary = json.loads(congressctl("failover-test", "-i", inventory, "--yes", "--output", "json",
                                             "--report", str(report), *(chaos if args.chaos else []), ok=(0, 1)))
        finally:
            if not args.keep:
                subprocess.run([CLI, "lab", "down", "--name", "bf", "--dir", str(lab)], capture_output=True,
                               timeout=300)
        # the events file is in the report, in the temporary folder by default
        print(json.dumps(chaos_figures(summary) if args.chaos else scenario_figures(summary)))


def chaos_figures(summary: dict) -> dict:
    [run] = summary["scenarios"]
    events = [json.loads(line) for line in Path(run["events_file"]).read_text().splitlines()]
    return {"seed": summary["seed"], "duration_s": summary["duration_s"], "scheduled": len(summary["schedule"]),
            "held": [f"{e['name']} on {e['host']}" for e in events if e["kind"] == "slot"],
            "skipped": [e["detail"] for e in events if e["kind"] == "skip"],
            "lost": run["lost"], "duplicated": run["duplicated"], "duplicates_excused": run["duplicates_excused"],
            "actions": f"{run['executed']}/{run['expected_actions']}", "acked_writes_lost": run["acked_writes_lost"],
            "read_outage_s": round(run["read_outage_s"], 3), "write_outage_s": round(run["write_outage_s"], 3),
            "failed_gets": f"{run['failed_requests']}/{run['requests']}",
            "failed_writes": f"{run['failed_writes']}/{run['writes']}",
            "executor_overlaps": run["executor_overlaps"], "outage_limit_s": run["limits"]["outage_s"],
            "failures": run["failures"],
            "goals_met": run["lost"] == run["duplicated"] == run["acked_writes_lost"] == run["executor_overlaps"] == 0
            and run["tables_equal"]}


def scenario_figures(summary: dict) -> dict:
    figures = {s["name"]: {"detect_s": round(s["detect_s"], 3) if s["detect_s"] is not None else None,
                           "recover_s": round(s["recover_s"], 3) if s["recover_s"] is not None else None,
                           "lost": s["lost"], "duplicated": s["duplicated"],
                           "failed_gets": f"{s['failed_requests']}/{s['requests']}",
                           "write_outage_s": round(s["write_outage_s"], 3),
                           "failed_writes": f"{s['failed_writes']}/{s['writes']}",
                           "acked_writes_lost": s["acked_writes_lost"], "passed": s["passed"]}
               for s in summary["scenarios"]}
    t = summary["timings"]
    figures["node_recovery_limit_s"] = t["node_recovery_limit_s"]
    figures["bus_recovery_limit_s"] = t["bus_recovery_limit_s"]
    figures["corosync_in_force_ms"] = [t["corosync_token_in_force_ms"], t["corosync_consensus_in_force_ms"]]
    figures["goals_met"] = summary["passed"]
    return figures


if __name__ == "__main__":
    main()
