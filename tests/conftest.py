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


# The tests that disturb the shared lab the most run last, in this order: every failover scenario, a chaos run,
# then fencing (it reboots a host). A scenario that leaves the cluster worse off then cannot fail the deploy,
# status and rolling tests that come after it alphabetically. Last, once every other has run, the search of
# every host for the API token.
LAST_MODULES = ("test_failover.py", "test_failover_chaos.py", "test_fencing.py", "test_secrets_lab.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `make test` runs `-m "not lab"` and `-m lab` as two runs: a test on the shared lab is a lab test, marked or not
    for item in items:
        if {"lab", "cluster"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LAST_MODULES.index(name) + 1 if name in LAST_MODULES else 0
    items.sort(key=rank)
