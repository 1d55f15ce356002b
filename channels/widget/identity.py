"""Who a widget visitor is: an anonymous browser (its random token) or a shop user the shop
vouched for with an HMAC-SHA256 of the user id (DESIGN.md, widget identity)."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any

from channels.widget.sites import Site

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{22,128}$")
_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_USER_ID = 128
MAX_NAME = 80


def valid_token(token: object) -> bool:
    """A visitor token: 22-128 URL-safe characters (the widget makes 32 random ones)."""
    return isinstance(token, str) and bool(_TOKEN_RE.match(token))


def valid_client_id(client_id: object) -> bool:
    return isinstance(client_id, str) and bool(_CLIENT_ID_RE.match(client_id))


def visitor_id(site_key: str, token: str) -> str:
    """The stored id of a visitor: a hash, so a database leak does not hand out tokens."""
    return hashlib.sha256(f"{site_key}\0{token}".encode()).hexdigest()[:32]


def sign(secret: str, user_id: str) -> str:
    """What the shop's server puts in data-user-hash: hex HMAC-SHA256(secret, user id)."""
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    verified: bool
    shop_user_id: str | None = None
    name: str | None = None
    problem: str | None = None  # why a claimed identity was not accepted (for the developer)

    def attributes(self, site_key: str) -> dict[str, Any]:
        """What the contact's attributes say about the visitor (order tools check 'verified')."""
        return {
            "verified": self.verified,
            "shop_user_id": self.shop_user_id if self.verified else None,
            "identity": "verified" if self.verified else "anonymous",
            "widget_site": site_key,
        }


@dataclass(frozen=True, slots=True)
class Visitor:
    """One browser on one site, as every transport (socket, SSE, POST) sees it."""

    site: Site
    id: str
    identity: Identity
    ip: str


def resolve_identity(claim: object, secret: str | None) -> Identity:
    """`claim` is the client's {"id", "hash", "name"} (or nothing): verified only when the
    hash is the HMAC of the id under the site's secret; otherwise anonymous."""
    if not isinstance(claim, dict):
        return Identity(False)
    raw_name = claim.get("name")
    name = raw_name.strip()[:MAX_NAME] or None if isinstance(raw_name, str) else None
    user_id, given = claim.get("id"), claim.get("hash")
    if user_id in (None, ""):
        return Identity(False, name=name)
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if not isinstance(user_id, str) or len(user_id) > MAX_USER_ID:
        return Identity(False, name=name, problem="user id must be a string of at most 128 chars")
    if secret is None:
        return Identity(
            False, name=name, problem="this site has no identity secret (identity_secret_env)"
        )
    if not isinstance(given, str) or not hmac.compare_digest(
        given.strip().lower().encode(), sign(secret, user_id).encode()
    ):
        return Identity(False, name=name, problem="user hash does not match the user id")
    return Identity(True, shop_user_id=user_id, name=name)
