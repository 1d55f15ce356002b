"""The `kf/sync_msg` cursor of each WeChat Customer Service account (channels/wechat/kf_sync.py).
Units for storage.executor."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table, insert, select, update
from sqlalchemy.engine import Connection

from storage.models import WecomKfCursor, utcnow

_T = cast(Table, WecomKfCursor.__table__)
_K = _T.c


def get_cursor(conn: Connection, account: str, open_kfid: str) -> str | None:
    return conn.execute(
        select(_K.cursor).where(_K.account == account, _K.open_kfid == open_kfid)
    ).scalar_one_or_none()


def save_cursor(conn: Connection, account: str, open_kfid: str, cursor: str) -> None:
    # One puller per account writes it, so update-else-insert needs no upsert dialect.
    changed = conn.execute(
        update(_T)
        .where(_K.account == account, _K.open_kfid == open_kfid)
        .values(cursor=cursor, updated_at=utcnow())
    ).rowcount
    if not changed:
        conn.execute(
            insert(_T).values(
                account=account, open_kfid=open_kfid, cursor=cursor, updated_at=utcnow()
            )
        )
