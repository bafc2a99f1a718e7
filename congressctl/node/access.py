"""Who may call the API: tokens (sent as X-Auth-Token or Authorization: Bearer) checked against the sha256 of
each token in the node config, and their roles. Hosts never hold a token itself, only its hash.

The check reads the raw ASGI headers once, hashes what was sent and compares it with every known hash in
constant time (hmac.compare_digest, no early exit), so neither the answer nor its timing says which tokens
exist. `/` and `/healthz` stay open: clients discover the API version, and HAProxy and the OCF agent check
health without a credential.
"""

from __future__ import annotations

import hashlib
import hmac

from congressctl.payloads import TokenHash

OPEN_PATHS = frozenset(("/", "/healthz"))
READ_METHODS = frozenset(("GET", "HEAD"))
BEARER = b"bearer "


class TokenCheck:
    """The role a request's token has (None: no token, or none that matches)."""

    def __init__(self, tokens: list[TokenHash]):
        self.known = [(bytes.fromhex(t.sha256), t.role) for t in tokens]

    def presented(self, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        for name, value in headers:
            if name == b"x-auth-token":
                return value.strip()
            if name == b"authorization" and value[:7].lower() == BEARER:
                return value[7:].strip()
        return None

    def role_of(self, token: bytes | None) -> str | None:
        if not token:
            return None
        digest = hashlib.sha256(token).digest()
        role = None
        for known, known_role in self.known:
            if hmac.compare_digest(digest, known) and role is None:
                role = known_role
        return role


def refusal(method: str, role: str | None) -> int | None:
    """The status that refuses a request to a guarded path (401, 403), or None when the role may make it."""
    if role is None:
        return 401
    if role != "admin" and method not in READ_METHODS:
        return 403
    return None
