"""One `kf/sync_msg` item -> an `InboundMessage` and what the channel does with it.

Customers' messages (origin 3) are stored and, when they carry text, answered; messages a
WeCom servicer wrote (origin 5) are stored as agent messages; events (origin 4) say a
customer opened the chat (`enter_session`, with a 20-second `welcome_code`), a message
failed (`msg_send_fail`), or a servicer's session changed (`session_status_change`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from channels.base import InboundMessage

ORIGIN_CUSTOMER = 3
ORIGIN_EVENT = 4
ORIGIN_SERVICER = 5

# session_status_change change_type values
SESSION_TAKEN = 1  # a servicer took it from the pool
SESSION_TRANSFERRED = 2  # moved to another servicer
SESSION_ENDED = 3  # the servicer ended it
SESSION_REOPENED = 4  # a servicer reopened an ended or transferred session

# answer: the bot answers the text; media / voice: a configured text goes back; welcome: the
# welcome text via send_msg_on_event; servicer: a person has the session; ended: the
# servicer ended it; silent: stored only.
Action = Literal[
    "answer", "media", "voice", "welcome", "servicer", "ended", "send_failed", "silent"
]

_MEDIA = ("image", "video", "file")
_SHORT = {"session_status_change": "session_change"}


@dataclass(frozen=True, slots=True)
class KfItem:
    message: InboundMessage | None  # None: nothing about one customer (servicer status...)
    action: Action
    welcome_code: str = ""
    fail_msgid: str = ""  # msg_send_fail: which of our messages WeCom could not deliver


def _s(value: Any) -> str:
    return "" if value is None else str(value)


def _d(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _sent_at(item: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(item.get("send_time") or 0), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _content(kind: str, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]], Action]:
    """(text, attachments, action) of a customer's or servicer's message."""
    if kind == "text":
        return _s(body.get("content")), [], "answer"
    if kind in _MEDIA:
        return "", [{"type": kind, "media_id": _s(body.get("media_id"))}], "media"
    if kind == "voice":
        return "", [{"type": "voice", "media_id": _s(body.get("media_id"))}], "voice"
    if kind == "location":
        name, address = _s(body.get("name")).strip(), _s(body.get("address")).strip()
        lat, lng = _s(body.get("latitude")), _s(body.get("longitude"))
        label = " ".join(p for p in (name, address) if p)
        text = f"📍 {label} ({lat}, {lng})" if label else f"📍 ({lat}, {lng})"
        att = {"type": "location", "latitude": lat, "longitude": lng, "label": label}
        return text, [att], "answer"
    if kind == "link":
        parts = [_s(body.get("title")), _s(body.get("desc")), _s(body.get("url"))]
        text = "\n".join(p for p in parts if p.strip())
        return text, [{"type": "link", "url": _s(body.get("url"))}], "answer"
    if kind == "miniprogram":
        title = _s(body.get("title")).strip()
        text = f"[小程序] {title}" if title else "[小程序]"
        att = {
            "type": "miniprogram",
            "appid": _s(body.get("appid")),
            "page": _s(body.get("pagepath")),
        }
        return text, [att], "answer"
    if kind == "business_card":
        return "", [{"type": "business_card", "userid": _s(body.get("userid"))}], "silent"
    return "", [], "silent"  # unknown to us: stored, not answered


def parse_item(channel: str, account: str, item: dict[str, Any]) -> KfItem:
    """Raises ValueError for an item without the fields every item has."""
    msgid = _s(item.get("msgid")).strip()
    if not msgid:
        raise ValueError("a sync_msg item without msgid")
    kind = _s(item.get("msgtype")).lower() or "unknown"
    try:
        origin = int(item.get("origin") or 0)
    except (TypeError, ValueError):
        origin = 0
    event = _d(item.get("event")) if kind == "event" else {}
    user = _s(item.get("external_userid") or event.get("external_userid")).strip()
    if not user:
        return KfItem(None, "silent")  # e.g. servicer_status_change: about no customer
    text, attachments = "", list[dict[str, Any]]()
    action: Action = "silent"
    welcome_code = fail_msgid = ""
    if kind == "event":
        name = _s(event.get("event_type"))
        # (messages.kind holds 24 characters)
        kind = f"event:{_SHORT.get(name, name)}"[:24] if name else "event"
        if name == "enter_session":
            welcome_code = _s(event.get("welcome_code"))
            action = "welcome" if welcome_code else "silent"
        elif name == "session_status_change":
            change = int(_s(event.get("change_type")) or 0)
            if change in (SESSION_TAKEN, SESSION_TRANSFERRED, SESSION_REOPENED):
                action = "servicer"
            elif change == SESSION_ENDED:
                action = "ended"
        elif name == "msg_send_fail":
            fail_msgid = _s(event.get("fail_msgid"))
            action = "send_failed" if fail_msgid else "silent"
    else:
        text, attachments, action = _content(kind, _d(item.get(kind)))
        if origin == ORIGIN_SERVICER:
            action = "servicer"
        elif origin != ORIGIN_CUSTOMER:
            action = "silent"
    if action == "answer" and not text.strip():
        action = "silent"
    return KfItem(
        InboundMessage(
            channel=channel,
            account=account,
            chat_id=user,
            user_id=user,
            external_id=msgid,
            kind=kind,
            text=text,
            attachments=attachments,
            sent_at=_sent_at(item),
            raw=dict(item),
            answer=action == "answer",
            sender="agent" if origin == ORIGIN_SERVICER and kind != "event" else "contact",
        ),
        action,
        welcome_code,
        fail_msgid,
    )
