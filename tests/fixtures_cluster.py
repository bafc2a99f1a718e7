"""Fixture: the shared lab, deployed once by `congressctl deploy` (for deploy, status and failover tests)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from congressctl.inventory import Inventory, load_inventory

CLI = [str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "congressctl")]


@dataclass
class LabCluster:
    lab: object
    inventory_path: Path
    inv: Inventory
    first_deploy: dict


def congressctl(*args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """The real command line, as an operator runs it."""
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"congressctl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def cluster(lab) -> LabCluster:
    proc = congressctl("deploy", "-i", str(lab.inventory), "--output", "json", timeout=900)
    assert proc.returncode == 0, f"first deploy failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return LabCluster(lab=lab, inventory_path=lab.inventory, inv=load_inventory(lab.inventory),
                   first_deploy=json.loads(proc.stdout))
