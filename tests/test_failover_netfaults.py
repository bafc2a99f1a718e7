"""The network faults' pure parts: their nft rulesets checked and loaded by the real nft in a throwaway netns, the
shell that loads, heals and times them out, and the client's GET retries against a real HTTP server."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import jinja2
import pytest
from conftest import free_port, require, require_tool

from congressctl.failover import FAULTS, History, faults, workload

RULESETS = {
    "isolate.nft.j2": {"keep": "10.77.0.1"},
    "bus-cut.nft.j2": {"bus_address": "10.77.0.50", "bus_port": 6379},
    "loss.nft.j2": {"percent": faults.LOSS_PERCENT, "corosync_port": faults.COROSYNC_PORT},
}


@pytest.fixture
def netns() -> Iterator[str]:
    require(os.geteuid() == 0, "the nft rulesets are loaded in a network namespace: needs root")
    require_tool("ip")
    require_tool("nft")
    name = f"qn{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    made = subprocess.run(["ip", "netns", "add", name], check=False, capture_output=True, text=True)
    require(made.returncode == 0, f"cannot make a network namespace: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def in_netns(netns: str, command: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, "sh", "-c", command], input=stdin, capture_output=True,
                          text=True, timeout=30, check=False)


def table(netns: str) -> str:
    return in_netns(netns, f"nft list table {faults.FAULT_TABLE}").stdout


@pytest.mark.parametrize("template", sorted(RULESETS))
def test_every_ruleset_is_accepted_by_nft_and_loads_twice(netns, template):
    text = faults.ruleset(template, host="n1", **RULESETS[template])
    checked = in_netns(netns, "nft -c -f -", text)
    assert checked.returncode == 0, checked.stderr
    for _ in range(2):   # a second load replaces the first (its `delete table` line), as a repeated fault does
        loaded = in_netns(netns, "nft -f -", text)
        assert loaded.returncode == 0, loaded.stderr
    listed = table(netns)
    assert listed.count("chain ") == text.count("chain "), listed
    for value in RULESETS[template].values():
        assert str(value) in listed


def test_a_ruleset_missing_a_value_is_refused():
    with pytest.raises(jinja2.UndefinedError):
        faults.ruleset("bus-cut.nft.j2", host="n1", bus_address="10.77.0.50")


def test_heal_deletes_the_table_and_says_so_when_it_was_gone(netns):
    token = uuid.uuid4().hex[:12]
    text = faults.ruleset("loss.nft.j2", host="n1", percent=20, corosync_port=5405)
    loaded = in_netns(netns, faults.nft_load_command(token, 60), text)
    assert loaded.returncode == 0, loaded.stderr
    assert "numgen random mod 100 < 20 drop" in table(netns)
    assert in_netns(netns, faults.nft_heal_command(token)).stdout.strip() == "removed"
    assert table(netns) == ""
    # a host that was fenced and booted again: nothing left to remove (and no timer flag)
    assert in_netns(netns, faults.nft_heal_command(token)).stdout.strip() == "absent"


def test_the_safety_timer_deletes_the_table_when_no_heal_comes(netns):
    token = uuid.uuid4().hex[:12]
    text = faults.ruleset("bus-cut.nft.j2", host="n1", bus_address="10.77.0.50", bus_port=6379)
    assert in_netns(netns, faults.nft_load_command(token, 1.0), text).returncode == 0
    assert "tcp dport 6379 drop" in table(netns)
    deadline = time.monotonic() + 10
    while table(netns) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert table(netns) == ""


def test_a_healed_faults_timer_leaves_the_next_faults_table_alone(netns):
    first, second = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
    text = faults.ruleset("loss.nft.j2", host="n1", percent=20, corosync_port=5405)
    assert in_netns(netns, faults.nft_load_command(first, 1.0), text).returncode == 0
    assert in_netns(netns, faults.nft_heal_command(first)).stdout.strip() == "removed"
    assert in_netns(netns, faults.nft_load_command(second, 60), text).returncode == 0
    time.sleep(2.0)    # the first timer is due: its flag is gone, so it does nothing
    assert "numgen" in table(netns)
    assert in_netns(netns, faults.nft_heal_command(second)).stdout.strip() == "removed"


class Flaky:
    """A real HTTP server answering GETs from a script of status codes (200 once the script is used up)."""

    def __init__(self, codes: list[int]) -> None:
        self.codes, self.seen = list(codes), 0
        flaky = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                flaky.seen += 1
                self.send_response(flaky.codes.pop(0) if flaky.codes else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/rules"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0)) as c:
        yield c


def test_a_get_is_retried_on_503_and_every_try_is_recorded(client):
    server, history = Flaky([503, 502]), History()
    try:
        assert workload.get(client, server.url, attempts=3, history=history)
    finally:
        server.close()
    assert server.seen == 3
    tries = history.of("attempt")
    assert [(e.attempt, e.ok) for e in tries] == [(1, False), (2, False), (3, True)]
    assert [e.detail for e in tries] == ["GET try 1: HTTP 503", "GET try 2: HTTP 502", "GET try 3: HTTP 200"]
    [request] = history.of("request")
    assert request.ok and request.attempt == 3 and request.detail == "GET HTTP 200 after 3 tries"
    assert request.duration is not None and request.duration >= sum(e.duration or 0 for e in tries)


def test_retries_are_bounded_and_other_answers_are_not_retried(client):
    server, history = Flaky([504, 504, 504, 404, 504]), History()
    try:
        assert not workload.get(client, server.url, attempts=3, history=history)
        assert not workload.get(client, server.url, attempts=3, history=history)   # 404 is an answer: one try
        assert not workload.get(client, server.url, attempts=1, history=history)   # no retries: one try
    finally:
        server.close()
    assert server.seen == 5
    first, second, third = history.of("request")
    assert (first.ok, first.attempt, first.detail) == (False, 3, "GET failed: HTTP 504 after 3 tries")
    assert (second.ok, second.attempt, second.detail) == (False, 1, "GET failed: HTTP 404")
    assert (third.ok, third.attempt, third.detail) == (False, None, "GET failed: HTTP 504")
    assert len(history.of("attempt")) == 4


def test_a_transport_error_is_retried(client):
    history = History()
    url = f"http://127.0.0.1:{free_port()}/rules"     # nobody listens: connection refused each time
    assert not workload.get(client, url, attempts=2, history=history)
    assert [e.detail for e in history.of("attempt")] == ["GET try 1: ConnectError", "GET try 2: ConnectError"]


def test_the_packet_faults_turn_the_clients_retries_on_and_nothing_else_does():
    retrying = sorted(name for name, cls in FAULTS.items() if cls.get_attempts > 1)
    assert retrying == ["packet-delay", "packet-loss"]
    assert all(FAULTS[name].detection == "none" for name in retrying)
    assert FAULTS["partition-one"].new_dsd and not FAULTS["partition-one"].overlaps
    assert FAULTS["partition-bus"].killed == "dsd" and FAULTS["partition-bus"].new_dsd
    assert not any(FAULTS[n].heals_itself for n in ("partition-one", "partition-bus", "packet-loss", "packet-delay"))


def test_delay_commands_use_the_delayers_rule_and_queue():
    inject = faults.delay_inject_command("t0k", interface="eth0", seconds=20)
    assert "-m congressctl.failover.delay --queue 7 --delay-ms 100 --jitter-ms 20 --seconds 20.0" in inject
    assert inject.endswith("iptables -w -I OUTPUT -o eth0 -j NFQUEUE --queue-num 7 --queue-bypass")
    assert "iptables -w -D OUTPUT -o eth0 -j NFQUEUE --queue-num 7 --queue-bypass" in faults.delay_heal_command(
        "t0k", "eth0")
