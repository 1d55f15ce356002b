"""PostgreSQL's hot path of a turn in as few round trips as its guarantees allow.

Every statement is a round trip, and on the threaded executor each one also waits for the
GIL while the event loop is busy: storing a message with its answer's reservation took
eight statements, storing the final answer four. Here the same units take two and one,
with data-modifying CTEs (PostgreSQL only; SQLite keeps storage.inbound / storage.answers'
statements, which cost it no round trips).

Storing stays two statements on purpose: the first takes the conversation's row lock (it
allocates the seq), and only a statement that starts after that sees every message of
the conversation committed before: READ COMMITTED takes a new snapshot per statement, not
per CTE. So "is anything else of the conversation waiting?" is asked by the second.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import JSON, bindparam, text
from sqlalchemy.engine import Connection

from storage.fences import FenceLost
from storage.models import Direction, MessageStatus, Sender
from storage.rows import ConversationNotFound, HistoryRow, NewMessage, StoredMessage
from storage.statements import BOT

if TYPE_CHECKING:
    from storage.answers import FinalAnswer

# The enum values the statements compare with: parameters, so the SQL can't drift from them.
_VALUES = {
    "v_bot": BOT,
    "v_out": Direction.OUT.value,
    "v_bot_sender": Sender.BOT.value,
    "v_received": MessageStatus.RECEIVED.value,
    "v_streaming": MessageStatus.STREAMING.value,
    "v_abandoned": MessageStatus.ABANDONED.value,
    "v_answered": MessageStatus.ANSWERED.value,
    "v_human": MessageStatus.HUMAN.value,
}

# A message to a named conversation of the contact: check it is theirs, take a seq (and the
# row lock), and return what the rest of the unit needs, the contact's attributes included.
ALLOCATE = text(
    """
UPDATE conversations AS c SET last_seq = c.last_seq + 1, updated_at = :now
WHERE c.id = :conversation_id
  AND c.contact_id = (SELECT k.id FROM contacts AS k
                      WHERE k.channel = :channel AND k.account = :account
                        AND k.external_id = :user)
RETURNING c.last_seq, c.contact_id, c.owner, c.csat_asked_at, c.channel, c.account,
          c.chat_id, c.tier, c.cost_total,
          (SELECT k.attributes FROM contacts AS k WHERE k.id = c.contact_id)
"""
)

_MESSAGE_COLUMNS = """conversation_id, seq, channel, account, external_id, direction, sender,
    agent_id, kind, text, attachments, status, reply_to_id, platform_message_ids, raw, sent_at,
    created_at, completed_at"""

# The contact's attributes when they changed, and the message.
_STORE = f"""
contact AS (
  UPDATE contacts SET attributes = :attributes
  WHERE id = :contact_id AND CAST(:set_contact AS BOOLEAN)
  RETURNING 1
),
q AS (
  INSERT INTO messages ({_MESSAGE_COLUMNS})
  VALUES (:conversation_id, :seq, :channel, :account, :external_id, :direction, :sender,
          :agent_id, :kind, :text, :attachments, :status, NULL, :no_ids, :raw, :sent_at,
          :now, :completed_at)
  RETURNING id
)"""

STORE = text(f"WITH {_STORE} SELECT id FROM q").bindparams(
    bindparam("attributes", type_=JSON),
    bindparam("attachments", type_=JSON),
    bindparam("no_ids", type_=JSON),
    bindparam("raw", type_=JSON),
)

# The same, and the answer reserved (a STREAMING row at the next seq) when nothing else of
# the conversation waits or is being answered: one row per history message before it (the
# newest `history_before`; one row with NULL history when there is none or nothing was
# reserved).
STORE_AND_RESERVE = text(
    f"""
WITH {_STORE},
r AS (
  UPDATE conversations SET last_seq = last_seq + 1
  WHERE id = :conversation_id AND owner = :v_bot
    AND NOT EXISTS (SELECT 1 FROM messages AS w
                    WHERE w.conversation_id = :conversation_id
                      AND w.status IN (:v_received, :v_streaming))
  RETURNING last_seq
),
a AS (
  INSERT INTO messages ({_MESSAGE_COLUMNS})
  SELECT CAST(:conversation_id AS BIGINT), r.last_seq, CAST(:channel AS VARCHAR),
         CAST(:account AS VARCHAR), NULL, CAST(:v_out AS VARCHAR),
         CAST(:v_bot_sender AS VARCHAR), NULL, 'text', '', :no_ids,
         CAST(:v_streaming AS VARCHAR), q.id, :no_ids, NULL, NULL,
         CAST(:now AS TIMESTAMPTZ), NULL
  FROM r, q
  RETURNING id, seq
)
SELECT q.id, a.id, a.seq, h.id, h.seq, h.direction, h.sender, h.text, h.status, h.degraded
FROM q LEFT JOIN a ON true
LEFT JOIN LATERAL (
  SELECT m.id, m.seq, m.direction, m.sender, m.text, m.status,
         CAST(m.routing ->> 'degraded' AS BOOLEAN) AS degraded
  FROM messages AS m
  WHERE a.id IS NOT NULL AND m.conversation_id = :conversation_id AND m.seq < :seq
    AND m.status NOT IN (:v_streaming, :v_abandoned)
  ORDER BY m.seq DESC
  LIMIT :history_before
) AS h ON true
"""
).bindparams(
    bindparam("attributes", type_=JSON),
    bindparam("attachments", type_=JSON),
    bindparam("no_ids", type_=JSON),
    bindparam("raw", type_=JSON),
)


class Reserved(NamedTuple):
    """The answer reserved with the message: what storage.answers.Answering needs more."""

    question: HistoryRow
    history: list[HistoryRow]  # oldest first
    out_id: int
    seq: int


def allocate(
    conn: Connection, conversation_id: int, channel: str, account: str, user: str, now: datetime
) -> Sequence[Any]:
    """(seq, contact id, owner, csat_asked_at, channel, account, chat id, tier, cost_total,
    the contact's attributes) of the contact's conversation, a new seq taken; raises
    ConversationNotFound."""
    row = conn.execute(
        ALLOCATE,
        {
            "conversation_id": conversation_id,
            "channel": channel,
            "account": account,
            "user": user,
            "now": now,
        },
    ).first()
    if row is None:
        raise ConversationNotFound(conversation_id)
    return row


def store(
    conn: Connection,
    place: tuple[int, str, str, int],
    seq: int,
    m: NewMessage,
    now: datetime,
    attributes: dict[str, Any] | None,
    set_contact: bool,
    history_limit: int | None,
) -> tuple[StoredMessage, Reserved | None]:
    """Store `m` at `seq` (after `allocate`) in `place` (conversation id, channel, account,
    contact id), the contact's `attributes` if `set_contact`; with `history_limit`, reserve
    the answer if the conversation was idle."""
    conversation_id, channel, account, contact_id = place
    attachments = m.attachments or []
    params: dict[str, Any] = {
        **_VALUES,
        "attributes": attributes,
        "set_contact": set_contact,
        "contact_id": contact_id,
        "conversation_id": conversation_id,
        "seq": seq,
        "channel": channel,
        "account": account,
        "external_id": m.external_id,
        "direction": m.direction,
        "sender": m.sender,
        "agent_id": m.agent_id,
        "kind": m.kind,
        "text": m.text,
        "attachments": attachments,
        "status": m.status,
        "no_ids": [],
        "raw": m.raw,
        "sent_at": m.sent_at,
        "now": now,
        "completed_at": m.completed_at,
    }
    if history_limit is None:
        message_id = conn.execute(STORE, params).scalar_one()
        rows: Sequence[Any] = ()
    else:
        params["history_before"] = max(history_limit - 1, 0)
        rows = conn.execute(STORE_AND_RESERVE, params).all()
        message_id = rows[0][0]
    stored = StoredMessage(
        int(message_id),
        conversation_id,
        seq,
        m.direction,
        m.sender,
        m.kind,
        m.text,
        m.status,
        now,
        None,
        attachments,
        m.external_id,
        m.agent_id,
        [],
        m.raw,
    )
    if not rows or rows[0][1] is None:
        return stored, None
    question = HistoryRow(stored.id, seq, m.direction, m.sender, m.text, m.status, None)
    turns = sorted((HistoryRow._make(r[3:]) for r in rows if r[3] is not None), key=_seq)
    return stored, Reserved(question, turns, int(rows[0][1]), int(rows[0][2]))


def _seq(row: HistoryRow) -> int:
    return row.seq


# The final answer, its model calls and the conversation's cost at once; as abandoned when
# a person owns the conversation now (storage.answers.finish_answer says why). The calls
# come as one JSON array (a key left out takes the column's default, as with INSERT_CALLS).
_FINISH = """
calls AS (
  INSERT INTO llm_calls (conversation_id, message_id, created_at, provider, model, tier,
      specialist, purpose, intent, first_token_ms, latency_ms, input_tokens, output_tokens,
      usage_estimated, cost, outcome, error)
  SELECT CAST(:conversation_id AS BIGINT), CAST(:inbound_id AS BIGINT),
      CAST(:now AS TIMESTAMPTZ), r.provider, r.model, r.tier, r.specialist,
      coalesce(r.purpose, 'reply'), r.intent, r.first_token_ms, r.latency_ms,
      coalesce(r.input_tokens, 0), coalesce(r.output_tokens, 0),
      coalesce(r.usage_estimated, false), coalesce(r.cost, 0.0), r.outcome, r.error
  FROM json_populate_recordset(NULL::llm_calls, :calls) AS r
),
c AS (
  UPDATE conversations
  SET cost_total = coalesce(cost_total, 0.0) + :cost, updated_at = :now,
      tier = CASE WHEN owner = :v_bot THEN coalesce(CAST(:tier AS VARCHAR), tier)
                  ELSE tier END
  WHERE id = :conversation_id
  RETURNING owner
),
answer AS (
  UPDATE messages SET text = :text, status = :status, model = :model, tier = :tier,
      input_tokens = :input_tokens, output_tokens = :output_tokens, cost = :cost,
      first_delta_ms = :first_delta_ms, latency_ms = :latency_ms, routing = :routing,
      completed_at = :now
  FROM c WHERE messages.id = :out_id AND c.owner = :v_bot
),
abandoned AS (
  UPDATE messages SET text = :text, status = :v_abandoned, completed_at = :now
  FROM c WHERE messages.id = :out_id AND c.owner <> :v_bot
),
answered AS (
  UPDATE messages SET status = :v_answered, routing = :routing
  FROM c WHERE messages.id = :inbound_id AND c.owner = :v_bot
),
human AS (
  UPDATE messages SET status = :v_human
  FROM c WHERE messages.id = :inbound_id AND c.owner <> :v_bot
)"""
_FINISH_PARAMS = (bindparam("calls", type_=JSON), bindparam("routing", type_=JSON))
FINISH = text(f"WITH {_FINISH} SELECT owner, NULL FROM c").bindparams(*_FINISH_PARAMS)
# The same under a work partition's lease (storage.fences.check, in the same statement): the
# token read under a share lock, so a takeover waits until this transaction ends; a token
# not the answer's own makes the caller raise, and the rollback undoes the rest.
FINISH_FENCED = text(
    f"""
WITH fence AS (
  SELECT token FROM work_fences
  WHERE partitions = :f_partitions AND partition = :f_partition
  FOR SHARE
),
{_FINISH}
SELECT owner, (SELECT token FROM fence) FROM c"""
).bindparams(*_FINISH_PARAMS)


def finish(conn: Connection, a: FinalAnswer, now: datetime) -> str:
    """Store the final answer (no handoff: see storage.answers.finish_answer); the status
    it was stored with. Raises FenceLost (the caller's transaction rolls back) when the
    answer's work partition is held by another process now."""
    cost = sum(float(c["cost"]) for c in a.calls)
    status = MessageStatus.SENT.value if a.delivered else MessageStatus.PENDING.value
    fence = a.fence
    fenced = (
        {} if fence is None else {"f_partitions": fence.partitions, "f_partition": fence.partition}
    )
    owner, token = conn.execute(
        FINISH if fence is None else FINISH_FENCED,
        {
            **_VALUES,
            **fenced,
            "conversation_id": a.conversation_id,
            "inbound_id": a.inbound_id,
            "out_id": a.out_id,
            "now": now,
            "calls": list(a.calls),
            "cost": cost,
            "tier": a.tier,
            "text": a.text,
            "status": status,
            "model": a.model,
            "input_tokens": sum(int(c["input_tokens"]) for c in a.calls),
            "output_tokens": sum(int(c["output_tokens"]) for c in a.calls),
            "first_delta_ms": a.first_delta_ms,
            "latency_ms": a.latency_ms,
            "routing": a.routing,
        },
    ).one()
    if fence is not None and token != fence.token:
        raise FenceLost(f"partition {fence.partition} is now held with token {token}")
    return status if owner == BOT else MessageStatus.ABANDONED.value
