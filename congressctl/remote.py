"""Reach hosts over SSH (paramiko) with OpenSSH's habits.

- Host keys are checked against a known_hosts file (plain, hashed, wildcard and ``[host]:port`` entries,
  ``@revoked`` honoured). An unknown key is refused unless ``accept_new`` (OpenSSH's
  ``StrictHostKeyChecking=accept-new``), which records it; a changed key is always refused.
- ``~/.ssh/config`` is honoured (HostName, User, Port, IdentityFile, IdentitiesOnly, UserKnownHostsFile,
  HostKeyAlias, HashKnownHosts), and so is the SSH agent. An explicit key file from the inventory is tried
  first. A Host's user and port win over the config unless they are the defaults (root, 22): the inventory
  always fills those in, so only a non-default value can be told apart from "not given".
- Every connect, command and transfer is bounded by a timeout.
- An inventory node is reached with `connect`; `first_reachable` tries nodes in turn where any one host will do.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import posixpath
import re
import secrets
import select
import shlex
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import paramiko

from congressctl.errors import CongressctlError, HostKeyError, NoHostAnswered, RemoteError
from congressctl.files import atomic_write
from congressctl.inventory import Inventory, Node

DEFAULT_USER = "root"
DEFAULT_PORT = 22
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_SSH_CONFIG = "~/.ssh/config"
STDERR_TAIL_CHARS = 2000
_READ_CHUNK = 65536
_known_hosts_lock = threading.Lock()
T = TypeVar("T")


@dataclass
class Host:
    name: str
    address: str
    user: str = DEFAULT_USER
    port: int = DEFAULT_PORT
    key_file: str | None = None


@dataclass
class CommandResult:
    host: str
    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float


@dataclass
class HostOutcome:
    host: str
    ok: bool
    value: Any = None
    error: str | None = None
    step: str | None = None


@dataclass
class GroupResult:
    """Every host's outcome of one `run_on_hosts` call, in host order (like fabric's GroupResult)."""

    outcomes: dict[str, HostOutcome] = field(default_factory=dict)

    @property
    def failed(self) -> dict[str, HostOutcome]:
        return {name: o for name, o in self.outcomes.items() if not o.ok}


# ---------------------------------------------------------------- known_hosts


@dataclass
class _KnownKey:
    patterns: list[str]
    key: paramiko.PKey
    line: int
    marker: str | None = None


def known_hosts_name(address: str, port: int) -> str:
    """The name OpenSSH files a host key under: ``host`` on port 22, else ``[host]:port``."""
    address = address.lower()
    return address if port == DEFAULT_PORT else f"[{address}]:{port}"


def _parse_known_hosts(path: str) -> tuple[list[_KnownKey], bool]:
    """Entries of a known_hosts file, and whether it uses hashed names. Lines we cannot read are skipped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return [], False
    except OSError as exc:
        raise HostKeyError(f"cannot read known_hosts: {exc.strerror}", file=path) from exc
    entries: list[_KnownKey] = []
    hashed = False
    for number, raw in enumerate(lines, 1):
        entry = _parse_known_hosts_line(raw.strip(), number)
        if entry is None:
            continue
        hashed = hashed or any(p.startswith("|1|") for p in entry.patterns)
        entries.append(entry)
    return entries, hashed


def _parse_known_hosts_line(line: str, number: int) -> _KnownKey | None:
    if not line or line.startswith("#"):
        return None
    fields = line.split()
    marker = None
    if fields[0].startswith("@"):
        marker, fields = fields[0], fields[1:]
    if len(fields) < 3:
        return None
    try:
        key = paramiko.PKey.from_type_string(fields[1], base64.b64decode(fields[2], validate=True))
    except (binascii.Error, ValueError, paramiko.SSHException):
        return None
    return _KnownKey(patterns=fields[0].split(","), key=key, line=number, marker=marker)


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        return _hashed_matches(pattern, name)
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.fullmatch(regex, name) is not None


def _hashed_matches(entry: str, name: str) -> bool:
    parts = entry.split("|")
    if len(parts) != 4:
        return False
    try:
        salt, digest = base64.b64decode(parts[2]), base64.b64decode(parts[3])
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)


def _entry_matches(patterns: list[str], name: str) -> bool:
    """OpenSSH semantics: any positive pattern matches and no negated (``!pattern``) one does."""
    positive = False
    for pattern in patterns:
        if pattern.startswith("!"):
            if _pattern_matches(pattern[1:], name):
                return False
        elif _pattern_matches(pattern, name):
            positive = True
    return positive


def _hash_name(name: str) -> str:
    salt = os.urandom(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def _append_known_host(path: str, name: str, key: paramiko.PKey, hashed: bool) -> None:
    """Add one entry by writing the whole file anew and renaming it over the old one."""
    real = os.path.realpath(path)
    directory = os.path.dirname(real)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        with open(real, "rb") as f:
            old = f.read()
        old_mode = stat.S_IMODE(os.stat(real).st_mode)
    except FileNotFoundError:
        old, old_mode = b"", 0o644
    if old and not old.endswith(b"\n"):
        old += b"\n"
    entry = f"{_hash_name(name) if hashed else name} {key.get_name()} {key.get_base64()}\n"
    atomic_write(Path(real), old + entry.encode(), old_mode)


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Called by paramiko only when known_hosts holds no key for the host: refuse, or record it (accept-new)."""

    def __init__(self, host: str, target: _Target, accept_new: bool, revoked: list[_KnownKey]):
        self.host = host
        self.target = target
        self.accept_new = accept_new
        self.revoked = revoked

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        t = self.target
        _check_revoked(self.host, t, self.revoked, key)
        if not self.accept_new:
            scan = f"ssh-keyscan -p {t.port} {t.address}" if t.port != DEFAULT_PORT else f"ssh-keyscan {t.address}"
            raise HostKeyError(
                f"host key for {t.key_name} is not known ({key.get_name()} {key.fingerprint}); "
                f"check the fingerprint with the host's owner, then add it with "
                f"`{scan} >> {t.known_hosts}` or rerun with --accept-new-host-keys",
                host=self.host, file=t.known_hosts)
        with _known_hosts_lock:
            entries, hashed = _parse_known_hosts(t.known_hosts)
            known = [e for e in entries if e.marker is None and _entry_matches(e.patterns, t.key_name)]
            if known:
                _check_known(self.host, t, known, key)
                return
            _append_known_host(t.known_hosts, t.key_name, key, hashed or t.hash_known_hosts)


def _check_revoked(host: str, target: _Target, revoked: list[_KnownKey], key: paramiko.PKey) -> None:
    for entry in revoked:
        if entry.key == key:
            raise HostKeyError(f"host key {key.get_name()} {key.fingerprint} of {target.key_name} is marked "
                               f"@revoked; refused", host=host, file=target.known_hosts, line=entry.line)


def _check_known(host: str, target: _Target, known: list[_KnownKey], key: paramiko.PKey) -> None:
    if any(e.key == key for e in known):
        return
    same_type = [e for e in known if e.key.get_name() == key.get_name()]
    expected = (same_type or known)[0]
    raise HostKeyError(
        f"HOST KEY CHANGED for {target.key_name}: known_hosts has {expected.key.get_name()} "
        f"{expected.key.fingerprint}, the server offers {key.get_name()} {key.fingerprint}; refused "
        f"(someone may be intercepting, or the host was reinstalled). If the change is expected, remove the "
        f"old entry with `ssh-keygen -R '{target.key_name}' -f {target.known_hosts}` and connect again",
        host=host, file=target.known_hosts, line=expected.line)


# ---------------------------------------------------------------- where and how to connect


@dataclass
class _Target:
    address: str
    port: int
    user: str
    key_files: list[str]
    allow_agent: bool
    look_for_keys: bool
    known_hosts: str
    key_name: str
    hash_known_hosts: bool


def _load_ssh_config(path: str | None, host: str) -> paramiko.SSHConfig | None:
    explicit = path is not None
    path = os.path.expanduser(path or DEFAULT_SSH_CONFIG)
    if not os.path.exists(path):
        if explicit:
            raise RemoteError("ssh config file does not exist", host=host, file=path)
        return None
    try:
        return paramiko.SSHConfig.from_path(path)
    except (OSError, paramiko.SSHException) as exc:
        raise RemoteError(f"cannot read ssh config: {exc}", host=host, file=path) from exc


def _resolve(host: Host, known_hosts: str | None, ssh_config: str | None) -> _Target:
    """Merge the inventory's Host with ~/.ssh/config the way `ssh` merges its command line with it."""
    config = _load_ssh_config(ssh_config, host.name)
    options = config.lookup(host.address) if config else {}
    address = options.get("hostname", host.address)
    user = host.user if host.user != DEFAULT_USER else options.get("user", DEFAULT_USER)
    try:
        port = host.port if host.port != DEFAULT_PORT else int(options.get("port", DEFAULT_PORT))
    except ValueError as exc:
        raise RemoteError(f"ssh config gives a bad Port for {host.address}: {exc}", host=host.name) from exc
    key_files: list[str] = []
    if host.key_file:
        key_file = os.path.expanduser(host.key_file)
        if not os.path.isfile(key_file):
            raise RemoteError("SSH key file does not exist", host=host.name, file=key_file)
        key_files.append(key_file)
    key_files += [p for p in (os.path.expanduser(f) for f in options.get("identityfile", [])) if os.path.isfile(p)]
    identities_only = options.get("identitiesonly", "no").lower() == "yes" and bool(key_files)
    if known_hosts is None:
        configured = options.get("userknownhostsfile", "").split()
        known_hosts = configured[0] if configured and configured[0] != "none" else DEFAULT_KNOWN_HOSTS
    alias = options.get("hostkeyalias")
    return _Target(
        address=address, port=port, user=user, key_files=key_files,
        allow_agent=not identities_only, look_for_keys=not identities_only,
        known_hosts=os.path.expanduser(known_hosts),
        key_name=alias.lower() if alias else known_hosts_name(address, port),
        hash_known_hosts=options.get("hashknownhosts", "no").lower() == "yes",
    )


# ---------------------------------------------------------------- connection


class Connection:
    """One SSH connection to one host; connects in __init__. Use as a context manager."""

    def __init__(self, host: Host, known_hosts: str | None, accept_new: bool = False,
                 connect_timeout: float = 10.0, ssh_config: str | None = None, io_timeout: float = 60.0):
        self.host = host
        self.target = _resolve(host, known_hosts, ssh_config)
        self.io_timeout = io_timeout
        self._sftp: paramiko.SFTPClient | None = None
        self._client = paramiko.SSHClient()
        try:
            self._connect(accept_new, connect_timeout)
        except BaseException:
            self._client.close()
            raise

    def _connect(self, accept_new: bool, timeout: float) -> None:
        t = self.target
        entries, _ = _parse_known_hosts(t.known_hosts)
        matching = [e for e in entries if _entry_matches(e.patterns, t.key_name)]
        known = [e for e in matching if e.marker is None]
        revoked = [e for e in matching if e.marker == "@revoked"]
        paramiko_name = known_hosts_name(t.address, t.port)
        for entry in known:
            self._client.get_host_keys().add(paramiko_name, entry.key.get_name(), entry.key)
        self._client.set_missing_host_key_policy(_HostKeyPolicy(self.host.name, t, accept_new, revoked))
        where = f"{t.user}@{t.address}:{t.port}"
        try:
            # key_filename takes a list of files too (paramiko's docstring); types-paramiko says str only
            self._client.connect(
                t.address, port=t.port, username=t.user, key_filename=t.key_files or None,  # type: ignore[arg-type]
                allow_agent=t.allow_agent, look_for_keys=t.look_for_keys, timeout=timeout,
                banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout)
        except paramiko.BadHostKeyException as exc:
            _check_known(self.host.name, t, known, exc.key)
            raise RemoteError(f"host key refused: {exc}", host=self.host.name) from exc
        except paramiko.ssh_exception.NoValidConnectionsError as exc:
            raise RemoteError(f"cannot connect to {where}: connection refused or host unreachable",
                              host=self.host.name) from exc
        except TimeoutError as exc:
            raise RemoteError(f"cannot connect to {where}: timed out after {timeout:g}s",
                              host=self.host.name) from exc
        except paramiko.AuthenticationException as exc:
            raise RemoteError(f"authentication to {where} failed (tried {self._tried()}): {exc}",
                              host=self.host.name) from exc
        except paramiko.SSHException as exc:
            if "No authentication methods available" in str(exc):
                raise RemoteError(f"no SSH key to log in to {where} with (looked at {self._tried()}); set ssh.key "
                                  f"in the inventory or IdentityFile in ~/.ssh/config", host=self.host.name) from exc
            raise RemoteError(f"SSH handshake with {where} failed: {exc}", host=self.host.name) from exc
        except EOFError as exc:
            raise RemoteError(f"SSH handshake with {where} failed: the server closed the connection",
                              host=self.host.name) from exc
        except OSError as exc:
            raise RemoteError(f"cannot connect to {where}: {exc}", host=self.host.name) from exc
        _check_revoked(self.host.name, t, revoked, self._transport().get_remote_server_key())

    def _tried(self) -> str:
        sources = self.target.key_files + (["the SSH agent", "~/.ssh/id_*"] if self.target.allow_agent else [])
        return ", ".join(sources) or "no keys"

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise RemoteError("the SSH connection is closed", host=self.host.name)
        return transport

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        self._client.close()

    # ------------------------------------------------------------ commands

    def _open_channel(self, timeout: float) -> paramiko.Channel:
        try:
            return self._transport().open_session(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise RemoteError(f"cannot open an SSH channel: {exc}", host=self.host.name) from exc

    def _within(self, chan: paramiko.Channel, timeout: float, what: str, request: Callable[[], None]) -> None:
        """Run a channel request paramiko would wait on forever; close the channel if it overruns."""
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            chan.close()

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            request()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            reason = f"timed out after {timeout:g}s" if expired.is_set() else str(exc)
            raise RemoteError(f"{what}: {reason}", host=self.host.name) from exc
        finally:
            timer.cancel()

    def run(self, command: str, timeout: float = 60.0, check: bool = True, input: str | None = None) -> CommandResult:
        """Run a shell command; return its result, raise RemoteError on timeout (and on failure when check).

        On timeout the channel is closed; a remote process that ignores its closed pipes may keep running.
        """
        return self._run(command, timeout, check, input.encode() if input is not None else None)

    def _run(self, command: str, timeout: float, check: bool, data: bytes | None) -> CommandResult:
        started = time.monotonic()
        deadline = started + timeout
        chan = self._open_channel(timeout)
        try:
            self._within(chan, timeout, f"cannot start `{command}`", lambda: chan.exec_command(command))
            if data is not None:
                self._send_input(chan, data, deadline, command)
            else:
                chan.shutdown_write()
            stdout, stderr = self._collect(chan, deadline, command, timeout)
            exit_code = chan.recv_exit_status()
        finally:
            chan.close()
        result = CommandResult(host=self.host.name, command=command, exit_code=exit_code,
                               stdout=stdout.decode("utf-8", "replace"), stderr=stderr.decode("utf-8", "replace"),
                               duration_s=time.monotonic() - started)
        if check and exit_code != 0:
            tail = result.stderr.strip()[-STDERR_TAIL_CHARS:] or result.stdout.strip()[-STDERR_TAIL_CHARS:]
            raise RemoteError(f"`{command}` exited with code {exit_code}" + (f": {tail}" if tail else ""),
                              host=self.host.name)
        return result

    def _send_input(self, chan: paramiko.Channel, data: bytes, deadline: float, command: str) -> None:
        chan.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chan.sendall(data)
            chan.shutdown_write()
        except TimeoutError as exc:
            raise RemoteError(f"`{command}` timed out while reading its input", host=self.host.name) from exc
        except (paramiko.SSHException, OSError) as exc:
            raise RemoteError(f"cannot send input to `{command}`: {exc}", host=self.host.name) from exc

    def _collect(self, chan: paramiko.Channel, deadline: float, command: str, timeout: float) -> tuple[bytes, bytes]:
        """Read stdout and stderr together (so neither fills its window and stalls the command) until EOF + exit."""
        stdout, stderr = bytearray(), bytearray()

        def drain() -> None:
            while chan.recv_ready():
                stdout.extend(chan.recv(_READ_CHUNK))
            while chan.recv_stderr_ready():
                stderr.extend(chan.recv_stderr(_READ_CHUNK))

        while True:
            drain()
            if chan.closed or chan.eof_received:
                drain()
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RemoteError(f"`{command}` timed out after {timeout:g}s", host=self.host.name)
            select.select([chan], [], [], min(remaining, 1.0))
        if not chan.status_event.wait(max(deadline - time.monotonic(), 0)):
            raise RemoteError(f"`{command}` timed out after {timeout:g}s waiting for its exit status",
                              host=self.host.name)
        return bytes(stdout), bytes(stderr)

    # ------------------------------------------------------------ files

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            chan = self._open_channel(self.io_timeout)
            self._within(chan, self.io_timeout, "cannot start SFTP", lambda: chan.invoke_subsystem("sftp"))
            chan.settimeout(self.io_timeout)
            self._sftp = paramiko.SFTPClient(chan)
        return self._sftp

    def _file_error(self, path: str, action: str, exc: BaseException) -> RemoteError:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return RemoteError(f"cannot {action}: {reason}", host=self.host.name, file=path)

    def _stat(self, path: str) -> paramiko.SFTPAttributes | None:
        try:
            return self._sftp_client().stat(path)
        except FileNotFoundError:
            return None
        except (OSError, paramiko.SSHException) as exc:
            raise self._file_error(path, "stat", exc) from exc

    def read_file(self, path: str) -> bytes | None:
        """The file's content, or None when it does not exist."""
        try:
            with self._sftp_client().open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except (OSError, paramiko.SSHException) as exc:
            raise self._file_error(path, "read", exc) from exc

    def put_file(self, path: str, data: bytes, mode: int = 0o644, owner: str | None = None,
                 keep_previous: bool = True) -> bool:
        """Write a file atomically; return False (touching nothing) when content, mode and owner already match.

        The new content goes to ``path.tmp-XXXX`` in the same directory, whose mode is set before any byte is
        written (secrets are never readable by others), then owned, then renamed over ``path``. The replaced
        version stays as ``path.prev`` (a hard link, so ``path`` never goes missing) for `restore_previous`.
        """
        current = self._stat(path)
        if current is not None and self._unchanged(path, current, data, mode, owner):
            return False
        prev = path + ".prev"
        self._mkdirs(posixpath.dirname(path))
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        try:
            self._write_new(tmp, data, mode)
            if owner:
                self.run(f"chown -- {shlex.quote(owner)} {shlex.quote(tmp)}", timeout=self.io_timeout)
            if current is not None and keep_previous:
                self.run(f"ln -f -- {shlex.quote(path)} {shlex.quote(prev)}", timeout=self.io_timeout)
            else:
                self._remove(prev)
            self._sftp_client().posix_rename(tmp, path)
        except BaseException as exc:
            self._discard(tmp)
            if isinstance(exc, (OSError, paramiko.SSHException)):
                raise self._file_error(path, "write", exc) from exc
            raise
        return True

    def _unchanged(self, path: str, current: paramiko.SFTPAttributes, data: bytes, mode: int,
                   owner: str | None) -> bool:
        if not stat.S_ISREG(current.st_mode or 0) or stat.S_IMODE(current.st_mode or 0) != mode:
            return False
        if current.st_size != len(data) or self.read_file(path) != data:
            return False
        return owner is None or self._owned_by(path, owner)

    def _owned_by(self, path: str, owner: str) -> bool:
        result = self.run(f"stat -c '%U:%G %u:%g' -- {shlex.quote(path)}", timeout=self.io_timeout)
        want_user, _, want_group = owner.partition(":")
        for names in result.stdout.split():
            user, _, group = names.partition(":")
            if user == want_user and (not want_group or group == want_group):
                return True
        return False

    def _write_new(self, tmp: str, data: bytes, mode: int) -> None:
        with self._sftp_client().open(tmp, "wbx") as f:
            f.chmod(mode)
            f.set_pipelined(True)
            f.write(data)

    def _mkdirs(self, directory: str) -> None:
        if not directory or directory == "/" or self._stat(directory) is not None:
            return
        self._mkdirs(posixpath.dirname(directory))
        try:
            self._sftp_client().mkdir(directory, 0o755)
        except (OSError, paramiko.SSHException) as exc:
            if self._stat(directory) is None:
                raise self._file_error(directory, "create directory", exc) from exc

    def _remove(self, path: str) -> None:
        try:
            self._sftp_client().remove(path)
        except FileNotFoundError:
            pass
        except (OSError, paramiko.SSHException) as exc:
            raise self._file_error(path, "remove", exc) from exc

    def _discard(self, path: str) -> None:
        """Best-effort cleanup while another error is already on its way up."""
        with contextlib.suppress(RemoteError):
            self._remove(path)

    def restore_previous(self, path: str) -> None:
        """Roll back the last `put_file` of ``path``: put ``path.prev`` back, or remove ``path`` if it was new.

        Call it only for files whose `put_file` returned True (with keep_previous=True).
        """
        prev = path + ".prev"
        if self._stat(prev) is None:
            self._remove(path)
            return
        try:
            self._sftp_client().posix_rename(prev, path)
        except (OSError, paramiko.SSHException) as exc:
            raise self._file_error(path, "restore previous version of", exc) from exc


# ---------------------------------------------------------------- many hosts


def _outcome(host: Host, future: Future) -> HostOutcome:
    exc = future.exception()
    if exc is None:
        return HostOutcome(host=host.name, ok=True, value=future.result())
    return HostOutcome(host=host.name, ok=False, error=str(exc) or type(exc).__name__,
                       step=getattr(exc, "step", None))


def run_on_hosts(hosts: list[Host], fn: Callable[[Host], Any], max_workers: int = 8,
                 timeout: float = 300.0) -> GroupResult:
    """Run fn(host) on every host in parallel and collect every outcome; one failure never stops the others.

    A host still running (or not yet started) at `timeout` is reported failed. Its thread cannot be killed and
    finishes in the background, so fn should bound its own work (every Connection call is timed).
    """
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate host names in {names}")
    if not hosts:
        return GroupResult()
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(hosts))), thread_name_prefix="remote")
    futures = {pool.submit(fn, host): host for host in hosts}
    done, _ = wait(futures, timeout=timeout)
    pool.shutdown(wait=False, cancel_futures=True)
    outcomes = {}
    for future, host in futures.items():
        if future in done:
            outcomes[host.name] = _outcome(host, future)
        else:
            outcomes[host.name] = HostOutcome(host=host.name, ok=False, error=f"timed out after {timeout:g}s")
    return GroupResult(outcomes)


# ---------------------------------------------------------------- the inventory's hosts


def host_of(inv: Inventory, node: Node) -> Host:
    key = str(inv.resolve(node.ssh.key)) if node.ssh.key else None
    return Host(name=node.name, address=node.address, user=node.ssh.user, port=node.ssh.port, key_file=key)


def known_hosts_of(inv: Inventory) -> str | None:
    path = inv.resolve(inv.ssh.known_hosts)
    return str(path) if path else None


def connect(inv: Inventory, node: Node, accept_new: bool = False) -> Connection:
    return Connection(host_of(inv, node), known_hosts_of(inv), accept_new=accept_new, connect_timeout=10)


def first_reachable(inv: Inventory, nodes: list[Node], fn: Callable[[Connection], T], *,
                    accept_new: bool = False) -> T:
    """fn(connection) on each node in turn, returning the first success. A node that cannot be reached, or
    where fn raises a CongressctlError or OSError, hands over to the next; NoHostAnswered when none is left."""
    failures = []
    for node in nodes:
        try:
            with connect(inv, node, accept_new) as conn:
                return fn(conn)
        except (CongressctlError, OSError) as exc:
            failures.append(f"{node.name}: {exc}")
    raise NoHostAnswered(failures)
