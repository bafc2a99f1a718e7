"""The OCF resource agents pass Pacemaker's ocf-tester against real node processes and a real Redis."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import require, require_tool
from fixtures_redis import REPO, congressctl_command

AGENTS = REPO / "templates" / "ocf"


def run_ocf_tester(agent: str, params: dict[str, str]) -> subprocess.CompletedProcess:
    args = [require_tool("ocf-tester"), "-n", f"test-{agent}"]
    for key, value in params.items():
        args += ["-o", f"{key}={value}"]
    env = {**os.environ, "OCF_ROOT": "/usr/lib/ocf"}
    return subprocess.run([*args, str(AGENTS / agent)], capture_output=True, text=True, timeout=240, env=env)


def binary() -> str:
    command = congressctl_command()
    require(len(command) == 2, "the congressctl console script is not installed in .venv (make install)")
    return command[0]


@pytest.mark.slow
@pytest.mark.parametrize("agent,role", [("congress-api-pe", "api-pe"), ("congress-dsd", "dsd")])
def test_ocf_tester_passes(agent, role, node_cluster, tmp_path):
    require(os.geteuid() == 0, "ocf-tester needs root")
    require(Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(), "resource-agents is not installed")
    from conftest import free_port
    config = node_cluster.write_config("ocf1", role, free_port())
    pidfile = tmp_path / f"{agent}.pid"
    logfile = tmp_path / f"{agent}.log"
    result = run_ocf_tester(agent, {"config": str(config), "binary": binary(), "pidfile": str(pidfile),
                                    "logfile": str(logfile)})
    log = logfile.read_text()[-3000:] if logfile.exists() else "(no log)"
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nnode log:\n{log}"
    assert "passed all tests" in result.stdout + result.stderr
    assert not pidfile.exists()


@pytest.mark.slow
def test_ocf_tester_passes_on_the_bus_agent(redis_server, tmp_path):
    """A real redis-server started, promoted, demoted and stopped by congress-bus under ocf-tester."""
    require(os.geteuid() == 0, "ocf-tester needs root")
    require(Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(), "resource-agents is not installed")
    from conftest import free_port
    port = free_port()
    config = tmp_path / "redis.conf"
    config.write_text("\n".join(["bind 127.0.0.1", f"port {port}", f"dir {tmp_path}", "appendonly yes", "save ''",
                                 f"requirepass {redis_server.password}", f"masterauth {redis_server.password}",
                                 "replica-read-only yes", ""]))
    pidfile, logfile = tmp_path / "bus.pid", tmp_path / "bus.log"
    # bus_address: the fixture's Redis, a master this instance replicates from until promoted; not a peer (a
    # live master is always ahead, so promote would rightly refuse: Pacemaker demotes it first)
    result = run_ocf_tester("congress-bus", {
        "config": str(config), "port": str(port), "bus_address": f"127.0.0.1:{redis_server.port}",
        "peers": f"self=127.0.0.1:{port}",
        "password_file": str(redis_server.password_file), "pidfile": str(pidfile), "logfile": str(logfile),
        "user": "root"})
    log = logfile.read_text()[-3000:] if logfile.exists() else "(no log)"
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nredis log:\n{log}"
    assert "passed all tests" in result.stdout + result.stderr
    assert not pidfile.exists()
    assert redis_server.client().info("replication")["role"] == "master"


@pytest.mark.parametrize("agent", ["congress-api-pe", "congress-dsd"])
def test_agents_are_executable_and_describe_their_parameters(agent):
    path = AGENTS / agent
    assert os.access(path, os.X_OK)
    require(Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(), "resource-agents is not installed")
    out = subprocess.run([str(path), "meta-data"], capture_output=True, text=True, timeout=10,
                         env={**os.environ, "OCF_ROOT": "/usr/lib/ocf"})
    assert out.returncode == 0
    for name in ("config", "binary", "pidfile"):
        assert f'<parameter name="{name}"' in out.stdout
    assert "/opt/congressctl/bin/congressctl" in out.stdout


def test_bus_agent_is_promotable_and_describes_its_parameters():
    path = AGENTS / "congress-bus"
    assert os.access(path, os.X_OK)
    require(Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(), "resource-agents is not installed")
    out = subprocess.run([str(path), "meta-data"], capture_output=True, text=True, timeout=10,
                         env={**os.environ, "OCF_ROOT": "/usr/lib/ocf"})
    assert out.returncode == 0
    for name in ("config", "port", "bus_address", "peers", "password_file", "pidfile", "server", "client"):
        assert f'<parameter name="{name}"' in out.stdout
    for action in ("promote", "demote", "notify"):
        assert f'<action name="{action}"' in out.stdout
