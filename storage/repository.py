"""Queries and writes of the conversation model. Every function takes an open session and
leaves committing to the caller, so one unit of work can span several of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import (
    Contact,
    Conversation,
    Direction,
    LLMCall,
    Message,
    MessageStatus,
    Owner,
    Sender,
    utcnow,
)


class NotFound(Exception):
    pass


async def allocate_seq(session: AsyncSession, conversation_id: int) -> int:
    """Next per-conversation sequence number (atomic: the UPDATE takes the row lock)."""
    result = await session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(last_seq=Conversation.last_seq + 1, updated_at=utcnow())
        .returning(Conversation.last_seq)
    )
    seq = result.scalar_one_or_none()
    if seq is None:
        raise NotFound(f"conversation {conversation_id}")
    return seq


async def get_or_create_contact(
    session: AsyncSession, channel: str, account: str, external_id: str, name: str | None
) -> Contact:
    q = select(Contact).where(
        Contact.channel == channel, Contact.account == account, Contact.external_id == external_id
    )
    contact = (await session.execute(q)).scalar_one_or_none()
    if contact is not None:
        return contact
    contact = Contact(channel=channel, account=account, external_id=external_id, display_name=name)
    try:
        async with session.begin_nested():
            session.add(contact)
    except IntegrityError:  # created concurrently by another request
        contact = (await session.execute(q)).scalar_one()
    return contact


async def open_conversation(
    session: AsyncSession, contact: Contact, channel: str, account: str, chat_id: str
) -> Conversation:
    """The contact's latest unresolved conversation in this chat, or a new one."""
    q = (
        select(Conversation)
        .where(
            Conversation.contact_id == contact.id,
            Conversation.channel == channel,
            Conversation.account == account,
            Conversation.chat_id == chat_id,
            Conversation.owner != Owner.RESOLVED.value,
        )
        .order_by(Conversation.id.desc())
        .limit(1)
    )
    conv = (await session.execute(q)).scalar_one_or_none()
    if conv is None:
        conv = Conversation(
            contact_id=contact.id,
            channel=channel,
            account=account,
            chat_id=chat_id,
            owner=Owner.BOT.value,
            last_seq=0,
        )
        session.add(conv)
        await session.flush()
    return conv


async def find_by_external_id(
    session: AsyncSession, channel: str, account: str, external_id: str
) -> Message | None:
    q = select(Message).where(
        Message.channel == channel, Message.account == account, Message.external_id == external_id
    )
    return (await session.execute(q)).scalar_one_or_none()


async def add_message(
    session: AsyncSession,
    conversation: Conversation,
    *,
    direction: Direction,
    sender: Sender,
    status: MessageStatus,
    text: str = "",
    kind: str = "text",
    external_id: str | None = None,
    attachments: list[Any] | None = None,
    raw: dict[str, Any] | None = None,
    sent_at: datetime | None = None,
    reply_to_id: int | None = None,
    agent_id: int | None = None,
) -> Message:
    seq = await allocate_seq(session, conversation.id)
    msg = Message(
        conversation_id=conversation.id,
        seq=seq,
        channel=conversation.channel,
        account=conversation.account,
        external_id=external_id,
        direction=direction.value,
        sender=sender.value,
        agent_id=agent_id,
        kind=kind,
        text=text,
        attachments=attachments or [],
        status=status.value,
        reply_to_id=reply_to_id,
        raw=raw,
        sent_at=sent_at,
    )
    session.add(msg)
    await session.flush()
    return msg


async def get_conversation(session: AsyncSession, conversation_id: int) -> Conversation | None:
    return await session.get(Conversation, conversation_id)


async def history(session: AsyncSession, conversation_id: int, limit: int) -> list[Message]:
    """The newest `limit` complete messages, oldest first."""
    q = (
        select(Message)
        .where(
            Message.conversation_id == conversation_id,
            Message.status.not_in([MessageStatus.STREAMING.value, MessageStatus.ABANDONED.value]),
        )
        .order_by(Message.seq.desc())
        .limit(limit)
    )
    rows = list((await session.execute(q)).scalars())
    rows.reverse()
    return rows


async def list_messages(
    session: AsyncSession,
    conversation_id: int,
    *,
    after_seq: int | None = None,
    before_seq: int | None = None,
    limit: int = 50,
    complete_only: bool = False,
) -> Sequence[Message]:
    q = select(Message).where(Message.conversation_id == conversation_id)
    if complete_only:
        q = q.where(Message.status != MessageStatus.STREAMING.value)
    if after_seq is not None:
        q = q.where(Message.seq > after_seq).order_by(Message.seq.asc())
    elif before_seq is not None:
        q = q.where(Message.seq < before_seq).order_by(Message.seq.desc())
    else:
        q = q.order_by(Message.seq.desc())
    rows = list((await session.execute(q.limit(limit))).scalars())
    if after_seq is None:
        rows.reverse()
    return rows


async def resume_point(session: AsyncSession, conversation_id: int) -> int:
    streaming = await session.scalar(
        select(func.min(Message.seq)).where(
            Message.conversation_id == conversation_id,
            Message.status == MessageStatus.STREAMING.value,
        )
    )
    if streaming is not None:
        return int(streaming) - 1
    last = await session.scalar(
        select(Conversation.last_seq).where(Conversation.id == conversation_id)
    )
    return int(last or 0)


@dataclass(frozen=True, slots=True)
class Unanswered:
    conversation_id: int
    message_id: int


async def unanswered_inbound(session: AsyncSession) -> list[Unanswered]:
    """Inbound messages stored but never answered (for recovery after a crash), in order."""
    q = (
        select(Message.conversation_id, Message.id)
        .where(
            Message.direction == Direction.IN.value,
            Message.status == MessageStatus.RECEIVED.value,
        )
        .order_by(Message.conversation_id, Message.seq)
    )
    return [Unanswered(c, m) for c, m in (await session.execute(q)).all()]


async def abandon_streaming(session: AsyncSession) -> list[Message]:
    """Answers cut by a crash: mark them abandoned so a new answer replaces them."""
    q = select(Message).where(Message.status == MessageStatus.STREAMING.value)
    rows = list((await session.execute(q)).scalars())
    for m in rows:
        m.status = MessageStatus.ABANDONED.value
        m.completed_at = utcnow()
    return rows


async def undelivered_outbound(session: AsyncSession) -> list[Message]:
    """Final answers stored but not yet confirmed by their channel."""
    q = (
        select(Message)
        .where(
            Message.direction == Direction.OUT.value,
            Message.status == MessageStatus.PENDING.value,
        )
        .order_by(Message.conversation_id, Message.seq)
    )
    return list((await session.execute(q)).scalars())


def add_llm_call(session: AsyncSession, **fields: Any) -> None:
    session.add(LLMCall(**fields))


@dataclass(frozen=True, slots=True)
class CostRow:
    tier: str | None
    model: str
    intent: str | None
    calls: int
    failed: int
    input_tokens: int
    output_tokens: int
    cost: float


async def cost_summary(
    session: AsyncSession, since: datetime, until: datetime | None = None
) -> list[CostRow]:
    """The ledger grouped by tier, provider/model and intent, most expensive first."""
    model = LLMCall.provider + "/" + LLMCall.model
    q = (
        select(
            LLMCall.tier,
            model,
            LLMCall.intent,
            func.count(),
            func.sum(case((LLMCall.outcome == "ok", 0), else_=1)),
            func.coalesce(func.sum(LLMCall.input_tokens), 0),
            func.coalesce(func.sum(LLMCall.output_tokens), 0),
            func.coalesce(func.sum(LLMCall.cost), 0.0),
        )
        .where(LLMCall.created_at >= since)
        .group_by(LLMCall.tier, model, LLMCall.intent)
        .order_by(func.sum(LLMCall.cost).desc())
    )
    if until is not None:
        q = q.where(LLMCall.created_at < until)
    return [
        CostRow(t, m, i, int(n), int(f or 0), int(it), int(ot), float(c))
        for t, m, i, n, f, it, ot, c in (await session.execute(q)).all()
    ]


async def conversation_cost(session: AsyncSession, conversation_id: int) -> float:
    total = await session.scalar(
        select(func.coalesce(func.sum(LLMCall.cost), 0.0)).where(
            LLMCall.conversation_id == conversation_id
        )
    )
    return float(total or 0.0)
