"""Real `swarmdesk serve` processes sharing one PostgreSQL database and one Redis, for the
multi-process tests of the distributed mode (queue.backend: redis).

`open_cluster` makes a fresh PostgreSQL database, the model simulator and the fake Telegram
and WeChat platforms (in the test's own process, so their records can be read directly),
writes one config for every process (API, widget, Telegram, WeChat OA), migrates once, and
yields a `Cluster` that starts, stops and kill -9s processes, talks to each channel of any
process as a platform or a browser would, and reads back what was stored and delivered.
`PgProxy` stands between the processes and PostgreSQL so a test can cut the database away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx

from bench.processes import ManagedProcess, clean_env, free_port, wait_ready
from bench.service_config import write_yaml
from bot.settings import Settings
from simulator.config import SimulatorConfig
from simulator.fakes.telegram_api import FakeBotApi, UpdateFactory
from simulator.fakes.wechat_api import FakeWechatApi, OfficialAccountClient, text_xml
from simulator.server import Simulator
from tests.conftest import PG_ADMIN_DSN, create_pg_database, drop_pg_database, simulator_models
from tests.support import API_KEY, SseEvent, eventually, sse_events
from tests.widget_support import WidgetSocket, socket_at

TG_TOKEN = "123456:CLUSTER-token_abc"
TG_BOT_ID = 123456
TG_USERNAME = "shop_cluster_bot"
TG_SECRET = "cluster-secret_1"
TG_PATH = "/telegram/default/webhook"
WX_SECRET = "cluster-app-secret"
# Two Official Accounts: `shop` answers passively when it can (4 s window); `busy` has a
# 1 s window, so slow answers go through the customer-service API and WeChat retries.
WX_ACCOUNTS = {"shop": ("wx_shop", "shop-token", 4.0), "busy": ("wx_busy", "busy-token", 1.0)}
SITE_ORIGIN = "http://shop.test"
FINAL_STATUSES = ("sent", "failed", "undeliverable")


def service_config(
    tmp: Path,
    *,
    db_url: str,
    redis_url: str,
    prefix: str,
    sim_url: str,
    telegram_url: str,
    wechat_url: str,
    **queue: Any,
) -> dict[str, Any]:
    """One config for every process: redis backend, PostgreSQL, four channels, the simulator
    as the only provider. `queue` adds to the queue section (lease_seconds, ...)."""
    official_accounts = [
        {
            "name": name,
            "path": f"/wechat/{name}",
            "appid": appid,
            "token": token,
            "secret_env": "WX_CLUSTER_SECRET",
            "passive_budget_seconds": budget,
        }
        for name, (appid, token, budget) in WX_ACCOUNTS.items()
    ]
    return {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_seconds": 3},
        "database": {"url": db_url, "migrate_on_start": False, "pool_size": 5},
        "log": {"format": "json", "level": "info"},
        "queue": {
            "backend": "redis",
            "url": redis_url,
            "key_prefix": prefix,
            "partitions": 8,
            "lease_seconds": 2.0,
            "sweep_seconds": 1.0,
            **queue,
        },
        **simulator_models(sim_url),
        "reply": {"turn_deadline_seconds": 15},
        # One specialist, no LLM routing, no demo shop (whose documents every process would
        # index at start): one model call per answer keeps the processes quick to start and
        # light on the machine's two cores.
        "routing": {"llm_below": 0},
        "specialists": [
            {
                "name": "general",
                "intents": ["other"],
                "timeout_seconds": 12,
                "system_prompt": "You are the shop's assistant. Answer briefly.",
            }
        ],
        "demo_shop": {"enabled": False},
        "demo": {"allow": ["demo_tools", "demo_site", "builtin_faq"]},
        "channels": {
            "api": {"enabled": True},
            "widget": {
                "enabled": True,
                "sites": [{"key": "shop", "name": "Test shop", "allowed_origins": [SITE_ORIGIN]}],
                "demo_site": None,
                "attachments": {"dir": str(tmp / "uploads")},
            },
            "telegram": {
                "enabled": True,
                "bots": [
                    {"account": "default", "api_base_url": telegram_url, "username": TG_USERNAME}
                ],
            },
            "wechat": {
                "enabled": True,
                "api_base_url": wechat_url,
                "official_accounts": official_accounts,
            },
        },
    }


SERVICE_ENV = {
    "SWARMDESK_API_KEY": API_KEY,
    "TELEGRAM_BOT_TOKEN": TG_TOKEN,
    "TELEGRAM_WEBHOOK_SECRET": TG_SECRET,
    "WX_CLUSTER_SECRET": WX_SECRET,
}


class PgProxy:
    """A TCP relay in front of PostgreSQL. `cut()` drops every open connection and closes
    each new one at once (what a database restart looks like to its clients); `restore()`
    relays again."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5432) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.down = False
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def cut(self) -> None:
        self.down = True
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    def restore(self) -> None:
        self.down = False

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_writer):
            w.transport.abort()
            self._open.discard(w)
        for task in pumps:
            task.cancel()
            self._tasks.discard(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()


@dataclass
class ServiceProcess:
    """One `swarmdesk serve` child on its own port."""

    name: str
    proc: ManagedProcess
    http: httpx.AsyncClient
    killed: bool = False

    @property
    def url(self) -> str:
        return self.proc.url

    async def metric(self, name: str) -> float:
        """The sum of a Prometheus metric's samples (all labels) on this process."""
        r = await self.http.get("/metrics")
        r.raise_for_status()
        total = 0.0
        for line in r.text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        """kill -9: no drain, no goodbye; its leases must expire."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.popen.send_signal(signal.SIGKILL)  # type: ignore[union-attr]

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait (without blocking the loop), then SIGKILL."""
        popen = self.proc.popen
        if popen is None:
            return None
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(popen.wait, grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    popen.kill()
                await asyncio.to_thread(popen.wait, 10)
        self.proc.stop()  # closes the log file; the process is gone already
        await self.http.aclose()
        return popen.returncode


@dataclass
class Row:
    """A stored message, as the tests look at it."""

    id: int
    conversation_id: int
    seq: int
    direction: str
    sender: str
    status: str
    reply_to_id: int | None
    external_id: str | None
    text: str


@dataclass
class Cluster:
    tmp: Path
    config_path: Path
    db: asyncpg.Pool
    sim: Simulator
    telegram: FakeBotApi
    wechat: FakeWechatApi
    procs: list[ServiceProcess] = field(default_factory=list)
    updates: UpdateFactory = field(default_factory=lambda: UpdateFactory(TG_BOT_ID, TG_USERNAME))
    _msg_ids: Iterator[int] = field(default_factory=lambda: itertools.count(7_000_000_000))

    # -- processes ----------------------------------------------------------------------------

    async def migrate(self) -> None:
        """`swarmdesk db upgrade` once, before any process starts (they don't migrate)."""
        child = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bot.cli", "--config", str(self.config_path)),
            *("db", "upgrade"),
            env=clean_env(SERVICE_ENV),
            cwd=self.tmp,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"db upgrade failed:\n{out.decode(errors='replace')}")

    async def start(self, count: int, *, balanced: bool = True) -> list[ServiceProcess]:
        """`count` more processes, each on a free port, ready (/readyz) when this returns, and
        with `balanced` holding their share of the work."""
        made: list[ServiceProcess] = []
        for _ in range(count):
            name = f"p{len(self.procs)}"
            port = free_port()
            proc = ManagedProcess(
                name,
                [
                    *(sys.executable, "-m", "bot.cli", "--config", str(self.config_path)),
                    *("serve", "--port", str(port)),
                ],
                self.tmp / f"{name}.log",
                env=clean_env(SERVICE_ENV),
                cwd=self.tmp,
                port=port,
                ready_path="/readyz",
            )
            proc.start()
            http = httpx.AsyncClient(base_url=proc.url, timeout=30)
            sp = ServiceProcess(name, proc, http)
            self.procs.append(sp)
            made.append(sp)
        async with aiohttp.ClientSession() as session:
            for sp in made:
                await wait_ready(session, sp.url + "/readyz", sp.proc, timeout_s=90)
        if balanced:
            await self.wait_balanced()
        return made

    async def wait_balanced(self) -> None:
        """Until every live process holds some work partitions (a process that joins takes
        its share from the others once they are idle; load started before that would all go
        to the first ones)."""

        async def probe() -> bool:
            held = [await p.metric("swarmdesk_work_partitions_held") for p in self.alive]
            return all(n >= 1 for n in held)

        await eventually(probe, timeout=30, every=0.2)

    @property
    def alive(self) -> list[ServiceProcess]:
        return [p for p in self.procs if not p.killed and p.proc.exited() is None]

    async def stop_all(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs), return_exceptions=True)

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {p.name} (exit {p.proc.exited()}) ---\n{p.proc.log_tail(lines)}"
            for p in self.procs
        )

    def proc(self, i: int) -> ServiceProcess:
        """The i-th live process, round robin (a load balancer's choice)."""
        live = self.alive
        return live[i % len(live)]

    # -- the channels, as platforms and browsers use them --------------------------------------

    async def api_post(
        self, proc: ServiceProcess, contact: str, text: str, client_id: str
    ) -> httpx.Response:
        return await proc.http.post(
            "/api/v1/messages",
            json={"contact_id": contact, "text": text, "client_message_id": client_id},
            headers={"X-Api-Key": API_KEY},
        )

    async def api_stream_until_final(
        self, proc: ServiceProcess, conversation_id: int, after: int, finals: int = 1
    ) -> list[SseEvent]:
        """Read a conversation's SSE stream on `proc` until `finals` answers arrived."""
        got: list[SseEvent] = []
        url = f"/api/v1/conversations/{conversation_id}/stream"
        headers = {"X-Api-Key": API_KEY}
        async with proc.http.stream("GET", url, headers=headers, params={"after": after}) as r:
            assert r.status_code == 200, r.status_code
            async for ev in sse_events(r):
                got.append(ev)
                if sum(e.event == "final" for e in got) >= finals:
                    break
        return got

    async def telegram_post(self, proc: ServiceProcess, update: dict[str, Any]) -> httpx.Response:
        return await proc.http.post(
            TG_PATH, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": TG_SECRET}
        )

    def wechat_client(self, proc: ServiceProcess, account: str = "shop") -> OfficialAccountClient:
        appid, token, _ = WX_ACCOUNTS[account]
        return OfficialAccountClient(proc.http, f"/wechat/{account}", token, appid=appid)

    def wechat_msg_id(self) -> str:
        return str(next(self._msg_ids))

    async def wechat_post(
        self, proc: ServiceProcess, openid: str, text: str, msg_id: str, account: str = "shop"
    ) -> httpx.Response:
        """WeChat posts the shopper's text (the window opens on the fake API first)."""
        self.wechat.user_wrote(openid)
        xml = text_xml(openid, text, msg_id)
        return await self.wechat_client(proc, account).post_xml(xml, timeout=10)

    @contextlib.asynccontextmanager
    async def widget(self, proc: ServiceProcess) -> AsyncIterator[WidgetSocket]:
        async with socket_at(proc.url, origin=SITE_ORIGIN) as sock:
            yield sock

    # -- what was stored ----------------------------------------------------------------------

    async def rows(self, conversation_ids: Iterable[int]) -> list[Row]:
        records = await self.db.fetch(
            "SELECT id, conversation_id, seq, direction, sender, status, reply_to_id, "
            "external_id, text FROM messages WHERE conversation_id = ANY($1::bigint[]) "
            "ORDER BY conversation_id, seq",
            list(conversation_ids),
        )
        return [Row(**dict(r)) for r in records]

    async def conversations(self, channel: str, chat_id: str) -> list[int]:
        records = await self.db.fetch(
            "SELECT id FROM conversations WHERE channel = $1 AND chat_id = $2 ORDER BY id",
            channel,
            chat_id,
        )
        return [int(r["id"]) for r in records]

    async def inbound_count(self, channel: str, external_id: str) -> int:
        n = await self.db.fetchval(
            "SELECT count(*) FROM messages WHERE channel = $1 AND external_id = $2 "
            "AND direction = 'in'",
            channel,
            external_id,
        )
        return int(n)

    async def answered_in_order(
        self, conversation_ids: Iterable[int], expected_inbound: int
    ) -> list[tuple[Row, Row]] | None:
        """(inbound, its answer) pairs once each of `expected_inbound` stored messages has one
        settled answer; None while any is still missing or being written.

        Fails at once when a message has two answers (a duplicate never goes away) or when
        answers come in another order than their messages."""
        rows = await self.rows(conversation_ids)
        inbound = [r for r in rows if r.direction == "in"]
        answers = [
            r
            for r in rows
            if r.direction == "out" and r.sender == "bot" and r.status != "abandoned"
        ]
        per_inbound = Counter(a.reply_to_id for a in answers)
        twice = {k: v for k, v in per_inbound.items() if v > 1}
        assert not twice, f"answered more than once: {twice}\n{_table(rows)}"
        if len(inbound) < expected_inbound or any(a.status not in FINAL_STATUSES for a in answers):
            return None
        if {a.reply_to_id for a in answers} != {m.id for m in inbound}:
            return None
        pairs: list[tuple[Row, Row]] = []
        for conv in sorted({m.conversation_id for m in inbound}):
            ins = [m for m in inbound if m.conversation_id == conv]
            outs = [a for a in answers if a.conversation_id == conv]
            assert [a.reply_to_id for a in outs] == [m.id for m in ins], (
                f"conversation {conv}: answers out of order\n{_table(rows)}"
            )
            pairs.extend(zip(ins, outs, strict=True))
        return pairs

    async def wait_answered(
        self, conversation_ids: Iterable[int], expected_inbound: int, timeout: float = 60
    ) -> list[tuple[Row, Row]]:
        ids = list(conversation_ids)
        try:
            return await eventually(
                lambda: self.answered_in_order(ids, expected_inbound), timeout=timeout, every=0.2
            )
        except AssertionError:
            rows = await self.rows(ids)
            raise AssertionError(
                f"not all {expected_inbound} messages answered once:\n{_table(rows)}\n"
                f"{self.log_tails()}"
            ) from None

    # -- what the platforms got ---------------------------------------------------------------

    def telegram_shown(self, chat_id: int) -> list[str]:
        """The final messages a Telegram chat shows (drafts are not messages)."""
        return [m.text for m in self.telegram.sent(chat_id)]

    def telegram_calls(self, chat_id: int) -> str:
        """What the fake Bot API got for one chat, for a failure's message."""
        calls = self.telegram.calls_to(chat_id)
        t0 = calls[0].at if calls else 0.0
        return "\n".join(
            f"  +{c.at - t0:6.2f}s {c.method} {c.status} {c.description[:40]} {c.text[:50]!r}"
            for c in calls
        )

    async def check_telegram(self, chat_id: int) -> None:
        """The chat shows each stored answer once, complete, in the order of its messages
        (drafts are not messages)."""
        pairs = await self.wait_answered(await self.conversations("telegram", str(chat_id)), 1)
        stored = [a.text for _, a in pairs]
        shown = self.telegram_shown(chat_id)
        assert all(a.status == "sent" for _, a in pairs) and shown == stored, (
            f"chat {chat_id}: shown {shown}\nstored {[(a.status, a.text) for _, a in pairs]}\n"
            f"calls:\n{self.telegram_calls(chat_id)}"
        )

    def wechat_api_texts(self, openid: str) -> list[str]:
        return self.wechat.texts(openid, "custom")


def _table(rows: Iterable[Row]) -> str:
    return "\n".join(
        f"  conv {r.conversation_id} seq {r.seq} id {r.id} {r.direction} {r.sender} "
        f"{r.status} reply_to={r.reply_to_id} ext={r.external_id} {r.text[:40]!r}"
        for r in rows
    )


def widget_final_ids(frames: Iterable[dict[str, Any]]) -> list[int]:
    """The messages the widget frames carried answers to, in order."""
    return [int(f["reply_to_id"]) for f in frames if f["type"] == "final"]


@contextlib.asynccontextmanager
async def open_cluster(
    tmp_path: Path,
    *,
    redis_url: str,
    prefix: str,
    db_proxy: PgProxy | None = None,
    simulator: SimulatorConfig | None = None,
    **queue: Any,
) -> AsyncIterator[Cluster]:
    """A fresh database (through `db_proxy` when given), the simulator, the fakes, the config;
    migrated, no process started yet. Everything is stopped and dropped afterwards."""
    name = await create_pg_database()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    direct = f"{base}/{name}"
    host_part = base.replace("postgresql://", "postgresql+asyncpg://", 1)
    if db_proxy is not None:
        host_part = host_part.replace("@127.0.0.1:5432", f"@127.0.0.1:{db_proxy.port}")
        assert str(db_proxy.port) in host_part, f"proxy only for 127.0.0.1:5432, not {base}"
    db_url = f"{host_part}/{name}"
    sim = Simulator(
        simulator or SimulatorConfig(first_token_ms=20, tokens_per_second=400, reply_tokens=12)
    )
    telegram = FakeBotApi(usernames={TG_TOKEN: TG_USERNAME})
    wechat = FakeWechatApi()
    for appid, _, _ in WX_ACCOUNTS.values():
        wechat.add_official_account(appid, WX_SECRET)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(drop_pg_database, name)
        await sim.start()
        stack.push_async_callback(sim.stop)
        await telegram.start()
        stack.push_async_callback(telegram.stop)
        await wechat.start()
        stack.push_async_callback(wechat.stop)
        db = await asyncpg.create_pool(direct, min_size=1, max_size=4)
        stack.push_async_callback(db.close)
        tmp = tmp_path / "cluster"
        tmp.mkdir()
        config = service_config(
            tmp,
            db_url=db_url,
            redis_url=redis_url,
            prefix=prefix,
            sim_url=sim.base_url,
            telegram_url=telegram.base_url or "",
            wechat_url=wechat.base_url,
            **queue,
        )
        Settings(**json.loads(json.dumps(config)))  # a config mistake fails here, clearly
        cluster = Cluster(
            tmp, write_yaml(tmp / "swarmdesk.yaml", config), db, sim, telegram, wechat
        )
        stack.push_async_callback(cluster.stop_all)
        await cluster.migrate()
        try:
            yield cluster
        except BaseException:
            print(cluster.log_tails(80))
            raise


def openid() -> str:
    return "o_" + secrets.token_hex(6)


async def deliver(
    post: Callable[[], Awaitable[httpx.Response]], *, timeout: float = 30
) -> httpx.Response:
    """Post until the service takes it (2xx), as a platform redelivers after a 5xx or a
    dropped connection; a 4xx is the caller's mistake and fails at once."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    last = "nothing yet"
    while loop.time() < end:
        try:
            r = await post()
        except httpx.TransportError as e:
            last = repr(e)
        else:
            if r.status_code < 300:
                return r
            assert r.status_code >= 500, f"refused for good: {r.status_code} {r.text[:300]}"
            last = f"{r.status_code} {r.text[:200]}"
        await asyncio.sleep(0.2)
    raise AssertionError(f"not taken within {timeout}s: {last}")
