"""`swarmdesk kb add|list|remove|reindex|search|bench`: the shop's documents from the shell.

The commands use the configured database (migrating it first, like `serve`), so a running
service sees their changes within `knowledge.refresh_seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from functools import partial
from typing import Any, TypeVar

from knowledge.base import DEFAULT_COLLECTION
from knowledge.errors import KnowledgeError
from knowledge.service import Added, Failed, KnowledgeBase
from storage.knowledge import as_dict

T = TypeVar("T")
# The application's settings loader (bot.cli passes it in: knowledge never imports bot).
LoadSettings = Callable[[argparse.Namespace], Any]  # -> bot.settings.Settings
# Sets generated FAQ entries' intents and validates them as routing config (bot passes it).
CheckFaq = Callable[[Any, list[dict[str, Any]]], list[dict[str, Any]]]


def register_cli(
    subparsers: Any, *, load_settings: LoadSettings, check_faq: CheckFaq | None = None
) -> None:
    """Add `kb ...` to the `swarmdesk` command."""
    kb = subparsers.add_parser("kb", help="the shop's documents the bot answers from")
    sub = kb.add_subparsers(dest="kb_command", required=True)

    def collection_arg(p: argparse.ArgumentParser, default: str | None) -> None:
        p.add_argument(
            "--collection",
            "-C",
            default=default,
            help=f"the site's or account's collection (default: {default or 'all'})",
        )

    a = sub.add_parser("add", help="index files (Markdown, text, HTML, PDF, catalogue CSV/JSON)")
    a.add_argument("paths", nargs="+", metavar="PATH", help="files, folders or file:// URLs")
    collection_arg(a, DEFAULT_COLLECTION)
    a.add_argument("--url", help="the link shoppers see for these documents (overrides theirs)")
    a.set_defaults(func=partial(_run, cmd=cmd_add, load_settings=load_settings))

    ls = sub.add_parser("list", help="the indexed documents")
    collection_arg(ls, None)
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=partial(_run, cmd=cmd_list, load_settings=load_settings))

    rm = sub.add_parser("remove", help="remove a document (by its source or id)")
    rm.add_argument("document", metavar="SOURCE|ID")
    collection_arg(rm, DEFAULT_COLLECTION)
    rm.set_defaults(func=partial(_run, cmd=cmd_remove, load_settings=load_settings))

    ri = sub.add_parser("reindex", help="read every document's file again")
    collection_arg(ri, None)
    ri.set_defaults(func=partial(_run, cmd=cmd_reindex, load_settings=load_settings))

    s = sub.add_parser("search", help="what the bot would read for a question")
    s.add_argument("query")
    collection_arg(s, DEFAULT_COLLECTION)
    s.add_argument("-k", type=int, default=None, help="passages (default: knowledge.k)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=partial(_run, cmd=cmd_search, load_settings=load_settings))

    f = sub.add_parser(
        "faq",
        help="routing FAQ entries (no-model answers) from the Q&A pages, as YAML",
        description="Q&A pages: sections whose heading is a question, or Q:/A: pairs. The "
        "output goes under `routing:` `faq:` in swarmdesk.yaml.",
    )
    f.add_argument(
        "files", nargs="*", metavar="FILE", help="read these files instead of the collection"
    )
    collection_arg(f, DEFAULT_COLLECTION)
    f.set_defaults(func=partial(cmd_faq, load_settings=load_settings, check_faq=check_faq))

    b = sub.add_parser("bench", help="search latency on a made-up collection")
    b.add_argument("--chunks", type=int, default=10_000)
    b.add_argument("--rounds", type=int, default=50, help="passes over the sample questions")
    b.set_defaults(func=partial(cmd_bench, load_settings=load_settings))


Command = Callable[[KnowledgeBase, argparse.Namespace], Awaitable[int]]


def _run(args: argparse.Namespace, *, cmd: Command, load_settings: LoadSettings) -> int:
    settings = load_settings(args)
    try:
        return asyncio.run(_with_kb(settings, args, cmd))
    except KnowledgeError as e:
        print(f"swarmdesk kb: {e}", file=sys.stderr)
        return 2


async def _with_kb(settings: Any, args: argparse.Namespace, cmd: Command) -> int:
    from storage import db
    from storage.executor import for_engine

    engine = db.create_engine(settings.database.url, pool_size=2)
    database = None
    kb = None
    try:
        if settings.database.migrate_on_start:
            await db.upgrade(engine)
        database = for_engine(engine, pool_size=2)
        kb = await KnowledgeBase.open(database, settings.knowledge, providers=settings.providers)
        return await cmd(kb, args)
    finally:
        if kb is not None:
            await kb.aclose()
        if database is not None:
            await database.close()
        await engine.dispose()


def _print_outcome(added: list[Added], failed: list[Failed]) -> int:
    for a in added:
        what = f"v{a.version}, {a.chunks} chunks" if a.changed else f"unchanged (v{a.version})"
        link = f"  {a.url}" if a.url else ""
        print(f"{a.document_id:>5}  {a.collection}  {a.source}  — {a.title} ({what}){link}")
    for f in failed:
        print(f"failed: {f.reason}", file=sys.stderr)
    if failed:
        print(f"{len(added)} added, {len(failed)} failed", file=sys.stderr)
        return 2
    return 0


async def cmd_add(kb: KnowledgeBase, args: argparse.Namespace) -> int:
    added, failed = await kb.add_many(args.paths, collection=args.collection, url=args.url)
    if not added and not failed:
        print("no supported files found there", file=sys.stderr)
        return 2
    return _print_outcome(added, failed)


async def cmd_list(kb: KnowledgeBase, args: argparse.Namespace) -> int:
    docs = await kb.documents(args.collection)
    if args.json:
        for d in docs:
            print(json.dumps(as_dict(d), ensure_ascii=False))
        return 0
    if not docs:
        print("no documents yet; add some with `swarmdesk kb add PATH`")
        return 0
    print(f"{'id':>5}  {'collection':<12} {'kind':<9} {'ver':>3} {'chunks':>6}  source — title")
    for d in docs:
        print(
            f"{d.id:>5}  {d.collection:<12} {d.kind:<9} {d.version:>3} {d.chunks:>6}  "
            f"{d.source} — {d.title}" + (f"  <{d.url}>" if d.url else "")
        )
    return 0


async def cmd_remove(kb: KnowledgeBase, args: argparse.Namespace) -> int:
    doc = await kb.remove(args.document, collection=args.collection)
    print(f"removed {doc.id}  {doc.source} — {doc.title} ({doc.chunks} chunks)")
    return 0


async def cmd_reindex(kb: KnowledgeBase, args: argparse.Namespace) -> int:
    added, failed = await kb.reindex(args.collection)
    if not added and not failed:
        print("nothing to reindex")
        return 0
    return _print_outcome(added, failed)


async def cmd_search(kb: KnowledgeBase, args: argparse.Namespace) -> int:
    passages = await kb.search(args.query, collection=args.collection, k=args.k)
    if args.json:
        print(json.dumps([asdict(p) for p in passages], ensure_ascii=False))
        return 0
    if not passages:
        print("nothing relevant: the bot would say it will check and offer a person")
        return 0
    for n, p in enumerate(passages, start=1):
        where = f"{p.title}" + (f" › {p.heading}" if p.heading else "")
        print(f"[{n}] {where}  (score {p.score:.2f}, doc {p.document_id} v{p.version})")
        print(f"    {p.url or p.source}")
        for line in p.text.splitlines():
            print(f"    | {line}")
    return 0


def cmd_faq(
    args: argparse.Namespace, *, load_settings: LoadSettings, check_faq: CheckFaq | None
) -> int:
    from knowledge import faq

    settings = load_settings(args)
    qas: list[faq.QA] = []

    async def from_collection(kb: KnowledgeBase, args: argparse.Namespace) -> int:
        qas.extend(faq.qas_from_chunks((await kb.index(args.collection)).chunks))
        return 0

    try:
        if args.files:
            for path in args.files:
                qas.extend(faq.qas_from_file(path))
        else:
            asyncio.run(_with_kb(settings, args, from_collection))
        if not qas:
            where = ", ".join(args.files) or f"collection '{args.collection}'"
            raise KnowledgeError(
                f"no Q&A found in {where}: write questions as headings "
                '("## Can I change my address?") or as "Q: ..." / "A: ..." lines'
            )
        entries = faq.faq_entries(qas)
        if check_faq is not None:
            entries = check_faq(settings, entries)
    except (KnowledgeError, ValueError) as e:
        print(f"swarmdesk kb faq: {e}", file=sys.stderr)
        return 2
    print(faq.to_yaml(entries), end="")
    return 0


def cmd_bench(args: argparse.Namespace, *, load_settings: LoadSettings) -> int:
    from knowledge import bench

    settings = load_settings(args)
    result = bench.run(
        args.chunks, rounds=args.rounds, min_relevance=settings.knowledge.min_relevance
    )
    print(json.dumps(result.as_dict()))
    print(
        f"{result.chunks} chunks: index built in {result.build_seconds:.2f} s; search p50 "
        f"{result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms over {result.queries} questions"
    )
    return 0
