"""Rate limits of the widget: token buckets per visitor and per IP address, daily upload
quotas, and a cap on open connections per IP. `WidgetLimits` holds them in this process;
with several processes `SharedWidgetLimits` (shared_limits.py) holds them in Redis."""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from dataclasses import dataclass

from aiohttp import web

from channels.widget.config import AttachmentSettings, RateLimitSettings


class KeyedBuckets:
    """A token bucket per key: `per_period` tokens (messages, or bytes of uploads) per
    `period_s`, refilled continuously, burst = per_period."""

    def __init__(self, per_period: int, max_keys: int = 100_000, period_s: float = 60.0) -> None:
        self.capacity = float(per_period)
        self.rate = per_period / period_s
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.rate)

    def available(self, key: str, now: float | None = None) -> int:
        """Whole tokens there now."""
        return max(0, int(self._level(key, time.monotonic() if now is None else now)))

    def retry_after(self, key: str, now: float | None = None, amount: float = 1) -> float:
        """0 if `amount` tokens are there, else the seconds until they are."""
        now = time.monotonic() if now is None else now
        level = self._level(key, now)
        return 0.0 if level >= amount else (amount - level) / self.rate

    def take(self, key: str, now: float | None = None, amount: float = 1) -> None:
        now = time.monotonic() if now is None else now
        if len(self._buckets) >= self.max_keys:
            self._prune(now)
        self._buckets[key] = (self._level(key, now) - amount, now)

    def _prune(self, now: float) -> None:
        """Forget full buckets: a key nobody used for a while is as good as new."""
        full = [k for k in self._buckets if self._level(k, now) >= self.capacity]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:  # all busy: drop the oldest half
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for k in oldest[: len(oldest) // 2]:
                del self._buckets[k]


class ConnectionCounter:
    def __init__(self, per_ip: int) -> None:
        self.per_ip = per_ip
        self._open: Counter[str] = Counter()

    def acquire(self, ip: str) -> bool:
        if self._open[ip] >= self.per_ip:
            return False
        self._open[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self._open[ip] -= 1
        if self._open[ip] <= 0:
            del self._open[ip]

    @property
    def total(self) -> int:
        return sum(self._open.values())


@dataclass(frozen=True, slots=True)
class Seat:
    """One open connection counted against its address (released when it closes)."""

    ip: str
    claim: str | None = None  # its claim in Redis; None: counted in this process


class WidgetLimits:
    """The widget's limits in this process. The channel asks `*_wait` before it accepts
    something and tells `*_taken` once it did (a refused message costs nothing)."""

    def __init__(self, rl: RateLimitSettings, att: AttachmentSettings) -> None:
        self.visitor = KeyedBuckets(rl.visitor_messages_per_minute)
        self.ip = KeyedBuckets(rl.ip_messages_per_minute)
        self.connections = ConnectionCounter(rl.ip_connections)
        day = 24 * 3600.0
        self.visitor_bytes = KeyedBuckets(att.visitor_bytes_per_day, period_s=day)
        self.site_bytes = KeyedBuckets(att.site_bytes_per_day, period_s=day)

    @property
    def per_ip(self) -> int:
        return self.connections.per_ip

    async def message_wait(self, visitor: str, ip: str) -> float:
        """0.0 if the visitor may send a message now, else the seconds to wait."""
        return max(self.visitor.retry_after(visitor), self.ip.retry_after(ip))

    async def message_taken(self, visitor: str, ip: str) -> None:
        self.visitor.take(visitor)
        self.ip.take(ip)

    async def upload_wait(self, ip: str) -> float:
        return self.ip.retry_after(ip)

    async def upload_taken(self, ip: str) -> None:
        self.ip.take(ip)

    async def upload_room(self, visitor: str, site: str) -> int:
        """Bytes the visitor's and the site's daily upload quotas have left."""
        return min(self.visitor_bytes.available(visitor), self.site_bytes.available(site))

    async def uploaded(self, visitor: str, site: str, size: int) -> None:
        self.visitor_bytes.take(visitor, amount=size)
        self.site_bytes.take(site, amount=size)

    async def connect(self, ip: str) -> Seat | None:
        """A seat for one more open connection from `ip`, or None at the cap."""
        return Seat(ip) if self.connections.acquire(ip) else None

    async def disconnect(self, seat: Seat) -> None:
        self.connections.release(seat.ip)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def client_ip(request: web.Request, trust_forwarded_for: bool, proxy_hops: int = 1) -> str:
    """The address limits count against. Behind `proxy_hops` proxies of ours, each appends
    the address it saw to X-Forwarded-For, so the client is `proxy_hops` entries from the
    right; anything left of that the client wrote itself and could vary at will."""
    peer = request.remote or "unknown"
    if not trust_forwarded_for:
        return peer
    hops = [
        h.strip() for line in request.headers.getall("X-Forwarded-For", []) for h in line.split(",")
    ]
    hops = [h for h in hops if h]
    if not hops:
        return peer
    candidate = hops[-proxy_hops] if len(hops) >= proxy_hops else hops[0]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return peer  # not an address: no proxy of ours wrote that
