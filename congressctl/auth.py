"""API tokens on the controller side: the admin token deploy generates once into the state dir (0600), the
tokens the inventory names by file or environment variable, and what hosts get of them (only their sha256
and role, rendered into the node config). congressctl's own clients send the admin token.

A token is never printed, logged or put on a command line: remote curl reads its header from stdin.
"""

from __future__ import annotations

import hashlib
import os
import secrets as pysecrets
from pathlib import Path

from congressctl.errors import AuthError
from congressctl.files import atomic_write
from congressctl.inventory import Inventory
from congressctl.payloads import TokenHash

ADMIN_TOKEN_FILE = "api-admin.token"
ADMIN_TOKEN_NAME = "admin"   # the generated token's name; the inventory cannot give it to another
HEADER = "X-Auth-Token"


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def admin_token_path(state_dir: Path) -> Path:
    return state_dir / ADMIN_TOKEN_FILE


def admin_token(inv: Inventory, *, create: bool = False) -> str | None:
    """The admin token of the inventory's state dir (made the first time when `create`; None: not made yet)."""
    path = admin_token_path(inv.state_dir)
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, pysecrets.token_urlsafe(32).encode(), 0o600)
    return _read(path, what=f"the admin token {path}")


def require_admin_token(inv: Inventory) -> str:
    """The admin token, for congressctl's own clients of a deployed cluster."""
    token = admin_token(inv)
    if token is None:
        raise AuthError(f"no API admin token in {admin_token_path(inv.state_dir)}: run `congressctl deploy` first",
                        file=str(inv.path), field="state_dir")
    return token


def token_hashes(inv: Inventory, *, create: bool = False) -> list[TokenHash] | None:
    """What the hosts get: the admin token's and every inventory token's sha256 with its role (None: no admin
    token yet and not `create`)."""
    admin = admin_token(inv, create=create)
    if admin is None:
        return None
    hashes = [TokenHash(name=ADMIN_TOKEN_NAME, role="admin", sha256=token_sha256(admin))]
    for i, token in enumerate(inv.api.tokens):
        hashes.append(TokenHash(name=token.name, role=token.role, sha256=token_sha256(_inventory_token(inv, i))))
    return hashes


def _inventory_token(inv: Inventory, index: int) -> str:
    token = inv.api.tokens[index]
    where = f"api.tokens[{index}]"
    if token.env:
        value = os.environ.get(token.env, "").strip()
        if not value:
            raise AuthError(f"environment variable {token.env} ({where}.env) is not set", file=str(inv.path),
                            field=f"{where}.env")
        return value
    assert token.file is not None   # the inventory requires file or env
    return _read(inv.resolve(token.file), what=f"{where}.file", inv=inv, field=f"{where}.file")


def _read(path: Path, *, what: str, inv: Inventory | None = None, field: str | None = None) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise AuthError(f"cannot read {what} ({path}): {exc.strerror}", file=str(inv.path) if inv else None,
                        field=field) from None
    if not value:
        raise AuthError(f"{what} ({path}) is empty", file=str(inv.path) if inv else None, field=field)
    return value


def headers(token: str) -> dict[str, str]:
    """The request header that carries a token (what keystoneauth and python-congressclient send)."""
    return {HEADER: token}


def curl_header(token: str) -> str:
    """The header as `curl -H @-` reads it from stdin (so it is on no command line)."""
    return f"{HEADER}: {token}\n"
