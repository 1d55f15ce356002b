"""The side of the pipeline the channels call (`channels.base.ChannelHost`): store what a
shopper sends before the webhook is acknowledged and queue it for the worker; read history
for streaming clients; store and deliver system and agent messages; record edits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial

from sqlalchemy.exc import IntegrityError

from bot import metrics
from bot.hub import Hub, owner_event
from bot.locks import LockStore
from bot.pipeline.outbox import delivery_status
from bot.pipeline.parts import Parts
from bot.workqueue import WorkQueue
from channels.base import (
    ConversationEvent,
    ConversationRef,
    InboundMessage,
    IngestResult,
    StoredMessage,
    UnknownConversation,
    message_event,
)
from storage import answers, handoff, inbound, reads
from storage.answers import Answering
from storage.models import Direction, MessageStatus, Owner, Sender, utcnow
from storage.rows import AgentRow, ConversationNotFound, NewMessage


class Host:
    def __init__(
        self, parts: Parts, queue: WorkQueue, chat_locks: LockStore, history_limit: int
    ) -> None:
        self.parts = parts
        self.db, self.hub, self.channels = parts.db, parts.hub, parts.channels
        self.queue = queue
        # Two first messages of one new chat must not open two conversations.
        self._chat_locks = chat_locks
        self._prepare = inbound.Prepare(history_limit)

    @property
    def events(self) -> Hub:
        return self.hub

    async def ingest(self, message: InboundMessage) -> IngestResult:
        key = (message.channel, message.account, message.chat_id)
        async with self._chat_locks.hold(key) as held:
            result, view, answering = await self._store(message)
            if view is not None and message.answer:
                # Queued under the chat's lock: the queue's order is the order of storing,
                # also when several processes take one chat's messages.
                if self.queue.here(result.conversation_id):
                    self.parts.prepared.keep(view, answering)
                await self.queue.put(result.conversation_id, result.message_id, unlock=held)
        if view is None:
            metrics.DUPLICATES.labels(message.channel).inc()
            return result
        metrics.MESSAGES_IN.labels(message.channel).inc()
        self.hub.publish(message_event(view))
        return result

    async def _store(
        self, message: InboundMessage
    ) -> tuple[IngestResult, StoredMessage | None, Answering | None]:
        """The stored message (and its answer, reserved if the conversation was idle), or
        (for a redelivery) the earlier one's ids and no view."""
        target = inbound.InboundTarget(
            message.channel,
            message.account,
            message.chat_id,
            message.user_id,
            message.user_name,
            message.conversation_id,
            message.contact_attributes,
        )
        status = MessageStatus.RECEIVED if message.answer else MessageStatus.SKIPPED
        direction, sender = Direction.IN, Sender.CONTACT
        if message.sender == "agent":
            # A person wrote it on the platform itself (a WeCom servicer): delivered already.
            direction, sender, status = Direction.OUT, Sender.AGENT, MessageStatus.SENT
        new = NewMessage(
            direction.value,
            sender.value,
            status.value,
            text=message.text,
            kind=message.kind,
            external_id=message.external_id,
            attachments=message.attachments,
            raw=message.raw,
            sent_at=message.sent_at,
        )
        try:
            row, contact_id, answering = await self.db.write(
                partial(
                    inbound.store_inbound,
                    target=target,
                    m=new,
                    prepare=self._prepare if message.answer else None,
                ),
                urgent=True,
            )
        except ConversationNotFound as e:
            raise UnknownConversation(message.conversation_id) from e
        except IntegrityError:
            # The external id is stored already (the unique key said so): a redelivery.
            if message.external_id is None:
                raise
            old = await self.db.read(
                partial(
                    inbound.find_by_external_id,
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
        return result, row, answering

    async def get_conversation(self, conversation_id: int) -> ConversationRef | None:
        return await self.db.read(partial(reads.get_conversation, conversation_id=conversation_id))

    async def list_messages(
        self,
        conversation_id: int,
        *,
        after_seq: int | None = None,
        before_seq: int | None = None,
        limit: int = 50,
        complete_only: bool = False,
    ) -> Sequence[StoredMessage]:
        return await self.db.read(
            partial(
                reads.list_messages,
                conversation_id=conversation_id,
                after_seq=after_seq,
                before_seq=before_seq,
                limit=limit,
                complete_only=complete_only,
            )
        )

    async def resume_point(self, conversation_id: int) -> int:
        return await self.db.read(partial(reads.resume_point, conversation_id=conversation_id))

    async def send_message(
        self,
        conversation_id: int,
        text: str,
        *,
        sender: str = "system",
        agent_id: int | None = None,
    ) -> StoredMessage:
        new = NewMessage(
            Direction.OUT.value,
            Sender(sender).value,
            MessageStatus.PENDING.value,
            text=text,
            agent_id=agent_id,
            completed_at=utcnow(),
        )
        try:
            conv, view = await self.db.write(
                partial(answers.add_outbound, conversation_id=conversation_id, m=new)
            )
        except ConversationNotFound as e:
            raise UnknownConversation(conversation_id) from e
        self.hub.publish(message_event(view))
        channel = self.channels[conv.channel]
        delivery = await self.parts.outbox.deliver(
            view.id, conversation_id, lambda: channel.send(conv, text, sender=sender)
        )
        return replace(
            view,
            status=delivery_status(delivery),
            platform_message_ids=delivery.platform_message_ids,
        )

    async def request_handoff(self, conversation_id: int, reason: str, detail: str = "") -> bool:
        return await self.parts.outbox.request_handoff(conversation_id, reason, detail)

    async def agent_typing(self, conversation_id: int) -> None:
        """A person is writing in the console: the shopper sees it where the channel can."""
        conv = await self.get_conversation(conversation_id)
        if conv is None:
            raise UnknownConversation(conversation_id)
        channel = self.channels.get(conv.channel)
        if channel is None:
            return
        if channel.capabilities.event_bus_delivery:
            seq = await self.resume_point(conversation_id) + 1
            self.hub.signal(
                ConversationEvent(conversation_id, "typing", seq, None, {"by": "agent"})
            )
        else:
            await channel.agent_typing(conv)

    async def change_owner(
        self, conversation_id: int, action: str, agent: AgentRow, target_id: int | None = None
    ) -> handoff.Moved:
        """An agent's move (storage.handoff.MOVES): stored with its event; the bot stops
        answering a conversation a person takes and starts again when handed back; the
        console hears of it. Raises OwnerRefused, UnknownConversation."""
        return await self._move(
            conversation_id, action, agent.id, agent.role == "admin", target_id, None
        )

    async def answer_not_delivered(self, question_id: int, detail: str) -> bool:
        cid = await self.db.write(partial(answers.answer_failed, question_id=question_id))
        if cid is None:
            return False
        await self.parts.outbox.request_handoff(cid, "send_failed", detail)
        return True

    async def platform_move(self, conversation_id: int, action: str, reason: str) -> bool:
        """A move the platform made (a WeCom servicer took or ended the session)."""
        moved = await self._move(conversation_id, action, None, True, None, reason)
        return moved.changed

    async def _move(
        self,
        conversation_id: int,
        action: str,
        actor_id: int | None,
        admin: bool,
        target_id: int | None,
        reason: str | None,
    ) -> handoff.Moved:
        try:
            moved = await self.db.write(
                partial(
                    handoff.move,
                    conversation_id=conversation_id,
                    action=action,
                    actor_id=actor_id,
                    admin=admin,
                    target_id=target_id,
                    reason=reason,
                ),
                urgent=True,
            )
        except ConversationNotFound as e:
            raise UnknownConversation(conversation_id) from e
        owner = moved.conversation.owner
        if owner == Owner.BOT.value:
            self.parts.taken.discard(conversation_id)
        else:
            self.parts.taken.add(conversation_id)
        if moved.changed:
            metrics.OWNER_CHANGES.labels(action).inc()
            self.hub.announce(owner_event(conversation_id, owner, action, reason))
        return moved

    async def record_edit(self, channel: str, account: str, external_id: str, text: str) -> bool:
        view = await self.db.write(
            partial(
                inbound.record_edit,
                channel=channel,
                account=account,
                external_id=external_id,
                text=text,
            )
        )
        if view is None:
            return False
        self.parts.prepared.edited(view)
        self.hub.publish(
            ConversationEvent(
                view.conversation_id, "message", view.seq, None, {**view.as_json(), "edited": True}
            )
        )
        return True
