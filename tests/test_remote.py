"""congressctl.remote against a real sshd (tests/fixtures_sshd.py): commands, host keys, files, many hosts."""

from __future__ import annotations

import os
import pwd
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from congressctl.errors import HostKeyError, NoHostAnswered, RemoteError
from congressctl.inventory import Node, SshSettings, generate, parse_inventory
from congressctl.remote import (Connection, Host, _entry_matches, _parse_known_hosts, first_reachable,
                                known_hosts_name, run_on_hosts)


@pytest.fixture
def no_ssh_config(tmp_path: Path) -> str:
    """An empty ssh_config, so a developer's ~/.ssh/config cannot change what these tests see."""
    path = tmp_path / "ssh_config"
    path.write_text("")
    return str(path)


@pytest.fixture
def conn(sshd, no_ssh_config):
    with Connection(_host(sshd), sshd.known_hosts, ssh_config=no_ssh_config) as c:
        yield c


def _host(sshd, name: str = "n1", **kw) -> Host:
    kw.setdefault("address", sshd.host)
    kw.setdefault("port", sshd.port)
    kw.setdefault("key_file", sshd.client_key)
    return Host(name=name, **kw)


def _other_key_line(tmp_path: Path) -> str:
    key = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(key)], check=True, timeout=30)
    return " ".join(Path(f"{key}.pub").read_text().split()[:2])


# ---------------------------------------------------------------- commands


def test_run_returns_stdout_stderr_and_exit_code(conn):
    result = conn.run("echo out; echo err >&2")
    assert (result.host, result.exit_code, result.stdout, result.stderr) == ("n1", 0, "out\n", "err\n")
    assert conn.run("exit 3", check=False).exit_code == 3


def test_run_feeds_input(conn):
    assert conn.run("tr a-z A-Z", input="hello").stdout == "HELLO"


def test_run_reads_large_stdout_and_stderr_together(conn):
    result = conn.run("head -c 3000000 /dev/zero | tr '\\0' a; head -c 3000000 /dev/zero | tr '\\0' b >&2")
    assert (len(result.stdout), len(result.stderr)) == (3_000_000, 3_000_000)
    assert set(result.stdout) == {"a"} and set(result.stderr) == {"b"}


def test_check_raises_remote_error_naming_host_code_and_stderr(conn):
    with pytest.raises(RemoteError) as info:
        conn.run("echo 'disk on fire' >&2; exit 4")
    assert info.value.host == "n1"
    assert "code 4" in str(info.value) and "disk on fire" in str(info.value)


def test_command_timeout_raises_and_connection_stays_usable(conn):
    with pytest.raises(RemoteError, match="timed out"):
        conn.run("sleep 30", timeout=0.5)
    assert conn.run("echo still here").stdout == "still here\n"


def test_connect_timeout_when_server_never_speaks(no_ssh_config, tmp_path):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        with pytest.raises(RemoteError) as info:
            Connection(Host("mute", "127.0.0.1", port=port), str(tmp_path / "kh"), connect_timeout=0.5,
                       ssh_config=no_ssh_config)
    assert info.value.host == "mute"


def test_missing_key_file_is_named(sshd, no_ssh_config, tmp_path):
    with pytest.raises(RemoteError) as info:
        Connection(_host(sshd, key_file=str(tmp_path / "nope")), sshd.known_hosts, ssh_config=no_ssh_config)
    assert info.value.file == str(tmp_path / "nope")


def test_no_usable_key_is_explained(sshd, no_ssh_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(RemoteError, match="no SSH key") as info:
        Connection(_host(sshd, key_file=None), sshd.known_hosts, ssh_config=no_ssh_config)
    assert info.value.host == "n1"


def test_ssh_agent_is_used(sshd, no_ssh_config, tmp_path, monkeypatch):
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists() or agent.poll() is not None:
                break
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", sshd.client_key], env=env, check=True, capture_output=True, timeout=30)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        with Connection(_host(sshd, key_file=None), sshd.known_hosts, ssh_config=no_ssh_config) as c:
            assert c.run("id -un").stdout == "root\n"
    finally:
        agent.terminate()
        agent.wait(timeout=10)


# ---------------------------------------------------------------- host keys


def test_unknown_host_key_is_refused_with_advice(sshd, no_ssh_config, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    with pytest.raises(HostKeyError) as info:
        Connection(_host(sshd), str(known_hosts), ssh_config=no_ssh_config)
    message = str(info.value)
    assert info.value.host == "n1" and "ssh-keyscan" in message and "--accept-new-host-keys" in message
    assert known_hosts.read_text() == ""


def test_accept_new_records_the_key_then_connects_strictly(sshd, no_ssh_config, tmp_path):
    known_hosts = tmp_path / "ssh" / "known_hosts"
    with Connection(_host(sshd), str(known_hosts), accept_new=True, ssh_config=no_ssh_config) as c:
        assert c.run("echo hi").stdout == "hi\n"
    assert known_hosts.read_text() == f"{sshd.known_hosts_name} {sshd.host_key_line}\n"
    found = subprocess.run(["ssh-keygen", "-F", sshd.known_hosts_name, "-f", str(known_hosts)],
                           capture_output=True, text=True, timeout=30)
    assert found.returncode == 0
    with Connection(_host(sshd), str(known_hosts), ssh_config=no_ssh_config) as c:
        assert c.run("true").exit_code == 0


def test_accept_new_hashes_when_the_file_is_hashed(sshd, no_ssh_config, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"elsewhere.example {_other_key_line(tmp_path)}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known_hosts)], check=True, capture_output=True, timeout=30)
    with Connection(_host(sshd), str(known_hosts), accept_new=True, ssh_config=no_ssh_config):
        pass
    lines = known_hosts.read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith("|1|") for line in lines)
    found = subprocess.run(["ssh-keygen", "-F", sshd.known_hosts_name, "-f", str(known_hosts)],
                           capture_output=True, text=True, timeout=30)
    assert found.returncode == 0 and sshd.host_key_line.split()[1] in found.stdout


def test_hashed_entry_written_by_ssh_keygen_is_honoured(sshd, no_ssh_config, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(Path(sshd.known_hosts).read_text())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known_hosts)], check=True, capture_output=True, timeout=30)
    assert known_hosts.read_text().startswith("|1|")
    with Connection(_host(sshd), str(known_hosts), ssh_config=no_ssh_config) as c:
        assert c.run("true").exit_code == 0


@pytest.mark.parametrize("accept_new", [False, True])
def test_changed_host_key_is_refused_even_with_accept_new(sshd, no_ssh_config, tmp_path, accept_new):
    known_hosts = tmp_path / "known_hosts"
    other = _other_key_line(tmp_path)
    known_hosts.write_text(f"# a comment\n{sshd.known_hosts_name} {other}\n")
    before = known_hosts.read_text()
    with pytest.raises(HostKeyError) as info:
        Connection(_host(sshd), str(known_hosts), accept_new=accept_new, ssh_config=no_ssh_config)
    message = str(info.value)
    assert "CHANGED" in message and sshd.known_hosts_name in message
    assert _fingerprint(other) in message and _fingerprint(sshd.host_key_line) in message
    assert (info.value.host, info.value.line) == ("n1", 2)
    assert known_hosts.read_text() == before


def test_revoked_key_is_refused(sshd, no_ssh_config, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(Path(sshd.known_hosts).read_text() + f"@revoked * {sshd.host_key_line}\n")
    with pytest.raises(HostKeyError, match="revoked"):
        Connection(_host(sshd), str(known_hosts), ssh_config=no_ssh_config)


def _fingerprint(key_line: str) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=key_line, capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return out.split()[1]


def test_known_hosts_patterns(tmp_path):
    line = _other_key_line(tmp_path)
    path = tmp_path / "known_hosts"
    path.write_text(f"@cert-authority *.corp {line}\nnot a key line\n*.corp,!bad.corp {line}\n[10.0.0.5]:2222 {line}\n")
    entries, hashed = _parse_known_hosts(str(path))
    plain = [e for e in entries if e.marker is None]
    assert not hashed and [e.line for e in plain] == [3, 4]
    assert _entry_matches(plain[0].patterns, "n1.corp")
    assert not _entry_matches(plain[0].patterns, "bad.corp")
    assert _entry_matches(plain[1].patterns, known_hosts_name("10.0.0.5", 2222))
    assert not _entry_matches(plain[1].patterns, known_hosts_name("10.0.0.5", 22))


# ---------------------------------------------------------------- ssh_config


def test_ssh_config_alias_supplies_hostname_port_user_and_identity(sshd, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(f"Host lb-alias\n    HostName {sshd.host}\n    Port {sshd.port}\n    User nobody\n"
                      f"    IdentityFile {sshd.client_key}\n    IdentitiesOnly yes\n")
    host = Host(name="n1", address="lb-alias")
    with Connection(host, sshd.known_hosts, ssh_config=str(config)) as c:
        assert (c.target.address, c.target.port, c.target.user) == (sshd.host, sshd.port, "nobody")
        assert c.run("true", check=False).exit_code != 0  # nobody's shell is nologin: we really are nobody
    assert "Accepted publickey for nobody from 127.0.0.1" in sshd.log_text()


def test_inventory_values_win_over_ssh_config(sshd, tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(f"Host lb-alias\n    HostName {sshd.host}\n    Port 1\n    IdentityFile /nonexistent/key\n")
    host = Host(name="n1", address="lb-alias", port=sshd.port, key_file=sshd.client_key)
    with Connection(host, sshd.known_hosts, ssh_config=str(config)) as c:
        assert c.run("id -un").stdout == "root\n"


# ---------------------------------------------------------------- files


def test_read_file(conn, tmp_path):
    (tmp_path / "f").write_bytes(b"\x00bytes\xff")
    assert conn.read_file(str(tmp_path / "f")) == b"\x00bytes\xff"
    assert conn.read_file(str(tmp_path / "absent")) is None


def test_put_file_is_atomic_idempotent_and_keeps_previous(conn, tmp_path):
    path = tmp_path / "etc" / "deep" / "app.conf"
    assert conn.put_file(str(path), b"v1\n") is True
    assert path.read_bytes() == b"v1\n" and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not Path(f"{path}.prev").exists()
    first = path.stat()
    assert conn.put_file(str(path), b"v1\n") is False
    assert path.stat().st_mtime_ns == first.st_mtime_ns and path.stat().st_ino == first.st_ino

    assert conn.put_file(str(path), b"v2\n") is True
    assert path.read_bytes() == b"v2\n" and Path(f"{path}.prev").read_bytes() == b"v1\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["app.conf", "app.conf.prev"]

    assert conn.put_file(str(path), b"v2\n", mode=0o640) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_put_file_secret_mode_and_owner(conn, tmp_path):
    path = tmp_path / "secret"
    nobody = pwd.getpwnam("nobody")
    assert conn.put_file(str(path), b"s3cret", mode=0o600, owner="nobody") is True
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == nobody.pw_uid
    assert conn.put_file(str(path), b"s3cret", mode=0o600, owner="nobody") is False
    assert conn.put_file(str(path), b"s3cret", mode=0o600, owner="root") is True
    assert path.stat().st_uid == 0
    assert stat.S_IMODE(Path(f"{path}.prev").stat().st_mode) == 0o600


def test_restore_previous(conn, tmp_path):
    path = tmp_path / "app.conf"
    conn.put_file(str(path), b"v1\n")
    conn.put_file(str(path), b"v2\n")
    conn.restore_previous(str(path))
    assert path.read_bytes() == b"v1\n" and not Path(f"{path}.prev").exists()

    fresh = tmp_path / "new.conf"
    Path(f"{fresh}.prev").write_bytes(b"stale leftover")
    conn.put_file(str(fresh), b"new\n")
    assert not Path(f"{fresh}.prev").exists()
    conn.restore_previous(str(fresh))
    assert not fresh.exists()


# ---------------------------------------------------------------- many hosts


class _StepError(RuntimeError):
    step = "render"


def test_run_on_hosts_collects_every_outcome(sshd, no_ssh_config):
    def work(host: Host) -> str:
        if host.name == "broken":
            raise _StepError("template exploded")
        with Connection(host, sshd.known_hosts, connect_timeout=5, ssh_config=no_ssh_config) as c:
            return c.run("echo ok").stdout.strip()

    hosts = [_host(sshd, "good"), _host(sshd, "down", port=free_port()), _host(sshd, "broken")]
    result = run_on_hosts(hosts, work, max_workers=2, timeout=120)
    assert list(result.outcomes) == ["good", "down", "broken"]
    assert result.outcomes["good"].ok and result.outcomes["good"].value == "ok"
    assert list(result.failed) == ["down", "broken"]
    assert "refused" in result.failed["down"].error and "down" in result.failed["down"].error
    assert (result.failed["broken"].error, result.failed["broken"].step) == ("template exploded", "render")


def test_run_on_hosts_reports_a_host_still_running_at_timeout():
    release = threading.Event()

    def work(host: Host) -> str:
        if host.name == "stuck":
            release.wait(30)
        return host.name

    try:
        result = run_on_hosts([Host("quick", "192.0.2.1"), Host("stuck", "192.0.2.2")], work, timeout=1.0)
    finally:
        release.set()
    assert result.outcomes["quick"].ok and result.outcomes["quick"].value == "quick"
    assert list(result.failed) == ["stuck"] and "timed out" in result.failed["stuck"].error


def _inventory(sshd, tmp_path: Path, ports: dict[str, int]):
    inv = parse_inventory(yaml.safe_dump(generate(len(ports))), tmp_path / "inv.yaml")
    inv.ssh = SshSettings(known_hosts=sshd.known_hosts)
    inv.nodes = [Node(name=name, address=sshd.host, roles=("api-pe",), ssh=SshSettings(port=port, key=sshd.client_key))
                 for name, port in ports.items()]
    return inv


def test_first_reachable_returns_the_first_host_that_answers(sshd, tmp_path):
    inv = _inventory(sshd, tmp_path, {"down": free_port(), "up": sshd.port, "later": sshd.port})
    tried = []

    def work(conn: Connection) -> str:
        tried.append(conn.host.name)
        return conn.run("echo ok").stdout.strip()

    assert first_reachable(inv, inv.nodes, work) == "ok"
    assert tried == ["up"]


def test_first_reachable_names_every_failure_when_none_answers(sshd, tmp_path):
    inv = _inventory(sshd, tmp_path, {"down": free_port(), "failing": sshd.port})

    def work(conn: Connection) -> str:
        return conn.run("echo 'no cluster here' >&2; exit 3").stdout

    with pytest.raises(NoHostAnswered) as info:
        first_reachable(inv, inv.nodes, work)
    down, failing = info.value.failures
    assert down.startswith("down: ") and "refused" in down
    assert failing.startswith("failing: ") and "no cluster here" in failing
    assert "refused" in str(info.value) and "no cluster here" in str(info.value)
