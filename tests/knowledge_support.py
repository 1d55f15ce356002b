"""A knowledge base on a fresh database, for the knowledge tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from knowledge.config import KnowledgeSettings
from knowledge.embeddings import Provider
from knowledge.service import KnowledgeBase
from storage import db
from storage.executor import Database, for_engine

DATA = Path(__file__).parent / "data" / "knowledge"


@asynccontextmanager
async def open_database(url: str) -> AsyncIterator[Database]:
    engine = db.create_engine(url)
    await db.upgrade(engine)
    database = for_engine(engine)
    try:
        yield database
    finally:
        await database.close()
        await engine.dispose()


@asynccontextmanager
async def open_kb(
    database: Database, providers: Sequence[Provider] = (), **settings: Any
) -> AsyncIterator[KnowledgeBase]:
    kb = await KnowledgeBase.open(database, KnowledgeSettings(**settings), providers=providers)
    try:
        yield kb
    finally:
        await kb.aclose()
