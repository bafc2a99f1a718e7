"""The thin CLI's shared output: rows as a rich table or JSON."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from congressctl import cli

EXAMPLE = Path(__file__).resolve().parent.parent / "inventory.example.yaml"
ROW = {"host": "n1", "url": "http://10.213.111.100:1789/healthz", "resources": ["api-pe", "bus", "dsd", "haproxy"]}


def test_a_narrow_table_wraps_values_instead_of_cutting_them(monkeypatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buffer, width=40, color_system=None))
    cli.emit([ROW], "table", title="hosts")
    text = buffer.getvalue()
    assert "…" not in text
    rows = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    columns = ["".join(cell.strip() for cell in column).replace(" ", "") for column in zip(*rows)]
    assert columns == ["n1", "http://10.213.111.100:1789/healthz", "api-pe,bus,dsd,haproxy"]


def test_json_output_is_the_rows(capsys) -> None:
    cli.emit([ROW], "json")
    assert json.loads(capsys.readouterr().out) == [ROW]


def test_piped_tables_are_laid_out_wider_than_a_terminal(tmp_path) -> None:
    """Redirected to a file (no COLUMNS), a row longer than 80 characters stays on one line."""
    out = tmp_path / ("o" * 70)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-c", "from congressctl.cli import main; main()", "render", "-i",
                           str(EXAMPLE), "-o", str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert any(f"{out}/n1/corosync.conf" in line for line in proc.stdout.splitlines()), proc.stdout
