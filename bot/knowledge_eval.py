"""`swarmdesk eval-knowledge`: the knowledge base scored on a question set, answers included.

knowledge/evaluate.py measures retrieval; this module adds what only the application can
build: every question answered by the real orchestrator (routing, specialists, the
`search_knowledge` tool, the citation line) with the configured models — the built-in model
simulator on the embedded defaults — and the demo shop's API behind the tools.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from bot import logging as logs
from bot.app import build_orchestrator
from bot.demo_shop import build_demo_shop_app
from bot.models import fast_models
from bot.settings import Settings
from knowledge.errors import KnowledgeError
from knowledge.evaluate import (
    DEMO_DOCS,
    DEMO_QUESTIONS,
    Answer,
    Question,
    QuestionFileError,
    Reply,
    Report,
    evaluate,
    format_report,
    load_questions,
    open_demo_base,
)
from knowledge.service import KnowledgeBase
from orchestration.events import ConversationInfo, Final, Turn
from orchestration.tools import ToolRunner

LoadSettings = Callable[[argparse.Namespace], Settings]
# The line the orchestrator appends under an answer that cites the shop's documents.
_SOURCE_LABELS = ("Source: ", "Sources: ", "来源：", "出典：", "Nguồn: ")


def register_cli(subparsers: Any, *, load_settings: LoadSettings) -> None:
    """Add `eval-knowledge` to the `swarmdesk` command."""
    e = subparsers.add_parser(
        "eval-knowledge",
        help="score the knowledge base on a question set (retrieval, latency, answers)",
        description="Loads the demo shop's documents (or --docs) into a fresh temporary "
        "SQLite database and scores retrieval hit@1/hit@3 per language, latency (also on an "
        "index scaled to --chunks chunks) and the answers of the orchestrator.",
    )
    e.add_argument(
        "file",
        nargs="?",
        default=str(DEMO_QUESTIONS),
        help="JSONL: id, lang, question, sources, facts per line (default: the project's set)",
    )
    e.add_argument("--docs", default=str(DEMO_DOCS), help="folder of documents to index")
    e.add_argument("--json", dest="json_out", metavar="OUT", help="write the figures here")
    e.add_argument(
        "--chunks",
        type=int,
        default=10_000,
        metavar="N",
        help="measure latency on an index scaled to N chunks (0: skip; default 10000)",
    )
    e.add_argument(
        "--no-answers", action="store_true", help="retrieval only: don't run the orchestrator"
    )
    e.add_argument("--misses", type=int, default=0, metavar="N", help="list the first N misses")
    e.set_defaults(func=partial(cmd_eval_knowledge, load_settings=load_settings))


def cmd_eval_knowledge(args: argparse.Namespace, *, load_settings: LoadSettings) -> int:
    settings = load_settings(args)
    # Tool calls and model attempts log at debug/info: only problems belong in the report
    # (left alone when the process set logging up already, as tests do).
    if not structlog.is_configured():
        logs.configure(settings.log.format, "warning")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    try:
        questions = load_questions(args.file)
    except QuestionFileError as e:
        print(f"eval-knowledge: {e}", file=sys.stderr)
        return 2
    docs = Path(args.docs)
    if not docs.is_dir():
        print(f"eval-knowledge: {docs}: not a folder; give a folder of documents", file=sys.stderr)
        return 2
    if args.chunks < 0:
        print("eval-knowledge: --chunks must be 0 or more", file=sys.stderr)
        return 2
    try:
        report, failed = asyncio.run(
            run(settings, questions, docs, scale_to=args.chunks, answers=not args.no_answers)
        )
    except KnowledgeError as e:
        print(f"eval-knowledge: {e}", file=sys.stderr)
        return 2
    for line in failed:
        print(f"not indexed: {line}", file=sys.stderr)
    print(format_report(report, show_misses=args.misses))
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(report.as_json(), ensure_ascii=False, indent=2), encoding="utf-8"
        )
        print(f"figures written to {args.json_out}")
    return 0


async def run(
    settings: Settings,
    questions: list[Question],
    docs: Path = DEMO_DOCS,
    *,
    scale_to: int = 10_000,
    answers: bool = True,
) -> tuple[Report, list[str]]:
    """The report, and the documents that could not be indexed (with their reasons)."""
    with tempfile.TemporaryDirectory(prefix="swarmdesk-eval-knowledge-") as tmp:
        kb, database, failed = await open_demo_base(
            Path(tmp), docs, settings.knowledge, settings.providers
        )
        try:
            if not answers:
                return await evaluate(questions, kb, scale_to=scale_to), failed
            async with answering(settings, kb) as answer:
                return await evaluate(questions, kb, scale_to=scale_to, answer=answer), failed
        finally:
            await kb.aclose()
            await database.close()


@asynccontextmanager
async def answering(settings: Settings, kb: KnowledgeBase) -> AsyncIterator[Answer]:
    """An answering function: each question a new conversation with the orchestrator, on
    the configured models (the simulator on the defaults) and the demo shop's tools."""
    shop = web.Application()
    shop.add_subapp("/demo-shop", build_demo_shop_app(settings.server.max_body_bytes))
    runner = web.AppRunner(shop, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    tools = ToolRunner(settings.tools, base_url=f"http://127.0.0.1:{port}")
    try:
        async with fast_models(settings) as models:
            orchestrator = build_orchestrator(settings, models, tools, kb)
            counter = iter(range(1, 1_000_000))

            async def answer(q: Question) -> Reply:
                conversation = ConversationInfo(
                    id=next(counter), channel="api", shop_user_id="demo-shopper"
                )
                final: Final | None = None
                async for ev in orchestrator.reply(conversation, [], Turn("user", q.question)):
                    if isinstance(ev, Final):
                        final = ev
                if final is None:
                    return Reply("", cited=False)
                fast = final.routing.get("stage") == "faq" and not final.routing.get("handoff")
                return Reply(final.text, cited=cites(final), fast_path=fast)

            yield answer
    finally:
        await tools.aclose()
        await runner.cleanup()


def cites(final: Final) -> bool:
    """Whether the answer cites the shop's documents (the routing record lists the passages
    it cited; the source line under the text says the same to the shopper)."""
    record = final.routing.get("knowledge") if isinstance(final.routing, dict) else None
    if isinstance(record, dict) and record.get("cited"):
        return True
    return any(line.startswith(_SOURCE_LABELS) for line in final.text.splitlines())
