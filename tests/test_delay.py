"""The NFQUEUE packet delayer (congressctl/failover/delay.py) in a private network namespace of its own.

Each test gets a fresh netns with only lo up, so the iptables rule on its OUTPUT -o lo sees this test's packets
alone. A TCP connect on lo sends its SYN and the SYN-ACK both through OUTPUT, so a connect through the queue costs
two holds. A packet lost instead of held would show as TCP's 1 s SYN retransmit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require, require_tool

from congressctl.failover import delay

ROOT = Path(__file__).resolve().parent.parent
DELAY_PY = ROOT / "congressctl" / "failover" / "delay.py"
PYTHON = "/usr/bin/python3"   # Debian's python3, as on the hosts (nobody may run it, unlike the venv's)
QUEUE = 7
PORT = 8080


CONNECTS = f"""
import json, socket, sys, time
count = int(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", {PORT}))
listener.listen(64)
print("go", flush=True)
took = []
for _ in range(count):
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", {PORT}), timeout=10):
        took.append((time.monotonic() - start) * 1000)
print(json.dumps(took), flush=True)
"""


@pytest.fixture
def netns() -> Iterator[str]:
    require(os.geteuid() == 0, "the delayer test needs root (netns, iptables, NFQUEUE)")
    require_tool("ip")
    require_tool("iptables")
    require(os.access(PYTHON, os.X_OK), f"{PYTHON} is missing")
    name = f"qd{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    made = subprocess.run(["ip", "netns", "add", name], check=False, capture_output=True, text=True)
    require(made.returncode == 0, f"cannot make a network namespace: {made.stderr.strip()}")
    try:
        in_netns(name, "ip link set lo up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def in_netns(netns: str, command: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sh", "-c", command], check=True, timeout=30)


def start_delayer(netns: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", netns, *prefix, PYTHON, str(DELAY_PY), "--queue", str(QUEUE),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def bound(netns: str) -> bool:
    out = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/netfilter/nfnetlink_queue"],
                         capture_output=True, text=True, check=True).stdout
    return any(line.split()[0] == str(QUEUE) for line in out.splitlines() if line.strip())


def wait_bound(netns: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while not bound(netns):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the delayer did not bind its queue within 10 s"
        time.sleep(0.05)


def connects(netns: str, count: int) -> list[float]:
    """Milliseconds each of `count` TCP connects to a listener on lo took."""
    out = subprocess.run(["ip", "netns", "exec", netns, PYTHON, "-c", CONNECTS, str(count)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [float(ms) for ms in json.loads(out.splitlines()[-1])]


def stop(proc: subprocess.Popen) -> delay.DelayReport:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return delay.DelayReport.from_dict(json.loads(out))


def test_connects_through_the_queue_are_delayed_and_fast_again_without_the_rule(netns: str) -> None:
    proc = start_delayer(netns, "--delay-ms", "100", "--jitter-ms", "0", "--seconds", "60")
    try:
        wait_bound(netns, proc)
        in_netns(netns, delay.insert_rule(QUEUE, "lo"))
        delayed = connects(netns, 5)
        in_netns(netns, delay.delete_rule(QUEUE, "lo"))
        direct = connects(netns, 5)
    finally:
        report = stop(proc)
    assert all(190 <= ms < 900 for ms in delayed), delayed   # two holds of 100 ms, no retransmit
    assert all(ms < 50 for ms in direct), direct
    assert report.packets >= 10
    assert 80 <= report.mean_delay_ms <= 150, report   # what is held at exit goes at once
    assert not bound(netns)


def test_jitter_spreads_the_delay_around_its_mean(netns: str) -> None:
    proc = start_delayer(netns, "--delay-ms", "60", "--jitter-ms", "20", "--seconds", "60", "--seed", "1")
    try:
        wait_bound(netns, proc)
        in_netns(netns, delay.insert_rule(QUEUE, "lo"))
        delayed = connects(netns, 20)
    finally:
        report = stop(proc)
    assert max(delayed) - min(delayed) > 20, delayed
    assert 50 <= report.mean_delay_ms <= 80, report


def test_sigterm_releases_every_held_packet(netns: str) -> None:
    proc = start_delayer(netns, "--delay-ms", "5000", "--seconds", "60")
    wait_bound(netns, proc)
    in_netns(netns, delay.insert_rule(QUEUE, "lo"))
    client = subprocess.Popen(["ip", "netns", "exec", netns, PYTHON, "-c", CONNECTS, "1"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline() == "go\n"
        time.sleep(0.5)   # its SYN is held now
        report = stop(proc)
        held_connect = json.loads(client.communicate(timeout=10)[0])[0]
    finally:
        client.kill()
    assert held_connect < 950, held_connect   # released at SIGTERM, not dropped (TCP resends a SYN after 1 s)
    assert report.packets >= 1
    assert all(ms < 50 for ms in connects(netns, 3))   # the rule stays, but passes packets with no one bound


def test_it_stops_by_itself_when_its_time_is_up(netns: str) -> None:
    proc = start_delayer(netns, "--delay-ms", "100", "--seconds", "1")
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert delay.DelayReport.from_dict(json.loads(out)).packets == 0
    assert not bound(netns)


def test_a_taken_queue_is_a_clear_error(netns: str) -> None:
    first = start_delayer(netns, "--delay-ms", "100", "--seconds", "60")
    try:
        wait_bound(netns, first)
        second = start_delayer(netns, "--delay-ms", "100", "--seconds", "60")
        _out, err = second.communicate(timeout=10)
    finally:
        stop(first)
    assert second.returncode == 1
    assert "queue 7 is already bound by another process" in err
    assert "Traceback" not in err


def test_binding_as_nobody_is_a_clear_error(netns: str) -> None:
    setpriv = require_tool("setpriv")
    proc = start_delayer(netns, "--delay-ms", "100", "--seconds", "60",
                         prefix=(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"))
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert "needs root" in err
    assert "Traceback" not in err


def test_the_rule_commands_insert_and_delete_one_bypassing_rule(netns: str) -> None:
    assert delay.insert_rule(7, "eth0") == (
        "iptables -w -I OUTPUT -o eth0 -j NFQUEUE --queue-num 7 --queue-bypass")
    assert delay.delete_rule(7, "eth0") == (
        "iptables -w -D OUTPUT -o eth0 -j NFQUEUE --queue-num 7 --queue-bypass")
    in_netns(netns, delay.insert_rule(QUEUE, "lo"))
    in_netns(netns, delay.delete_rule(QUEUE, "lo"))
    rules = subprocess.run(["ip", "netns", "exec", netns, "iptables", "-w", "-S", "OUTPUT"],
                           capture_output=True, text=True, check=True).stdout
    assert "NFQUEUE" not in rules


def test_the_report_round_trips() -> None:
    report = delay.DelayReport(queue=7, packets=12, mean_delay_ms=101.5, overflows=0)
    assert delay.DelayReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report
