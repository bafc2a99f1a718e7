"""Fixture `sshd`: a real OpenSSH server on 127.0.0.1 and a free port, with its own host and client keys."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port, require, require_tool

SSHD = "/usr/sbin/sshd"
START_ATTEMPTS = 3
START_WAIT_S = 15.0


@dataclass
class Sshd:
    host: str
    port: int
    user: str
    client_key: str
    host_key_line: str
    known_hosts: str
    log: str
    dir: str

    @property
    def known_hosts_name(self) -> str:
        return f"[{self.host}]:{self.port}"

    def log_text(self) -> str:
        return Path(self.log).read_text(errors="replace")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
                   check=True, timeout=30)


def _config(d: Path, port: int, authorized_keys: Path) -> str:
    return f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d}/ssh_host_ed25519_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {authorized_keys}
PermitRootLogin yes
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
X11Forwarding no
PrintMotd no
Subsystem sftp internal-sftp
MaxStartups 50:30:100
LogLevel INFO
"""


def _wait_listening(proc: subprocess.Popen, port: int) -> bool:
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                return s.recv(4) == b"SSH-"
        except OSError:
            time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    require(os.geteuid() == 0, "sshd tests need root (sshd must run as root to log in)")
    require(os.access(SSHD, os.X_OK), "openssh-server is not installed (make install)")
    require_tool("ssh-keygen")
    d = tmp_path_factory.mktemp("sshd")
    _keygen(d / "ssh_host_ed25519_key")
    _keygen(d / "client_ed25519")
    # sshd reads authorized_keys as the user logging in, so it lives where non-root users (nobody) can read it.
    public = Path(tempfile.mkdtemp(prefix="congressctl-sshd-"))
    public.chmod(0o755)
    authorized_keys = public / "authorized_keys"
    authorized_keys.write_text((d / "client_ed25519.pub").read_text())
    authorized_keys.chmod(0o644)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    host_key_line = " ".join((d / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    log = d / "sshd.log"
    for _ in range(START_ATTEMPTS):
        port = free_port()
        (d / "sshd_config").write_text(_config(d, port, authorized_keys))
        with open(log, "ab") as out:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                                    stdout=out, stderr=subprocess.STDOUT)
        if _wait_listening(proc, port):
            break
        _stop(proc)
    else:
        shutil.rmtree(public, ignore_errors=True)
        pytest.fail(f"sshd did not start; its log:\n{log.read_text(errors='replace')}")
    known_hosts = d / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key_line}\n")
    try:
        yield Sshd(host="127.0.0.1", port=port, user="root", client_key=str(d / "client_ed25519"),
                   host_key_line=host_key_line, known_hosts=str(known_hosts), log=str(log), dir=str(d))
    finally:
        _stop(proc)
        shutil.rmtree(public, ignore_errors=True)
