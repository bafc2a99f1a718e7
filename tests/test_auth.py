"""API tokens on the controller side: deploy's admin token (made once, 0600), the inventory's tokens by file or
environment variable, what the node config gets of them (hashes only), and the status probe handing curl its
header on stdin (never on a command line)."""

from __future__ import annotations

import http.server
import stat
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from conftest import require_tool

from congressctl import auth, deploy, status
from congressctl.errors import AuthError
from congressctl.inventory import generate, parse_inventory
from congressctl.node.config import load_node_config
from congressctl.render import render_node


def _inv(tmp_path: Path, tokens: list[dict] | None = None):
    data = generate(3)
    data["state_dir"] = str(tmp_path / "state")
    if tokens is not None:
        data["api"]["tokens"] = tokens
    return parse_inventory(yaml.safe_dump(data), tmp_path / "inv.yaml")


def test_deploy_makes_the_admin_token_once_0600_and_hosts_get_only_hashes(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "ops.token").write_text("ops-reader-token-text\n")
    monkeypatch.setenv("CI_API_TOKEN", "ci-admin-token-text")
    inv = _inv(tmp_path, [{"name": "ops", "role": "reader", "file": "ops.token"},
                          {"name": "ci", "role": "admin", "env": "CI_API_TOKEN"}])
    assert auth.admin_token(inv) is None and deploy.load_or_create_secrets(inv, create=False) is None
    secrets = deploy.load_or_create_secrets(inv)
    path = auth.admin_token_path(inv.state_dir)
    token = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 40
    assert deploy.load_or_create_secrets(inv).api_tokens == secrets.api_tokens and path.read_text() == token
    assert [(t.name, t.role) for t in secrets.api_tokens] == [("admin", "admin"), ("ops", "reader"), ("ci", "admin")]
    assert secrets.api_tokens[1].sha256 == auth.token_sha256("ops-reader-token-text")
    files = render_node(inv, inv.node("n1"), secrets)
    for secret in (token, "ops-reader-token-text", "ci-admin-token-text"):
        assert all(secret.encode() not in f.content for f in files)
    config = next(f for f in files if f.path == "/etc/congressctl/congress.yaml")
    (tmp_path / "bus.password").write_text("pw")
    (tmp_path / "bus.password").chmod(0o600)
    doc = yaml.safe_load(config.content)
    doc["bus"]["password_file"] = str(tmp_path / "bus.password")
    (tmp_path / "congress.yaml").write_text(yaml.safe_dump(doc))
    loaded = load_node_config(tmp_path / "congress.yaml")
    assert [t.sha256 for t in loaded.auth.tokens] == [t.sha256 for t in secrets.api_tokens]
    assert loaded.limits.max_body_mb == 16 and loaded.datasources.allowed_urls == []


def test_an_inventory_token_that_cannot_be_read_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NOT_SET_TOKEN", raising=False)
    inv = _inv(tmp_path, [{"name": "ci", "role": "admin", "env": "NOT_SET_TOKEN"}])
    with pytest.raises(AuthError) as info:
        deploy.load_or_create_secrets(inv)
    assert info.value.field == "api.tokens[0].env" and "NOT_SET_TOKEN" in info.value.message
    inv = _inv(tmp_path, [{"name": "ops", "role": "reader", "file": "missing.token"}])
    with pytest.raises(AuthError) as info:
        deploy.load_or_create_secrets(inv)
    assert info.value.field == "api.tokens[0].file"


def test_clients_of_an_undeployed_cluster_are_told_to_deploy(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="run `congressctl deploy` first"):
        auth.require_admin_token(_inv(tmp_path))


def test_the_status_probe_gives_curl_the_token_on_stdin_not_the_command_line(tmp_path: Path) -> None:
    require_tool("curl")
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("X-Auth-Token"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/status"
        command = status.probe_command("marker", url, 3, api_header=True)
        assert "secret-token-text" not in command
        proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=20, check=False,
                              input=auth.curl_header("secret-token-text"))
    finally:
        server.shutdown()
        server.server_close()
    assert status.parse_probes(proc.stdout, "marker")["api"].out == "{}"
    assert seen == ["secret-token-text"]


def test_redis_keeps_its_password_and_protected_mode(tmp_path: Path) -> None:
    inv = _inv(tmp_path)
    files = {f.path: f for f in render_node(inv, inv.node("n1"), deploy.load_or_create_secrets(inv))}
    conf = files["/etc/congressctl/redis.conf"].content.decode()
    assert "\nprotected-mode yes\n" in conf and "\nrequirepass " in conf and "protected-mode no" not in conf
