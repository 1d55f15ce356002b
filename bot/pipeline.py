"""Ingest -> conversation worker -> orchestration -> delivery (DESIGN.md, Data flow).

`Pipeline` is the `ChannelHost` the channels talk to. Every inbound message is stored before
the webhook is acknowledged; the worker answers it through the channel it came from and
stores the answer; `recover()` at start answers whatever a crash left unanswered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import metrics
from bot.hub import Hub
from bot.locks import KeyedLocks
from bot.workqueue import WorkQueue
from channels.base import (
    Channel,
    ConversationEvent,
    ConversationRef,
    Delivery,
    InboundMessage,
    IngestResult,
    StoredMessage,
    UnknownConversation,
)
from orchestration.config import ReplySettings
from orchestration.events import CallRecord, ConversationInfo, Delta, Escalate, Final, Turn
from orchestration.orchestrator import Orchestrator
from storage import repository as repo
from storage.models import (
    Contact,
    Conversation,
    Direction,
    HandoffEvent,
    Message,
    MessageStatus,
    Owner,
    Sender,
    utcnow,
)

log = structlog.get_logger(__name__)

OUTBOUND_FINAL = {
    MessageStatus.PENDING.value,
    MessageStatus.SENT.value,
    MessageStatus.FAILED.value,
    MessageStatus.UNDELIVERABLE.value,
}


def stored(m: Message) -> StoredMessage:
    return StoredMessage(
        id=m.id,
        conversation_id=m.conversation_id,
        seq=m.seq,
        direction=m.direction,
        sender=m.sender,
        kind=m.kind,
        text=m.text,
        status=m.status,
        created_at=m.created_at,
        reply_to_id=m.reply_to_id,
        attachments=list(m.attachments or []),
        external_id=m.external_id,
        agent_id=m.agent_id,
        platform_message_ids=list(m.platform_message_ids or []),
        raw=m.raw,
    )


def ref(conv: Conversation) -> ConversationRef:
    return ConversationRef(
        id=conv.id,
        channel=conv.channel,
        account=conv.account,
        chat_id=conv.chat_id,
        contact_id=conv.contact_id,
        owner=conv.owner,
    )


@dataclass(slots=True)
class _Reply:
    """What the worker gathered from one orchestration stream."""

    final: Final | None = None
    escalate: Escalate | None = None
    first_delta_s: float | None = None
    deltas: int = 0


class Pipeline:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        hub: Hub,
        queue: WorkQueue,
        orchestrator: Orchestrator,
        channels: Mapping[str, Channel],
        reply: ReplySettings,
    ) -> None:
        self.sessions = sessions
        self.hub = hub
        self.queue = queue
        self.orchestrator = orchestrator
        self.channels = channels
        self.reply_settings = reply
        # Two first messages of one new chat must not open two conversations.
        self._chat_locks = KeyedLocks()

    # -- ChannelHost -------------------------------------------------------------------------

    @property
    def events(self) -> Hub:
        return self.hub

    async def ingest(self, message: InboundMessage) -> IngestResult:
        async with self._chat_locks.hold((message.channel, message.account, message.chat_id)):
            result, event = await self._store_inbound(message)
        if result.duplicate:
            metrics.DUPLICATES.labels(message.channel).inc()
            return result
        metrics.MESSAGES_IN.labels(message.channel).inc()
        self.hub.publish(event)
        if message.answer:
            await self.queue.put(result.conversation_id, result.message_id)
        return result

    async def _store_inbound(
        self, message: InboundMessage
    ) -> tuple[IngestResult, ConversationEvent]:
        try:
            async with self.sessions() as s, s.begin():
                if message.external_id is not None:
                    old = await repo.find_by_external_id(
                        s, message.channel, message.account, message.external_id
                    )
                    if old is not None:
                        return await self._duplicate(s, old), stored(old).event()
                contact = await repo.get_or_create_contact(
                    s, message.channel, message.account, message.user_id, message.user_name
                )
                if message.contact_attributes:
                    # The latest says who the contact is now (e.g. verified or anonymous).
                    contact.attributes = {
                        **(contact.attributes or {}),
                        **message.contact_attributes,
                    }
                if message.conversation_id is not None:
                    conv = await repo.get_conversation(s, message.conversation_id)
                    if conv is None or conv.contact_id != contact.id:
                        raise UnknownConversation(message.conversation_id)
                else:
                    conv = await repo.open_conversation(
                        s, contact, message.channel, message.account, message.chat_id
                    )
                m = await repo.add_message(
                    s,
                    conv,
                    direction=Direction.IN,
                    sender=Sender.CONTACT,
                    status=MessageStatus.RECEIVED if message.answer else MessageStatus.SKIPPED,
                    text=message.text,
                    kind=message.kind,
                    external_id=message.external_id,
                    attachments=message.attachments,
                    raw=message.raw,
                    sent_at=message.sent_at,
                )
                result = IngestResult(m.id, conv.id, contact.id, m.seq, duplicate=False)
                return result, stored(m).event()
        except IntegrityError:
            # The same external id stored concurrently by another request: a redelivery.
            assert message.external_id is not None
            async with self.sessions() as s:
                old = await repo.find_by_external_id(
                    s, message.channel, message.account, message.external_id
                )
                if old is None:
                    raise
                return await self._duplicate(s, old), stored(old).event()

    async def _duplicate(self, s: AsyncSession, old: Message) -> IngestResult:
        conv = await repo.get_conversation(s, old.conversation_id)
        assert conv is not None
        return IngestResult(old.id, old.conversation_id, conv.contact_id, old.seq, duplicate=True)

    async def get_conversation(self, conversation_id: int) -> ConversationRef | None:
        async with self.sessions() as s:
            conv = await repo.get_conversation(s, conversation_id)
            return ref(conv) if conv else None

    async def list_messages(
        self,
        conversation_id: int,
        *,
        after_seq: int | None = None,
        before_seq: int | None = None,
        limit: int = 50,
        complete_only: bool = False,
    ) -> Sequence[StoredMessage]:
        async with self.sessions() as s:
            rows = await repo.list_messages(
                s,
                conversation_id,
                after_seq=after_seq,
                before_seq=before_seq,
                limit=limit,
                complete_only=complete_only,
            )
            return [stored(m) for m in rows]

    async def resume_point(self, conversation_id: int) -> int:
        async with self.sessions() as s:
            return await repo.resume_point(s, conversation_id)

    # -- the conversation worker -------------------------------------------------------------

    async def handle(self, conversation_id: int, message_id: int) -> None:
        """Answer one stored inbound message (called by the work queue, in order)."""
        structlog.contextvars.bind_contextvars(conversation_id=conversation_id)
        try:
            await self._handle(conversation_id, message_id)
        finally:
            structlog.contextvars.unbind_contextvars("conversation_id")

    async def _handle(self, conversation_id: int, message_id: int) -> None:
        async with self.sessions() as s, s.begin():
            inbound = await s.get(Message, message_id)
            conv = await repo.get_conversation(s, conversation_id)
            if inbound is None or conv is None or inbound.status != MessageStatus.RECEIVED.value:
                return  # answered already (a recovered duplicate of the queue entry)
            if conv.owner != Owner.BOT.value:
                inbound.status = MessageStatus.HUMAN.value
                metrics.REPLIES.labels(conv.channel, "human").inc()
                return
            past = await repo.history(s, conversation_id, self.reply_settings.history_messages)
            turns = [_turn(m) for m in past if m.seq < inbound.seq]
            out = await repo.add_message(
                s,
                conv,
                direction=Direction.OUT,
                sender=Sender.BOT,
                status=MessageStatus.STREAMING,
                reply_to_id=inbound.id,
            )
            conv_ref = ref(conv)
            inbound_view = stored(inbound)
            contact = await s.get(Contact, conv.contact_id)
            info = ConversationInfo(
                conv.id,
                conv.channel,
                conv.tier,
                spent=conv.cost_total or 0.0,
                verified=_verified(conv.channel, contact),
                degraded_answers=sum(
                    1
                    for m in past
                    if m.sender == Sender.BOT.value and (m.routing or {}).get("degraded")
                ),
            )
            question = Turn("user", inbound.text)
            out_id, seq = out.id, out.seq

        channel = self.channels[conv_ref.channel]
        sink = channel.open_reply(conv_ref, inbound_view)
        started = time.monotonic()
        metrics.IN_FLIGHT.inc()
        try:
            reply, calls = await self._stream(conv_ref, seq, sink, info, turns, question, started)
        except BaseException:
            metrics.IN_FLIGHT.dec()
            raise
        metrics.IN_FLIGHT.dec()
        await self._finish(
            conv_ref,
            inbound_id=message_id,
            out_id=out_id,
            seq=seq,
            reply=reply,
            calls=calls,
            started=started,
            sink=sink,
        )

    async def _stream(
        self,
        conv: ConversationRef,
        seq: int,
        sink: Any,
        info: ConversationInfo,
        turns: list[Turn],
        question: Turn,
        started: float,
    ) -> tuple[_Reply, list[CallRecord]]:
        reply = _Reply()
        calls: list[CallRecord] = []
        self.hub.publish(ConversationEvent(conv.id, "typing", seq))
        try:
            await sink.typing()
            async for ev in self.orchestrator.reply(info, turns, question):
                if isinstance(ev, Delta):
                    if reply.first_delta_s is None:
                        reply.first_delta_s = time.monotonic() - started
                        metrics.FIRST_DELTA.labels(conv.channel).observe(reply.first_delta_s)
                    self.hub.publish(
                        ConversationEvent(conv.id, "delta", seq, reply.deltas, {"text": ev.text})
                    )
                    reply.deltas += 1
                    await sink.push(ev.text)
                elif isinstance(ev, CallRecord):
                    calls.append(ev)
                elif isinstance(ev, Final):
                    reply.final = ev
                elif isinstance(ev, Escalate):
                    reply.escalate = ev
        except asyncio.CancelledError:
            raise  # shutdown: the answer stays STREAMING and is redone after restart
        except Exception:
            log.exception("orchestration_raised")
        if reply.final is None:
            reply.final = Final(text=self.reply_settings.fallback_text, degraded=True)
            reply.escalate = reply.escalate or Escalate("internal_error")
        return reply, calls

    async def _finish(
        self,
        conv_ref: ConversationRef,
        *,
        inbound_id: int,
        out_id: int,
        seq: int,
        reply: _Reply,
        calls: list[CallRecord],
        started: float,
        sink: Any,
    ) -> None:
        final = reply.final
        assert final is not None
        async with self.sessions() as s, s.begin():
            conv = await repo.get_conversation(s, conv_ref.id)
            out = await s.get(Message, out_id)
            inbound = await s.get(Message, inbound_id)
            assert conv is not None and out is not None and inbound is not None
            for c in calls:
                repo.add_llm_call(
                    s, conversation_id=conv.id, message_id=inbound_id, **_call_fields(c)
                )
            conv.cost_total = (conv.cost_total or 0.0) + sum(c.cost for c in calls)
            if conv.owner != Owner.BOT.value:
                # A human took over while the bot was writing: never talk over them.
                out.status = MessageStatus.ABANDONED.value
                out.text = final.text
                out.completed_at = utcnow()
                inbound.status = MessageStatus.HUMAN.value
                abandoned = stored(out)
            else:
                abandoned = None
                out.text = final.text
                out.status = MessageStatus.PENDING.value
                out.model = f"{final.provider}/{final.model}" if final.model else None
                out.tier = final.tier
                out.input_tokens = sum(c.input_tokens for c in calls)
                out.output_tokens = sum(c.output_tokens for c in calls)
                out.cost = sum(c.cost for c in calls)
                out.first_delta_ms = (
                    round(reply.first_delta_s * 1000, 2) if reply.first_delta_s else None
                )
                out.latency_ms = round((time.monotonic() - started) * 1000, 2)
                out.routing = final.routing or None
                inbound.routing = final.routing or None
                if final.tier:
                    conv.tier = final.tier  # sticky: routing starts from it next turn
                out.completed_at = utcnow()
                inbound.status = MessageStatus.ANSWERED.value
            final_msg = stored(out)
        for c in calls:
            metrics.LLM_CALLS.labels(c.provider, c.model, c.outcome).inc()
            metrics.LLM_TOKENS.labels(c.provider, c.model, "input").inc(c.input_tokens)
            metrics.LLM_TOKENS.labels(c.provider, c.model, "output").inc(c.output_tokens)
            metrics.LLM_COST.labels(c.provider, c.model).inc(c.cost)
        if abandoned is not None:
            self.hub.publish(abandoned.event())
            await sink.fail("human took over")
            metrics.REPLIES.labels(conv_ref.channel, "abandoned").inc()
            return
        if reply.escalate is not None:
            await self.request_handoff(
                conv_ref.id, reply.escalate.reason, reply.escalate.detail, reply.escalate.card
            )
        self.hub.publish(final_msg.event())
        metrics.REPLY_TIME.labels(conv_ref.channel).observe(time.monotonic() - started)
        metrics.REPLIES.labels(conv_ref.channel, "degraded" if final.degraded else "model").inc()
        await self._deliver(out_id, lambda: sink.finish(final.text))

    async def _deliver(self, out_id: int, send: Any) -> Delivery:
        """Hand the final text to the channel and record what the platform said."""
        try:
            delivery: Delivery = await send()
        except Exception as e:
            log.exception("delivery_failed", message_id=out_id)
            delivery = Delivery(ok=False, detail=repr(e))
        async with self.sessions() as s, s.begin():
            out = await s.get(Message, out_id)
            assert out is not None
            if delivery.ok:
                out.status = MessageStatus.SENT.value
            elif delivery.undeliverable:
                out.status = MessageStatus.UNDELIVERABLE.value
            else:
                out.status = MessageStatus.FAILED.value
            out.platform_message_ids = delivery.platform_message_ids
            conversation_id = out.conversation_id
        if delivery.undeliverable:
            # The platform will not take it (e.g. WeChat's 48-hour window): a person follows up.
            await self.request_handoff(conversation_id, "undeliverable", delivery.detail)
        return delivery

    async def send_message(
        self,
        conversation_id: int,
        text: str,
        *,
        sender: str = "system",
        agent_id: int | None = None,
    ) -> StoredMessage:
        async with self.sessions() as s, s.begin():
            conv = await repo.get_conversation(s, conversation_id)
            if conv is None:
                raise UnknownConversation(conversation_id)
            m = await repo.add_message(
                s,
                conv,
                direction=Direction.OUT,
                sender=Sender(sender),
                status=MessageStatus.PENDING,
                text=text,
                agent_id=agent_id,
            )
            m.completed_at = utcnow()
            conv_ref, view = ref(conv), stored(m)
        self.hub.publish(view.event())
        channel = self.channels[conv_ref.channel]
        delivery = await self._deliver(view.id, lambda: channel.send(conv_ref, text, sender=sender))
        status = (
            MessageStatus.SENT
            if delivery.ok
            else MessageStatus.UNDELIVERABLE
            if delivery.undeliverable
            else MessageStatus.FAILED
        )
        return replace(
            view, status=status.value, platform_message_ids=delivery.platform_message_ids
        )

    async def request_handoff(
        self,
        conversation_id: int,
        reason: str,
        detail: str = "",
        card: dict[str, Any] | None = None,
    ) -> bool:
        async with self.sessions() as s, s.begin():
            conv = await repo.get_conversation(s, conversation_id)
            if conv is None or conv.owner != Owner.BOT.value:
                return False
            s.add(
                HandoffEvent(
                    conversation_id=conv.id,
                    from_owner=conv.owner,
                    to_owner=Owner.HANDOFF_REQUESTED.value,
                    reason=reason,
                    card={**(card or {}), "detail": detail} if detail or card else None,
                )
            )
            conv.owner = Owner.HANDOFF_REQUESTED.value
        log.info("handoff_requested", conversation_id=conversation_id, reason=reason)
        return True

    async def record_edit(self, channel: str, account: str, external_id: str, text: str) -> bool:
        async with self.sessions() as s, s.begin():
            m = await repo.find_by_external_id(s, channel, account, external_id)
            if m is None:
                return False
            raw = dict(m.raw or {})
            raw.setdefault("edits", []).append(
                {"previous_text": m.text, "at": utcnow().isoformat()}
            )
            m.raw = raw
            m.text = text
            view = stored(m)
        self.hub.publish(
            ConversationEvent(
                view.conversation_id, "message", view.seq, None, {**view.as_json(), "edited": True}
            )
        )
        return True

    # -- recovery ----------------------------------------------------------------------------

    async def recover(self) -> dict[str, int]:
        """After a crash or restart: drop cut answers, deliver stored ones, answer the rest."""
        async with self.sessions() as s, s.begin():
            abandoned = [stored(m) for m in await repo.abandon_streaming(s)]
            pending = [
                (m.id, m.conversation_id, m.text) for m in await repo.undelivered_outbound(s)
            ]
            todo = await repo.unanswered_inbound(s)
        for m in abandoned:
            self.hub.publish(m.event())
        for out_id, conversation_id, text in pending:
            conv = await self.get_conversation(conversation_id)
            if conv is None:
                continue
            channel = self.channels.get(conv.channel)
            if channel is None:
                continue
            await self._deliver(
                out_id, lambda c=channel, r=conv, t=text: c.send(r, t, sender="bot")
            )
        for item in todo:
            await self.queue.put(item.conversation_id, item.message_id)
        counts = {"abandoned": len(abandoned), "redelivered": len(pending), "requeued": len(todo)}
        if any(counts.values()):
            log.info("recovered", **counts)
        return counts


# Channels whose callers the shop itself authenticates (server-to-server).
_TRUSTED_CHANNELS = frozenset({"api"})


def _verified(channel: str, contact: Contact | None) -> bool:
    """Whether order tools may be used: the shop vouched for who this shopper is."""
    if channel in _TRUSTED_CHANNELS:
        return True
    return bool(contact is not None and (contact.attributes or {}).get("verified"))


def _turn(m: Message) -> Turn:
    role = "user" if m.direction == Direction.IN.value else "assistant"
    return Turn(role, m.text, m.sender)


def _call_fields(c: CallRecord) -> dict[str, Any]:
    return {
        "provider": c.provider,
        "model": c.model,
        "tier": c.tier,
        "specialist": c.specialist,
        "purpose": c.purpose,
        "intent": c.intent,
        "first_token_ms": c.first_token_ms,
        "latency_ms": c.latency_ms,
        "input_tokens": c.input_tokens,
        "output_tokens": c.output_tokens,
        "usage_estimated": c.usage_estimated,
        "cost": c.cost,
        "outcome": c.outcome,
        "error": c.error,
    }
