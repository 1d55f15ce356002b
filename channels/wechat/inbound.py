"""WeChat XML messages (parsed by wechatpy) -> `InboundMessage` and what to do with them.

Official Account and WeCom application callbacks share the message format: text, image,
voice (with `Recognition`, the speech-to-text WeChat adds when it is switched on), video,
location, link, and events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from channels.base import InboundMessage

# answer: the bot answers the text; welcome / media: a configured text goes back (not a model
# answer); silent: stored only, acknowledged with `success`.
Action = Literal["answer", "welcome", "media", "silent"]

_MEDIA = ("image", "video", "shortvideo", "voice", "file")


@dataclass(frozen=True, slots=True)
class Normalized:
    message: InboundMessage
    action: Action


def _s(value: Any) -> str:
    return "" if value is None else str(value)


def _sent_at(raw: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(raw.get("CreateTime") or 0), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def external_id(raw: dict[str, Any]) -> str:
    """The idempotency key: MsgId, or for events FromUserName + CreateTime + event type
    (what WeChat documents for deduplicating retried events)."""
    msg_id = _s(raw.get("MsgId") or raw.get("MsgID")).strip()
    if msg_id and msg_id != "0" and _s(raw.get("MsgType")).lower() != "event":
        return msg_id
    event = _s(raw.get("Event")).lower() or _s(raw.get("MsgType")).lower()
    return f"{_s(raw.get('FromUserName'))}:{_s(raw.get('CreateTime'))}:{event}"


def normalize(
    channel: str,
    account: str,
    msg: Any,
    raw: dict[str, Any],
    *,
    menu: dict[str, str] | None = None,
    media_text: str = "",
    welcome_text: str = "",
) -> Normalized:
    """`msg` is wechatpy's parse of the decrypted <xml> message, `raw` the same as a dict."""
    kind = _s(msg.type).lower()
    if kind == "unknown":
        kind = _s(raw.get("MsgType")).lower() or "unknown"
    user = _s(msg.source)
    if not user:
        raise ValueError("FromUserName is missing")
    text = ""
    attachments: list[dict[str, Any]] = []
    action: Action = "answer"

    if kind == "text":
        text = _s(msg.content)
    elif kind == "voice" and _s(getattr(msg, "recognition", "")).strip():
        text = _s(msg.recognition).strip()
        attachments.append({"type": "voice", "media_id": _s(msg.media_id)})
    elif kind in _MEDIA:
        item = {"type": kind, "media_id": _s(getattr(msg, "media_id", ""))}
        if getattr(msg, "image", None):
            item["url"] = _s(msg.image)
        attachments.append(item)
        action = "media" if media_text else "silent"
    elif kind == "location":
        label = _s(msg.label).strip()
        lat, lng = _s(msg.location_x), _s(msg.location_y)
        text = f"📍 {label} ({lat}, {lng})" if label else f"📍 ({lat}, {lng})"
        attachments.append({"type": "location", "latitude": lat, "longitude": lng, "label": label})
    elif kind == "link":
        parts = [_s(msg.title), _s(msg.description), _s(msg.url)]
        text = "\n".join(p for p in parts if p.strip())
        attachments.append({"type": "link", "url": _s(msg.url)})
    elif kind == "event":
        event = _s(getattr(msg, "event", "")) or _s(raw.get("Event")).lower()
        key = _s(raw.get("EventKey"))
        kind = f"event:{event}" if event else "event"
        action = "silent"
        if event.startswith("subscribe"):  # subscribe, subscribe_scan (QR code with a scene)
            action = "welcome" if welcome_text else "silent"
        elif event == "click" and menu and key in menu:
            text, action, kind = menu[key], "answer", "menu"
        if key:
            attachments.append({"type": "event_key", "key": key})
    else:
        action = "silent"  # unknown to us: acknowledged and recorded

    if action == "answer" and not text.strip():
        action = "silent"
    return Normalized(
        InboundMessage(
            channel=channel,
            account=account,
            chat_id=user,
            user_id=user,
            external_id=external_id(raw),
            kind=kind,
            text=text,
            attachments=attachments,
            sent_at=_sent_at(raw),
            raw=dict(raw),
            answer=action == "answer",
        ),
        action,
    )
