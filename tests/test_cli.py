"""The thin CLI's shared output: rows as a rich table or JSON."""

from __future__ import annotations

import io
import json

from rich.console import Console

from congressctl import cli

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
