"""Fixtures: a real redis-server (requirepass, appendonly) on a free port, and real congress node processes.

`redis_server` yields a RedisServer that can be stopped and started again on the same port and data dir
(persistence through the append-only file). `node_cluster` starts `congressctl serve api-pe|dsd` processes
against it, each with its own config file, and stops them at the end.
"""

from __future__ import annotations

import http.server
import json
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import yaml

from congressctl import failover, tls
from congressctl.auth import token_sha256

from conftest import free_port, require

REPO = Path(__file__).resolve().parent.parent
START_WAIT_S = 10.0
# Every test cluster's nodes know these two tokens (by hash, as deployed ones do); requests send the admin one
ADMIN_TOKEN = secrets.token_urlsafe(32)
READER_TOKEN = secrets.token_urlsafe(32)
TOKENS = [{"name": "admin", "role": "admin", "sha256": token_sha256(ADMIN_TOKEN)},
          {"name": "reader", "role": "reader", "sha256": token_sha256(READER_TOKEN)}]
# the failover-test sink listens here: test datasources may send their actions to it
ALLOWED_URLS = ["http://127.0.0.1:"]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling; reported on timeout
            last_exc = exc
        time.sleep(interval)
    detail = f" (last error: {last_exc})" if last_exc else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")


@dataclass
class RedisServer:
    dir: Path
    port: int
    password: str
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    extra_conf: list[str] = field(default_factory=list)   # e.g. replicaof, min-replicas-to-write
    tls_dir: Path | None = None     # TLS only on `port`, with write_test_tls's certificates from this folder

    @property
    def password_file(self) -> Path:
        return self.dir / "bus.password"

    def write_conf(self) -> Path:
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join([
            f"bind {self.host}", *self.port_conf(), f"dir {self.dir}", "appendonly yes",
            "appendfsync everysec", "save ''", f"requirepass {self.password}", "protected-mode yes",
            "daemonize no", f"logfile {self.dir / 'redis.log'}",
            "client-output-buffer-limit pubsub 256mb 64mb 60", *self.extra_conf, ""]))
        conf.chmod(0o600)
        return conf

    def port_conf(self) -> list[str]:
        if self.tls_dir is None:
            return [f"port {self.port}"]
        return ["port 0", f"tls-port {self.port}", f"tls-cert-file {self.tls_dir / 'bus.crt'}",
                f"tls-key-file {self.tls_dir / 'bus.key'}", f"tls-ca-cert-file {self.tls_dir / 'ca.crt'}",
                "tls-auth-clients no", "tls-replication yes"]

    def start(self) -> None:
        conf = self.write_conf()
        self.proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(lambda: self.client().ping(), START_WAIT_S, what=f"redis on port {self.port}")

    def stop(self) -> None:
        """Shut down cleanly (the append-only file is flushed)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def client(self) -> redis.Redis:
        secure = {"ssl": True, "ssl_ca_certs": str(self.tls_dir / "ca.crt")} if self.tls_dir else {}
        return redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=5,
                           socket_connect_timeout=2, decode_responses=True, **secure)


def write_test_tls(folder: Path) -> Path:
    """A cluster CA (ca.crt) and certificates for 127.0.0.1 made by congressctl.tls: api.crt/key, bus.crt/key."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = tls.make_ca("test")
    (folder / "ca.crt").write_bytes(ca.cert)
    for name in ("api", "bus"):
        pair = tls.issue(ca, name=name, addresses=["127.0.0.1"])
        (folder / f"{name}.crt").write_bytes(pair.cert)
        (folder / f"{name}.key").write_bytes(pair.key)
        (folder / f"{name}.key").chmod(0o600)
    return folder


@pytest.fixture
def redis_server(tmp_path_factory):
    require(shutil.which("redis-server") is not None, "redis-server is not installed (make install)")
    d = tmp_path_factory.mktemp("redis")
    server = RedisServer(dir=d, port=free_port(), password=secrets.token_hex(16))
    server.password_file.write_text(server.password + "\n")
    server.password_file.chmod(0o600)
    server.start()
    yield server
    server.stop()


def congressctl_command() -> list[str]:
    exe = REPO / ".venv" / "bin" / "congressctl"
    if exe.exists():
        return [str(exe), "serve"]
    return [sys.executable, "-m", "congressctl.node", "serve"]


@dataclass
class NodeProcess:
    role: str
    node_id: str
    config: Path
    log: Path
    api_port: int | None = None
    proc: subprocess.Popen | None = None
    ca_file: Path | None = None     # the node serves HTTPS, verified with this CA

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([*congressctl_command(), self.role, "--config", str(self.config)],
                                     stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO))
        out.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def terminate(self) -> None:
        """Ask the node to stop (a graceful stop, resumed first if it was paused), without waiting for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://127.0.0.1:{self.api_port}"

    @property
    def context(self) -> ssl.SSLContext | None:
        return tls.client_context(self.ca_file) if self.ca_file else None

    def get(self, path: str, timeout: float = 5.0, token: str | None = ADMIN_TOKEN):
        """(status, JSON body) of a GET on this node's API."""
        return http_json("GET", self.url + path, timeout=timeout, token=token, context=self.context)

    def request(self, method: str, path: str, body=None, timeout: float = 5.0, token: str | None = ADMIN_TOKEN):
        return http_json(method, self.url + path, body, timeout=timeout, token=token, context=self.context)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def http_json(method: str, url: str, body=None, timeout: float = 5.0, token: str | None = ADMIN_TOKEN,
              context: ssl.SSLContext | None = None):
    """(status, JSON body) of a request, sent with `token` (the admin token unless told; None: no token)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"X-Auth-Token": token} if token else {})}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except ValueError:
            return exc.code, raw.decode(errors="replace")


@dataclass
class NodeCluster:
    redis: RedisServer
    dir: Path
    cluster: str = "t"
    heartbeat_ms: int = 100
    peer_timeout_ms: int = 500
    full_sync_s: float = 5.0
    nodes: list[NodeProcess] = field(default_factory=list)
    api_tls_dir: Path | None = None   # api-pe nodes serve HTTPS with write_test_tls's api certificate

    def write_config(self, node_id: str, role: str, api_port: int | None, extra: dict | None = None) -> Path:
        doc = {"cluster": self.cluster, "node_id": node_id, "roles": [role],
               "api": {"bind": "127.0.0.1", "port": api_port or 1},
               "bus": {"host": "127.0.0.1", "port": self.redis.port, "password_file": str(self.redis.password_file),
                       "tls": self.redis.tls_dir is not None},
               "timings": {"heartbeat_interval_ms": self.heartbeat_ms, "peer_timeout_ms": self.peer_timeout_ms,
                           "full_sync_interval_s": self.full_sync_s},
               "paths": {"log_dir": str(self.dir / "logs" / node_id), "state_dir": str(self.dir / "state")},
               "auth": {"tokens": TOKENS}, "datasources": {"allowed_urls": ALLOWED_URLS}}
        if self.redis.tls_dir:
            doc["bus"]["tls_ca_file"] = str(self.redis.tls_dir / "ca.crt")
        if self.api_tls_dir:
            doc["api_tls"] = {"cert_file": str(self.api_tls_dir / "api.crt"),
                              "key_file": str(self.api_tls_dir / "api.key")}
        if extra:
            doc.update(extra)
        path = self.dir / f"{node_id}-{role}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def add(self, role: str, node_id: str, extra: dict | None = None, start: bool = True) -> NodeProcess:
        port = free_port() if role == "api-pe" else None
        config = self.write_config(node_id, role, port, extra)
        node = NodeProcess(role=role, node_id=node_id, config=config, api_port=port,
                           log=self.dir / "logs" / f"{node_id}-{role}.out",
                           ca_file=self.api_tls_dir / "ca.crt" if self.api_tls_dir else None)
        self.nodes.append(node)
        if start:
            node.start()
            if role == "api-pe":
                self.wait_healthy(node)
        return node

    def wait_healthy(self, node: NodeProcess, timeout: float = 15.0) -> None:
        def healthy():
            if not node.alive():
                raise AssertionError(f"{node.node_id} exited:\n{node.log_text()[-3000:]}")
            return node.get("/healthz", timeout=1)[0] == 200
        wait_for(healthy, timeout, what=f"{node.node_id} healthy")

    def stop_all(self) -> None:
        # every node drains at once: a graceful stop takes its drain time, one after the other it was seconds
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            node.stop()


@pytest.fixture
def node_cluster(redis_server, tmp_path):
    cluster = NodeCluster(redis=redis_server, dir=tmp_path)
    yield cluster
    cluster.stop_all()


class Sink(failover.Sink):
    """The failover-test sink (a real HTTP server counting actions by id), with the views tests read."""

    @property
    def received(self) -> list[dict]:
        return self.bodies()

    def ids(self) -> list[str]:
        return [b["action_id"] for b in self.bodies()]

    def args(self) -> list[tuple]:
        return [tuple(b["args"]) for b in self.bodies()]


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


class JsonSource:
    """A real HTTP server that serves a JSON document the test can change, counting GETs."""

    def __init__(self, document):
        self.document = document
        self.gets = 0
        source = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                source.gets += 1
                body = json.dumps(source.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/servers.json"

    def close(self):
        self.server.shutdown()
        self.server.server_close()



@pytest.fixture
def two_apis(node_cluster):
    node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    b = node_cluster.add("api-pe", "n2")
    return node_cluster, a, b


__all__ = ["RedisServer", "NodeCluster", "NodeProcess", "Sink", "JsonSource", "wait_for", "http_json",
           "write_test_tls", "ADMIN_TOKEN", "READER_TOKEN"]

