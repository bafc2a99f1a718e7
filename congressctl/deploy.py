"""Deploy: inventory -> rendered files -> hosts -> a running cluster, over SSH, every host in parallel.

Phases, each collecting every host's outcome (never stopping at the first failure):
1. install congressctl (a locally built wheelhouse) and push every file atomically; if any host fails, the
   files this run changed on every host are put back, and nothing is started; each host then names its
   stale processes (running, but older than the package or config they read: `congressctl-cluster stale`);
2. start the cluster stack where it is not running (reload corosync where its config changed);
3. load the CIB when it changed (or the cluster has none of ours yet), then restart the stale processes
   host by host (rolling.py): bus replicas, then the promoted bus by a switchover, then api-pe behind HAProxy
   and the DSD, so that the API never stops answering;
4. wait until Pacemaker reports every resource where the design puts it.
A second run with the same inventory changes no file and restarts nothing. A run whose rolling restart
stopped at a host leaves the hosts after it stale: the next run goes on with them.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import secrets as pysecrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import congressctl
from congressctl import auth, pacemaker, remote, rolling, tls
from congressctl.errors import CongressctlError, DeployError, NoHostAnswered, RemoteError, ToolTimeoutError
from congressctl.files import atomic_write
from congressctl.inventory import Inventory, Node
from congressctl.render import CIB_PATH, CLUSTER_SCRIPT, REDIS_CONF_PATH, RenderedFile, Secrets, render_all

VENV = "/opt/congressctl"
WHEELS = f"{VENV}/wheels"
STAMP = f"{VENV}/.wheelhouse"

Progress = Callable[[str, str], None]


@dataclass
class HostReport:
    host: str
    ok: bool = True
    step: str = ""
    error: str | None = None
    installed: bool = False
    changed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)   # processes older than what they read (before any restart)
    diff: str = ""


@dataclass
class DeployResult:
    hosts: dict[str, HostReport]
    cib_loaded: bool = False
    plan: list[str] = field(default_factory=list)   # the rolling restart, in order (dry run: what it would be)
    ready: bool = False
    problems: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    dry_run: bool = False
    ca_file: str | None = None   # what clients verify the API with (`--os-cacert`); None for plain HTTP

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hosts.values()) and (self.dry_run or self.ready)

    @property
    def changed(self) -> bool:
        return self.cib_loaded or any(h.changed or h.restarted or h.installed for h in self.hosts.values())


@dataclass
class Wheelhouse:
    digest: str
    wheels: list[Path]


# ---------------------------------------------------------------------------------------------- secrets


def load_or_create_secrets(inv: Inventory, create: bool = True) -> Secrets | None:
    """The bus password (inventory file/env, else generated once in state_dir), the corosync authkey and the
    API admin token (auth.py). Kept 0600 in state_dir and reused by every later deploy. None when missing and
    create=False."""
    state = inv.state_dir
    authkey_path = state / "corosync.authkey"
    password = _bus_password(inv, create)
    if password is None or (not authkey_path.exists() and not create):
        return None
    material = tls.load_material(inv, create)
    if not authkey_path.exists():
        _write_secret(authkey_path, pysecrets.token_bytes(256))
    tokens = auth.token_hashes(inv, create=create)
    if tokens is None:
        return None
    return Secrets(bus_password=password, corosync_authkey=authkey_path.read_bytes(), api_tokens=tuple(tokens),
                   tls=material)


def _bus_password(inv: Inventory, create: bool) -> str | None:
    if inv.bus.password_env:
        value = os.environ.get(inv.bus.password_env)
        if not value:
            raise DeployError(f"environment variable {inv.bus.password_env} (bus.password_env) is not set",
                              file=str(inv.path), field="bus.password_env")
        return value.strip()
    path = inv.resolve(inv.bus.password_file) if inv.bus.password_file else inv.state_dir / "bus.password"
    if path.exists():
        return path.read_text().strip()
    if inv.bus.password_file:
        raise DeployError(f"bus.password_file {path} does not exist", file=str(inv.path), field="bus.password_file")
    if not create:
        return None
    _write_secret(path, pysecrets.token_urlsafe(32).encode())
    return path.read_text().strip()


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, data, 0o600)


# ---------------------------------------------------------------------------------------------- wheelhouse


def project_root() -> Path:
    root = Path(congressctl.__file__).resolve().parent.parent
    if not (root / "setup.py").exists():
        raise DeployError("deploy builds congressctl from its source tree, and none was found next to "
                          f"{Path(congressctl.__file__).parent}; run it from a checkout")
    return root


def source_digest(root: Path) -> str:
    """Content hash of what goes into the wheel, so an unchanged tree reuses its wheelhouse."""
    h = hashlib.sha256()
    files = [root / "setup.py"] + sorted((root / "congressctl").rglob("*.py")) + sorted(
        p for p in (root / "templates").rglob("*") if p.is_file())
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def wheelhouse_digest(root: Path, python_version: str, local_version: str | None = None) -> str:
    """What a host's package stamp says once this tree's wheelhouse for its Python is installed there."""
    label = f"+{local_version}" if local_version else ""
    return f"{source_digest(root)}{label}-py{python_version}"


def build_wheelhouse(state_dir: Path, python_version: str, timeout: float = 600,
                     local_version: str | None = None) -> Wheelhouse:
    """congressctl's wheel plus every dependency's for the hosts' Python (hosts need no package index),
    and pip's own wheel, which the hosts run straight from the file (see _install_package).

    Built once per (source digest, local version, host Python version); `local_version` makes the package
    0.1.0+LOCAL_VERSION (setup.py reads it from CONGRESSCTL_LOCAL_VERSION). pip resolves for the local
    interpreter, so dependencies whose markers hold only on the hosts' version (e.g. async-timeout below
    3.11.3) are added.
    """
    root = project_root()
    digest = wheelhouse_digest(root, python_version, local_version)
    folder = state_dir / "wheelhouse" / digest
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="congressctl-src-") as tmp:
            _pip(["wheel", "--quiet", "-w", str(folder), str(_source_copy(root, Path(tmp)))], timeout,
                 env={**os.environ, "CONGRESSCTL_LOCAL_VERSION": local_version or ""})
        for requirement in ["pip", *_missing_for(folder, python_version)]:
            _pip(["download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                  "-d", str(folder), requirement], timeout)
        atomic_write(folder / ".complete", digest.encode(), 0o644)   # its presence alone says "complete"
    return Wheelhouse(digest=digest, wheels=sorted(folder.glob("*.whl")))


def _source_copy(root: Path, into: Path) -> Path:
    """The files source_digest hashes, alone: setuptools reuses the checkout's build/ folder, so a wheel built
    in place can carry a module deleted since (or race another deploy building at the same time)."""
    src = into / "src"
    src.mkdir()
    shutil.copy2(root / "setup.py", src / "setup.py")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "congressctl", src / "congressctl", ignore=ignore)   # templates/ link followed
    return src


def _pip(args: list[str], timeout: float, env: dict[str, str] | None = None) -> None:
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout,
                              check=False, env=env)
    except subprocess.TimeoutExpired:
        raise ToolTimeoutError(f"building the wheelhouse: `pip {args[0]}` did not finish within {timeout:g} s "
                               "(killed)") from None
    if proc.returncode != 0:
        raise DeployError(f"building the wheelhouse failed (pip {args[0]}): {proc.stderr.strip()[-1500:]}",
                          step="wheel")


def _missing_for(folder: Path, python_version: str) -> list[str]:
    """Requirements of the wheels in `folder` that apply on `python_version` but have no wheel there."""
    env = {"python_full_version": python_version, "python_version": ".".join(python_version.split(".")[:2])}
    have = {canonicalize_name(w.name.split("-")[0]) for w in folder.glob("*.whl")}
    missing = []
    for wheel in folder.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            lines = zf.read(meta).decode(errors="replace").splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker and "extra" in str(req.marker):
                continue
            if (req.marker is None or req.marker.evaluate(env)) and canonicalize_name(req.name) not in have:
                missing.append(str(Requirement(f"{req.name}{req.specifier}")))
                have.add(canonicalize_name(req.name))
    return missing


# ---------------------------------------------------------------------------------------------- hosts


class _Steps:
    """Names the step in progress so a failure says where it happened."""

    def __init__(self, report: HostReport, progress: Progress | None):
        self.report = report
        self.progress = progress

    def __call__(self, step: str) -> None:
        self.report.step = step
        if self.progress:
            self.progress(self.report.host, step)


# ---------------------------------------------------------------------------------------------- deploy


def deploy(inv: Inventory, *, accept_new: bool = False, dry_run: bool = False, serial: int = 1,
           wait_timeout: float = 240.0, progress: Progress | None = None, max_workers: int = 8,
           local_version: str | None = None) -> DeployResult:
    """`serial`: how many hosts a rolling restart takes out of service at a time; `local_version`: a label
    for the package built (see build_wheelhouse)."""
    started = time.monotonic()
    if serial < 1:
        raise DeployError(f"serial must be at least 1 (got {serial})")
    if dry_run:
        return _dry_run(inv, accept_new, progress, max_workers, started, serial)
    secrets = load_or_create_secrets(inv)
    rendered = render_all(inv, secrets)
    wheelhouses = _Wheelhouses(inv.state_dir, local_version)
    nodes = {n.name: n for n in inv.nodes}
    reports = {n.name: HostReport(n.name) for n in inv.nodes}

    def push(host: remote.Host) -> None:
        _push_host(inv, nodes[host.name], rendered[host.name], wheelhouses, reports[host.name],
                   accept_new, progress)

    hosts = [remote.host_of(inv, n) for n in inv.nodes]
    _collect(remote.run_on_hosts(hosts, push, max_workers=max_workers, timeout=900), reports)
    result = DeployResult(hosts=reports, ca_file=str(tls.ca_path(inv)) if inv.api_tls.enabled else None)
    if any(not r.ok for r in reports.values()):
        _roll_back(inv, reports, progress, max_workers)
        result.problems.append("some hosts failed; files changed by this run were put back on every host")
        result.duration_s = time.monotonic() - started
        return result

    def start(host: remote.Host) -> None:
        _start_stack(inv, nodes[host.name], reports[host.name], progress)

    _collect(remote.run_on_hosts(hosts, start, max_workers=max_workers, timeout=120), reports)
    if all(r.ok for r in reports.values()):
        _configure_cluster(inv, reports, result, wait_timeout=wait_timeout, serial=serial, progress=progress)
    result.duration_s = time.monotonic() - started
    return result


def _collect(group: remote.GroupResult, reports: dict[str, HostReport]) -> None:
    for name, outcome in group.failed.items():
        report = reports[name]
        report.ok = False
        report.error = outcome.error
        report.step = outcome.step or report.step


def _push_host(inv: Inventory, node: Node, files: list[RenderedFile], wheelhouses: _Wheelhouses, report: HostReport,
               accept_new: bool, progress: Progress | None) -> None:
    step = _Steps(report, progress)
    step("connect")
    with _FailingAs(report), remote.connect(inv, node, accept_new) as conn:
        step("check the bus")
        _refuse_live_bus_tls_switch(inv, node, conn)
        step("install congressctl")
        version = conn.run("python3 -c 'import platform; print(platform.python_version())'", timeout=30).stdout
        report.installed = _install_package(conn, wheelhouses.get(version.strip()))
        step("push files")
        for f in files:
            if conn.put_file(f.path, f.content, mode=f.mode, owner=f.owner):
                report.changed.append(f.path)
        report.stale = _actions(conn.run(f"{CLUSTER_SCRIPT} stale", timeout=30).stdout)
        step("files pushed")


def _refuse_live_bus_tls_switch(inv: Inventory, node: Node, conn: remote.Connection) -> None:
    """A running bus cannot be rolled from plain to TLS or back: a replica of the other kind never syncs, so
    the roll would stop with the bus half switched. Refused before anything is touched on any host."""
    if not node.has("bus"):
        return
    # grep's status: 0 TLS, 1 plain, 2 no config (never deployed here); then pgrep's: 0 while Redis runs
    answer = conn.run(f"grep -qs '^tls-port ' {REDIS_CONF_PATH}; echo $?; pgrep -x redis-server >/dev/null; echo $?",
                      timeout=10, check=False).stdout.split()
    if len(answer) != 2 or answer[0] not in ("0", "1") or answer[1] != "0":
        return
    was_tls = answer[0] == "0"
    if was_tls == inv.bus.tls:
        return
    on_off = {True: "on", False: "off"}
    raise DeployError(
        f"bus.tls: the bus on {node.name} runs with TLS {on_off[was_tls]} and the inventory turns it "
        f"{on_off[inv.bus.tls]}; a plain and a TLS Redis never replicate to each other, so this cannot be rolled. "
        "Stop the resources first (crm_attribute --type crm_config --name stop-all-resources --update true), "
        "deploy, then delete that attribute (--delete) and deploy again; nothing was changed",
        host=node.name, step="check the bus")


class _Wheelhouses:
    """One wheelhouse per host Python version, built once even when several hosts ask at the same time."""

    def __init__(self, state_dir: Path, local_version: str | None):
        self.state_dir, self.local_version = state_dir, local_version
        self.lock = threading.Lock()
        self.built: dict[str, Wheelhouse] = {}

    def get(self, python_version: str) -> Wheelhouse:
        with self.lock:
            if python_version not in self.built:
                self.built[python_version] = build_wheelhouse(self.state_dir, python_version,
                                                              local_version=self.local_version)
            return self.built[python_version]


class _FailingAs:
    """Turn any failure inside a host's work into a DeployError naming the host and the step."""

    def __init__(self, report: HostReport):
        self.report = report

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None or isinstance(exc, DeployError):
            return
        message = exc.message if isinstance(exc, CongressctlError) else f"{type(exc).__name__}: {exc}"
        raise DeployError(message, host=self.report.host, step=self.report.step) from exc


def _install_package(conn: remote.Connection, wheelhouse: Wheelhouse) -> bool:
    """Install the wheelhouse into the host's venv, with pip run from its wheel file.

    The venv is made without ensurepip and nothing is byte-compiled at install: those two cost about 6 s of
    CPU per host, which on a big cluster of small machines (or a lab on one) was most of a first deploy.
    Modules compile when first imported instead.
    """
    stamp = (conn.read_file(STAMP) or b"").decode().strip()
    if stamp == wheelhouse.digest:
        return False
    conn.run(f"mkdir -p {WHEELS} && rm -f {WHEELS}/*.whl", timeout=30)
    for wheel in wheelhouse.wheels:
        conn.put_file(f"{WHEELS}/{wheel.name}", wheel.read_bytes(), keep_previous=False)
    main_wheel = _wheel_named("congressctl", wheelhouse)
    pip = f"{VENV}/bin/python {WHEELS}/{_wheel_named('pip', wheelhouse)}/pip install --quiet --no-index --no-compile"
    conn.run(f"test -x {VENV}/bin/python || python3 -m venv --without-pip {VENV}", timeout=120)
    conn.run(f"{pip} --find-links {WHEELS} {WHEELS}/{main_wheel} && "
             f"{pip} --no-deps --force-reinstall {WHEELS}/{main_wheel}", timeout=300)
    conn.put_file(STAMP, wheelhouse.digest.encode() + b"\n", keep_previous=False)
    return True


def _wheel_named(project: str, wheelhouse: Wheelhouse) -> str:
    return next(w.name for w in wheelhouse.wheels if canonicalize_name(w.name.split("-")[0]) == project)


def _roll_back(inv: Inventory, reports: dict[str, HostReport], progress: Progress | None, max_workers: int) -> None:
    touched = [n for n in inv.nodes if reports[n.name].changed]

    def restore(host: remote.Host) -> None:
        report = reports[host.name]
        if progress:
            progress(host.name, "roll back")
        with remote.connect(inv, inv.node(host.name)) as conn:
            for path in report.changed:
                conn.restore_previous(path)
                report.rolled_back.append(path)

    group = remote.run_on_hosts([remote.host_of(inv, n) for n in touched], restore, max_workers=max_workers,
                                timeout=120)
    for name, outcome in group.failed.items():
        reports[name].error = (reports[name].error or "") + f"; roll back failed: {outcome.error}"
        reports[name].ok = False


def _start_stack(inv: Inventory, node: Node, report: HostReport, progress: Progress | None) -> None:
    step = _Steps(report, progress)
    step("start cluster stack")
    with _FailingAs(report), remote.connect(inv, node) as conn:
        if "/etc/corosync/corosync.conf" in report.changed:
            out = conn.run(f"{CLUSTER_SCRIPT} reload-corosync", timeout=30).stdout
            report.restarted += _actions(out)
        out = conn.run(f"{CLUSTER_SCRIPT} start", timeout=60).stdout
        report.restarted += _actions(out)


def _actions(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.strip()]


def _configure_cluster(inv: Inventory, reports: dict[str, HostReport], result: DeployResult, *, wait_timeout: float,
                       serial: int, progress: Progress | None) -> None:
    """Load the CIB through one host (the first that answers), restart what is stale host by host, then wait."""
    deadline = time.monotonic() + wait_timeout
    changed_paths = {p for r in reports.values() for p in r.changed}

    def configure(conn: remote.Connection) -> None:
        if progress:
            progress(conn.host.name, "load CIB")
        existed = _load_cib(conn, inv, CIB_PATH in changed_paths, result, deadline)
        if existed:
            rolling.clear_leftovers(conn)
            try:
                if result.cib_loaded and any(r.stale for r in reports.values()):
                    # Pacemaker may have restarted what the new CIB changed: settle, then ask again what is stale
                    _wait_ready(conn, inv, result, deadline)
                    _refresh_stale(inv, reports)
                _roll(conn, inv, reports, result, serial=serial, deadline=deadline, progress=progress)
            except CongressctlError as exc:
                # not handed to the next host: the hosts after this one keep serving, and the next deploy goes on
                _failed(reports, exc, conn.host.name)
                result.problems.append(str(exc))
                return
        if progress:
            progress(conn.host.name, "wait for resources")
        _wait_ready(conn, inv, result, deadline)

    try:
        remote.first_reachable(inv, inv.nodes, configure)
    except NoHostAnswered as exc:
        result.problems += exc.failures or ["no host could configure the cluster"]


def _refresh_stale(inv: Inventory, reports: dict[str, HostReport]) -> None:
    def ask(host: remote.Host) -> None:
        with remote.connect(inv, inv.node(host.name)) as conn:
            reports[host.name].stale = _actions(conn.run(f"{CLUSTER_SCRIPT} stale", timeout=30).stdout)

    hosts = [remote.host_of(inv, inv.node(name)) for name, r in reports.items() if r.stale]
    for name, outcome in remote.run_on_hosts(hosts, ask, timeout=60).failed.items():
        raise DeployError(f"cannot tell which processes are stale: {outcome.error}", host=name, step="rolling restart")


def _wait_membership(conn: remote.Connection, inv: Inventory, deadline: float) -> None:
    """Wait for a quorate cluster with every node online.

    A CIB replaced before the nodes have joined is local-only: the DC's CIB sync then overwrites it.
    """
    want = sorted(n.name for n in inv.nodes)
    seen = "crm_mon did not answer"
    while time.monotonic() < deadline:
        placement = pacemaker.cluster_placement(conn)
        if placement and placement.quorum and sorted(placement.online) == want:
            return
        if placement:
            seen = f"online: {', '.join(placement.online) or 'none'}; quorum: {placement.quorum}"
        time.sleep(1)
    raise DeployError(f"the cluster did not form with every node online ({seen})", host=conn.host.name,
                      step="load CIB")


def _load_cib(conn: remote.Connection, inv: Inventory, changed: bool, result: DeployResult,
              deadline: float) -> bool:
    """Replace the CIB's configuration when it changed or is not ours yet; True when ours was already there."""
    _wait_membership(conn, inv, deadline)
    while True:
        current = pacemaker.query_resources(conn)
        if current.exit_code == 0:
            break
        if time.monotonic() > deadline:
            raise DeployError(f"the CIB did not come up: {current.stderr.strip()[-300:]}", host=conn.host.name,
                              step="load CIB")
        time.sleep(1)
    existed = 'id="api-pe-clone"' in current.stdout
    if existed and not changed:
        return True
    # only what our rendering changed since the CIB file this deploy replaced (put_file kept it as .prev)
    if not (existed and pacemaker.patch_configuration(conn, f"{CIB_PATH}.prev", CIB_PATH)):
        pacemaker.replace_configuration(conn, _pushed_cib(conn))
    result.cib_loaded = True
    return existed


def _pushed_cib(conn: remote.Connection) -> bytes:
    """The CIB file this deploy pushed to the host before loading it."""
    cib = conn.read_file(CIB_PATH)
    if cib is None:
        raise RemoteError(f"{CIB_PATH} is gone from the host it was pushed to", host=conn.host.name)
    return cib


@dataclass
class _Restarts:
    """What a deploy restarts where: HAProxy on the VIP host (when `haproxy`), then the rolling plan."""

    vip: str
    haproxy: bool
    plan: rolling.Plan

    def steps(self) -> list[str]:
        return ([f"reload haproxy on {self.vip}"] if self.haproxy else []) + self.plan.steps()


def _restarts(conn: remote.Connection, inv: Inventory, stale: dict[str, list[str]], serial: int) -> _Restarts:
    placement = pacemaker.cluster_placement(conn)
    if placement is None:
        raise DeployError("crm_mon did not answer", host=conn.host.name, step="rolling restart")
    vip = next(iter(placement.on("haproxy")), conn.host.name)
    view = rolling.dsd_view(conn, inv) if stale else None
    plan = rolling.make_plan(stale, placement, leader=view.leader.node if view and view.leader else None,
                             serial=serial, multi_bus=len(inv.with_role("bus")) > 1)
    return _Restarts(vip=vip, haproxy="haproxy" in stale.get(vip, []), plan=plan)


def _roll(conn: remote.Connection, inv: Inventory, reports: dict[str, HostReport], result: DeployResult, *,
          serial: int, deadline: float, progress: Progress | None) -> None:
    """Restart the stale processes: HAProxy where it runs, then the bus, api-pe host by host and the DSD
    (rolling.py)."""
    stale = {name: r.stale for name, r in reports.items() if r.stale}
    if not stale:
        return
    due = _restarts(conn, inv, stale, serial)
    result.plan = due.steps()
    if due.plan.empty and not due.haproxy:
        return
    with remote.connect(inv, inv.node(due.vip)) as vip_conn:
        if due.haproxy:
            if progress:
                progress(due.vip, "reload haproxy")
            reports[due.vip].restarted += _actions(vip_conn.run(f"{CLUSTER_SCRIPT} reload-haproxy", timeout=60).stdout)
        roll = rolling.Roll(vip_conn, inv, deadline=deadline, progress=progress)
        try:
            roll.run(due.plan)
        finally:
            for name, done in roll.done.items():
                reports[name].restarted += done


def _failed(reports: dict[str, HostReport], exc: CongressctlError, fallback: str) -> None:
    report = reports[exc.host if exc.host in reports else fallback]
    report.ok = False
    report.error = exc.message
    report.step = getattr(exc, "step", None) or "rolling restart"


def _wait_ready(conn: remote.Connection, inv: Inventory, result: DeployResult, deadline: float) -> None:
    problems = ["crm_mon did not answer"]
    while time.monotonic() < deadline:
        placement = pacemaker.cluster_placement(conn)
        problems = pacemaker.placement_problems(inv, placement) if placement else ["crm_mon did not answer"]
        if placement and not placement.running and not placement.stopped:
            pacemaker.replace_configuration(conn, _pushed_cib(conn))
        if not problems and not _api_healthy(conn, inv):
            problems = [f"the API through the VIP {inv.vip.address}:{inv.api_port} is not healthy yet"]
        if not problems:
            result.ready = True
            result.problems = []
            return
        time.sleep(1)
    result.problems = problems


def _api_healthy(conn: remote.Connection, inv: Inventory) -> bool:
    """HAProxy on the VIP has a healthy api-pe behind it (its checks passed and the PE is synced)."""
    url = f"{inv.api_url()}/healthz"
    return conn.run(f"curl -sf -m 2 -o /dev/null {tls.curl_args(inv)}{shlex.quote(url)}", timeout=10,
                    check=False).exit_code == 0


# ---------------------------------------------------------------------------------------------- dry run


def _dry_run(inv: Inventory, accept_new: bool, progress: Progress | None, max_workers: int,
             started: float, serial: int) -> DeployResult:
    secrets = load_or_create_secrets(inv, create=False)
    rendered = render_all(inv, secrets)
    reports = {n.name: HostReport(n.name) for n in inv.nodes}
    root = project_root()

    def diff(host: remote.Host) -> None:
        report = reports[host.name]
        _Steps(report, progress)("diff")
        with _FailingAs(report), remote.connect(inv, inv.node(host.name), accept_new) as conn:
            chunks = []
            for f in rendered[host.name]:
                current = conn.read_file(f.path)
                if current == f.content:
                    continue
                report.changed.append(f.path)
                chunks.append(_file_diff(f, current))
            report.diff = "".join(chunks)
            report.installed = _would_install(conn, root)
            report.stale = _would_be_stale(conn, report.changed + ([STAMP] if report.installed else []))

    hosts = [remote.host_of(inv, n) for n in inv.nodes]
    _collect(remote.run_on_hosts(hosts, diff, max_workers=max_workers, timeout=120), reports)
    result = DeployResult(hosts=reports, dry_run=True)
    stale = {name: r.stale for name, r in reports.items() if r.stale}
    if stale and all(r.ok for r in reports.values()):
        try:
            result.plan = remote.first_reachable(inv, inv.nodes, lambda c: _restarts(c, inv, stale, serial).steps(),
                                                 accept_new=accept_new)
        except NoHostAnswered as exc:
            result.problems += exc.failures or ["no host could tell where the processes run"]
    result.duration_s = time.monotonic() - started
    return result


def _would_install(conn: remote.Connection, root: Path) -> bool:
    version = conn.run("python3 -c 'import platform; print(platform.python_version())'", timeout=30).stdout.strip()
    return (conn.read_file(STAMP) or b"").decode().strip() != wheelhouse_digest(root, version)


def _would_be_stale(conn: remote.Connection, changing: list[str]) -> list[str]:
    """The processes a deploy changing `changing` on this host would restart (none before the first deploy)."""
    args = " ".join(shlex.quote(p) for p in changing)
    proc = conn.run(f"test -x {CLUSTER_SCRIPT} && {CLUSTER_SCRIPT} stale {args}", timeout=30, check=False)
    return _actions(proc.stdout) if proc.exit_code == 0 else []


def _file_diff(f: RenderedFile, current: bytes | None) -> str:
    if f.secret or b"\0" in f.content:
        what = "would be created" if current is None else "would change"
        return f"--- {f.path}\n+++ {f.path}\n@@ secret or binary file {what}; content not shown @@\n"
    old = [] if current is None else current.decode(errors="replace").splitlines(keepends=True)
    new = f.content.decode().splitlines(keepends=True)
    return "".join(difflib.unified_diff(old, new, fromfile=f"{f.path} (on host)", tofile=f"{f.path} (rendered)"))
