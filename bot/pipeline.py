"""Ingest -> conversation worker -> orchestration -> delivery (DESIGN.md, Data flow).

`Pipeline` is the `ChannelHost` the channels talk to. Every inbound message is stored before
the webhook is acknowledged; the worker answers it through the channel it came from and
stores the answer; `recover()` at start answers whatever a crash left unanswered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
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
    NullSink,
    ReplySink,
    StoredMessage,
    UnknownConversation,
)
from orchestration.config import ReplySettings
from orchestration.events import CallRecord, ConversationInfo, Delta, Escalate, Final, Turn
from orchestration.orchestrator import Orchestrator
from storage import executor
from storage import turns as store
from storage.executor import Database
from storage.models import Direction, MessageStatus, Sender, utcnow

log = structlog.get_logger(__name__)

OUTBOUND_FINAL = {
    MessageStatus.PENDING.value,
    MessageStatus.SENT.value,
    MessageStatus.FAILED.value,
    MessageStatus.UNDELIVERABLE.value,
}
# Inbound messages stored by ingest and not yet taken by the worker: what it would otherwise
# read back. A bound, for work another replica takes (scale-out) and never pops here.
_MAX_PENDING_VIEWS = 10_000


def stored(m: store.StoredRow) -> StoredMessage:
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


def ref(conv: store.ConversationRow) -> ConversationRef:
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
        db: Database | None = None,
    ) -> None:
        # `sessions` (the ORM on the async engine) is for tools and tests; the pipeline's
        # own reads and writes are units on `db` (storage.executor: why).
        self.sessions = sessions
        self.db = db if db is not None else executor.for_engine(sessions.kw["bind"])
        self.hub = hub
        self.queue = queue
        self.orchestrator = orchestrator
        self.channels = channels
        self.reply_settings = reply
        # Two first messages of one new chat must not open two conversations.
        self._chat_locks = KeyedLocks()
        self._pending_views: dict[int, StoredMessage] = {}
        # Answers reserved when their message was stored (store.store_inbound, prepare).
        self._prepared: dict[int, store.Answering] = {}
        self._prepare = store.Prepare(reply.history_messages, _TRUSTED_CHANNELS)

    async def close(self) -> None:
        """After the work queue drained: close the database threads."""
        await self.db.close()

    # -- ChannelHost -------------------------------------------------------------------------

    @property
    def events(self) -> Hub:
        return self.hub

    async def ingest(self, message: InboundMessage) -> IngestResult:
        async with self._chat_locks.hold((message.channel, message.account, message.chat_id)):
            result, view, prepared = await self._store_inbound(message)
        if view is None:
            metrics.DUPLICATES.labels(message.channel).inc()
            return result
        metrics.MESSAGES_IN.labels(message.channel).inc()
        self.hub.publish(view.event())
        if message.answer:
            views = self._pending_views
            if len(views) >= _MAX_PENDING_VIEWS:
                del views[next(iter(views))]
            views[view.id] = view
            if prepared is not None:
                if len(self._prepared) >= _MAX_PENDING_VIEWS:
                    # (begin_answer takes over a reservation it doesn't know of)
                    del self._prepared[next(iter(self._prepared))]
                self._prepared[view.id] = prepared
            await self.queue.put(result.conversation_id, result.message_id)
        return result

    async def _store_inbound(
        self, message: InboundMessage
    ) -> tuple[IngestResult, StoredMessage | None, store.Answering | None]:
        """The stored message (and its answer, reserved if the conversation was idle), or
        (for a redelivery) the earlier one's ids and no view."""
        target = store.InboundTarget(
            message.channel,
            message.account,
            message.chat_id,
            message.user_id,
            message.user_name,
            message.conversation_id,
            message.contact_attributes,
        )
        new = store.NewMessage(
            Direction.IN.value,
            Sender.CONTACT.value,
            (MessageStatus.RECEIVED if message.answer else MessageStatus.SKIPPED).value,
            text=message.text,
            kind=message.kind,
            external_id=message.external_id,
            attachments=message.attachments,
            raw=message.raw,
            sent_at=message.sent_at,
        )
        try:
            row, contact_id, prepared = await self.db.write(
                partial(
                    store.store_inbound,
                    target=target,
                    m=new,
                    prepare=self._prepare if message.answer else None,
                ),
                urgent=True,
            )
        except store.ConversationNotFound as e:
            raise UnknownConversation(message.conversation_id) from e
        except IntegrityError:
            # The external id is stored already (the unique key said so): a redelivery.
            if message.external_id is None:
                raise
            old = await self.db.read(
                partial(
                    store.find_by_external_id,
                    channel=message.channel,
                    account=message.account,
                    external_id=message.external_id,
                )
            )
            if old is None:
                raise
            dup = IngestResult(old.message_id, old.conversation_id, old.contact_id, old.seq, True)
            return dup, None, None
        result = IngestResult(row.id, row.conversation_id, contact_id, row.seq, False)
        return result, stored(row), prepared

    async def get_conversation(self, conversation_id: int) -> ConversationRef | None:
        conv = await self.db.read(partial(store.get_conversation, conversation_id=conversation_id))
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
        rows = await self.db.read(
            partial(
                store.list_messages,
                conversation_id=conversation_id,
                after_seq=after_seq,
                before_seq=before_seq,
                limit=limit,
                complete_only=complete_only,
            )
        )
        return [stored(m) for m in rows]

    async def resume_point(self, conversation_id: int) -> int:
        return await self.db.read(partial(store.resume_point, conversation_id=conversation_id))

    # -- the conversation worker -------------------------------------------------------------

    async def handle(self, conversation_id: int, message_id: int) -> None:
        """Answer one stored inbound message (called by the work queue, in order)."""
        structlog.contextvars.bind_contextvars(conversation_id=conversation_id)
        try:
            await self._handle(conversation_id, message_id)
        finally:
            structlog.contextvars.unbind_contextvars("conversation_id")

    async def _handle(self, conversation_id: int, message_id: int) -> None:
        view = self._pending_views.pop(message_id, None)
        begun: store.Answering | store.NotAnswering | None = self._prepared.pop(message_id, None)
        if begun is None or view is None:
            begun = await self.db.write(
                partial(
                    store.begin_answer,
                    conversation_id=conversation_id,
                    message_id=message_id,
                    history_limit=self.reply_settings.history_messages,
                    trusted_channels=_TRUSTED_CHANNELS,
                    with_inbound=view is None,
                ),
                urgent=True,
            )
        if isinstance(begun, store.NotAnswering):
            if begun.human_channel is not None:
                metrics.REPLIES.labels(begun.human_channel, "human").inc()
            return
        if view is None and begun.inbound is not None:
            view = stored(begun.inbound)
        assert view is not None
        conv_ref = ref(begun.conversation)
        info = ConversationInfo(
            conv_ref.id,
            conv_ref.channel,
            begun.tier,
            spent=begun.cost_total,
            verified=_verified(conv_ref.channel, begun.contact_attributes),
            degraded_answers=sum(
                1 for m in begun.history if m.sender == Sender.BOT.value and m.degraded
            ),
        )
        history = [_turn(m) for m in begun.history]
        question = Turn("user", begun.question.text)
        out_id, seq = begun.out_id, begun.seq

        channel = self.channels[conv_ref.channel]
        sink = channel.open_reply(conv_ref, view)
        started = time.monotonic()
        metrics.IN_FLIGHT.inc()
        try:
            reply, calls = await self._stream(conv_ref, seq, sink, info, history, question, started)
        finally:
            metrics.IN_FLIGHT.dec()
        await self._finish(
            conv_ref,
            inbound_id=message_id,
            out_id=out_id,
            seq=seq,
            created_at=begun.out_created_at,
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
        # (A sink that ignores deltas costs nothing to skip, once per delta.)
        push = None if type(sink).push is NullSink.push else sink.push
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
                    if push is not None:
                        await push(ev.text)
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
        created_at: datetime,
        reply: _Reply,
        calls: list[CallRecord],
        started: float,
        sink: ReplySink,
    ) -> None:
        final = reply.final
        assert final is not None
        # A sink that delivers nothing (its clients read the event bus): storing the answer
        # is its delivery, recorded in the same transaction.
        delivered = _delivers_nothing(sink)
        handoff = None
        if reply.escalate is not None:
            e = reply.escalate
            handoff = (e.reason, _handoff_card(e.detail, e.card))
        row = await self.db.write(
            partial(
                store.finish_answer,
                a=store.FinalAnswer(
                    conversation_id=conv_ref.id,
                    inbound_id=inbound_id,
                    out_id=out_id,
                    out_seq=seq,
                    out_created_at=created_at,
                    text=final.text,
                    calls=[_call_fields(c) for c in calls],
                    model=f"{final.provider}/{final.model}" if final.model else None,
                    tier=final.tier,
                    first_delta_ms=(
                        round(reply.first_delta_s * 1000, 2) if reply.first_delta_s else None
                    ),
                    latency_ms=round((time.monotonic() - started) * 1000, 2),
                    routing=final.routing or None,
                    delivered=delivered,
                    handoff=handoff,
                ),
            )
        )
        for c in calls:
            metrics.LLM_CALLS.labels(c.provider, c.model, c.outcome).inc()
            metrics.LLM_TOKENS.labels(c.provider, c.model, "input").inc(c.input_tokens)
            metrics.LLM_TOKENS.labels(c.provider, c.model, "output").inc(c.output_tokens)
            metrics.LLM_COST.labels(c.provider, c.model).inc(c.cost)
        final_msg = stored(row)
        if row.status == MessageStatus.ABANDONED.value:
            # A human took over while the bot was writing: never talk over them.
            self.hub.publish(final_msg.event())
            await sink.fail("human took over")
            metrics.REPLIES.labels(conv_ref.channel, "abandoned").inc()
            return
        if handoff is not None:
            log.info("handoff_requested", conversation_id=conv_ref.id, reason=handoff[0])
        self.hub.publish(final_msg.event())
        metrics.REPLY_TIME.labels(conv_ref.channel).observe(time.monotonic() - started)
        metrics.REPLIES.labels(conv_ref.channel, "degraded" if final.degraded else "model").inc()
        if not delivered:
            await self._deliver(out_id, conv_ref.id, lambda: sink.finish(final.text))

    async def _deliver(
        self, out_id: int, conversation_id: int, send: Callable[[], Awaitable[Delivery]]
    ) -> Delivery:
        """Hand the final text to the channel and record what the platform said."""
        try:
            delivery = await send()
        except Exception as e:
            log.exception("delivery_failed", message_id=out_id)
            delivery = Delivery(ok=False, detail=repr(e))
        if delivery.ok:
            status = MessageStatus.SENT
        elif delivery.undeliverable:
            status = MessageStatus.UNDELIVERABLE
        else:
            status = MessageStatus.FAILED
        await self.db.write(
            partial(
                store.record_delivery,
                message_id=out_id,
                status=status.value,
                platform_message_ids=delivery.platform_message_ids,
            )
        )
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
        new = store.NewMessage(
            Direction.OUT.value,
            Sender(sender).value,
            MessageStatus.PENDING.value,
            text=text,
            agent_id=agent_id,
            completed_at=utcnow(),
        )
        try:
            conv, row = await self.db.write(
                partial(store.add_outbound, conversation_id=conversation_id, m=new)
            )
        except store.ConversationNotFound as e:
            raise UnknownConversation(conversation_id) from e
        conv_ref, view = ref(conv), stored(row)
        self.hub.publish(view.event())
        channel = self.channels[conv_ref.channel]
        delivery = await self._deliver(
            view.id, conversation_id, lambda: channel.send(conv_ref, text, sender=sender)
        )
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
        handed = await self.db.write(
            partial(
                store.request_handoff,
                conversation_id=conversation_id,
                reason=reason,
                card=_handoff_card(detail, card),
            )
        )
        if handed:
            log.info("handoff_requested", conversation_id=conversation_id, reason=reason)
        return handed

    async def record_edit(self, channel: str, account: str, external_id: str, text: str) -> bool:
        row = await self.db.write(
            partial(
                store.record_edit,
                channel=channel,
                account=account,
                external_id=external_id,
                text=text,
            )
        )
        if row is None:
            return False
        view = stored(row)
        if view.id in self._pending_views:
            self._pending_views[view.id] = view  # not answered yet: the worker sees the edit
        prepared = self._prepared.get(view.id)
        if prepared is not None:
            prepared.question = prepared.question._replace(text=view.text)
        self.hub.publish(
            ConversationEvent(
                view.conversation_id, "message", view.seq, None, {**view.as_json(), "edited": True}
            )
        )
        return True

    # -- recovery ----------------------------------------------------------------------------

    async def recover(self) -> dict[str, int]:
        """After a crash or restart: drop cut answers, deliver stored ones, answer the rest."""
        found = await self.db.write(store.recover)
        for m in found.abandoned:
            self.hub.publish(stored(m).event())
        for m in found.undelivered:
            conv = await self.get_conversation(m.conversation_id)
            if conv is None:
                continue
            channel = self.channels.get(conv.channel)
            if channel is None:
                continue
            await self._deliver(
                m.id, m.conversation_id, partial(channel.send, conv, m.text, sender="bot")
            )
        for conversation_id, message_id in found.unanswered:
            await self.queue.put(conversation_id, message_id)
        counts = {
            "abandoned": len(found.abandoned),
            "redelivered": len(found.undelivered),
            "requeued": len(found.unanswered),
        }
        if any(counts.values()):
            log.info("recovered", **counts)
        return counts


# Channels whose callers the shop itself authenticates (server-to-server).
_TRUSTED_CHANNELS = frozenset({"api"})


def _verified(channel: str, contact_attributes: dict[str, Any] | None) -> bool:
    """Whether order tools may be used: the shop vouched for who this shopper is."""
    if channel in _TRUSTED_CHANNELS:
        return True
    return bool((contact_attributes or {}).get("verified"))


def _handoff_card(detail: str, card: dict[str, Any] | None) -> dict[str, Any] | None:
    return {**(card or {}), "detail": detail} if detail or card else None


def _delivers_nothing(sink: ReplySink) -> bool:
    return type(sink).finish is NullSink.finish


def _turn(m: store.HistoryRow) -> Turn:
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
