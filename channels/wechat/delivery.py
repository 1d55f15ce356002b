"""Sending a text through a WeChat message API in pieces, and what the platform's refusals mean.

`PieceStream` is the streaming side both API sinks share (Official Account customer-service
messages, WeCom application `message/send`): whole pieces go out while the model still
writes, the rest with the final text.

A piece the platform calls too long (45002; e.g. its count differs from ours) is split in
half and retried. A closed 48-hour window (45015) or a spent quota (45047) is final: the
rest of the answer is undeliverable and the pipeline asks a person to follow up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from channels.base import Delivery, ReplySink, may_send
from channels.wechat.api import (
    OUT_OF_WINDOW,
    QUOTA,
    TOO_LONG,
    WechatApiError,
    WechatTransportError,
)
from channels.wechat.chunks import complete_length, split_text, utf8_len
from channels.wechat.kf_api import KF_QUOTA, KF_STATE

log = structlog.get_logger(__name__)

MAX_BYTES = 2048  # text messages of the customer-service API and of WeCom message/send

SendOne = Callable[[str], Awaitable[str]]
# Sends a text in pieces, adding the platform ids of those that went out to the list.
SendText = Callable[[str, list[str]], Awaitable[Delivery]]

_UNDELIVERABLE = {
    OUT_OF_WINDOW: "the shopper last wrote more than 48 hours ago, so WeChat refuses "
    "customer-service messages (errcode 45015); a person must follow up another way",
    QUOTA: "WeChat's quota of customer-service messages since the shopper last wrote is "
    "spent (errcode 45047); the rest can be sent once they write again",
    81013: "the recipient is not a member of this WeCom application (errcode 81013)",
    KF_QUOTA: "WeChat Customer Service allows only a few messages within 48 hours of the "
    "customer's last message (errcode 95001); the rest can be sent once they write again",
    KF_STATE: "the customer's WeChat Customer Service session is with a person or ended, so "
    "the API may not send to it (errcode 95018)",
}


class _Refused(Exception):
    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery


async def send_pieces(
    send_one: SendOne,
    text: str,
    *,
    limit: int = MAX_BYTES,
    sent: list[str] | None = None,
) -> Delivery:
    """Send `text` in sentence-aligned pieces of at most `limit` bytes, in order.

    `sent` collects the platform ids of the pieces that went out (also on failure)."""
    ids: list[str] = [] if sent is None else sent
    try:
        for piece in split_text(text, limit):
            if piece.isspace():
                continue  # invisible, and WeChat refuses empty content
            await _send(send_one, piece, ids, depth=0)
    except _Refused as r:
        r.delivery.platform_message_ids = list(ids)
        return r.delivery
    return Delivery(platform_message_ids=list(ids))


async def _send(send_one: SendOne, piece: str, ids: list[str], depth: int) -> None:
    if not may_send():
        raise _Refused(Delivery(ok=False, detail="a person took the conversation over"))
    try:
        ids.append(await send_one(piece) or f"piece-{len(ids) + 1}")
        return
    except WechatApiError as e:
        if e.errcode == TOO_LONG and depth < 3 and utf8_len(piece) > 64:
            log.warning("wechat_piece_too_long", bytes=utf8_len(piece), depth=depth)
            for half in split_text(piece, max(utf8_len(piece) // 2, 16)):
                await _send(send_one, half, ids, depth + 1)
            return
        reason = _UNDELIVERABLE.get(e.errcode)
        if reason is not None:
            log.warning("wechat_undeliverable", errcode=e.errcode, errmsg=e.errmsg)
            raise _Refused(Delivery(ok=False, undeliverable=True, detail=reason)) from e
        log.error("wechat_send_failed", errcode=e.errcode, errmsg=e.errmsg)
        raise _Refused(Delivery(ok=False, detail=str(e))) from e
    except WechatTransportError as e:
        # Not retried: WeChat may have shown it already; a duplicate is worse than a gap
        # a person is told about (the message is marked failed).
        log.error("wechat_send_uncertain", error=str(e))
        raise _Refused(Delivery(ok=False, detail=str(e))) from e


class PieceStream:
    """One answer sent through a message API as it streams, in pieces of at most MAX_BYTES.

    Only full pieces go out early, so the answer takes no more messages than if it had been
    sent at the end. After a failed piece nothing more is sent; the sink reports `failure`.
    """

    def __init__(self, send: SendText, *, channel: str, account: str) -> None:
        self._send = send
        self._channel = channel
        self._account = account
        self._streamed = ""
        self.sent = ""  # delivered while streaming
        self._unsent_bytes = 0
        self.ids: list[str] = []  # platform ids of every piece that went out
        self.failure: Delivery | None = None

    def add(self, delta: str) -> bool:
        """Take a delta; True when more than a piece waits unsent (false for almost all)."""
        self._streamed += delta
        self._unsent_bytes += utf8_len(delta)
        return self._unsent_bytes > MAX_BYTES and self.failure is None

    def clear(self) -> None:
        """Forget what streamed so far (only while none of it went out)."""
        self._streamed = self.sent
        self._unsent_bytes = 0

    def full_pieces(self) -> list[str]:
        """The whole pieces of complete sentences ready to go (not the last, still growing)."""
        if not self._streamed.startswith(self.sent):
            return []
        unsent = self._streamed[len(self.sent) :]
        return split_text(unsent[: complete_length(unsent)], MAX_BYTES)[:-1]

    async def send_full(self, pieces: list[str]) -> None:
        for piece in pieces:
            d = await self.send(piece)
            if not d.ok:
                self.failure = d
                return
            self.sent += piece
            self._unsent_bytes -= utf8_len(piece)

    def unsent(self, final_text: str) -> str:
        """What of the final text is still to send: the whole of it when it does not continue
        what went out while streaming (a fallback model rewrote it; logged)."""
        if not self.sent:
            return final_text
        if final_text.startswith(self.sent):
            return final_text[len(self.sent) :]
        log.warning(f"{self._channel}_final_differs_from_stream", account=self._account)
        return final_text

    async def send(self, text: str) -> Delivery:
        return await self._send(text, self.ids)


class PieceSink(ReplySink):
    """The sink of an answer sent through a message API: whole pieces go out as soon as
    they are complete, the rest when the answer is done."""

    def __init__(self, send: SendText, *, channel: str, account: str) -> None:
        self._pieces = PieceStream(send, channel=channel, account=account)

    async def push(self, delta: str) -> None:
        if self._pieces.add(delta):
            await self._pieces.send_full(self._pieces.full_pieces())

    def shown(self) -> bool:
        return bool(self._pieces.sent)

    def retract(self) -> None:
        self._pieces.clear()

    async def finish(self, final_text: str) -> Delivery:
        if self._pieces.failure is not None:
            return self._pieces.failure
        return await self._pieces.send(self._pieces.unsent(final_text))

    async def fail(self, reason: str) -> None:
        return None
