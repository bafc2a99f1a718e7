"""Shared test plumbing. Fixtures for each real service live in their own fixtures_*.py plugin."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

pytest_plugins = ["fixtures_redis", "fixtures_sshd", "fixtures_lab", "fixtures_cluster"]

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip when a capability is missing; under CI=true a missing capability fails the test instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing capability under CI=true: {reason}")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed (make install)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
