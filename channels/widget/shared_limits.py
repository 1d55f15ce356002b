"""The widget's limits held in Redis, for several processes behind one load balancer: a
visitor or an address that spreads its messages or connections over the processes still
meets one limit.

A message check reserves its place at once (one round trip): a message refused afterwards
(an unknown attachment) has used it; `message_taken` has nothing left to do. Connections are
claims renewed while they stay open, so a process that dies frees its addresses' seats
within a lease.

While Redis cannot be reached the in-process `WidgetLimits` answers (logged once by
`Outage`): each process then enforces the limits on its own, so an address gets at most the
limit per process for the length of the outage.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from channels.widget.config import AttachmentSettings, RateLimitSettings
from channels.widget.limits import Seat, WidgetLimits
from cluster.limits import Rate, SharedLimits
from cluster.outage import Outage, RedisUnavailable
from cluster.quotas import Quota, SharedQuotas
from cluster.redis import RedisParts
from cluster.slots import SharedSlots

log = structlog.get_logger(__name__)

CONNECTION_LEASE_S = 60.0


class SharedWidgetLimits(WidgetLimits):
    def __init__(self, rl: RateLimitSettings, att: AttachmentSettings, cluster: RedisParts) -> None:
        super().__init__(rl, att)  # the fallback while Redis is away
        keys = cluster.keys
        day = 24 * 3600.0
        self._rl = rl
        self._keys = keys
        self._visitor_bytes = Quota(keys("widget", "vbytes"), att.visitor_bytes_per_day, day)
        self._site_bytes = Quota(keys("widget", "sbytes"), att.site_bytes_per_day, day)
        self._limits = SharedLimits(cluster.state)
        self._quotas = SharedQuotas(cluster.state)
        self._seats = SharedSlots(
            cluster.state, keys("widget", "conn"), rl.ip_connections, CONNECTION_LEASE_S
        )
        self.outage = Outage("widget_limits")
        self._renewer: asyncio.Task[None] | None = None

    def _ip_rate(self, ip: str) -> Rate:
        return Rate(self._keys("widget", "ip", ip), self._rl.ip_messages_per_minute, 60.0)

    async def _admit(self, rates: list[Rate]) -> float:
        got = await self.outage.call(
            self._limits.admit([(rate, 1) for rate in rates], max_wait=0.0)
        )
        return 0.0 if got.admitted else max(got.wait, 0.001)

    async def message_wait(self, visitor: str, ip: str) -> float:
        per_visitor = self._rl.visitor_messages_per_minute
        rates = [Rate(self._keys("widget", "visitor", visitor), per_visitor, 60.0)]
        try:
            return await self._admit([*rates, self._ip_rate(ip)])
        except RedisUnavailable:
            return await super().message_wait(visitor, ip)

    async def message_taken(self, visitor: str, ip: str) -> None:
        if self.outage.down:
            await super().message_taken(visitor, ip)  # the local check let it through

    async def upload_wait(self, ip: str) -> float:
        try:
            return await self._admit([self._ip_rate(ip)])
        except RedisUnavailable:
            return await super().upload_wait(ip)

    async def upload_taken(self, ip: str) -> None:
        if self.outage.down:
            await super().upload_taken(ip)

    async def upload_room(self, visitor: str, site: str) -> int:
        try:
            levels = await self.outage.call(
                self._quotas.left([(self._visitor_bytes, visitor), (self._site_bytes, site)])
            )
        except RedisUnavailable:
            return await super().upload_room(visitor, site)
        return max(0, int(min(levels)))

    async def uploaded(self, visitor: str, site: str, size: int) -> None:
        await super().uploaded(visitor, site, size)  # kept here too, for an outage to come
        with contextlib.suppress(RedisUnavailable):
            await self.outage.call(
                self._quotas.spend([(self._visitor_bytes, visitor), (self._site_bytes, site)], size)
            )

    async def connect(self, ip: str) -> Seat | None:
        try:
            claim = await self.outage.call(self._seats.claim(ip))
        except RedisUnavailable:
            return await super().connect(ip)
        return Seat(ip, claim) if claim is not None else None

    async def disconnect(self, seat: Seat) -> None:
        if seat.claim is None:
            await super().disconnect(seat)
            return
        try:
            await self.outage.call(self._seats.release(seat.claim))
        except RedisUnavailable:
            self._seats.forget(seat.claim)  # its lease runs out by itself

    async def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew(), name="widget-seat-leases")

    async def close(self) -> None:
        task, self._renewer = self._renewer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _renew(self) -> None:
        """Keep this process's open connections counted (and count them again after a Redis
        restart lost them)."""
        while True:
            await asyncio.sleep(self._seats.lease_s / 3)
            with contextlib.suppress(RedisUnavailable):
                await self.outage.call(self._seats.renew())

    @property
    def seats_held(self) -> int:
        return self._seats.held
