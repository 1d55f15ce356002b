"""The conversation worker: answers one stored message (the work queue calls it, one
message of a conversation at a time, in order). Reserve the answer, ask orchestration,
stream the reply through the channel's sink, store the final answer, deliver it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog

from bot import metrics
from bot.pipeline.failed_turn import give_up, turn_retries
from bot.pipeline.outbox import handed_off, handoff_card
from bot.pipeline.parts import Parts
from bot.pipeline.summaries import call_fields
from bot.workqueue import WORK_LEASE
from channels.base import (
    Channel,
    ConversationEvent,
    ConversationRef,
    ReplySink,
    guard_sends,
    message_event,
)
from orchestration.config import ReplySettings
from orchestration.events import (
    CallRecord,
    ConversationInfo,
    Delta,
    Escalate,
    Final,
    Retract,
    Turn,
    Visibility,
)
from orchestration.orchestrator import Orchestrator
from storage import answers, inbox
from storage.answers import Answering, NotAnswering
from storage.fences import FenceLost
from storage.models import Direction, MessageStatus, Sender
from storage.rows import HistoryRow

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Reply:
    """What the worker gathered from one orchestration stream."""

    final: Final | None = None
    escalate: Escalate | None = None
    first_delta_s: float | None = None
    deltas: int = 0


class TurnWorker:
    def __init__(self, parts: Parts, orchestrator: Orchestrator, reply: ReplySettings) -> None:
        self.parts = parts
        self.db, self.hub, self.channels = parts.db, parts.hub, parts.channels
        self.orchestrator = orchestrator
        self.reply_settings = reply
        self._reserved: dict[int, Answering] = {}  # message id -> its answer, while handled

    async def draft(self, conversation_id: int) -> str | None:
        """A reply the bot would give now, for a person to edit and send (never sent by the
        bot, never stored); None when the shopper has not written anything."""
        found = await self.db.read(
            partial(
                inbox.draft_context,
                conversation_id=conversation_id,
                limit=self.reply_settings.history_messages,
            )
        )
        if found is None:
            return None
        channel, tier, attributes, rows, account = found
        asked = [i for i, m in enumerate(rows) if m.direction == Direction.IN.value]
        if not asked:
            return None
        question = rows[asked[-1]]
        info = ConversationInfo(
            conversation_id,
            channel,
            tier,
            shop_user_id=verified_shop_user(attributes),
            drafting=True,
            account=account,
        )
        final: Final | None = None
        history = [_turn(m) for m in rows[: asked[-1]]]
        async for ev in self.orchestrator.reply(info, history, Turn("user", question.text)):
            if isinstance(ev, Final):
                final = ev
        return final.text if final is not None else None

    async def handle(self, conversation_id: int, message_id: int) -> None:
        """Answer one stored inbound message (called by the work queue, in order). A turn
        that raises (a database error, an account gone from the config) is tried again
        with backoff; after the last try the shopper gets the fallback text and a person
        is asked for (bot/pipeline/failed_turn.py)."""
        structlog.contextvars.bind_contextvars(conversation_id=conversation_id)
        try:
            async for attempt in turn_retries():
                with attempt:
                    try:
                        await self._handle(conversation_id, message_id)
                    except Exception:
                        self.hub.forget_inflight(conversation_id)  # the next try streams anew
                        raise
        except asyncio.CancelledError:
            raise
        except FenceLost as e:
            # Another process holds the conversation now and answers the message itself.
            log.warning("turn_fenced", message_id=message_id, detail=str(e))
        except Exception:
            log.exception("turn_failed", message_id=message_id)
            await give_up(
                self.parts, self.reply_settings, conversation_id, self._reserved.get(message_id)
            )
        finally:
            self._reserved.pop(message_id, None)
            structlog.contextvars.unbind_contextvars("conversation_id")

    async def _handle(self, conversation_id: int, message_id: int) -> None:
        view, prepared = self.parts.prepared.take(message_id)
        begun: Answering | NotAnswering | None = prepared
        if begun is None or view is None:
            lease = WORK_LEASE.get()
            begun = await self.db.write(
                partial(
                    answers.begin_answer,
                    conversation_id=conversation_id,
                    message_id=message_id,
                    history_limit=self.reply_settings.history_messages,
                    with_inbound=view is None,
                    fence=lease.fence if lease is not None else None,
                ),
                urgent=True,
            )
        if isinstance(begun, NotAnswering):
            if begun.human_channel is not None:
                metrics.REPLIES.labels(begun.human_channel, "human").inc()
            return
        self._reserved[message_id] = begun  # what give_up needs if the turn fails
        if view is None:
            view = begun.inbound
        assert view is not None
        conv = begun.conversation
        info = ConversationInfo(
            conv.id,
            conv.channel,
            begun.tier,
            spent=begun.cost_total,
            shop_user_id=verified_shop_user(begun.contact_attributes),
            degraded_answers=sum(
                1 for m in begun.history if m.sender == Sender.BOT.value and m.degraded
            ),
            account=conv.account,
        )
        history = [_turn(m) for m in begun.history]
        question = Turn("user", begun.question.text)

        channel = self.channels[conv.channel]
        taken = self.parts.taken
        lease = WORK_LEASE.get()
        # From here on every send of this answer first asks whether a person took over (and,
        # with several processes, whether this one still holds the conversation).
        if lease is None:
            guard_sends(lambda: conv.id not in taken)
        else:
            guard_sends(lambda: conv.id not in taken and lease.valid())
        sink = channel.open_reply(conv, view)
        started = time.monotonic()
        metrics.IN_FLIGHT.inc()
        try:
            reply, calls = await self._stream(
                conv, begun.seq, channel, sink, info, history, question, started
            )
        finally:
            metrics.IN_FLIGHT.dec()
        await self._finish(begun, channel, reply, calls, started, sink)

    async def _stream(
        self,
        conv: ConversationRef,
        seq: int,
        channel: Channel,
        sink: ReplySink,
        info: ConversationInfo,
        turns: list[Turn],
        question: Turn,
        started: float,
    ) -> tuple[_Reply, list[CallRecord]]:
        reply = _Reply()
        calls: list[CallRecord] = []
        # (A channel whose clients read the event bus needs no deltas pushed to its sink.)
        push = None if channel.capabilities.event_bus_delivery else sink.push
        self.hub.publish(ConversationEvent(conv.id, "typing", seq))
        taken = self.parts.taken
        # What the shopper may have seen: orchestration restarts a failed answer cleanly
        # only while nothing was (a delta on the hub reaches its readers at once; a sink
        # says whether it showed anything, e.g. WeChat buffers until a piece goes out).
        vis = Visibility()
        try:
            await sink.typing()
            lease = WORK_LEASE.get()
            async for ev in self.orchestrator.reply(info, turns, question, vis):
                if lease is not None and not lease.held():
                    raise FenceLost("this process lost the conversation's work partition")
                if conv.id in taken:
                    # A person took over: stop writing now; the answer is stored abandoned.
                    inflight = self.hub.inflight(conv.id)
                    reply.final = Final(text="".join(inflight[1]) if inflight else "")
                    break
                if isinstance(ev, Retract):
                    vis.withdrawing = False
                    sink.retract()
                    # (a typing event starts the answer's in-flight text afresh)
                    self.hub.publish(ConversationEvent(conv.id, "typing", seq))
                elif isinstance(ev, Delta):
                    if vis.withdrawing:
                        continue  # the rest of an attempt being withdrawn
                    if reply.first_delta_s is None:
                        reply.first_delta_s = time.monotonic() - started
                        metrics.FIRST_DELTA.labels(conv.channel).observe(reply.first_delta_s)
                    self.hub.publish(
                        ConversationEvent(conv.id, "delta", seq, reply.deltas, {"text": ev.text})
                    )
                    reply.deltas += 1
                    if push is None:
                        vis.seen = True
                    else:
                        vis.sending = True
                        try:
                            await push(ev.text)
                        finally:
                            vis.sending = False
                        vis.seen = vis.seen or sink.shown()
                elif isinstance(ev, CallRecord):
                    calls.append(ev)
                elif isinstance(ev, Final):
                    reply.final = ev
                elif isinstance(ev, Escalate):
                    reply.escalate = ev
        except (asyncio.CancelledError, FenceLost):
            raise  # shutdown: the answer stays STREAMING and is redone after restart
        except Exception:
            log.exception("orchestration_raised")
        if reply.final is None:
            reply.final = Final(text=self.reply_settings.fallback_text, degraded=True)
            reply.escalate = reply.escalate or Escalate("internal_error")
        return reply, calls

    async def _finish(
        self,
        begun: Answering,
        channel: Channel,
        reply: _Reply,
        calls: list[CallRecord],
        started: float,
        sink: ReplySink,
    ) -> None:
        conv, out_id = begun.conversation, begun.out_id
        final = reply.final
        assert final is not None
        # A channel that delivers nothing (its clients read the event bus): storing the
        # answer is its delivery, recorded in the same transaction.
        delivered = channel.capabilities.event_bus_delivery
        lease = WORK_LEASE.get()
        handoff = None
        if reply.escalate is not None:
            e = reply.escalate
            handoff = (e.reason, handoff_card(e.detail, e.card))
        row = await self.db.write(
            partial(
                answers.finish_answer,
                a=answers.FinalAnswer(
                    conversation_id=conv.id,
                    inbound_id=begun.question.id,
                    out_id=out_id,
                    out_seq=begun.seq,
                    out_created_at=begun.out_created_at,
                    text=final.text,
                    calls=[call_fields(c) for c in calls],
                    model=f"{final.provider}/{final.model}" if final.model else None,
                    tier=final.tier,
                    first_delta_ms=(
                        round(reply.first_delta_s * 1000, 2) if reply.first_delta_s else None
                    ),
                    latency_ms=round((time.monotonic() - started) * 1000, 2),
                    routing=final.routing or None,
                    delivered=delivered,
                    handoff=handoff,
                    fence=lease.fence if lease is not None else None,
                ),
            )
        )
        for c in calls:
            metrics.LLM_CALLS.labels(c.provider, c.model, c.outcome).inc()
            metrics.LLM_TOKENS.labels(c.provider, c.model, "input").inc(c.input_tokens)
            metrics.LLM_TOKENS.labels(c.provider, c.model, "output").inc(c.output_tokens)
            metrics.LLM_COST.labels(c.provider, c.model).inc(c.cost)
        if row.status == MessageStatus.ABANDONED.value:
            # A human took over while the bot was writing: never talk over them.
            self.hub.publish(message_event(row))
            await sink.fail("human took over")
            metrics.REPLIES.labels(conv.channel, "abandoned").inc()
            return
        if handoff is not None:
            self.parts.outbox.handed_over(conv.id, handoff[0])
        self.hub.publish(message_event(row))
        metrics.REPLY_TIME.labels(conv.channel).observe(time.monotonic() - started)
        metrics.REPLIES.labels(conv.channel, "degraded" if final.degraded else "model").inc()
        if delivered:
            return
        if conv.id in self.parts.taken:
            # Taken over between storing the answer and sending it: it never goes out.
            await self.db.write(
                partial(
                    answers.record_delivery,
                    message_id=out_id,
                    status=MessageStatus.ABANDONED.value,
                    platform_message_ids=[],
                )
            )
            await sink.fail("human took over")
            return
        await self.parts.outbox.deliver(out_id, conv.id, lambda: sink.finish(final.text))
        if handoff is not None:
            await handed_off(channel, conv, handoff[0])  # after the answer that says so


def verified_shop_user(attributes: dict[str, Any] | None) -> str | None:
    """The shop user id the channel verified for this contact (widget HMAC, an API caller
    that named it); arriving on a channel vouches for no one."""
    attrs = attributes or {}
    user = attrs.get("shop_user_id")
    return user if attrs.get("verified") is True and isinstance(user, str) and user else None


def _turn(m: HistoryRow) -> Turn:
    role = "user" if m.direction == Direction.IN.value else "assistant"
    return Turn(role, m.text, m.sender)
