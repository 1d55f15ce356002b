"""The `channels.widget` section of swarmdesk.yaml: the sites that embed the chat widget."""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from config_section import ConfigSection, matching

SELF_ORIGIN = "self"  # pages served by swarmdesk itself (the demo shop at /)
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_COLOUR_RE = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ImageKind = Literal["png", "jpeg", "gif", "webp"]
IMAGE_KINDS: tuple[ImageKind, ...] = ("png", "jpeg", "gif", "webp")
SiteKey = Annotated[str, matching(_KEY_RE, "use 1-64 letters, digits, '-' or '_'")]
HexColour = Annotated[str, matching(_COLOUR_RE, "use a hex colour like '#2563eb'")]
EnvName = Annotated[
    str, matching(_ENV_RE, "name an environment variable (the secret itself never goes here)")
]


def check_origin(value: str) -> str:
    """'https://shop.example.com', 'http://localhost:3000', 'https://*.example.com' or 'self'."""
    if value == SELF_ORIGIN:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"'{value}' is not an origin; write it like 'https://shop.example.com' "
            "(scheme and host, optional port), or 'self' for swarmdesk's own pages"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(
            f"'{value}': an origin has no path, query or user; use "
            f"'{parts.scheme}://{parts.netloc}'"
        )
    host = parts.netloc
    if ("*" in host and not host.startswith("*.")) or host.count("*") > 1:
        raise ValueError(f"'{value}': a wildcard may only start the host, as in https://*.shop.com")
    return f"{parts.scheme}://{host.lower()}"


class SiteSettings(ConfigSection):
    key: SiteKey = Field(description="public site key, in the script tag's data-site")
    name: str = "Shop"
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="origins whose pages may use this site key: 'https://shop.example.com', "
        "'https://*.example.com', or 'self' (pages served by swarmdesk)",
    )
    identity_secret_env: EnvName | None = Field(
        None,
        description="environment variable with the HMAC-SHA256 key for verified shop user ids",
    )
    title: dict[str, str] = Field(
        default_factory=lambda: {"en": "Customer service", "zh": "在线客服"}
    )
    greeting: dict[str, str] = Field(
        default_factory=lambda: {
            "en": "Hi! Ask me about orders, delivery, returns or our products.",
            "zh": "您好！订单、物流、退换货或商品问题，都可以问我。",
        }
    )
    quick_replies: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "en": ["Where is my order?", "How do I return an item?", "Talk to a person"],
            "zh": ["我的订单到哪了？", "怎么退货？", "转人工客服"],
        }
    )
    colour: HexColour = "#2563eb"
    position: Literal["right", "left"] = "right"
    locale: Literal["auto", "en", "zh"] = Field(
        "auto", description="auto: the page's lang attribute, else the browser's language"
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        return [check_origin(o.strip().rstrip("/")) for o in v]


def _demo_site() -> SiteSettings:
    return SiteSettings(
        key="demo",
        name="Northwind Goods",
        allowed_origins=[SELF_ORIGIN],
        title={"en": "Northwind Goods support", "zh": "Northwind 在线客服"},
        colour="#0f766e",
    )


class RateLimitSettings(ConfigSection):
    visitor_messages_per_minute: int = Field(20, ge=1)
    ip_messages_per_minute: int = Field(120, ge=1)
    ip_connections: int = Field(50, ge=1, description="open sockets/streams per IP address")
    trust_forwarded_for: bool = Field(
        False, description="take the client IP from X-Forwarded-For (behind your own proxy only)"
    )
    proxy_hops: int = Field(
        1,
        ge=1,
        le=10,
        description="with trust_forwarded_for: how many of your proxies add to X-Forwarded-For; "
        "the client is that many entries from the right (what is left of it, the client wrote)",
    )


class AttachmentSettings(ConfigSection):
    enabled: bool = True
    max_bytes: int = Field(5 * 1024 * 1024, gt=0, le=50 * 1024 * 1024)
    types: list[ImageKind] = Field(default_factory=lambda: list(IMAGE_KINDS))
    dir: str = Field("./swarmdesk-uploads/widget", description="where images are stored")
    visitor_bytes_per_day: int = Field(
        50 * 1024 * 1024, gt=0, description="upload quota of one visitor (refills over the day)"
    )
    site_bytes_per_day: int = Field(
        2 * 1024 * 1024 * 1024, gt=0, description="upload quota of one site, all its visitors"
    )
    orphan_seconds: int = Field(
        24 * 3600,
        ge=1,
        description="an upload no message attached by then is deleted (checked periodically)",
    )

    @model_validator(mode="after")
    def _quotas_fit_one_image(self) -> AttachmentSettings:
        for name in ("visitor_bytes_per_day", "site_bytes_per_day"):
            if getattr(self, name) < self.max_bytes:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) is below max_bytes ({self.max_bytes}): "
                    "an image of the largest allowed size could never be uploaded"
                )
        return self


class WidgetSettings(ConfigSection):
    enabled: bool = True
    sites: list[SiteSettings] = Field(default_factory=lambda: [_demo_site()])
    demo_site: str | None = Field(
        "demo", description="site key of the demo shop page served at /; null: no demo page"
    )
    demo_shopper: str | None = Field(
        "demo-shopper",
        max_length=128,
        description="shop user id the demo page signs its visitors in as (it owns the demo "
        "shop's orders ORD-1001...ORD-1008); null: demo visitors stay anonymous",
    )
    max_text_chars: int = Field(4000, ge=1, le=32000)
    max_frame_bytes: int = Field(
        32 * 1024, ge=1024, description="larger WebSocket frames get an error frame"
    )
    history_messages: int = Field(100, ge=1, description="messages shown when a page opens")
    heartbeat_seconds: float = Field(
        30.0, gt=0, description="WebSocket ping interval (keeps proxies from closing idle chats)"
    )
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    attachments: AttachmentSettings = Field(default_factory=AttachmentSettings)
    delta_timestamps: bool = Field(
        False, description="benchmarks: deltas carry the service's monotonic time of creation"
    )

    @model_validator(mode="after")
    def _check(self) -> WidgetSettings:
        keys = [s.key for s in self.sites]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"sites: duplicate site key(s) {dupes}; keys must be unique")
        if self.demo_site is not None:
            site = next((s for s in self.sites if s.key == self.demo_site), None)
            # The default names the built-in demo site: a config with its own sites simply
            # has no demo page; a demo_site set explicitly must exist.
            if site is None and self.enabled and "demo_site" in self.model_fields_set:
                raise ValueError(
                    f"demo_site: no site with key '{self.demo_site}' (known: {keys}); "
                    "name one, or set demo_site: null"
                )
            if site is not None and SELF_ORIGIN not in site.allowed_origins:
                raise ValueError(
                    f"demo_site: site '{site.key}' must list 'self' in allowed_origins "
                    "to be embedded in swarmdesk's own demo page"
                )
        return self
