"""What the agent console reads: conversations by view (waiting for a person, mine, open,
resolved), one conversation with its ownership events, history with internal notes.
Units for storage.executor."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.engine import Connection

from storage.handoff import HUMAN, RESOLVED, WAITING
from storage.models import ConversationNote, MessageStatus, utcnow
from storage.reads import list_messages
from storage.rows import HistoryRow
from storage.statements import CONTACTS, CONVERSATIONS, HANDOFFS, HISTORY_COLUMNS, C, K, M

NOTES = cast(Table, ConversationNote.__table__)
_N, _H = NOTES.c, HANDOFFS.c
VIEWS = ("waiting", "mine", "open", "resolved")
_CONVERSATION = (
    C.id,
    C.channel,
    C.account,
    C.chat_id,
    C.owner,
    C.owner_since,
    C.assigned_agent_id,
    C.updated_at,
    C.created_at,
    C.rating,
    K.id,
    K.display_name,
    K.external_id,
)


def conversations(
    conn: Connection,
    view: str,
    agent_id: int,
    *,
    channel: str | None = None,
    account: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    q = select(*_CONVERSATION).join_from(CONVERSATIONS, CONTACTS, K.id == C.contact_id)
    if view == "waiting":
        q = q.where(C.owner == WAITING).order_by(
            func.coalesce(C.owner_since, C.updated_at).asc(), C.id
        )
    elif view == "mine":
        q = q.where(C.owner == HUMAN, C.assigned_agent_id == agent_id)
    elif view == "open":
        q = q.where(C.owner != RESOLVED)
    else:
        q = q.where(C.owner == RESOLVED)
    if view != "waiting":
        q = q.order_by(C.updated_at.desc(), C.id.desc())
    if channel:
        q = q.where(C.channel == channel)
    if account:
        q = q.where(C.account == account)
    rows = conn.execute(q.limit(limit)).all()
    return _described(conn, rows)


def conversation(conn: Connection, conversation_id: int) -> dict[str, Any] | None:
    row = conn.execute(
        select(*_CONVERSATION)
        .join_from(CONVERSATIONS, CONTACTS, K.id == C.contact_id)
        .where(C.id == conversation_id)
    ).first()
    if row is None:
        return None
    (described,) = _described(conn, [row])
    events = conn.execute(
        select(_H.from_owner, _H.to_owner, _H.reason, _H.agent_id, _H.created_at)
        .where(_H.conversation_id == conversation_id)
        .order_by(_H.id)
    ).all()
    described["events"] = [
        {
            "from_owner": f,
            "to_owner": t,
            "reason": r,
            "agent_id": a,
            "created_at": _iso(at),
        }
        for f, t, r, a, at in events
    ]
    return described


def _described(conn: Connection, rows: Sequence[Any]) -> list[dict[str, Any]]:
    """The list's shape (docs/agent-api.md), with each one's last message and handoff."""
    ids = [r[0] for r in rows]
    last: dict[int, dict[str, Any]] = {}
    handoffs: dict[int, dict[str, Any]] = {}
    if ids:
        newest = (
            select(M.conversation_id, func.max(M.seq).label("seq"))
            .where(M.conversation_id.in_(ids), M.status != MessageStatus.STREAMING.value)
            .group_by(M.conversation_id)
            .subquery()
        )
        for cid, seq, sender, text, at in conn.execute(
            select(M.conversation_id, M.seq, M.sender, M.text, M.created_at).join(
                newest, (newest.c.conversation_id == M.conversation_id) & (newest.c.seq == M.seq)
            )
        ):
            last[cid] = {"seq": seq, "sender": sender, "text": text, "created_at": _iso(at)}
        latest = (
            select(func.max(_H.id))
            .where(_H.conversation_id.in_(ids), _H.to_owner == WAITING)
            .group_by(_H.conversation_id)
        )
        for cid, reason, card in conn.execute(
            select(_H.conversation_id, _H.reason, _H.card).where(_H.id.in_(latest))
        ):
            handoffs[cid] = {"reason": reason, "card": card or {}}
    now = utcnow()
    out = []
    for (
        cid,
        ch,
        acc,
        chat,
        owner,
        since,
        assigned,
        updated,
        created,
        rating,
        kid,
        name,
        ext,
    ) in rows:
        waiting_since = _aware(since or updated) if owner == WAITING else None
        out.append(
            {
                "id": cid,
                "channel": ch,
                "account": acc,
                "chat_id": chat,
                "contact": {"id": kid, "name": name, "external_id": ext},
                "owner": owner,
                "assigned_agent_id": assigned,
                "waiting_since": _iso(waiting_since),
                "waiting_seconds": (
                    round((now - waiting_since).total_seconds(), 1) if waiting_since else None
                ),
                "handoff": handoffs.get(cid),
                "last_message": last.get(cid),
                "rating": rating,
                "updated_at": _iso(updated),
                "created_at": _iso(created),
            }
        )
    return out


def history(
    conn: Connection, conversation_id: int, before_seq: int | None, limit: int
) -> list[dict[str, Any]]:
    """Messages (bot, people, system) and the notes written meanwhile, oldest first."""
    messages = list_messages(
        conn, conversation_id, before_seq=before_seq, limit=limit, complete_only=True
    )
    items = [(_aware(m.created_at), {**m.as_json(), "agent_id": m.agent_id}) for m in messages]
    q = select(_N.id, _N.agent_id, _N.text, _N.created_at).where(
        _N.conversation_id == conversation_id
    )
    if messages and (before_seq is not None or len(messages) >= limit):
        q = q.where(_N.created_at >= messages[0].created_at)  # this page's stretch only
    if messages and before_seq is not None:
        q = q.where(_N.created_at <= messages[-1].created_at)
    for nid, agent_id, text, at in conn.execute(q.order_by(_N.id)):
        items.append((_aware(at), note_json(nid, conversation_id, agent_id, text, _aware(at))))
    items.sort(key=lambda pair: pair[0])
    return [item for _, item in items]


def add_note(conn: Connection, conversation_id: int, agent_id: int, text: str) -> dict[str, Any]:
    now = utcnow()
    key = conn.execute(
        insert(NOTES).values(
            conversation_id=conversation_id, agent_id=agent_id, text=text, created_at=now
        )
    ).inserted_primary_key
    assert key is not None
    return note_json(int(key[0]), conversation_id, agent_id, text, now)


def note_json(
    note_id: int, conversation_id: int, agent_id: int, text: str, at: datetime
) -> dict[str, Any]:
    return {
        "id": f"note-{note_id}",
        "conversation_id": conversation_id,
        "kind": "note",
        "sender": "agent",
        "agent_id": agent_id,
        "text": text,
        "created_at": at.isoformat(),
    }


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=utcnow().tzinfo)


def _iso(when: datetime | None) -> str | None:
    return _aware(when).isoformat() if when is not None else None


def ask_satisfaction(conn: Connection, conversation_id: int) -> str:
    """Note that the satisfaction question goes out now; the text of the shopper's last
    message (to ask in their language)."""
    conn.execute(
        update(CONVERSATIONS).where(C.id == conversation_id).values(csat_asked_at=utcnow())
    )
    last = conn.execute(
        select(M.text)
        .where(M.conversation_id == conversation_id, M.sender == "contact")
        .order_by(M.seq.desc())
        .limit(1)
    ).scalar()
    return str(last or "")


def draft_context(
    conn: Connection, conversation_id: int, limit: int
) -> tuple[str, str | None, dict[str, Any] | None, list[HistoryRow], str] | None:
    """What the bot needs to draft a reply for a person: (channel, sticky tier, the
    contact's attributes, the last `limit` complete messages, oldest first, the channel
    account)."""
    conv = conn.execute(
        select(C.channel, C.tier, K.attributes, C.account)
        .join_from(CONVERSATIONS, CONTACTS, K.id == C.contact_id)
        .where(C.id == conversation_id)
    ).first()
    if conv is None:
        return None
    rows = conn.execute(
        select(*HISTORY_COLUMNS)
        .where(
            M.conversation_id == conversation_id,
            M.status.not_in((MessageStatus.STREAMING.value, MessageStatus.ABANDONED.value)),
        )
        .order_by(M.seq.desc())
        .limit(limit)
    ).all()
    channel, tier, attributes, account = conv
    return channel, tier, attributes, [HistoryRow._make(r) for r in reversed(rows)], account


def waiting_for_first_reply(conn: Connection, conversation_id: int) -> datetime | None:
    """When the conversation was last handed over, if no person has written in it since."""
    asked = conn.execute(
        select(func.max(_H.created_at)).where(
            _H.conversation_id == conversation_id, _H.to_owner == WAITING
        )
    ).scalar()
    if asked is None:
        return None
    replied = conn.execute(
        select(M.id)
        .where(M.conversation_id == conversation_id, M.sender == "agent", M.created_at >= asked)
        .limit(1)
    ).first()
    return None if replied is not None else _aware(asked)


def gauges(conn: Connection, since: datetime) -> tuple[int, float | None]:
    """(conversations waiting for a person now, average rating given since `since`)."""
    waiting = conn.execute(select(func.count()).where(C.owner == WAITING)).scalar() or 0
    rating = conn.execute(
        select(func.avg(C.rating)).where(C.rating.is_not(None), C.updated_at >= since)
    ).scalar()
    return int(waiting), float(rating) if rating is not None else None


def report(conn: Connection, since: datetime) -> list[dict[str, Any]]:
    """Per day (UTC) and channel since `since`: conversations, handoffs by reason, how many
    the bot resolved alone, time to the first human reply (p50/p90 s), satisfaction."""
    days: dict[tuple[str, str], dict[str, Any]] = {}

    def row(day: str, channel: str) -> dict[str, Any]:
        return days.setdefault(
            (day, channel),
            {
                "day": day,
                "channel": channel,
                "conversations": 0,
                "bot_alone": 0,
                "handoffs": {},
                "first_reply_seconds": [],
                "ratings": [],
            },
        )

    # (A conversation of the period was handed over after it began: no older events needed.)
    handed = set(
        conn.execute(
            select(_H.conversation_id)
            .where(_H.to_owner == WAITING, _H.created_at >= since)
            .distinct()
        ).scalars()
    )
    for cid, channel, created, rating in conn.execute(
        select(C.id, C.channel, C.created_at, C.rating).where(C.created_at >= since)
    ):
        r = row(_aware(created).date().isoformat(), channel)
        r["conversations"] += 1
        r["bot_alone"] += cid not in handed
        if rating is not None:
            r["ratings"].append(rating)
    first_agent = (
        select(M.conversation_id, M.created_at)
        .where(M.sender == "agent", M.created_at >= since)
        .order_by(M.created_at)
    )
    agent_times: dict[int, list[datetime]] = {}
    for cid, at in conn.execute(first_agent):
        agent_times.setdefault(cid, []).append(_aware(at))
    for cid, channel, reason, at in conn.execute(
        select(_H.conversation_id, C.channel, _H.reason, _H.created_at)
        .join_from(HANDOFFS, CONVERSATIONS, C.id == _H.conversation_id)
        .where(_H.to_owner == WAITING, _H.created_at >= since)
    ):
        asked = _aware(at)
        r = row(asked.date().isoformat(), channel)
        r["handoffs"][reason] = r["handoffs"].get(reason, 0) + 1
        answer = next((t for t in agent_times.get(cid, []) if t >= asked), None)
        if answer is not None:
            r["first_reply_seconds"].append((answer - asked).total_seconds())
    out = []
    for key in sorted(days):
        r = days[key]
        times, ratings = sorted(r.pop("first_reply_seconds")), r.pop("ratings")
        r["first_reply_p50_s"] = _quantile(times, 0.5)
        r["first_reply_p90_s"] = _quantile(times, 0.9)
        r["bot_alone_share"] = (
            round(r["bot_alone"] / r["conversations"], 3) if r["conversations"] else None
        )
        r["satisfaction"] = round(sum(ratings) / len(ratings), 2) if ratings else None
        r["ratings"] = len(ratings)
        out.append(r)
    return out


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))], 1)
