"""The demo or a real deployment: what a real one must not carry over from the demo.

On the embedded defaults (loopback, no providers configured) the model simulator, the demo
shop, its tools, the demo page and the built-in FAQ answers make a working demo. Once the
service listens beyond loopback or names a provider it is taken for a real deployment, where
each of them would mislead real shoppers: an answer from the simulator, orders of a shop that
does not exist, policy texts (free shipping over 99, 7-day returns, opening hours) sent
without any model call. Each is then a start-up error, unless the shop names it in
`demo.allow`; keys and tiers must all be usable. `swarmdesk config check` reports the same.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from channels.peers import loopback
from orchestration.routing.config import builtin_data

if TYPE_CHECKING:
    from bot.settings import Settings

DEMO_SHOP_PREFIX = "/demo-shop/"


def is_embedded_demo(settings: Settings) -> bool:
    return loopback(settings.server.host) and not settings.providers


def problems(settings: Settings) -> list[str]:
    """Why this configuration may not serve real shoppers (empty: it may, or it is the demo)."""
    out: list[str] = []
    env = settings.metrics.token_env
    if env and not os.environ.get(env):
        out.append(f"metrics.token_env: {env} is not set; set it, or remove token_env")
    if is_embedded_demo(settings):
        return out
    allow = set(settings.demo.allow)
    usable = {p.name for p in settings.live_providers()}
    for p in settings.providers:
        if p.name not in usable:
            out.append(
                f"providers[{p.name}]: {p.api_key_env} is not set; set it, or remove the provider"
            )
    for tier, dead in unusable_tier_models(settings).items():
        out.append(f"tiers.{tier}: {', '.join(dead)} cannot answer (no key for its provider)")
    if not usable and "simulator" not in allow:
        out.append(
            "no provider is usable: every shopper would be answered by the built-in model "
            "simulator; configure a provider with its key (or demo.allow: [simulator])"
        )
    for part, text in demo_parts_on(settings).items():
        if part not in allow:
            out.append(f"{text} (or keep it on purpose: demo.allow: [{part}])")
    return out


def unusable_tier_models(settings: Settings) -> dict[str, list[str]]:
    """tier -> its 'provider/model' entries whose provider has no key."""
    usable = {p.name for p in settings.live_providers()}
    out: dict[str, list[str]] = {}
    for tier, chain in settings.tiers.items():
        dead = [ref for ref in chain if ref.split("/", 1)[0] not in usable]
        if dead:
            out[tier] = dead
    return out


def demo_parts_on(settings: Settings) -> dict[str, str]:
    """Demo parts this configuration serves (simulator aside), with what to do instead."""
    on: dict[str, str] = {}
    if settings.demo_shop.enabled:
        on["demo_shop"] = (
            "demo_shop.enabled: the sample shop backend (orders, refunds) is served under "
            "/demo-shop; set demo_shop.enabled: false"
        )
    demo_tools = [t.name for t in settings.tools if t.url.startswith(DEMO_SHOP_PREFIX)]
    if demo_tools:
        on["demo_tools"] = (
            f"tools: {', '.join(demo_tools)} call the demo shop; list your shop's tools "
            "under tools:"
        )
    widget = settings.channels.widget
    if (
        widget.enabled
        and widget.demo_site is not None
        and any(s.key == widget.demo_site for s in widget.sites)
    ):
        on["demo_site"] = (
            "channels.widget.demo_site: the demo shop page is served at / and signs its "
            "visitors in as a demo shopper; set demo_site: null"
        )
    faq = builtin_faq_in_use(settings)
    if faq:
        on["builtin_faq"] = (
            f"routing.faq: the built-in answers {', '.join(faq)} read like a real shop's "
            "policy and go out without a model call; give yours under routing.faq with the "
            "same names, or disable them with enabled: false"
        )
    return on


def builtin_faq_in_use(settings: Settings) -> list[str]:
    """Names of built-in FAQ entries the configuration neither replaced nor disabled."""
    if not settings.routing.builtin:
        return []
    own = {f.name for f in settings.routing.faq}
    return [f.name for f in builtin_data().faq if f.enabled and f.name not in own]


def warnings(settings: Settings) -> list[str]:
    """Loud notes for a service reachable beyond this machine."""
    if loopback(settings.server.host):
        return []
    out = [
        f"{part} is on while listening on {settings.server.host}: {text}"
        for part, text in demo_parts_on(settings).items()
    ]
    if settings.uses_simulator():
        out.append(f"the model simulator answers while listening on {settings.server.host}")
    if metrics_token(settings) is None:
        out.append(
            f"/metrics is open to anyone who reaches {settings.server.host}; set "
            "metrics.token_env (a bearer token) or block it at your proxy"
        )
    return out


def metrics_token(settings: Settings) -> str | None:
    env = settings.metrics.token_env
    return (os.environ.get(env) or None) if env else None
