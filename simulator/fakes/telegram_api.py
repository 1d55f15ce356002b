"""A fake Telegram Bot API server (aiohttp) for tests and benchmarks.

aiogram talks to it through `TelegramAPIServer.from_base(url)` exactly as it talks to
api.telegram.org: POST /bot<token>/<method> with form or JSON parameters. It enforces the rules
that shape swarmdesk's sink: 4,096 characters after entity parsing, HTML and MarkdownV2 that
parse, empty draft text refused, drafts only in private chats, "message is not modified",
unknown methods 404, and floods: more than `per_chat_per_second` calls to one chat within a
second get 429 with `retry_after`; a call during that pause is 429 again and recorded as a
violation. Every call is recorded (`calls`) for assertions. Faults can be queued
(`fail_next`). `UpdateFactory` builds the Updates Telegram would post to a webhook.

Standalone (benchmarks): `python -m simulator.fakes.telegram_api --port 8091`; GET /_fake/calls
returns the recorded calls as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from aiohttp import web

MAX_TEXT = 4096
_TOKEN_RE = re.compile(r"^(\d+):[A-Za-z0-9_-]+$")
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_ACTIONS = {
    "typing",
    "upload_photo",
    "record_video",
    "upload_video",
    "record_voice",
    "upload_voice",
    "upload_document",
    "choose_sticker",
    "find_location",
    "record_video_note",
    "upload_video_note",
}
_NO_CHAT_LIMIT = {"getme", "setwebhook", "deletewebhook", "getwebhookinfo", "getupdates"}


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class BadRequest(Exception):
    def __init__(self, description: str, status: int = 400, **parameters: Any) -> None:
        super().__init__(description)
        self.description = description
        self.status = status
        self.parameters = parameters


# --- entity parsing (what Telegram does with parse_mode) --------------------------------

_HTML_TAGS = {
    "b",
    "strong",
    "i",
    "em",
    "u",
    "ins",
    "s",
    "strike",
    "del",
    "span",
    "tg-spoiler",
    "a",
    "code",
    "pre",
    "blockquote",
    "tg-emoji",
    "tg-time",
}
_ENTITY_REF = re.compile(r"&(#\d+|#x[0-9a-fA-F]+|[A-Za-z]+);")


class _TelegramHtml(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.out: list[str] = []
        self.stack: list[tuple[str, int]] = []
        self.entities: list[tuple[str, int, int]] = []

    def _offset(self) -> int:
        return utf16_len("".join(self.out))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _HTML_TAGS:
            raise BadRequest(f'Bad Request: can\'t parse entities: Unsupported start tag "{tag}"')
        if tag == "a" and not dict(attrs).get("href"):
            raise BadRequest("Bad Request: can't parse entities: the link has no href")
        self.stack.append((tag, self._offset()))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1][0] != tag:
            raise BadRequest(f'Bad Request: can\'t parse entities: Unexpected end tag "{tag}"')
        name, start = self.stack.pop()
        self.entities.append((name, start, self._offset() - start))

    def handle_data(self, data: str) -> None:
        for ch in "<>&":
            if ch in data:
                raise BadRequest(
                    f"Bad Request: can't parse entities: unescaped '{ch}' in the text; "
                    "use &lt; &gt; &amp;"
                )
        self.out.append(data)

    def handle_entityref(self, name: str) -> None:
        known = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
        if name not in known:
            raise BadRequest(f"Bad Request: can't parse entities: Unsupported entity &{name};")
        self.out.append(known[name])

    def handle_charref(self, name: str) -> None:
        code = int(name[1:], 16) if name.lower().startswith("x") else int(name)
        self.out.append(chr(code))


def parse_html(text: str) -> tuple[str, list[tuple[str, int, int]]]:
    p = _TelegramHtml()
    # A bare '&' that starts no entity reference is an error on Telegram's side too.
    for m in re.finditer(r"&", text):
        if not _ENTITY_REF.match(text, m.start()):
            raise BadRequest("Bad Request: can't parse entities: unescaped '&'; use &amp;")
    p.feed(text)
    p.close()
    if p.stack:
        raise BadRequest(
            f"Bad Request: can't parse entities: Can't find end tag corresponding to start "
            f'tag "{p.stack[-1][0]}"'
        )
    return "".join(p.out), p.entities


_MD_RESERVED = set("_*[]()~`>#+-=|{}.!")


def parse_markdown_v2(text: str) -> tuple[str, list[tuple[str, int, int]]]:
    """Telegram's MarkdownV2: every reserved character outside an entity marker escaped."""
    out: list[str] = []
    entities: list[tuple[str, int, int]] = []
    open_: dict[str, int] = {}
    i, n = 0, len(text)

    def off() -> int:
        return utf16_len("".join(out))

    def toggle(name: str) -> None:
        if name in open_:
            entities.append((name, open_[name], off() - open_.pop(name)))
        else:
            open_[name] = off()

    while i < n:
        c = text[i]
        if c == "\r":
            i += 1
        elif c == "\\":
            if i + 1 >= n or not 1 <= ord(text[i + 1]) <= 126:
                raise BadRequest("Bad Request: can't parse entities: bad escape at the end")
            out.append(text[i + 1])
            i += 2
        elif text.startswith("```", i):
            end = text.find("```", i + 3)
            if end < 0:
                raise BadRequest("Bad Request: can't parse entities: Can't find end of pre")
            body = text[i + 3 : end]
            if "\n" in body:
                first, rest = body.split("\n", 1)
                body = rest if re.fullmatch(r"[\w+-]*", first) else body
            body = body.removesuffix("\n")  # the line break before the closing fence
            start = off()
            out.append(_md_unescape_code(body))
            entities.append(("pre", start, off() - start))
            i = end + 3
        elif c == "`":
            end = i + 1
            while end < n and text[end] != "`":
                end += 2 if text[end] == "\\" else 1
            if end >= n:
                raise BadRequest("Bad Request: can't parse entities: Can't find end of code")
            start = off()
            out.append(_md_unescape_code(text[i + 1 : end]))
            entities.append(("code", start, off() - start))
            i = end + 1
        elif text.startswith("||", i):
            toggle("spoiler")
            i += 2
        elif text.startswith("__", i):
            toggle("underline")
            i += 2
        elif c in "*_~":
            toggle({"*": "bold", "_": "italic", "~": "strikethrough"}[c])
            i += 1
        elif c == "[":
            toggle("text_link")
            i += 1
        elif c == "]" and "text_link" in open_:
            if not text.startswith("(", i + 1):
                raise BadRequest("Bad Request: can't parse entities: a link needs (url)")
            end = i + 2
            while end < n and text[end] != ")":
                end += 2 if text[end] == "\\" else 1
            if end >= n:
                raise BadRequest("Bad Request: can't parse entities: Can't find end of URL")
            toggle("text_link")
            i = end + 1
        elif c == ">" and (i == 0 or text[i - 1] == "\n"):
            i += 1  # a block quote line
        elif c in _MD_RESERVED:
            raise BadRequest(
                f"Bad Request: can't parse entities: Character '{c}' is reserved and must be "
                "escaped with the preceding '\\'"
            )
        else:
            out.append(c)
            i += 1
    if open_:
        raise BadRequest(
            f"Bad Request: can't parse entities: Can't find end of {next(iter(open_))} entity"
        )
    return "".join(out), entities


def _md_unescape_code(body: str) -> str:
    return re.sub(r"\\([\x01-\x7e])", r"\1", body)


def visible(text: str, parse_mode: str | None) -> tuple[str, list[tuple[str, int, int]]]:
    if not parse_mode:
        return text, []
    mode = parse_mode.lower()
    if mode == "html":
        return parse_html(text)
    if mode == "markdownv2":
        return parse_markdown_v2(text)
    if mode == "markdown":
        return text.replace("*", "").replace("_", "").replace("`", ""), []
    raise BadRequest(f"Bad Request: unsupported parse_mode {parse_mode!r}")


# --- records ----------------------------------------------------------------------------


@dataclass
class Call:
    method: str  # lower case
    token: str
    params: dict[str, Any]
    at: float  # time.monotonic() on arrival
    status: int = 200
    description: str = ""
    result: Any = None

    @property
    def chat_id(self) -> int | None:
        value = self.params.get("chat_id")
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def text(self) -> str:
        return str(self.params.get("text") or "")


@dataclass
class StoredMessage:
    chat_id: int
    message_id: int
    text: str  # visible text
    raw: str
    parse_mode: str | None
    entities: list[tuple[str, int, int]]
    reply_to: int | None = None
    deleted: bool = False
    edits: int = 0


@dataclass
class _Fault:
    method: str
    chat_id: int | None
    status: int
    description: str
    retry_after: int | None


@dataclass
class _Bot:
    token: str
    id: int
    username: str
    webhook: dict[str, Any] = field(default_factory=dict)
    updates: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False


class FakeBotApi:
    def __init__(
        self,
        *,
        per_chat_per_second: int = 5,
        retry_after: int = 1,
        drafts: bool = True,
        usernames: dict[str, str] | None = None,
    ) -> None:
        self.per_chat_per_second = per_chat_per_second
        self.retry_after = retry_after
        self.drafts = drafts
        self.usernames = dict(usernames or {})  # token -> username
        self.calls: list[Call] = []
        self.violations: list[str] = []
        self.messages: dict[tuple[int, int], StoredMessage] = {}
        self.draft_texts: dict[tuple[int, int], str] = {}
        self._faults: list[_Fault] = []
        self._windows: dict[tuple[str, int], deque[float]] = defaultdict(deque)
        self._paused_until: dict[tuple[str, int], float] = {}
        self._ids: dict[int, itertools.count[int]] = defaultdict(lambda: itertools.count(1))
        self._bots: dict[str, _Bot] = {}
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=50 * 2**20)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_get("/_fake/calls", self._export_calls)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound}"
        return self.base_url

    async def stop(self) -> None:
        for bot in self._bots.values():
            bot.closing = True
            bot.arrived.set()  # end long polls now
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- test controls -------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        *,
        chat_id: int | None = None,
        status: int = 429,
        retry_after: int | None = 1,
        description: str | None = None,
    ) -> None:
        """The next matching call fails like this (429 pauses the chat like a real flood)."""
        if description is None:
            description = (
                f"Too Many Requests: retry after {retry_after}"
                if status == 429
                else "Bad Request: injected failure"
            )
        self._faults.append(
            _Fault(
                method.lower(), chat_id, status, description, retry_after if status == 429 else None
            )
        )

    def push_update(self, token: str, update: dict[str, Any]) -> None:
        """Queue an update for getUpdates (long polling)."""
        bot = self._bot(token)
        bot.updates.append(update)
        bot.arrived.set()

    def calls_to(self, chat_id: int, method: str | None = None) -> list[Call]:
        m = method.lower() if method else None
        return [c for c in self.calls if c.chat_id == chat_id and (m is None or c.method == m)]

    def sent(self, chat_id: int) -> list[StoredMessage]:
        """Messages in the chat as the shopper sees them now, oldest first."""
        return [
            m
            for (c, _), m in sorted(self.messages.items(), key=lambda kv: kv[0][1])
            if c == chat_id and not m.deleted
        ]

    def drafts_to(self, chat_id: int) -> list[Call]:
        return [c for c in self.calls_to(chat_id, "sendMessageDraft") if c.ok]

    def webhook(self, token: str) -> dict[str, Any]:
        return dict(self._bot(token).webhook)

    # -- HTTP ----------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _export_calls(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        rows = [
            {
                "method": c.method,
                "chat_id": c.chat_id,
                "at": c.at,
                "status": c.status,
                "text_len": utf16_len(c.text),
                "description": c.description,
            }
            for c in self.calls[since:]
        ]
        return web.json_response({"calls": rows, "violations": self.violations})

    async def _handle(self, request: web.Request) -> web.Response:
        at = time.monotonic()
        token = request.match_info["token"]
        method = request.match_info["method"].lower()
        params = await _params(request)
        call = Call(method, token, params, at)
        self.calls.append(call)
        try:
            if not _TOKEN_RE.match(token) or (self.usernames and token not in self.usernames):
                raise BadRequest("Unauthorized", status=401)
            handler = getattr(self, f"_m_{method}", None)
            if handler is None:
                raise BadRequest("Not Found", status=404)
            self._limits(call)
            if method == "getupdates":
                result = await self._m_getupdates(call)
            else:
                result = handler(call)
        except BadRequest as e:
            call.status, call.description = e.status, e.description
            body: dict[str, Any] = {
                "ok": False,
                "error_code": e.status,
                "description": e.description,
            }
            if e.parameters:
                body["parameters"] = e.parameters
            return web.json_response(body, status=e.status)
        call.result = result
        return web.json_response({"ok": True, "result": result})

    def _limits(self, call: Call) -> None:
        """Injected faults first, then the per-chat flood rule."""
        chat = call.chat_id
        for i, f in enumerate(self._faults):
            if f.method == call.method and (f.chat_id is None or f.chat_id == chat):
                del self._faults[i]
                if f.retry_after is not None and chat is not None:
                    self._paused_until[(call.token, chat)] = call.at + f.retry_after
                params = {"retry_after": f.retry_after} if f.retry_after is not None else {}
                raise BadRequest(f.description, status=f.status, **params)
        if chat is None or call.method in _NO_CHAT_LIMIT:
            return
        key = (call.token, chat)
        paused = self._paused_until.get(key, 0.0)
        if call.at < paused:
            left = max(1, round(paused - call.at + 0.5))
            self.violations.append(
                f"{call.method} to chat {chat} {paused - call.at:.3f}s before retry_after ended"
            )
            raise BadRequest(f"Too Many Requests: retry after {left}", status=429, retry_after=left)
        window = self._windows[key]
        while window and call.at - window[0] >= 1.0:
            window.popleft()
        if len(window) >= self.per_chat_per_second:
            self._paused_until[key] = call.at + self.retry_after
            raise BadRequest(
                f"Too Many Requests: retry after {self.retry_after}",
                status=429,
                retry_after=self.retry_after,
            )
        window.append(call.at)

    # -- methods -------------------------------------------------------------------------

    def _bot(self, token: str) -> _Bot:
        bot = self._bots.get(token)
        if bot is None:
            m = _TOKEN_RE.match(token)
            bot_id = int(m.group(1)) if m else 0
            bot = _Bot(token, bot_id, self.usernames.get(token, f"shop{bot_id}_bot"))
            self._bots[token] = bot
        return bot

    def _bot_user(self, token: str) -> dict[str, Any]:
        bot = self._bot(token)
        return {"id": bot.id, "is_bot": True, "first_name": "Shop", "username": bot.username}

    def _m_getme(self, call: Call) -> Any:
        return self._bot_user(call.token)

    def _chat(self, call: Call) -> int:
        chat = call.chat_id
        if chat is None:
            raise BadRequest(
                "Bad Request: chat_id is empty"
                if "chat_id" not in call.params
                else "Bad Request: chat not found"
            )
        return chat

    def _text(
        self, call: Call, *, empty_ok: bool = False
    ) -> tuple[str, list[tuple[str, int, int]]]:
        raw = call.text
        shown, entities = visible(raw, call.params.get("parse_mode"))
        if not shown.strip() and not empty_ok:
            raise BadRequest("Bad Request: message text is empty")
        if utf16_len(shown) > MAX_TEXT:
            raise BadRequest("Bad Request: message is too long")
        return shown, entities

    def _message_json(self, call: Call, m: StoredMessage) -> dict[str, Any]:
        out: dict[str, Any] = {
            "message_id": m.message_id,
            "date": int(time.time()),
            "chat": {"id": m.chat_id, "type": "private" if m.chat_id > 0 else "supergroup"},
            "from": self._bot_user(call.token),
            "text": m.text,
        }
        if m.edits:
            out["edit_date"] = int(time.time())
        return out

    def _m_sendmessage(self, call: Call) -> Any:
        chat = self._chat(call)
        shown, entities = self._text(call)
        reply = call.params.get("reply_parameters") or {}
        mid = next(self._ids[chat])
        m = StoredMessage(
            chat,
            mid,
            shown,
            call.text,
            call.params.get("parse_mode"),
            entities,
            reply_to=(reply.get("message_id") if isinstance(reply, dict) else None)
            or call.params.get("reply_to_message_id"),
        )
        self.messages[(chat, mid)] = m
        return self._message_json(call, m)

    def _m_sendmessagedraft(self, call: Call) -> Any:
        if not self.drafts:
            raise BadRequest("Not Found", status=404)
        chat = self._chat(call)
        if chat <= 0:
            raise BadRequest("Bad Request: TEXTDRAFT_PEER_INVALID")
        draft_id = int(call.params.get("draft_id") or 0)
        if not draft_id:
            raise BadRequest("Bad Request: draft_id must be non-zero")
        if not call.text:
            raise BadRequest("Bad Request: text must be non-empty")
        shown, _ = self._text(call)
        self.draft_texts[(chat, draft_id)] = shown
        return True

    def _m_editmessagetext(self, call: Call) -> Any:
        chat = self._chat(call)
        mid = int(call.params.get("message_id") or 0)
        m = self.messages.get((chat, mid))
        if m is None or m.deleted:
            raise BadRequest("Bad Request: message to edit not found")
        shown, entities = self._text(call)
        if shown == m.text and entities == m.entities:
            raise BadRequest(
                "Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message"
            )
        m.text, m.entities, m.raw = shown, entities, call.text
        m.parse_mode = call.params.get("parse_mode")
        m.edits += 1
        return self._message_json(call, m)

    def _m_deletemessage(self, call: Call) -> Any:
        chat = self._chat(call)
        m = self.messages.get((chat, int(call.params.get("message_id") or 0)))
        if m is None or m.deleted:
            raise BadRequest("Bad Request: message to delete not found")
        m.deleted = True
        return True

    def _m_sendchataction(self, call: Call) -> Any:
        self._chat(call)
        if call.params.get("action") not in _ACTIONS:
            raise BadRequest("Bad Request: wrong parameter action in request")
        return True

    def _m_setwebhook(self, call: Call) -> Any:
        url = str(call.params.get("url") or "")
        if not url.startswith("https://"):
            raise BadRequest("Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
        secret = call.params.get("secret_token")
        if secret is not None and not _SECRET_RE.match(str(secret)):
            raise BadRequest("Bad Request: secret token contains unallowed characters")
        bot = self._bot(call.token)
        bot.webhook = {
            "url": url,
            "secret_token": secret,
            "allowed_updates": call.params.get("allowed_updates"),
            "max_connections": call.params.get("max_connections"),
        }
        if call.params.get("drop_pending_updates"):
            bot.updates.clear()
        return True

    def _m_deletewebhook(self, call: Call) -> Any:
        bot = self._bot(call.token)
        bot.webhook = {}
        if call.params.get("drop_pending_updates"):
            bot.updates.clear()
        return True

    def _m_getwebhookinfo(self, call: Call) -> Any:
        bot = self._bot(call.token)
        info: dict[str, Any] = {
            "url": bot.webhook.get("url", ""),
            "has_custom_certificate": False,
            "pending_update_count": len(bot.updates),
        }
        if bot.webhook.get("allowed_updates"):
            info["allowed_updates"] = bot.webhook["allowed_updates"]
        return info

    async def _m_getupdates(self, call: Call) -> Any:
        bot = self._bot(call.token)
        if bot.webhook.get("url"):
            raise BadRequest(
                "Conflict: can't use getUpdates method while webhook is active; use "
                "deleteWebhook to delete the webhook first",
                status=409,
            )
        offset = int(call.params.get("offset") or 0)
        if offset:
            bot.updates = [u for u in bot.updates if u["update_id"] >= offset]
        if not bot.updates and not bot.closing:
            bot.arrived.clear()
            timeout = float(call.params.get("timeout") or 0)
            try:
                await asyncio.wait_for(bot.arrived.wait(), timeout)
            except TimeoutError:
                pass
        return list(bot.updates)


async def _params(request: web.Request) -> dict[str, Any]:
    """Parameters as Telegram reads them: query string, form fields or a JSON body; nested
    objects arrive JSON-encoded in form fields."""
    params: dict[str, Any] = dict(request.query)
    if request.method == "POST" and request.can_read_body:
        if request.content_type == "application/json":
            body = await request.json()
            if isinstance(body, dict):
                params.update(body)
        else:
            form = await request.post()
            for key, value in form.items():
                params[key] = value if isinstance(value, str) else "<file>"
    for key in ("reply_parameters", "link_preview_options", "allowed_updates", "entities"):
        encoded = params.get(key)
        if isinstance(encoded, str):
            try:
                params[key] = json.loads(encoded)
            except ValueError:
                pass
    for key in ("drop_pending_updates", "disable_notification"):
        if isinstance(params.get(key), str):
            params[key] = params[key].lower() == "true"
    return params


# --- Updates as Telegram posts them -----------------------------------------------------


class UpdateFactory:
    """Builds Update payloads with fresh update ids and per-chat message ids."""

    def __init__(self, bot_id: int, username: str, start_update_id: int = 1000) -> None:
        self.bot_id = bot_id
        self.username = username
        self._update_ids = itertools.count(start_update_id)
        self._message_ids: dict[int, itertools.count[int]] = defaultdict(lambda: itertools.count(1))

    def _user(self, user_id: int) -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": f"Shopper{user_id}"}

    def message(
        self,
        chat_id: int,
        *,
        user_id: int | None = None,
        text: str | None = None,
        entities: list[dict[str, Any]] | None = None,
        reply_to_bot: bool = False,
        **content: Any,
    ) -> dict[str, Any]:
        user = user_id if user_id is not None else chat_id
        chat: dict[str, Any] = {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"}
        if chat_id > 0:
            chat["first_name"] = f"Shopper{user}"
        else:
            chat["title"] = "Shop fans"
        msg: dict[str, Any] = {
            "message_id": next(self._message_ids[chat_id]),
            "date": int(time.time()),
            "chat": chat,
            "from": self._user(user),
        }
        if text is not None:
            msg["text"] = text
            ents = list(entities or [])
            if text.startswith("/") and not any(e["type"] == "bot_command" for e in ents):
                ents.append({"type": "bot_command", "offset": 0, "length": len(text.split()[0])})
            if ents:
                msg["entities"] = ents
        if reply_to_bot:
            msg["reply_to_message"] = {
                "message_id": 1,
                "date": int(time.time()),
                "chat": chat,
                "from": {
                    "id": self.bot_id,
                    "is_bot": True,
                    "first_name": "Shop",
                    "username": self.username,
                },
                "text": "earlier answer",
            }
        msg.update(content)
        return {"update_id": next(self._update_ids), "message": msg}

    def text(self, chat_id: int, text: str, **kw: Any) -> dict[str, Any]:
        return self.message(chat_id, text=text, **kw)

    def mention(self, chat_id: int, user_id: int, text: str) -> dict[str, Any]:
        """A group message starting with @bot."""
        handle = f"@{self.username}"
        return self.message(
            chat_id,
            user_id=user_id,
            text=f"{handle} {text}",
            entities=[{"type": "mention", "offset": 0, "length": len(handle)}],
        )

    def voice(self, chat_id: int, **kw: Any) -> dict[str, Any]:
        voice = {"file_id": "voice-1", "file_unique_id": "v1", "duration": 3}
        return self.message(chat_id, voice=voice, **kw)

    def sticker(self, chat_id: int, **kw: Any) -> dict[str, Any]:
        sticker = {
            "file_id": "sticker-1",
            "file_unique_id": "s1",
            "type": "regular",
            "width": 512,
            "height": 512,
            "is_animated": False,
            "is_video": False,
            "emoji": "👍",
        }
        return self.message(chat_id, sticker=sticker, **kw)

    def photo(self, chat_id: int, caption: str | None = None, **kw: Any) -> dict[str, Any]:
        sizes = [
            {"file_id": "p-small", "file_unique_id": "ps", "width": 90, "height": 90},
            {"file_id": "p-big", "file_unique_id": "pb", "width": 1280, "height": 1280},
        ]
        extra: dict[str, Any] = {"photo": sizes}
        if caption is not None:
            extra["caption"] = caption
        return self.message(chat_id, **extra, **kw)

    def edit(self, update: dict[str, Any], new_text: str) -> dict[str, Any]:
        msg = dict(update["message"])
        msg["text"] = new_text
        msg.pop("entities", None)
        msg["edit_date"] = int(time.time())
        return {"update_id": next(self._update_ids), "edited_message": msg}

    def other(self, **payload: Any) -> dict[str, Any]:
        return {"update_id": next(self._update_ids), **payload}


# --- standalone -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="fake Telegram Bot API server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8091)
    p.add_argument("--per-chat-per-second", type=int, default=5)
    p.add_argument("--no-drafts", action="store_true")
    args = p.parse_args(argv)
    fake = FakeBotApi(per_chat_per_second=args.per_chat_per_second, drafts=not args.no_drafts)
    web.run_app(fake.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
