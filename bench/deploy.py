"""Deploy onto fresh labs over SSH, as an operator would; last line: JSON with the seconds taken.

Measures `congressctl deploy` (the real command) on a new 3-host lab (first deploy, a no-change re-deploy, then
an upgrade under load: `failover-test --scenario rolling-upgrade`, whose deploy of a new version runs while
pushes and GETs go through the VIP) and on a new 12-host lab (first deploy). Goals (issues 5 and 11):
noop_deploy_s <= 3 s; first_deploy_12_s <= 2 x first_deploy_3_s; upgrade_3_s <= 60 s with 0 failed requests
and 0 lost or duplicated actions. Needs root. Run: .venv/bin/python bench/deploy.py [--big 12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "congressctl")


def congressctl(*args: str, timeout: float = 1800, check: bool = True) -> tuple[float, str]:
    """Seconds taken and stdout."""
    started = time.monotonic()
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)
    took = time.monotonic() - started
    if check and proc.returncode != 0:
        problems = [line for line in proc.stderr.splitlines() if "problem" in line or "error" in line]
        raise RuntimeError(f"congressctl {' '.join(args)} exited {proc.returncode} after {took:.0f}s: "
                           + " | ".join(problems[:3]))
    return took, proc.stdout


def upgrade_figures(inventory: str) -> dict:
    """The rolling-upgrade scenario's deploy: how long it took and what failed meanwhile."""
    _, out = congressctl("failover-test", "-i", inventory, "--scenario", "rolling-upgrade", "--yes",
                         "--output", "json", check=False)
    s = json.loads(out)["scenarios"][0]
    return {"upgrade_3_s": round(s["recover_s"], 2) if s["recover_s"] is not None else None,
            "upgrade_failed_requests": f"{s['failed_requests']}/{s['requests']}", "upgrade_lost": s["lost"],
            "upgrade_duplicated": s["duplicated"], "upgrade_passed": s["passed"]}


def deploy_times(nodes: int, name: str, root: Path, noop: bool) -> dict:
    lab = root / name
    congressctl("lab", "up", "--nodes", str(nodes), "--name", name, "--dir", str(lab))
    try:
        inventory = str(lab / "inventory.yaml")
        figures = {f"first_deploy_{nodes}_s": round(congressctl("deploy", "-i", inventory)[0], 2)}
        if noop:
            figures[f"noop_deploy_{nodes}_s"] = round(congressctl("deploy", "-i", inventory)[0], 2)
            figures |= upgrade_figures(inventory)
        return figures
    finally:
        subprocess.run([CLI, "lab", "down", "--name", name, "--dir", str(lab)], capture_output=True, timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=12, help="hosts in the big lab")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        figures = deploy_times(3, "bd3", Path(tmp), noop=True)
        try:
            figures |= deploy_times(args.big, "bd12", Path(tmp), noop=False)
        except RuntimeError as exc:
            figures |= {f"first_deploy_{args.big}_s": None, f"error_{args.big}": str(exc)}
    small, big = figures["first_deploy_3_s"], figures[f"first_deploy_{args.big}_s"]
    upgrade = figures["upgrade_3_s"]
    figures |= {"first_deploy_s": small, "noop_deploy_s": figures["noop_deploy_3_s"],
                "big_over_small": round(big / small, 2) if big else None,
                "goals_met": bool(big) and figures["noop_deploy_3_s"] <= 3 and big <= 2 * small
                and upgrade is not None and upgrade <= 60 and figures["upgrade_passed"]}
    print(json.dumps(figures))
    sys.exit(0 if figures["goals_met"] else 1)


if __name__ == "__main__":
    main()
