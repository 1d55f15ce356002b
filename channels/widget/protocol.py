"""The widget's wire format (README: Adding the chat widget to your site).

Server -> browser frames are JSON objects with a "type": the conversation events of the
shared stream (message, delta, final, error, typing; durable ones carry `seq`, deltas
`seq` + `index`) plus ready, conversation, ack, problem and pong. Browser -> server: hello
(first), send, ping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from channels.base import ConversationEvent
from channels.http import load_json
from channels.stream_cursor import StreamCursor
from channels.widget.identity import valid_client_id


class ProtocolError(Exception):
    """A frame the server can't use; the client gets a `problem` frame (or a close)."""

    def __init__(
        self,
        code: str,
        detail: str,
        client_id: str | None = None,
        *,
        status: int = 400,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.client_id = client_id
        self.status = status  # for the HTTP fallback
        self.retry_after = retry_after

    def frame(self) -> str:
        extra: dict[str, Any] = {}
        if self.client_id is not None:
            extra["client_id"] = self.client_id
        if self.retry_after is not None:
            extra["retry_after"] = round(self.retry_after, 1)
        return problem_frame(self.code, self.detail, **extra)


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def event_frame(ev: ConversationEvent, *, with_time: bool = False) -> str:
    if ev.type == "delta":
        obj: dict[str, Any] = {
            "type": "delta",
            "seq": ev.seq,
            "index": ev.index,
            "text": ev.data.get("text", ""),
        }
        if with_time:
            obj["t"] = ev.at
        return dumps(obj)
    obj = {"type": ev.type, **ev.data, "seq": ev.seq}
    if ev.index is not None:
        obj["index"] = ev.index
    return dumps(obj)


def problem_frame(code: str, detail: str, **extra: Any) -> str:
    return dumps({"type": "problem", "code": code, "detail": detail, **extra})


def parse_frame(text: str) -> dict[str, Any]:
    try:
        frame = load_json(text)
    except ValueError as e:
        raise ProtocolError("invalid_json", f"the frame is not valid JSON: {e}") from e
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise ProtocolError("invalid_frame", 'a frame is a JSON object with a "type"')
    return frame


@dataclass(frozen=True, slots=True)
class Hello:
    token: str
    conversation_id: int | None
    after: int | None  # the client's watermark; None: a fresh page, show recent history
    delta: tuple[int, int] | None  # the answer being streamed on the client, and its last index
    user: dict[str, Any] | None
    locale: str | None


def parse_hello(frame: dict[str, Any]) -> Hello:
    if frame.get("type") != "hello":
        raise ProtocolError("hello_expected", 'the first frame must be {"type": "hello", ...}')
    token = frame.get("token")
    conv = _opt_int(frame, "conversation_id")
    after = _opt_int(frame, "after")
    delta: tuple[int, int] | None = None
    raw_delta = frame.get("delta")
    if raw_delta is not None:
        if (
            not isinstance(raw_delta, list)
            or len(raw_delta) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw_delta)
        ):
            raise ProtocolError("invalid_field", "delta must be [seq, index]")
        delta = (raw_delta[0], raw_delta[1])
    user = frame.get("user")
    if user is not None and not isinstance(user, dict):
        raise ProtocolError("invalid_field", "user must be an object {id, hash, name}")
    locale = frame.get("locale")
    return Hello(
        token=token if isinstance(token, str) else "",
        conversation_id=conv,
        after=after,
        delta=delta,
        user=user,
        locale=locale if isinstance(locale, str) else None,
    )


def cursor_for(hello: Hello, base: int) -> StreamCursor:
    """Where to resume: the client's watermark (and delta position), or `base` for a fresh
    page (which then gets the recent history)."""
    if hello.after is None:
        return StreamCursor(watermark=base)
    cur = StreamCursor(watermark=max(0, hello.after))
    if hello.delta is not None:
        cur.delta_seq, cur.delta_index = hello.delta
    return cur


@dataclass(frozen=True, slots=True)
class Send:
    client_id: str
    text: str
    attachments: list[str] = field(default_factory=list)


def parse_send(frame: dict[str, Any], max_chars: int) -> Send:
    client_id = frame.get("client_id")
    if not isinstance(client_id, str) or not valid_client_id(client_id):
        raise ProtocolError("invalid_field", "client_id must be 1-64 letters, digits or '-_.:'")
    cid = client_id
    text = frame.get("text", "")
    if not isinstance(text, str):
        raise ProtocolError("invalid_field", "text must be a string", cid)
    if len(text) > max_chars:
        raise ProtocolError(
            "text_too_long", f"a message may have at most {max_chars} characters", cid
        )
    raw_att = frame.get("attachments") or []
    if not isinstance(raw_att, list) or len(raw_att) > 4:
        raise ProtocolError("invalid_field", "attachments: a list of at most 4 upload ids", cid)
    ids: list[str] = []
    for a in raw_att:
        ident = a.get("id") if isinstance(a, dict) else a
        if not isinstance(ident, str):
            raise ProtocolError("invalid_field", "attachments: upload ids are strings", cid)
        ids.append(ident)
    if not text.strip() and not ids:
        raise ProtocolError("empty_message", "write something or attach an image", cid)
    return Send(cid, text, ids)


def _opt_int(frame: dict[str, Any], key: str) -> int | None:
    value = frame.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("invalid_field", f"{key} must be an integer")
    return value
