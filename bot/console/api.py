"""The agent API (docs/agent-api.md): sign-in, the inbox, history, and the moves and messages
of people. The console uses it with a session cookie; a shop's tools with a Bearer token."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import structlog
from aiohttp import web

from bot import metrics
from bot.console.auth import COOKIE, Auth, set_session_cookie
from bot.console.events import stream_console_events
from bot.pipeline import Pipeline
from bot.settings import ConsoleSettings
from channels.base import ConversationEvent, UnknownConversation
from channels.http import ApiError, read_json
from orchestration.language import pick
from storage import agents, inbox, routing_examples, webhook_log
from storage.handoff import HUMAN, RESOLVED, OwnerRefused
from storage.rows import AgentRow

log = structlog.get_logger(__name__)

PREFIX = "/api/v1/agent"
GAUGE_EVERY_S = 15.0
_ACTIONS = ("claim", "assign", "unassign", "resolve", "handback")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AgentApi:
    def __init__(self, pipeline: Pipeline, settings: ConsoleSettings) -> None:
        self.pipeline = pipeline
        self.db = pipeline.parts.db
        self.auth = Auth(self.db)
        self.settings = settings

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_post(f"{PREFIX}/session", self.sign_in)
        r.add_get(f"{PREFIX}/session", self._agent(self.session))
        r.add_delete(f"{PREFIX}/session", self._agent(self.sign_out))
        r.add_get(f"{PREFIX}/agents", self._agent(self.team))
        r.add_get(f"{PREFIX}/canned", self._agent(self.canned))
        r.add_get(f"{PREFIX}/report", self._agent(self.report))
        r.add_get(f"{PREFIX}/events", self._agent(self.events))
        r.add_get(f"{PREFIX}/webhooks/deliveries", self._agent(self.deliveries))
        r.add_get(f"{PREFIX}/conversations", self._agent(self.conversations))
        r.add_get(f"{PREFIX}/conversations/{{id}}", self._agent(self.conversation))
        r.add_get(f"{PREFIX}/conversations/{{id}}/messages", self._agent(self.messages))
        r.add_post(f"{PREFIX}/conversations/{{id}}/reply", self._agent(self.reply))
        r.add_post(f"{PREFIX}/conversations/{{id}}/notes", self._agent(self.note))
        r.add_post(f"{PREFIX}/conversations/{{id}}/suggest", self._agent(self.suggest))
        r.add_post(f"{PREFIX}/conversations/{{id}}/typing", self._agent(self.typing))
        r.add_post(f"{PREFIX}/conversations/{{id}}/label", self._agent(self.label))
        for action in _ACTIONS:
            r.add_post(
                f"{PREFIX}/conversations/{{id}}/{action}", self._agent(partial(self.move, action))
            )

    def _agent(
        self, handler: Callable[[web.Request, AgentRow, str | None], Awaitable[Any]]
    ) -> Handler:
        """Only a signed-in agent (session + CSRF for changes, or a token) gets through."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            agent, csrf = await self.auth.agent(request)
            result: web.StreamResponse = await handler(request, agent, csrf)
            return result

        return guarded

    # -- session -----------------------------------------------------------------------------

    async def sign_in(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        email, password = body.get("email"), body.get("password")
        if not isinstance(email, str) or not isinstance(password, str) or not email:
            raise ApiError(400, "missing_fields", 'send {"email": ..., "password": ...}')
        agent, session, csrf = await self.auth.sign_in(request, email, password)
        resp = web.json_response({"agent": agent.as_json(), "csrf_token": csrf})
        set_session_cookie(resp, request, session)
        return resp

    async def session(
        self, request: web.Request, agent: AgentRow, csrf: str | None
    ) -> web.Response:
        return web.json_response({"agent": agent.as_json(), "csrf_token": csrf})

    async def sign_out(
        self, request: web.Request, agent: AgentRow, csrf: str | None
    ) -> web.Response:
        await self.auth.sign_out(request)
        resp = web.json_response({"signed_out": True})
        resp.del_cookie(COOKIE, path="/")
        return resp

    async def team(self, request: web.Request, agent: AgentRow, csrf: str | None) -> web.Response:
        team = await self.db.read(agents.list_agents)
        return web.json_response({"agents": [a.as_json() for a in team if a.active]})

    async def canned(self, request: web.Request, agent: AgentRow, csrf: str | None) -> web.Response:
        """Saved answers whose shortcut starts with `q`, in `language` (or any), with the
        placeholders of `conversation_id` filled in."""
        q = request.query.get("q", "").lstrip("/").lower()
        language = request.query.get("language", "")
        values = {"name": "", "order_id": ""}
        if "conversation_id" in request.query:
            conv = await self._one(_id(request, "conversation_id"))
            values["name"] = conv["contact"]["name"] or ""
            card = (conv.get("handoff") or {}).get("card") or {}
            values["order_id"] = (card.get("order_ids") or [""])[-1]
        found = [
            {
                "shortcut": c.shortcut,
                "language": c.language,
                "text": _fill(c.text, values),
            }
            for c in self.settings.canned_replies
            if c.shortcut.lower().startswith(q)
            and (not language or c.language in (language, "any"))
        ]
        return web.json_response({"canned": found})

    async def report(self, request: web.Request, agent: AgentRow, csrf: str | None) -> web.Response:
        days = _int(request, "days", 7, 1, 366)
        since = datetime.now(UTC) - timedelta(days=days)
        rows = await self.db.read(partial(inbox.report, since=since))
        return web.json_response({"since": since.isoformat(), "days": rows})

    async def watch_gauges(self) -> None:
        """Keep the inbox gauges of /metrics fresh (every process reads the database)."""
        while True:
            since = datetime.now(UTC) - timedelta(days=1)
            try:
                waiting, rating = await self.db.read(partial(inbox.gauges, since=since))
                metrics.WAITING.set(waiting)
                if rating is not None:
                    metrics.SATISFACTION.set(rating)
            except Exception:
                log.exception("console_gauges_failed")
            await asyncio.sleep(GAUGE_EVERY_S)

    async def events(
        self, request: web.Request, agent: AgentRow, csrf: str | None
    ) -> web.StreamResponse:
        return await stream_console_events(request, self.pipeline.parts.hub)

    async def deliveries(
        self, request: web.Request, agent: AgentRow, csrf: str | None
    ) -> web.Response:
        if agent.role != "admin":
            raise ApiError(403, "not_allowed", "the webhook log is for admins")
        rows = await self.db.read(
            partial(webhook_log.recent, limit=_int(request, "limit", 100, 1, 1000))
        )
        return web.json_response({"deliveries": rows})

    # -- reading -----------------------------------------------------------------------------

    async def conversations(
        self, request: web.Request, agent: AgentRow, csrf: str | None
    ) -> web.Response:
        view = request.query.get("view", "open")
        if view not in inbox.VIEWS:
            raise ApiError(400, "bad_view", f"view must be one of {', '.join(inbox.VIEWS)}")
        rows = await self.db.read(
            partial(
                inbox.conversations,
                view=view,
                agent_id=agent.id,
                channel=request.query.get("channel") or None,
                account=request.query.get("account") or None,
                limit=_int(request, "limit", 50, 1, 200),
            )
        )
        return web.json_response({"conversations": [self._flag(c) for c in rows]})

    async def conversation(
        self, request: web.Request, agent: AgentRow, csrf: str | None
    ) -> web.Response:
        return web.json_response(await self._one(_id(request)))

    async def messages(
        self, request: web.Request, agent: AgentRow, csrf: str | None
    ) -> web.Response:
        cid = _id(request)
        await self._one(cid)
        before = request.query.get("before")
        items = await self.db.read(
            partial(
                inbox.history,
                conversation_id=cid,
                before_seq=_int(request, "before", 0, 1, 2**62) if before else None,
                limit=_int(request, "limit", 50, 1, 200),
            )
        )
        return web.json_response({"messages": items})

    # -- acting ------------------------------------------------------------------------------

    async def move(
        self, action: str, request: web.Request, agent: AgentRow, csrf: str | None
    ) -> web.Response:
        cid = _id(request)
        target: int | None = None
        if action == "assign":
            body = await read_json(request)
            target = body.get("agent_id")
            if not isinstance(target, int) or isinstance(target, bool):
                raise ApiError(400, "missing_fields", 'send {"agent_id": <an agent\'s id>}')
            found = await self.db.read(partial(agents.get_agent, agent_id=target))
            if found is None or not found.active:
                raise ApiError(404, "unknown_agent", f"no active agent has id {target}")
        try:
            moved = await self.pipeline.host.change_owner(cid, action, agent, target)
        except UnknownConversation as e:
            raise _not_found(cid) from e
        except OwnerRefused as e:
            raise ApiError(
                409 if e.code in ("owned_by_other", "resolved") else 403, e.code, e.message
            ) from e
        conv = moved.conversation
        if action == "resolve" and moved.changed:
            if conv.channel in self.settings.satisfaction_channels:
                last = await self.db.write(partial(inbox.ask_satisfaction, conversation_id=cid))
                s = self.settings
                question = pick(last, s.satisfaction_question, s.satisfaction_question_zh)
                await self.pipeline.host.send_message(cid, question, sender="system")
        return web.json_response(await self._one(cid))

    async def reply(self, request: web.Request, agent: AgentRow, csrf: str | None) -> web.Response:
        cid = _id(request)
        text = await self._text(request)
        conv = await self._one(cid)
        if conv["owner"] == RESOLVED:
            raise ApiError(
                409, "resolved", "the conversation is resolved; the shopper writes first"
            )
        if conv["owner"] != HUMAN or conv["assigned_agent_id"] != agent.id:
            raise ApiError(409, "not_yours", "claim the conversation before replying")
        asked = await self.db.read(partial(inbox.waiting_for_first_reply, conversation_id=cid))
        sent = await self.pipeline.host.send_message(cid, text, sender="agent", agent_id=agent.id)
        if asked is not None:
            metrics.FIRST_HUMAN_REPLY.observe((datetime.now(UTC) - asked).total_seconds())
        return web.json_response({**sent.as_json(), "agent_id": agent.id})

    async def note(self, request: web.Request, agent: AgentRow, csrf: str | None) -> web.Response:
        cid = _id(request)
        text = await self._text(request)
        await self._one(cid)
        note = await self.db.write(
            partial(inbox.add_note, conversation_id=cid, agent_id=agent.id, text=text)
        )
        self.pipeline.parts.hub.announce(ConversationEvent(cid, "note", 0, None, note))
        return web.json_response(note)

    async def typing(self, request: web.Request, agent: AgentRow, csrf: str | None) -> web.Response:
        cid = _id(request)
        conv = await self._one(cid)
        if conv["owner"] != HUMAN or conv["assigned_agent_id"] != agent.id:
            raise ApiError(409, "not_yours", "claim the conversation before replying")
        await self.pipeline.host.agent_typing(cid)
        return web.json_response({"typing": True})

    async def suggest(
        self, request: web.Request, agent: AgentRow, csrf: str | None
    ) -> web.Response:
        cid = _id(request)
        await self._one(cid)
        text = await self.pipeline.worker.draft(cid)
        if text is None:
            raise ApiError(409, "nothing_to_answer", "the shopper has not written anything yet")
        return web.json_response({"text": text})

    async def label(self, request: web.Request, agent: AgentRow, csrf: str | None) -> web.Response:
        """An agent's routing of one shopper message: stored for `swarmdesk routing train`."""
        cid = _id(request)
        body = await read_json(request)
        seq, intents = body.get("seq"), body.get("intents")
        tier, escalate = body.get("tier"), body.get("escalate")
        known = self.pipeline.worker.orchestrator.router.labels
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ApiError(400, "missing_fields", 'send {"seq": <the message\'s seq>, ...}')
        if (
            not isinstance(intents, list)
            or not 1 <= len(intents) <= 3
            or any(i not in known for i in intents)
        ):
            raise ApiError(
                400, "bad_intents", f"'intents': 1 to 3 of {', '.join(known)}, primary first"
            )
        if tier not in (None, "cheap", "premium"):
            raise ApiError(400, "bad_tier", "'tier': cheap or premium (or leave it out)")
        if escalate is not None and not isinstance(escalate, bool):
            raise ApiError(400, "bad_escalate", "'escalate': true or false (or leave it out)")
        await self._one(cid)
        try:
            labeled = await self.db.write(
                partial(
                    routing_examples.record_label,
                    conversation_id=cid,
                    seq=seq,
                    intents=intents,
                    tier=tier,
                    escalate=escalate,
                    agent_id=agent.id,
                )
            )
        except routing_examples.MessageNotLabelable as e:
            raise ApiError(404, "unknown_message", str(e)) from e
        return web.json_response(
            {
                "conversation_id": cid,
                "seq": labeled.seq,
                "text": labeled.text,
                "intents": labeled.intents,
                "tier": labeled.tier,
                "escalate": labeled.escalate,
            }
        )

    # -- helpers -----------------------------------------------------------------------------

    async def _one(self, cid: int) -> dict[str, Any]:
        found = await self.db.read(partial(inbox.conversation, conversation_id=cid))
        if found is None:
            raise _not_found(cid)
        return self._flag(found)

    def _flag(self, conv: dict[str, Any]) -> dict[str, Any]:
        waited = conv.get("waiting_seconds")
        conv["overdue"] = waited is not None and waited > self.settings.waiting_alert_seconds
        return conv

    async def _text(self, request: web.Request) -> str:
        body = await read_json(request)
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "empty", 'send {"text": "..."} with something in it')
        if len(text) > self.settings.max_reply_chars:
            raise ApiError(
                413, "too_long", f"at most {self.settings.max_reply_chars} characters, please"
            )
        return text.strip()


def _id(request: web.Request, name: str = "id") -> int:
    raw = request.match_info.get(name) or request.query.get(name, "")
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(404, "not_found", f"no conversation {raw!r}")
    return int(raw)


def _fill(text: str, values: dict[str, str]) -> str:
    # Only the known placeholders: other braces in a saved answer stay as written.
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _not_found(cid: int) -> ApiError:
    return ApiError(404, "not_found", f"no conversation {cid}")


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"bad_{name}", f"{name} must be a whole number from {low} to {high}")
    return int(raw)
