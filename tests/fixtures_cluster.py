"""Fixture: the shared lab, deployed once by `congressctl deploy` (for deploy, status and failover tests)."""

from __future__ import annotations

import json
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from congressctl import auth, tls
from congressctl.inventory import Inventory, load_inventory

CLI = [str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "congressctl")]


@dataclass
class LabCluster:
    lab: object
    inventory_path: Path
    inv: Inventory
    first_deploy: dict

    @property
    def headers(self) -> dict[str, str]:
        """The API's admin token, from the lab's state dir where deploy made it."""
        return auth.headers(auth.require_admin_token(self.inv))

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """httpx's `verify` for the lab's API (its cluster CA, with api.tls on)."""
        return tls.client_verify(self.inv)


def retimed_inventory(cluster: LabCluster, folder: Path, **timings: object) -> Path:
    """The lab's inventory with other timings (so every congress.yaml changes): see inventory_with."""
    return inventory_with(cluster, folder, "timings", **timings)


def inventory_with(cluster: LabCluster, folder: Path, section: str, **values: object) -> Path:
    """The lab's inventory with other `values` in `section`, written to FOLDER under the lab's file name (the
    name is in every rendered file's first line), its paths made absolute."""
    data = yaml.safe_load(cluster.inventory_path.read_text())
    data.setdefault(section, {}).update(values)
    for key in ("key", "known_hosts"):
        data["ssh"][key] = str((cluster.inventory_path.parent / data["ssh"][key]).resolve())
    data["state_dir"] = str((cluster.inventory_path.parent / data.get("state_dir", ".congressctl-state")).resolve())
    path = folder / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


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
