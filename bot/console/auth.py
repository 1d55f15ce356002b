"""Who is calling the agent API: a console session (an HttpOnly, SameSite=Strict cookie, with
a CSRF token for every change) or a personal API token (Bearer). Passwords are argon2
hashes; sign-in attempts are limited per e-mail address and per client address."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from collections import deque
from datetime import timedelta
from functools import partial

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerifyMismatchError

from channels.http import ApiError
from cluster.outage import Outage, RedisUnavailable
from cluster.redis import RedisParts
from cluster.window import SlidingWindows
from storage import agents
from storage.executor import Database
from storage.models import utcnow
from storage.rows import AgentRow

COOKIE = "swarmdesk_session"
SESSION_HOURS = 12
TOKEN_PREFIX = "sd_"
# Sign-in attempts: this many failures in the window lock the address (or the client) out.
WINDOW_S = 15 * 60
FAILURES_PER_EMAIL = 5
FAILURES_PER_CLIENT = 20

_hasher = PasswordHasher()
# Compared against when the address is unknown, so a wrong address costs as much time as a
# wrong password (no telling which addresses exist).
_DUMMY_HASH = _hasher.hash("not a password of anybody")


async def hash_password(password: str) -> str:
    # argon2 takes tens of milliseconds of CPU on purpose: not on the event loop.
    return await asyncio.to_thread(_hasher.hash, password)


async def password_matches(password_hash: str | None, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(password_hash or _DUMMY_HASH, password) and bool(password_hash)
        except (VerifyMismatchError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class SignInLimits:
    """Failed sign-ins per e-mail address and per client address, in this process."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}

    async def retry_after(self, email: str, client: str) -> int:
        """Seconds until `email` from `client` may try again (0: now)."""
        return self._retry_after(email, client)

    async def failed(self, email: str, client: str) -> None:
        self._failed(email, client)

    async def succeeded(self, email: str) -> None:
        self._failures.pop(f"e:{email}", None)

    def _retry_after(self, email: str, client: str) -> int:
        now = time.monotonic()
        waits = [
            self._wait(f"e:{email}", FAILURES_PER_EMAIL, now),
            self._wait(f"c:{client}", FAILURES_PER_CLIENT, now),
        ]
        return max(waits)

    def _failed(self, email: str, client: str) -> None:
        now = time.monotonic()
        for key in (f"e:{email}", f"c:{client}"):
            self._failures.setdefault(key, deque()).append(now)

    def _wait(self, key: str, limit: int, now: float) -> int:
        times = self._failures.get(key)
        if not times:
            return 0
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        if len(times) < limit:
            return 0
        return max(1, int(times[0] + WINDOW_S - now) + 1)


class SharedSignInLimits(SignInLimits):
    """The same limits across all processes (queue.backend: redis): failures counted in Redis,
    under hashed keys (no addresses stored there).

    While Redis is down each process limits on its own counts — kept alongside all the time —
    so an attacker gets at most the limit per process per window until Redis answers again
    (logged once per outage)."""

    def __init__(self, cluster: RedisParts) -> None:
        super().__init__()
        self._keys = cluster.keys
        self._windows = SlidingWindows(cluster.state)
        self.outage = Outage("sign-in limits")

    def _key(self, kind: str, value: str) -> str:
        return self._keys("signin", kind, secret_hash(value)[:32])

    async def retry_after(self, email: str, client: str) -> int:
        checks = [
            (self._key("e", email), FAILURES_PER_EMAIL, WINDOW_S),
            (self._key("c", client), FAILURES_PER_CLIENT, WINDOW_S),
        ]
        try:
            wait = await self.outage.call(self._windows.wait(checks))
        except RedisUnavailable:
            return self._retry_after(email, client)
        return max(1, int(wait) + 1) if wait > 0 else 0

    async def failed(self, email: str, client: str) -> None:
        self._failed(email, client)
        with contextlib.suppress(RedisUnavailable):
            await self.outage.call(
                self._windows.add([self._key("e", email), self._key("c", client)], WINDOW_S)
            )

    async def succeeded(self, email: str) -> None:
        await super().succeeded(email)
        with contextlib.suppress(RedisUnavailable):
            await self.outage.call(self._windows.clear(self._key("e", email)))


class Auth:
    def __init__(self, db: Database) -> None:
        self.db = db
        # Replaced by SharedSignInLimits in the distributed mode (bot/app.py).
        self.limits: SignInLimits = SignInLimits()

    async def sign_in(
        self, request: web.Request, email: str, password: str
    ) -> tuple[AgentRow, str, str]:
        """(agent, session secret for the cookie, CSRF token), or an ApiError."""
        email = email.strip().lower()
        client = request.remote or "?"
        wait = await self.limits.retry_after(email, client)
        if wait:
            raise ApiError(
                429,
                "too_many_attempts",
                f"too many failed sign-ins: try again in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        found = await self.db.read(partial(agents.agent_for_sign_in, email=email))
        agent, stored = found if found is not None else (None, None)
        ok = await password_matches(stored, password)
        if not ok or agent is None or not agent.active:
            await self.limits.failed(email, client)
            raise ApiError(401, "wrong_credentials", "the e-mail address or password is wrong")
        await self.limits.succeeded(email)
        session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        await self.db.write(
            partial(
                agents.add_credential,
                agent_id=agent.id,
                kind="session",
                secret_hash=secret_hash(session),
                csrf_token=csrf,
                expires_at=utcnow() + timedelta(hours=SESSION_HOURS),
            )
        )
        return agent, session, csrf

    async def sign_out(self, request: web.Request) -> None:
        session = request.cookies.get(COOKIE)
        if session:
            await self.db.write(partial(agents.delete_credential, secret_hash=secret_hash(session)))

    async def agent(self, request: web.Request) -> tuple[AgentRow, str | None]:
        """The calling agent (and the session's CSRF token; None for a token), or 401. A
        change made with a session must carry the CSRF token (403 otherwise)."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            kind, secret = "token", header.removeprefix("Bearer ").strip()
        else:
            kind, secret = "session", request.cookies.get(COOKIE, "")
        found = None
        if secret:
            found = await self.db.read(
                partial(
                    agents.agent_by_credential,
                    kind=kind,
                    secret_hash=secret_hash(secret),
                    now=utcnow(),
                )
            )
        if found is None:
            raise ApiError(401, "unauthenticated", "sign in at /console, or send a valid API token")
        agent, csrf = found
        if kind == "session" and request.method not in ("GET", "HEAD", "OPTIONS"):
            sent = request.headers.get("X-CSRF-Token", "")
            if not csrf or not hmac.compare_digest(sent, csrf):
                raise ApiError(403, "csrf", "send the X-CSRF-Token header from the session")
        return agent, csrf


def set_session_cookie(response: web.StreamResponse, request: web.Request, secret: str) -> None:
    response.set_cookie(
        COOKIE,
        secret,
        max_age=SESSION_HOURS * 3600,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
