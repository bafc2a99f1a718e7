"""The lab's power switch (requests, authentication, refusals) and its fence agent (argument parsing, exit codes),
the agent run as Pacemaker's fencer runs it, against a real switch on 127.0.0.1 switching a table of plugs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from congressctl import powerswitch
from congressctl.errors import PowerSwitchError
from congressctl.powerswitch import Answer, Request, Switch

AGENT = Path(__file__).resolve().parent.parent / "templates" / "fence" / "fence_congresslab"
KEY = b"0123456789abcdef" * 4


@dataclass
class Plugs:
    """A power strip of our own (the switch's Power): which plug is on, and what was asked of it."""

    state: dict[str, bool] = field(default_factory=lambda: {"n1": True, "n2": True})
    done: list[str] = field(default_factory=list)

    def plugs(self) -> list[str]:
        return sorted(self.state)

    def is_on(self, plug: str) -> bool:
        return self.state[plug]

    def off(self, plug: str) -> None:
        self.done.append(f"off {plug}")
        self.state[plug] = False

    def on(self, plug: str) -> None:
        self.done.append(f"on {plug}")
        self.state[plug] = True


def line(request: Request) -> bytes:
    return json.dumps(request.to_dict()).encode()


def test_a_signed_request_switches_the_plug() -> None:
    plugs = Plugs()
    switch = Switch(key=KEY, power=plugs)
    assert switch.handle(line(Request.signed(KEY, action="off", plug="n2"))) == Answer(ok=True, status="off")
    assert switch.handle(line(Request.signed(KEY, action="status", plug="n2"))) == Answer(ok=True, status="off")
    assert switch.handle(line(Request.signed(KEY, action="reboot", plug="n1"))).status == "on"
    assert switch.handle(line(Request.signed(KEY, action="list"))).plugs == ("n1", "n2")
    assert plugs.done == ["off n2", "off n1", "on n1"]


@pytest.mark.parametrize("raw, why", [
    (b"", "one line of JSON"),
    (b"\xff\xfe", "one line of JSON"),
    (b"[1, 2]", "a JSON object"),
    (b'{"action": "off", "plug": "n1", "time": "now", "nonce": "x", "mac": "y"}', "'time' missing or not a int"),
    (b'{"action": "off", "plug": "n1", "time": 1, "nonce": "x"}', "'mac' missing"),
])
def test_malformed_requests_are_refused_with_a_reason(raw: bytes, why: str) -> None:
    plugs = Plugs()
    answer = Switch(key=KEY, power=plugs).handle(raw)
    assert not answer.ok and answer.error.startswith("refused: ") and why in answer.error
    assert plugs.done == []


def test_a_wrong_key_an_altered_request_a_stale_one_and_a_replay_are_refused() -> None:
    plugs = Plugs()
    switch = Switch(key=KEY, power=plugs, clock=lambda: 1_000_000)
    wrong_key = Request.signed(b"not the key", action="off", plug="n1", now=1_000_000)
    assert "bad MAC" in switch.handle(line(wrong_key)).error
    altered = Request.signed(KEY, action="status", plug="n1", now=1_000_000)
    assert "bad MAC" in switch.handle(line(Request("off", "n1", altered.time, altered.nonce, altered.mac))).error
    stale = Request.signed(KEY, action="off", plug="n1", now=1_000_000 - powerswitch.MAX_SKEW_S - 1)
    assert "more than 30 s" in switch.handle(line(stale)).error
    fresh = Request.signed(KEY, action="off", plug="n1", now=1_000_000)
    assert switch.handle(line(fresh)).ok
    assert "replayed" in switch.handle(line(fresh)).error
    assert plugs.done == ["off n1"]


def test_unknown_actions_and_plugs_are_refused_after_authentication() -> None:
    switch = Switch(key=KEY, power=Plugs())
    assert "unknown action 'explode'" in switch.handle(line(Request.signed(KEY, action="explode", plug="n1"))).error
    assert "no plug 'n9' (plugs: n1, n2)" in switch.handle(line(Request.signed(KEY, action="off", plug="n9"))).error


def test_a_failing_power_action_is_answered_not_raised() -> None:
    class Broken(Plugs):
        def off(self, plug: str) -> None:
            raise OSError("holder would not die")

    answer = Switch(key=KEY, power=Broken()).handle(line(Request.signed(KEY, action="off", plug="n1")))
    assert answer == Answer(ok=False, error="failed: OSError: holder would not die")


def test_answers_and_requests_round_trip() -> None:
    request = Request.signed(KEY, action="on", plug="n2")
    assert Request.from_dict(request.to_dict()) == request and request.authentic(KEY)
    answer = Answer(ok=True, status="on", plugs=("n1",))
    assert Answer.from_dict(answer.to_dict()) == answer
    with pytest.raises(PowerSwitchError):
        Answer.from_dict({"status": "on"})


# ---------------------------------------------------------------------------------------------- over TCP


@dataclass
class Running:
    port: int
    plugs: Plugs
    key_file: Path


@pytest.fixture
def switch(tmp_path: Path) -> Iterator[Running]:
    """The real daemon loop on 127.0.0.1 (a free port), in a thread of this process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    plugs = Plugs()
    pid_file = tmp_path / "switch.pid"
    thread = threading.Thread(target=powerswitch.serve, daemon=True,
                              kwargs={"address": "127.0.0.1", "key": KEY, "power": plugs, "pid_file": pid_file,
                                      "port": port})
    thread.start()
    for _ in range(100):
        if pid_file.exists():
            break
        threading.Event().wait(0.05)
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    yield Running(port, plugs, key_file)


def agent(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(AGENT), *argv], input=stdin, capture_output=True, text=True,
                          timeout=30, check=False)


def fencer_options(running: Running, **options: str) -> str:
    """stdin as Pacemaker's fencer writes it: the device's parameters, the action, the target twice."""
    base = {"ipaddr": "127.0.0.1", "ipport": str(running.port), "key_file": str(running.key_file)}
    return "".join(f"{k}={v}\n" for k, v in {**base, **options}.items())


def test_send_switches_over_tcp_and_raises_on_refusal(switch: Running) -> None:
    assert powerswitch.send(address="127.0.0.1", port=switch.port, key=KEY, action="off", plug="n1").status == "off"
    with pytest.raises(PowerSwitchError, match="bad MAC"):
        powerswitch.send(address="127.0.0.1", port=switch.port, key=b"wrong", action="on", plug="n1")
    assert switch.plugs.done == ["off n1"]


def test_the_agent_fences_as_the_fencer_calls_it(switch: Running) -> None:
    done = agent(stdin=fencer_options(switch, action="reboot", plug="n2", nodename="n2", pcmk_extra="1"))
    assert done.returncode == 0, done.stderr
    assert switch.plugs.done == ["off n2", "on n2"]
    assert "ignoring unknown option 'pcmk_extra'" in done.stderr
    assert agent(stdin=fencer_options(switch, action="off", port="n1")).returncode == 0
    status = agent(stdin=fencer_options(switch, action="status", plug="n1"))
    assert (status.returncode, status.stdout) == (2, "Status: OFF\n")
    assert agent(stdin=fencer_options(switch, action="monitor")).returncode == 0


def test_the_agent_takes_fence_agents_arguments(switch: Running) -> None:
    common = ["--ip=127.0.0.1", f"--ipport={switch.port}", f"--key-file={switch.key_file}"]
    status = agent("-o", "status", "-n", "n1", *common)
    assert (status.returncode, status.stdout) == (0, "Status: ON\n")
    listed = agent("--action=list", *common)
    assert (listed.returncode, listed.stdout) == (0, "n1,n1\nn2,n2\n")
    assert agent("--action=on", "--plug=n2", *common).returncode == 0


def test_the_agent_fails_with_exit_1_and_one_line_when_it_cannot_fence(switch: Running, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the key\n")
    for stdin, why in [
        (fencer_options(switch, action="off", plug="n1", key_file=str(wrong)), "bad MAC"),
        (fencer_options(switch, action="off", plug="n9"), "no plug 'n9'"),
        (fencer_options(switch, action="off"), "plug (the host to off) is required"),
        (fencer_options(switch, action="explode", plug="n1"), "unknown action 'explode'"),
        (fencer_options(switch, action="off", plug="n1", ipport="x"), "ipport must be a number"),
        ("action=off\nplug=n1\n", "ipaddr (the power switch's address) is required"),
        (fencer_options(switch, action="off", plug="n1", ipport="1"), "did not answer"),
    ]:
        done = agent(stdin=stdin)
        assert done.returncode == 1 and why in done.stderr, (stdin, done.stderr)
        assert "Traceback" not in done.stderr
    assert agent("--bogus").returncode == 1
    assert switch.plugs.done == []


def test_the_agent_metadata_is_what_the_fencer_reads() -> None:
    done = agent("-o", "metadata")
    assert done.returncode == 0
    root = ET.fromstring(done.stdout)
    assert root.tag == "resource-agent" and root.get("name") == "fence_congresslab"
    params = {p.get("name"): p for p in root.iter("parameter")}
    assert {"action", "plug", "ipaddr", "ipport", "key_file"} <= set(params)
    assert params["plug"].get("obsoletes") == "port"   # the fencer then passes the target as plug=
    assert {a.get("name") for a in root.iter("action")} >= {"on", "off", "reboot", "status", "monitor", "list",
                                                            "metadata"}
