"""The OCF resource agents pass Pacemaker's ocf-tester against real node processes and a real Redis."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from congressctl.node.runtime import BUS_OUTAGE_GRACE_S
from congressctl.payloads import DsdLiveness
from conftest import free_port, require, require_tool
from fixtures_redis import REPO, congressctl_command, wait_for

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


# The options of templates/haproxy.cfg.j2 that a reload depends on, on addresses a test can bind.
HAPROXY_CFG = """global
    stats socket {socket} mode 600 level admin
    hard-stop-after 30s
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    option idle-close-on-response
frontend api
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    server s1 127.0.0.1:{backend}
"""


class _Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def haproxy_agent(tmp_path):
    require(os.geteuid() == 0, "ocf-tester needs root")
    require(Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(), "resource-agents is not installed")
    require_tool("haproxy")
    require_tool("socat")
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CFG.format(socket=tmp_path / "admin.sock", port=port, backend=backend.server_port))
    params = {"config": str(config), "pidfile": str(tmp_path / "haproxy.pid"), "socket": str(tmp_path / "admin.sock"),
              "logfile": str(tmp_path / "haproxy.log")}
    yield params, port
    agent("congress-haproxy", "stop", params)
    backend.shutdown()


def agent(name: str, action: str, params: dict[str, str]) -> int:
    env = {**os.environ, "OCF_ROOT": "/usr/lib/ocf", **{f"OCF_RESKEY_{k}": v for k, v in params.items()}}
    return subprocess.run([str(AGENTS / name), action], env=env, capture_output=True, timeout=60).returncode


@pytest.mark.slow
def test_ocf_tester_passes_on_the_haproxy_agent(haproxy_agent):
    params, _ = haproxy_agent
    result = run_ocf_tester("congress-haproxy", params)
    assert result.returncode == 0 and "passed all tests" in result.stdout + result.stderr, result.stdout + result.stderr


def test_haproxy_reload_keeps_a_kept_alive_connection_and_refuses_no_new_one(haproxy_agent):
    """The master-worker reload: a client's kept-alive connection answers its next request (with
    `Connection: close`, then the client reconnects), and connections opened meanwhile all succeed."""
    params, port = haproxy_agent
    assert agent("congress-haproxy", "start", params) == 0
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    kept.request("GET", "/")
    first = kept.getresponse()
    assert first.status == 200 and first.read() == b"ok\n" and first.getheader("connection") is None
    errors: list[str] = []
    answered: list[int] = []
    stop = threading.Event()

    def fresh() -> None:
        while not stop.is_set():
            try:
                answered.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status)
            except OSError as exc:
                errors.append(repr(exc))
    clients = [threading.Thread(target=fresh) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        for _ in range(3):
            assert agent("congress-haproxy", "reload", params) == 0
        assert agent("congress-haproxy", "monitor", params) == 0
    finally:
        stop.set()
        for t in clients:
            t.join(10)
    kept.request("GET", "/")
    after = kept.getresponse()
    assert after.status == 200 and after.read() == b"ok\n"
    assert after.getheader("connection") == "close"
    assert errors == [] and len(answered) > 30


def test_haproxy_reload_refuses_a_bad_config_and_keeps_serving(haproxy_agent, tmp_path):
    params, port = haproxy_agent
    assert agent("congress-haproxy", "start", params) == 0
    good = Path(params["config"]).read_text()
    Path(params["config"]).write_text(good + "bogus line\n")
    assert agent("congress-haproxy", "reload", params) == 6   # OCF_ERR_CONFIGURED
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200
    Path(params["config"]).write_text(good)


# -- the DSD's liveness (issue 12): a paused DSD, a DSD whose bus is unreachable ---------------------------------
OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_INSTALLED, OCF_NOT_RUNNING = 0, 1, 5, 7


def run_agent(name: str, action: str, params: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OCF_ROOT": "/usr/lib/ocf", **{f"OCF_RESKEY_{k}": v for k, v in params.items()}}
    return subprocess.run([str(AGENTS / name), action], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def dsd_agent(node_cluster, tmp_path):
    """The congress-dsd agent's parameters for a DSD on the node cluster's Redis; stopped at the end."""
    require(os.geteuid() == 0, "the agent runs as root")
    require(Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(), "resource-agents is not installed")
    params = {"config": str(node_cluster.write_config("ocf1", "dsd", None)), "binary": binary(),
              "pidfile": str(tmp_path / "dsd.pid"), "logfile": str(tmp_path / "dsd.log"),
              "livefile": str(tmp_path / "dsd.live")}
    yield params
    run_agent("congress-dsd", "stop", params)


def liveness(params: dict[str, str]) -> DsdLiveness:
    return DsdLiveness.from_dict(json.loads(Path(params["livefile"]).read_text()))


def wait_for_monitor(params: dict[str, str], rc: int, timeout: float) -> subprocess.CompletedProcess:
    last: list[subprocess.CompletedProcess] = []

    def answered() -> bool:
        last[:] = [run_agent("congress-dsd", "monitor", params)]
        return last[0].returncode == rc
    wait_for(answered, timeout, interval=0.2, what=f"monitor to answer {rc}")
    return last[0]


def test_dsd_monitor_fails_on_a_paused_dsd_and_stop_ends_it_at_once(dsd_agent, node_cluster):
    started = run_agent("congress-dsd", "start", dsd_agent)
    assert started.returncode == OCF_SUCCESS, started.stderr
    pid = int(Path(dsd_agent["pidfile"]).read_text())
    record = liveness(dsd_agent)
    assert record.pid == pid and record.epoch == 1 and record.problem is None
    assert record.stale_after_s == 2             # 3 peer timeouts of 500 ms, rounded up to whole seconds
    assert run_agent("congress-dsd", "monitor", dsd_agent).returncode == OCF_SUCCESS
    os.kill(pid, signal.SIGSTOP)
    paused = time.monotonic()
    failed = wait_for_monitor(dsd_agent, OCF_ERR_GENERIC, timeout=10)
    assert time.monotonic() - paused < record.stale_after_s + 3
    assert "hung or paused" in failed.stderr
    stopping = time.monotonic()
    assert run_agent("congress-dsd", "stop", dsd_agent).returncode == OCF_SUCCESS
    assert time.monotonic() - stopping < 5, "a paused DSD stops at SIGTERM once resumed, not after the SIGKILL grace"
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert not Path(dsd_agent["livefile"]).exists()
    assert run_agent("congress-dsd", "monitor", dsd_agent).returncode == OCF_NOT_RUNNING


@pytest.mark.slow
def test_dsd_monitor_outlasts_a_bus_failover_then_fails_hard_and_the_api_pe_leaves_the_pool(dsd_agent, node_cluster):
    """The bus out of reach (its Redis frozen: nothing answers, as behind a dropped port): for as long as a bus
    failover takes the DSD stays; past BUS_OUTAGE_GRACE_S its monitor fails with a hard error (Pacemaker moves
    it rather than restart it here) and the api-pe's /healthz answers 503 (HAProxy takes it out)."""
    api = node_cluster.add("api-pe", "n1")
    assert run_agent("congress-dsd", "start", dsd_agent).returncode == OCF_SUCCESS
    node_cluster.redis.proc.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        while time.monotonic() - frozen < BUS_OUTAGE_GRACE_S - 2:
            assert run_agent("congress-dsd", "monitor", dsd_agent).returncode == OCF_SUCCESS
            assert api.get("/healthz", timeout=2)[0] == 200
            time.sleep(0.5)
        failed = wait_for_monitor(dsd_agent, OCF_ERR_INSTALLED, timeout=6)
        assert "control bus 127.0.0.1" in failed.stderr and "unreachable from this host" in failed.stderr
        wait_for(lambda: api.get("/healthz", timeout=2)[0] == 503, 5, what="the api-pe out of the pool")
    finally:
        node_cluster.redis.proc.send_signal(signal.SIGCONT)
    wait_for_monitor(dsd_agent, OCF_SUCCESS, timeout=10)


@pytest.mark.slow
def test_dsd_start_on_a_host_without_its_bus_fails_hard(node_cluster, tmp_path):
    require(os.geteuid() == 0, "the agent runs as root")
    require(Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(), "resource-agents is not installed")
    config = node_cluster.write_config("ocf1", "dsd", None)
    config.write_text(config.read_text().replace(f"port: {node_cluster.redis.port}", f"port: {free_port()}"))
    params = {"config": str(config), "binary": binary(), "pidfile": str(tmp_path / "dsd.pid"),
              "logfile": str(tmp_path / "dsd.log"), "livefile": str(tmp_path / "dsd.live")}
    begun = time.monotonic()
    started = run_agent("congress-dsd", "start", params)
    assert started.returncode == OCF_ERR_INSTALLED, started.stderr
    assert BUS_OUTAGE_GRACE_S <= time.monotonic() - begun < BUS_OUTAGE_GRACE_S + 5
    assert "cannot run here" in started.stderr and "unreachable from this host" in started.stderr
    assert not Path(params["pidfile"]).exists()
    assert run_agent("congress-dsd", "monitor", params).returncode == OCF_NOT_RUNNING
