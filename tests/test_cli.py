"""The thin CLI: rows as a rich table or JSON, how it is started, and Ctrl-C (one line, exit status 130)."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from conftest import require, require_tool
from congressctl import cli, deploy, verify
from congressctl.errors import ToolTimeoutError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "inventory.example.yaml"
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


@pytest.mark.parametrize("how", [["congressctl/cli.py"], ["-m", "congressctl.cli"]], ids=["script", "module"])
def test_every_command_is_there_however_the_cli_is_started(how) -> None:
    proc = subprocess.run([sys.executable, *how, "failover-test", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Inject failures" in proc.stdout


def _start(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "congressctl.cli", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, **kw)


def _read_until(proc: subprocess.Popen, marker: bytes, timeout: float = 60) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
        assert chunk, f"{marker!r} not on stderr: {seen!r}"
        seen += chunk
    return seen


def _assert_interrupted(proc: subprocess.Popen, before: bytes = b"") -> None:
    _, rest = proc.communicate(timeout=60)
    stderr = (before + rest).decode()
    assert proc.returncode == 130, stderr
    assert stderr.endswith("interrupted\n") and stderr.count("interrupted") == 1, stderr   # after a prompt, on its line
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr


def test_ctrl_c_at_a_prompt_is_one_line_and_exit_130(tmp_path: Path) -> None:
    report = tmp_path / "report"
    proc = _start("failover-test", "-i", str(EXAMPLE), "--report", str(report))
    seen = _read_until(proc, b"Go on?")
    proc.send_signal(signal.SIGINT)
    _assert_interrupted(proc, seen)
    assert not report.exists()


def test_ctrl_c_while_the_tools_run_leaves_no_namespace_and_no_temporary_file(tmp_path: Path) -> None:
    for tool in verify.TOOLS:
        require_tool(tool)
    require(os.geteuid() == 0, "corosync -t checks need root for a throwaway network namespace")
    proc = _start("validate", "-i", str(EXAMPLE), env={**os.environ, "TMPDIR": str(tmp_path)},
                  start_new_session=True)
    first = Path(f"/run/netns/cctl-check-{proc.pid}-0")
    deadline = time.monotonic() + 60
    while not first.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the first corosync check never started"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGINT)   # as Ctrl-C in a terminal: the tool running then gets it too
    _assert_interrupted(proc)
    assert not list(Path("/run/netns").glob(f"cctl-check-{proc.pid}-*"))
    assert list(tmp_path.iterdir()) == []


def test_a_wheelhouse_build_out_of_time_is_a_named_error(tmp_path: Path) -> None:
    """What a deploy host reports (its row's error) when pip overruns: the command and the time, one line."""
    with pytest.raises(ToolTimeoutError) as raised:
        deploy.build_wheelhouse(tmp_path, "3.11.2", timeout=1e-6)
    assert str(raised.value) == "building the wheelhouse: `pip wheel` did not finish within 1e-06 s (killed)"
    assert raised.value.exit_code == 2
    assert not list(tmp_path.glob("wheelhouse/*/.complete"))
