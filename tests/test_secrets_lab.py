"""After every other lab test of the session (conftest runs this module last): the API's admin token is in no
file of any lab host. Hosts hold only its sha256; logs, rendered files, the deployed package, Pacemaker's CIB
and Redis's data must never carry the token itself (lab only)."""

from __future__ import annotations

import pytest

from congressctl import auth
from congressctl import lab as labmod

pytestmark = pytest.mark.lab

# what a host writes: its logs, configs, state, the deployed package and runtime files (/usr is the machine's)
HOST_DIRS = ("/var/log", "/var/lib", "/etc", "/opt", "/run", "/root", "/tmp")


def test_the_admin_token_is_in_no_file_of_any_host(cluster) -> None:
    token = auth.require_admin_token(cluster.inv)
    for host in cluster.lab.hosts:
        # the token is given on stdin (grep -f -), so that it is on no command line either
        done = labmod.lab_exec(cluster.lab, host.name, ["grep", "-rlIF", "-f", "-", *HOST_DIRS], timeout=120,
                               input=(token + "\n").encode())
        found = done.stdout.decode().split()
        assert done.returncode in (0, 1) or not found, done.stderr.decode()[-500:]
        assert found == [], f"{host.name}: the admin token is in {found}"
