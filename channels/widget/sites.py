"""Which site a request is for, and whether the page that sent it may use that site key."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from channels.http import ApiError
from channels.widget.config import SELF_ORIGIN, SiteSettings


@dataclass(frozen=True, slots=True)
class Site:
    settings: SiteSettings
    secret: str | None  # the identity HMAC key, read from the environment at start

    @property
    def key(self) -> str:
        return self.settings.key

    def allows(self, origin: str | None, request: web.Request) -> bool:
        allowed = self.settings.allowed_origins
        if origin is None:
            # Browsers omit Origin on same-origin GETs (EventSource on the demo page).
            if SELF_ORIGIN not in allowed:
                return False
            fetch_site = request.headers.get("Sec-Fetch-Site")
            if fetch_site is not None:
                return fetch_site == "same-origin"
            return _same_host_referer(request)
        origin = origin.rstrip("/").lower()
        if SELF_ORIGIN in allowed and urlsplit(origin).netloc == request.host.lower():
            return True
        for pattern in allowed:
            if pattern == origin:
                return True
            if "://*." in pattern:
                scheme, _, suffix = pattern.partition("://*")
                if origin.startswith(scheme + "://") and origin.endswith(suffix):
                    return True
        return False


def _same_host_referer(request: web.Request) -> bool:
    referer = request.headers.get("Referer")
    return referer is not None and urlsplit(referer).netloc.lower() == request.host.lower()


class Sites:
    def __init__(self, sites: list[SiteSettings], ephemeral_secret_for: str | None = None) -> None:
        """`ephemeral_secret_for`: a site (the demo page's) that signs its visitors in with a
        key made for this process when the configuration names none."""
        self._sites: dict[str, Site] = {}
        for s in sites:
            secret: str | None = None
            if s.key == ephemeral_secret_for and not s.identity_secret_env:
                secret = secrets.token_hex(32)
            if s.identity_secret_env:
                secret = os.environ.get(s.identity_secret_env) or None
                if secret is None:
                    raise RuntimeError(
                        f"channels.widget.sites[{s.key}]: set {s.identity_secret_env} (the "
                        "HMAC key for verified shop user ids) or remove identity_secret_env"
                    )
            self._sites[s.key] = Site(s, secret)

    def get(self, key: str) -> Site | None:
        return self._sites.get(key)

    def resolve(self, request: web.Request, key: str | None = None) -> Site:
        """The site named by `?site=` (or `key`), refused with a clear error if unknown or if
        the requesting page's origin is not allowed to use it."""
        key = key if key is not None else request.query.get("site", "")
        if not key:
            raise ApiError(400, "missing_site", "name the site key: ?site=YOUR_SITE_KEY")
        site = self._sites.get(key)
        if site is None:
            raise ApiError(
                404,
                "unknown_site",
                f"no widget site with key '{key}'; check data-site in the script tag "
                "against channels.widget.sites in swarmdesk.yaml",
            )
        origin = request.headers.get("Origin")
        if not site.allows(origin, request):
            shown = origin or "(no Origin header)"
            raise ApiError(
                403,
                "origin_not_allowed",
                f"pages from {shown} may not use site '{key}'; add the origin to "
                f"channels.widget.sites[{key}].allowed_origins",
            )
        return site


def cors_headers(request: web.Request) -> dict[str, str]:
    """Let the embedding page read our answers (errors included, so it can say why)."""
    origin = request.headers.get("Origin")
    if not origin:
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Headers": "Content-Type, X-Widget-Token",
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }
