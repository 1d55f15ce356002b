"""The knowledge base's tables: documents, their chunks, a change counter per collection.

Units for storage.executor (plain functions of a Connection). A document and all its chunks
change in one transaction, with the collection's generation bumped in it too: a search in
any process sees either the old document or the new one, never half of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from storage.models import KbChunk, KbDocument, KbGeneration, utcnow

DOCUMENTS = cast(Table, KbDocument.__table__)
CHUNKS = cast(Table, KbChunk.__table__)
GENERATIONS = cast(Table, KbGeneration.__table__)
D = DOCUMENTS.c
C = CHUNKS.c
G = GENERATIONS.c


@dataclass(frozen=True, slots=True)
class NewChunk:
    ordinal: int
    heading: str
    text: str
    terms: str
    title: str | None = None
    url: str | None = None
    embedding: list[float] | None = None
    tokenizer: str = ""  # the knowledge.tokenize.VERSION that cut `terms`


@dataclass(frozen=True, slots=True)
class NewDocument:
    collection: str
    source: str
    title: str
    url: str | None
    kind: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class StoredDocument:
    id: int
    collection: str
    source: str
    title: str
    url: str | None
    kind: str
    sha256: str
    size_bytes: int
    version: int
    chunks: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class PutResult:
    document_id: int
    version: int
    changed: bool  # False: the same content was there already (nothing written)
    chunks: int


@dataclass(frozen=True, slots=True)
class StoredChunk:
    id: int
    document_id: int
    collection: str
    source: str
    title: str  # the chunk's own title (a product) or its document's
    heading: str
    text: str
    url: str | None
    version: int
    terms: str
    embedding: list[float] | None
    tokenizer: str = ""


def bump_generation(conn: Connection, collection: str) -> None:
    done = conn.execute(
        update(GENERATIONS)
        .where(G.collection == collection)
        .values(generation=G.generation + 1, updated_at=utcnow())
    )
    if done.rowcount == 0:
        conn.execute(
            insert(GENERATIONS).values(collection=collection, generation=1, updated_at=utcnow())
        )


def put_document(
    conn: Connection, doc: NewDocument, chunks: list[NewChunk], *, force: bool = False
) -> PutResult:
    """Add `doc` with `chunks`, or replace the stored one of the same (collection, source)
    and bump its version; unchanged content and link: nothing is written (`force`: the
    chunks are rewritten all the same, the version kept)."""
    row = conn.execute(
        select(D.id, D.version, D.sha256, D.url, D.title).where(
            D.collection == doc.collection, D.source == doc.source
        )
    ).first()
    now = utcnow()
    fields = {
        "title": doc.title,
        "url": doc.url,
        "kind": doc.kind,
        "sha256": doc.sha256,
        "size_bytes": doc.size_bytes,
        "updated_at": now,
    }
    if row is not None:
        same = row.sha256 == doc.sha256 and row.url == doc.url and row.title == doc.title
        if same and not force:
            count = conn.execute(
                select(func.count()).select_from(CHUNKS).where(C.document_id == row.id)
            ).scalar_one()
            return PutResult(row.id, row.version, False, int(count))
        doc_id = int(row.id)
        version = int(row.version) + (0 if row.sha256 == doc.sha256 else 1)
        conn.execute(delete(CHUNKS).where(C.document_id == doc_id))
        conn.execute(update(DOCUMENTS).where(D.id == doc_id).values(version=version, **fields))
    else:
        version = 1
        doc_id = int(
            conn.execute(
                insert(DOCUMENTS)
                .values(
                    collection=doc.collection,
                    source=doc.source,
                    version=version,
                    created_at=now,
                    **fields,
                )
                .returning(D.id)
            ).scalar_one()
        )
    if chunks:
        conn.execute(
            insert(CHUNKS),
            [
                {
                    "document_id": doc_id,
                    "collection": doc.collection,
                    "ordinal": c.ordinal,
                    "heading": c.heading,
                    "text": c.text,
                    "title": c.title,
                    "url": c.url,
                    "terms": c.terms,
                    "tokenizer": c.tokenizer,
                    "version": version,
                    "embedding": c.embedding,
                }
                for c in chunks
            ],
        )
    bump_generation(conn, doc.collection)
    return PutResult(doc_id, version, True, len(chunks))


def stored_fingerprint(
    conn: Connection, collection: str, source: str
) -> tuple[str, str | None] | None:
    """(sha256, url) of the stored document from `source`, if any."""
    row = conn.execute(
        select(D.sha256, D.url).where(D.collection == collection, D.source == source)
    ).first()
    return (row.sha256, row.url) if row is not None else None


def find_document(conn: Connection, collection: str, source_or_id: str) -> StoredDocument | None:
    """By its source (as stored: an absolute path) or its id."""
    docs = list_documents(conn, collection, source=source_or_id)
    if not docs and source_or_id.isdigit():
        docs = list_documents(conn, collection, document_id=int(source_or_id))
    return docs[0] if docs else None


def remove_document(conn: Connection, collection: str, document_id: int) -> bool:
    conn.execute(delete(CHUNKS).where(C.document_id == document_id))
    gone = conn.execute(
        delete(DOCUMENTS).where(D.id == document_id, D.collection == collection)
    ).rowcount
    if gone:
        bump_generation(conn, collection)
    return bool(gone)


def list_documents(
    conn: Connection,
    collection: str | None = None,
    *,
    source: str | None = None,
    document_id: int | None = None,
) -> list[StoredDocument]:
    counts = select(C.document_id, func.count().label("n")).group_by(C.document_id)
    if source is not None or document_id is not None:
        counts = counts.join(DOCUMENTS, D.id == C.document_id)
        counts = counts.where(D.source == source) if source else counts.where(D.id == document_id)
    counts_q = counts.subquery("counts")
    query = (
        select(
            D.id,
            D.collection,
            D.source,
            D.title,
            D.url,
            D.kind,
            D.sha256,
            D.size_bytes,
            D.version,
            func.coalesce(counts_q.c.n, 0).label("n"),
            D.updated_at,
        )
        .outerjoin(counts_q, counts_q.c.document_id == D.id)
        .order_by(D.collection, D.source)
    )
    if collection is not None:
        query = query.where(D.collection == collection)
    if source is not None:
        query = query.where(D.source == source)
    if document_id is not None:
        query = query.where(D.id == document_id)
    return [
        StoredDocument(
            r.id,
            r.collection,
            r.source,
            r.title,
            r.url,
            r.kind,
            r.sha256,
            r.size_bytes,
            r.version,
            int(r.n),
            r.updated_at,
        )
        for r in conn.execute(query)
    ]


def load_chunks(conn: Connection, collection: str) -> list[StoredChunk]:
    rows = conn.execute(
        select(
            C.id,
            C.document_id,
            C.heading,
            C.text,
            C.title,
            C.url,
            C.version,
            C.terms,
            C.embedding,
            C.tokenizer,
            D.source,
            D.title.label("doc_title"),
            D.url.label("doc_url"),
        )
        .join(DOCUMENTS, DOCUMENTS.c.id == C.document_id)
        .where(C.collection == collection)
        .order_by(C.document_id, C.ordinal)
    )
    return [
        StoredChunk(
            r.id,
            r.document_id,
            collection,
            r.source,
            r.title or r.doc_title,
            r.heading,
            r.text,
            r.url or r.doc_url,
            r.version,
            r.terms,
            r.embedding,
            r.tokenizer,
        )
        for r in rows
    ]


def save_terms(conn: Connection, terms: dict[int, str], tokenizer: str) -> None:
    """Chunks cut again by a newer tokenizer (their text, and so the generation, unchanged)."""
    if terms:
        conn.execute(
            update(CHUNKS).where(C.id == bindparam("chunk_id")),
            [{"chunk_id": i, "terms": t, "tokenizer": tokenizer} for i, t in terms.items()],
        )


def generations(conn: Connection) -> dict[str, int]:
    return {
        r.collection: int(r.generation) for r in conn.execute(select(G.collection, G.generation))
    }


def set_embeddings(conn: Connection, vectors: dict[int, list[float]]) -> None:
    """Store embeddings computed after the chunks were written (no generation bump: the
    text is the same)."""
    for chunk_id, vector in vectors.items():
        conn.execute(update(CHUNKS).where(C.id == chunk_id).values(embedding=vector))


def chunks_without_embeddings(conn: Connection, collection: str) -> list[tuple[int, str]]:
    rows = conn.execute(
        select(C.id, C.heading, C.text).where(C.collection == collection, C.embedding.is_(None))
    )
    return [(r.id, f"{r.heading}\n{r.text}".strip()) for r in rows]


def as_dict(doc: StoredDocument) -> dict[str, Any]:
    return {
        "id": doc.id,
        "collection": doc.collection,
        "source": doc.source,
        "title": doc.title,
        "url": doc.url,
        "kind": doc.kind,
        "version": doc.version,
        "chunks": doc.chunks,
        "size_bytes": doc.size_bytes,
        "updated_at": doc.updated_at.isoformat(),
    }
