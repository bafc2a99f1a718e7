"""The node config file that `congressctl serve` reads."""

from __future__ import annotations

import pytest
import yaml

from congressctl.errors import NodeConfigError
from congressctl.node.config import load_node_config


def write(tmp_path, doc, password="s3cret-pw", mode=0o600):
    pw = tmp_path / "bus.password"
    pw.write_text(password + "\n")
    pw.chmod(mode)
    base = {"cluster": "demo", "node_id": "n1", "roles": ["api-pe", "dsd", "bus"],
            "api": {"bind": "127.0.0.1", "port": 1789},
            "bus": {"host": "127.0.0.1", "port": 6379, "password_file": str(pw), "tls": False},
            "timings": {"heartbeat_interval_ms": 200, "peer_timeout_ms": 1000, "full_sync_interval_s": 30},
            "paths": {"log_dir": str(tmp_path / "log"), "state_dir": str(tmp_path / "state")}}
    for key, value in doc.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    path = tmp_path / "congress.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_rendered_shape_loads_with_password_read_and_hidden(tmp_path):
    path = tmp_path / "congress.yaml"
    pw = tmp_path / "bus.password"
    pw.write_text("s3cret-pw\n")
    pw.chmod(0o600)
    path.write_text(
        "cluster: demo\nnode_id: n1\nroles: [api-pe, dsd, bus]\napi: {bind: 10.213.0.11, port: 1789}\n"
        f"bus: {{host: 10.213.0.11, port: 6379, password_file: {pw}, tls: false}}\n"
        "timings: {heartbeat_interval_ms: 200, peer_timeout_ms: 1000, full_sync_interval_s: 30}\n"
        "paths: {log_dir: /var/log/congressctl, state_dir: /var/lib/congressctl}\n")
    cfg = load_node_config(path)
    assert (cfg.node_id, cfg.api.port, cfg.bus.port, cfg.timings.peer_timeout_s) == ("n1", 1789, 6379, 1.0)
    assert cfg.bus.password == "s3cret-pw"
    assert "s3cret-pw" not in repr(cfg)


@pytest.mark.parametrize("change,field", [
    ({"node_id": None}, "node_id"),
    ({"bus": None}, "bus"),
    ({"api": {"port": "x"}}, "api.port"),
    ({"roles": ["api-pe", "web"]}, "roles"),
    ({"timings": {"peer_timeout_ms": 100, "heartbeat_interval_ms": 200}}, "timings.peer_timeout_ms"),
    ({"timings": {"heartbeat_interval_ms": 0}}, "timings.heartbeat_interval_ms"),
    ({"bus": {"password_file": "/nonexistent/pw"}}, "bus.password_file"),
    ({"test_hooks": {"drop_publish": "x"}}, "test_hooks.drop_publish"),
])
def test_bad_config_names_file_and_field(tmp_path, change, field):
    path = write(tmp_path, change)
    with pytest.raises(NodeConfigError) as err:
        load_node_config(path)
    assert err.value.field == field and err.value.file == str(path)
    assert str(path) in str(err.value)


def test_password_file_must_be_0600_and_is_never_in_the_error(tmp_path):
    path = write(tmp_path, {}, mode=0o644)
    with pytest.raises(NodeConfigError) as err:
        load_node_config(path)
    assert "0600" in str(err.value) and "s3cret-pw" not in str(err.value)


def test_not_yaml_reports_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cluster: a\nnode_id: [unclosed\n")
    with pytest.raises(NodeConfigError) as err:
        load_node_config(path)
    assert err.value.line is not None
