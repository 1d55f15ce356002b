"""`KnowledgeBase`: the shop's documents, added, removed and searched (KnowledgeSearch).

Documents live in the database (storage/knowledge.py); each process keeps an in-memory index
per collection, built on first use. A change made by another process (`swarmdesk kb add`
while the service runs, another replica) bumps the collection's generation in the database;
a search looks at the generations at most every `refresh_seconds` and rebuilds a changed
collection's index in a thread, answering from the old index meanwhile. Changes made through
this instance are searchable as soon as the call returns.

Watched folders are scanned at `start()` and every `watch_seconds`: new and changed files are
indexed, deleted ones removed; a bad file is logged with its reason and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import structlog
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from knowledge import tokenize
from knowledge.base import DEFAULT_COLLECTION, Passage
from knowledge.chunking import chunk_sections
from knowledge.config import COLLECTION_NAME, KnowledgeSettings, WatchedFolder
from knowledge.embeddings import EmbeddingsClient, EmbeddingsError, Provider
from knowledge.errors import KnowledgeError
from knowledge.index import CollectionIndex
from knowledge.sources import KINDS, fingerprint, local_path, read_document
from storage import knowledge as store
from storage.executor import Database

log = structlog.get_logger(__name__)

# After a failed query embedding, searches stay lexical this long before trying again.
EMBEDDINGS_RETRY_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Added:
    """What `add` did with one file."""

    source: str
    collection: str
    document_id: int
    title: str
    url: str | None
    version: int
    chunks: int
    changed: bool  # False: the same content was indexed already


@dataclass(frozen=True, slots=True)
class Failed:
    source: str
    reason: str


class KnowledgeBase:
    """See the module's docstring. Build it with `await KnowledgeBase.open(db, settings)`."""

    def __init__(
        self,
        db: Database,
        settings: KnowledgeSettings,
        *,
        embedder: EmbeddingsClient | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self._embedder = embedder
        self._folders: list[WatchedFolder] = list(settings.folders)
        self._indexes: dict[str, CollectionIndex] = {}
        self._built: dict[str, int] = {}  # generation each index was built from
        self._locks: dict[str, asyncio.Lock] = {}
        self._rebuilds: dict[str, asyncio.Task[CollectionIndex]] = {}
        self._checked_at = 0.0
        self._seen: dict[str, tuple[int, int]] = {}  # watched file -> (mtime_ns, size)
        self._watcher: asyncio.Task[None] | None = None
        self._scan_lock = asyncio.Lock()
        self._started = False
        self._embeddings_down_until = 0.0

    @classmethod
    async def open(
        cls,
        db: Database,
        settings: KnowledgeSettings,
        *,
        providers: Sequence[Provider] = (),
    ) -> KnowledgeBase:
        """A knowledge base on `db` (tables from migration 0006). `providers`: the
        deployment's providers, needed only when `settings.embeddings` names one."""
        embedder = (
            EmbeddingsClient.from_settings(settings.embeddings, providers)
            if settings.embeddings is not None
            else None
        )
        # The dictionaries load in a thread now rather than on the first shopper's question.
        await asyncio.to_thread(tokenize.warm_up)
        return cls(db, settings, embedder=embedder)

    # --- lifecycle -------------------------------------------------------------------------

    def add_folder(
        self, path: str | os.PathLike[str], *, collection: str = DEFAULT_COLLECTION,
        url_prefix: str | None = None,
    ) -> None:  # fmt: skip
        """Watch one more folder (the demo shop's documents, ...): scanned at `start()`
        or on the next scan if already started."""
        folder = WatchedFolder(path=str(path), collection=collection, url_prefix=url_prefix)
        if folder not in self._folders:
            self._folders.append(folder)
        if self._started and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="knowledge-watch")

    async def start(self) -> None:
        """Index the watched folders now, then keep watching them."""
        self._started = True
        if self._folders:
            await self.scan()
        await self.embed_missing()
        if self._watcher is None and (self._folders or self._embedder is not None):
            self._watcher = asyncio.create_task(self._watch(), name="knowledge-watch")

    async def aclose(self) -> None:
        tasks = [t for t in (self._watcher, *self._rebuilds.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._watcher = None
        if self._embedder is not None:
            await self._embedder.aclose()

    # --- KnowledgeSearch -------------------------------------------------------------------

    def collection_for(self, channel: str, account: str) -> str:
        return self.settings.collection_for(channel, account)

    async def search(
        self, query: str, *, collection: str = DEFAULT_COLLECTION, k: int | None = None
    ) -> list[Passage]:
        """The best `k` passages for `query`; [] when nothing is relevant enough."""
        if not query.strip():
            return []
        await self._maybe_refresh()
        index = self._indexes.get(collection)
        if index is None:
            index = await self._rebuild(collection)
        if index.size == 0:
            return []
        vector: list[float] | None = None
        if (
            self._embedder is not None
            and index.has_vectors
            and time.monotonic() >= self._embeddings_down_until
        ):
            try:
                vector = (await self._embedder.embed([query]))[0]
            except EmbeddingsError as e:
                # Don't make every shopper wait for the timeout while the endpoint is away.
                self._embeddings_down_until = time.monotonic() + EMBEDDINGS_RETRY_SECONDS
                log.warning("knowledge_query_embedding_failed", error=str(e))
        limit = k if k is not None else self.settings.k
        return await asyncio.to_thread(self._search, index, query, limit, vector)

    def _search(
        self, index: CollectionIndex, query: str, k: int, vector: list[float] | None
    ) -> list[Passage]:
        chinese = tokenize.in_chinese(query)
        if chinese is not None:
            # "退货要寄到哪个address": the Chinese page first; the words as written if it
            # has nothing (a shop whose pages are all in English).
            found = self._search_as(index, chinese, k, vector)
            if found:
                return found
        return self._search_as(index, query, k, vector)

    def _search_as(
        self, index: CollectionIndex, query: str, k: int, vector: list[float] | None
    ) -> list[Passage]:
        return index.search(
            tokenize.terms(query),
            k=k,
            min_relevance=self.settings.min_relevance,
            query_language=tokenize.language(query),
            query_vector=vector,
            min_similarity=(
                self.settings.embeddings.min_similarity if self.settings.embeddings else 1.0
            ),
        )

    # --- changes ---------------------------------------------------------------------------

    async def add(
        self,
        path_or_url: str | os.PathLike[str],
        *,
        collection: str = DEFAULT_COLLECTION,
        url: str | None = None,
        url_prefix: str | None = None,
        rebuild: bool = True,
        force: bool = False,
    ) -> Added:
        """Index one file (a path or a file:// URL). A changed file replaces its chunks and
        gets the next version; the same content again changes nothing (`force`: parse and
        index it again all the same). Raises KnowledgeError (nothing is stored then)."""
        _check_collection(collection)
        source, sha = await asyncio.to_thread(
            fingerprint, path_or_url, max_file_mb=self.settings.max_file_mb
        )
        if not force:
            unchanged = await self._unchanged(source, sha, collection, url)
            if unchanged is not None:
                return unchanged
        key = (source, sha, collection, url, url_prefix, self.settings.chunk_chars)
        prepared = _PREPARED.get(key)
        if prepared is None:
            prepared = await asyncio.to_thread(
                self._prepare, path_or_url, collection, url, url_prefix
            )
            _remember(key, prepared)
        doc, chunks = prepared
        chunks = await self._embed_chunks(chunks)
        try:
            result = await self.db.write(
                lambda conn: store.put_document(conn, doc, chunks, force=force)
            )
        except IntegrityError:
            # Another process added the same file at the same moment: theirs stands.
            result = await self.db.write(
                lambda conn: store.put_document(conn, doc, chunks, force=force)
            )
        if result.changed and rebuild:
            await self._rebuild_if_loaded(collection)
        return Added(
            doc.source,
            collection,
            result.document_id,
            doc.title,
            doc.url,
            result.version,
            result.chunks,
            result.changed,
        )

    async def _unchanged(
        self, source: str, sha: str, collection: str, url: str | None
    ) -> Added | None:
        """The stored document when the file's content (and the link asked for) is what was
        indexed already: no parsing then (a restart re-scans every watched file)."""
        stored = await self.db.read(lambda conn: store.stored_fingerprint(conn, collection, source))
        if stored is None or stored[0] != sha or (url is not None and url != stored[1]):
            return None
        doc = await self.db.read(lambda conn: store.find_document(conn, collection, source))
        if doc is None:
            return None
        return Added(source, collection, doc.id, doc.title, doc.url, doc.version, doc.chunks, False)

    def _prepare(
        self,
        path_or_url: str | os.PathLike[str],
        collection: str,
        url: str | None,
        url_prefix: str | None,
    ) -> tuple[store.NewDocument, list[store.NewChunk]]:
        parsed = read_document(
            path_or_url, max_file_mb=self.settings.max_file_mb, url=url, url_prefix=url_prefix
        )
        chunks = chunk_sections(parsed.sections, self.settings.chunk_chars)
        new_chunks = [
            store.NewChunk(
                ordinal=c.ordinal,
                heading=c.heading,
                text=c.text,
                terms=tokenize.passage_terms(c.title or parsed.title, c.heading, c.text),
                tokenizer=tokenize.VERSION,
                title=c.title,
                url=c.url,
            )
            for c in chunks
        ]
        doc = store.NewDocument(
            collection=collection,
            source=parsed.source,
            title=parsed.title[:512],
            url=parsed.url,
            kind=parsed.kind,
            sha256=parsed.sha256,
            size_bytes=parsed.size_bytes,
        )
        return doc, new_chunks

    async def _embed_chunks(self, chunks: list[store.NewChunk]) -> list[store.NewChunk]:
        if self._embedder is None or not chunks:
            return chunks
        try:
            vectors = await self._embedder.embed(
                [f"{c.title or ''}\n{c.heading}\n{c.text}".strip() for c in chunks]
            )
        except EmbeddingsError as e:
            log.warning("knowledge_embeddings_failed", error=str(e))
            return chunks
        return [dataclasses.replace(c, embedding=v) for c, v in zip(chunks, vectors, strict=True)]

    async def add_many(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        collection: str = DEFAULT_COLLECTION,
        url: str | None = None,
    ) -> tuple[list[Added], list[Failed]]:
        """Add every valid file (folders: the supported files inside); each bad one is
        reported with its reason and the rest go on."""
        added: list[Added] = []
        failed: list[Failed] = []
        for p in _expand(paths):
            try:
                added.append(await self.add(p, collection=collection, url=url, rebuild=False))
            except KnowledgeError as e:
                failed.append(Failed(str(p), str(e)))
        if any(a.changed for a in added):
            await self._rebuild_if_loaded(collection)
        return added, failed

    async def remove(
        self, source_or_id: str | int, *, collection: str = DEFAULT_COLLECTION
    ) -> store.StoredDocument:
        """Remove a document by its source (path or file:// URL, as added) or its id."""
        key = str(source_or_id)
        candidates = [key]
        if not key.isdigit():
            with contextlib.suppress(KnowledgeError):
                candidates.insert(0, str(local_path(key)))

        def unit(conn: Connection) -> store.StoredDocument | None:
            for c in candidates:
                doc = store.find_document(conn, collection, c)
                if doc is not None:
                    store.remove_document(conn, collection, doc.id)
                    return doc
            return None

        doc = await self.db.write(unit)
        if doc is None:
            raise KnowledgeError(
                f"no document '{key}' in collection '{collection}'; "
                "`swarmdesk kb list` shows the sources and ids"
            )
        await self._rebuild_if_loaded(collection)
        return doc

    async def documents(self, collection: str | None = None) -> list[store.StoredDocument]:
        return await self.db.read(lambda conn: store.list_documents(conn, collection))

    async def reindex(self, collection: str | None = None) -> tuple[list[Added], list[Failed]]:
        """Read every document's source again (changed files get a new version)."""
        added: list[Added] = []
        failed: list[Failed] = []
        for d in await self.documents(collection):
            try:
                added.append(
                    await self.add(
                        d.source, collection=d.collection, url=d.url, rebuild=False, force=True
                    )
                )
            except KnowledgeError as e:
                failed.append(Failed(d.source, str(e)))
        for name in {d.collection for d in await self.documents(collection)}:
            await self._rebuild_if_loaded(name)
        return added, failed

    # --- indexes ---------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Bring every loaded index up to date with the database now (waits)."""
        gens = await self.db.read(store.generations)
        self._checked_at = time.monotonic()
        for name in list(self._indexes):
            if gens.get(name, 0) != self._built.get(name):
                await self._rebuild(name)

    async def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.settings.refresh_seconds:
            return
        self._checked_at = now
        try:
            gens = await self.db.read(store.generations)
        except Exception:  # the database may be briefly away: search the index we have
            log.warning("knowledge_generations_unreadable", exc_info=True)
            return
        for name in list(self._indexes):
            if gens.get(name, 0) != self._built.get(name) and name not in self._rebuilds:
                task = asyncio.create_task(self._rebuild(name), name=f"knowledge-rebuild-{name}")
                self._rebuilds[name] = task
                task.add_done_callback(partial(self._rebuild_done, name))

    def _rebuild_done(self, name: str, task: asyncio.Task[CollectionIndex]) -> None:
        self._rebuilds.pop(name, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("knowledge_rebuild_failed", collection=name, error=repr(task.exception()))

    async def _rebuild_if_loaded(self, collection: str) -> None:
        if collection in self._indexes:
            await self._rebuild(collection)

    async def _rebuild(self, collection: str) -> CollectionIndex:
        lock = self._locks.setdefault(collection, asyncio.Lock())
        async with lock:

            def load(conn: Connection) -> tuple[int, list[store.StoredChunk]]:
                # The generation first: a change landing in between only causes one more
                # rebuild later, never a missed one.
                gen = store.generations(conn).get(collection, 0)
                return gen, store.load_chunks(conn, collection)

            gen, chunks = await self.db.read(load)
            if self._built.get(collection) == gen and collection in self._indexes:
                return self._indexes[collection]
            if any(c.tokenizer != tokenize.VERSION for c in chunks):
                chunks = await self._cut_again(chunks)
            index = await asyncio.to_thread(CollectionIndex, chunks)
            self._indexes[collection] = index
            self._built[collection] = gen
            return index

    async def _cut_again(self, chunks: list[store.StoredChunk]) -> list[store.StoredChunk]:
        """Passages an older swarmdesk cut into words (its dictionary, its rules) are cut
        again from their stored text, and saved so it happens once: an upgrade needs no
        `kb reindex` for the index to match how questions are cut now."""

        def cut() -> list[store.StoredChunk]:
            return [
                c
                if c.tokenizer == tokenize.VERSION
                else dataclasses.replace(
                    c,
                    terms=tokenize.passage_terms(c.title, c.heading, c.text),
                    tokenizer=tokenize.VERSION,
                )
                for c in chunks
            ]

        fresh = await asyncio.to_thread(cut)
        changed = {c.id: c.terms for c, old in zip(fresh, chunks, strict=True) if c is not old}
        await self.db.write(partial(store.save_terms, terms=changed, tokenizer=tokenize.VERSION))
        log.info("knowledge_passages_cut_again", passages=len(changed))
        return fresh

    async def index(self, collection: str = DEFAULT_COLLECTION) -> CollectionIndex:
        """The collection's current index (built if needed)."""
        return self._indexes.get(collection) or await self._rebuild(collection)

    async def embed_missing(self) -> int:
        """Embed the chunks indexed while the embeddings endpoint was away (or before it
        was configured); returns how many got a vector."""
        if self._embedder is None:
            return 0
        done = 0
        collections = {d.collection for d in await self.documents()}
        for name in sorted(collections):
            todo = await self.db.read(partial(store.chunks_without_embeddings, collection=name))
            if not todo:
                continue
            try:
                vectors = await self._embedder.embed([text for _, text in todo])
            except EmbeddingsError as e:
                log.warning("knowledge_embeddings_failed", error=str(e))
                return done

            found = {cid: v for (cid, _), v in zip(todo, vectors, strict=True)}
            await self.db.write(partial(_save_embeddings, collection=name, vectors=found))
            done += len(todo)
            await self._rebuild_if_loaded(name)
        return done

    # --- watched folders -------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.watch_seconds)
            try:
                await self.scan()
                await self.embed_missing()
            except Exception:
                log.exception("knowledge_scan_failed")

    async def scan(self) -> None:
        """One pass over the watched folders."""
        async with self._scan_lock:
            changed: set[str] = set()
            for folder in list(self._folders):
                if await self._scan_folder(folder):
                    changed.add(folder.collection)
            for name in changed:
                await self._rebuild_if_loaded(name)

    async def _scan_folder(self, folder: WatchedFolder) -> bool:
        root = local_path(folder.path)
        files = await asyncio.to_thread(_files_with_stat, root)
        if files is None:
            if self._seen.get(str(root)) != (-1, -1):
                log.warning("knowledge_folder_missing", folder=str(root))
                self._seen[str(root)] = (-1, -1)
            return False
        indexed = removed = 0
        for path, stat in sorted(files.items()):
            if self._seen.get(path) == stat:
                continue
            try:
                result = await self.add(
                    path, collection=folder.collection, url_prefix=folder.url_prefix, rebuild=False
                )
                if result.changed:
                    indexed += 1
                    log.debug("knowledge_indexed", source=path, version=result.version)
            except KnowledgeError as e:
                log.warning("knowledge_file_skipped", source=path, reason=str(e))
            except Exception:
                log.exception("knowledge_index_failed", source=path)
                continue  # try again on the next scan
            self._seen[path] = stat
        prefix = str(root) + os.sep
        for doc in await self.documents(folder.collection):
            if doc.source.startswith(prefix) and doc.source not in files:
                await self.db.write(
                    partial(store.remove_document, collection=folder.collection, document_id=doc.id)
                )
                self._seen.pop(doc.source, None)
                log.debug("knowledge_removed", source=doc.source)
                removed += 1
        if indexed or removed:
            log.info(
                "knowledge_folder_changed",
                folder=str(root),
                collection=folder.collection,
                indexed=indexed,
                removed=removed,
            )
        return bool(indexed or removed)


# Parsed and tokenised files by (source, sha256, collection, link, prefix, chunk size): a
# process that indexes the same files into several databases (tests, evaluations: each
# service start on a fresh database indexes the demo shop's folder) parses them once.
_PREPARED: OrderedDict[tuple[object, ...], tuple[store.NewDocument, list[store.NewChunk]]] = (
    OrderedDict()
)
_PREPARED_MAX = 512


def _remember(
    key: tuple[object, ...], prepared: tuple[store.NewDocument, list[store.NewChunk]]
) -> None:
    _PREPARED[key] = prepared
    _PREPARED.move_to_end(key)
    while len(_PREPARED) > _PREPARED_MAX:
        _PREPARED.popitem(last=False)


def _save_embeddings(conn: Connection, collection: str, vectors: dict[int, list[float]]) -> None:
    store.set_embeddings(conn, vectors)
    store.bump_generation(conn, collection)  # every process reloads with the vectors


def _files_with_stat(root: Path) -> dict[str, tuple[int, int]] | None:
    if not root.is_dir():
        return None
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in KINDS:
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            out[path] = (st.st_mtime_ns, st.st_size)
    return out


def _expand(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    out: list[str] = []
    for p in paths:
        text = os.fspath(p)
        if "://" not in text and Path(text).is_dir():
            found = _files_with_stat(Path(text).absolute()) or {}
            out.extend(sorted(found))
        else:
            out.append(text)
    return out


def _check_collection(name: str) -> None:
    if not COLLECTION_NAME.match(name):
        raise KnowledgeError(
            f"collection '{name}': use 1-64 letters, digits, '_', '.' or '-' (e.g. brand-a)"
        )
