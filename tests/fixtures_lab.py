"""Fixtures: lab — one shared lab of 3 real hosts (netns + own sshd) for the whole test session.

Test labs are named q<letter><pid of the pytest process> (e.g. qt4242), not a fixed name: several pytest sessions
may run on one machine at once, and a fixed name would let one session tear down another's lab. A lab whose
session died without tearing down is removed by the next session (its pid is gone).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from conftest import require
from congressctl.errors import LabError
from congressctl.lab import Lab, check_capabilities, lab_down, lab_names, lab_up

TEST_LAB_NAME = re.compile(r"^q[a-z](\d+)$")


def session_lab_name(prefix: str) -> str:
    """A lab name that is this session's own: q + one letter (t = the shared lab) + the pytest pid."""
    return f"q{prefix}{os.getpid()}"


def require_lab() -> None:
    """Skip (fail under CI=true) when this machine cannot run a lab: not root, no namespaces, no sshd..."""
    try:
        check_capabilities()
    except LabError as e:
        require(False, f"lab unavailable: {e}")


def reap_orphan_test_labs() -> None:
    """Tear down test labs whose pytest session is gone (killed before its teardown ran)."""
    for name in lab_names():
        match = TEST_LAB_NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            lab_down(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three hosts n1..n3, up once per session; tests must leave them as they found them."""
    require_lab()
    reap_orphan_test_labs()
    name = session_lab_name("t")
    made = lab_up(3, name, tmp_path_factory.mktemp("lab"))
    try:
        yield made
    finally:
        lab_down(name, made.dir)
