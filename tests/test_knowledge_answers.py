"""Answers from the shop's own documents (issue 17), end to end: documents go in through the
service's KnowledgeBase, questions through the HTTP API (or the widget), and the answer the
shopper gets carries the fact and a source line with the document's link; without a document
that says it, the bot offers to check and a person instead of inventing a policy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.settings import Settings
from knowledge.base import DEFAULT_COLLECTION, Passage
from orchestration.shop_knowledge import Sources, TurnKnowledge, source_line
from storage.models import Message
from tests.demo_tools import DEMO_SHOPPER
from tests.support import RunningService, eventually, start_service
from tests.widget_support import SECRET, SECRET_ENV, is_final, new_token, socket, widget_config

DATA = Path(__file__).parent / "data" / "knowledge_answers"
RETURNS = sorted(DATA.glob("returns.*.md"))
COLLECTION = "quokka"

# (question, the fact the answer must carry, the source line's label, the document's link)
ASKED = {
    "en": (
        "Can I return opened earbuds after 10 days?",
        "within 14 days of delivery",
        "Source: ",
        "https://quokka.example/help/returns",
    ),
    "zh": (
        "耳机拆封10天了还能退吗？",
        "签收后 14 天内可以退货",
        "来源：",
        "https://quokka.example/zh/help/returns",
    ),
    "ja": (
        "イヤホンを開封して10日たちましたが、返品できますか？",
        "お受け取りから 14 日以内であれば返品できます",
        "出典：",
        "https://quokka.example/ja/help/returns",
    ),
    "vi": (
        "tai nghe đã mở hộp 10 ngày rồi có trả hàng được không?",
        "trong vòng 14 ngày kể từ khi nhận hàng",
        "Nguồn: ",
        "https://quokka.example/vi/help/returns",
    ),
    "mixed": (
        "耳机拆封10天了还能return吗",
        "签收后 14 天内可以退货",
        "来源：",
        "https://quokka.example/zh/help/returns",
    ),
}


def quokka_settings(factory: Callable[..., Settings], db: str, **extra: Any) -> Settings:
    """API conversations of the account 'quokka' read the collection 'quokka' (the demo
    shop's documents stay in the default collection, unseen here)."""
    return factory(
        db,
        channels={"api": {"account": COLLECTION}},
        knowledge={"collections": [{"name": COLLECTION, "channels": [f"api:{COLLECTION}"]}]},
        **extra,
    )


@pytest.fixture
async def quokka(
    sqlite_url: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[RunningService]:
    svc = await start_service(quokka_settings(settings_factory, sqlite_url))
    yield svc
    await svc.stop()


async def add(svc: RunningService, *paths: Path, collection: str = COLLECTION, **kw: Any) -> None:
    for path in paths:
        await svc.services.knowledge.add(path, collection=collection, **kw)


async def ask(svc: RunningService, text: str, contact: str = "shopper", **fields: Any) -> str:
    """The shopper's question through the HTTP API; the answer they got, once delivered."""
    r = await svc.post(contact_id=contact, text=text, **fields)
    assert r.status_code == 202, r.text
    cid, mid = r.json()["conversation_id"], r.json()["message_id"]
    answer = await eventually(lambda: svc.answered(cid, mid))
    return str(answer["text"])


async def routing_of(svc: RunningService, answer: str) -> dict[str, Any]:
    async with svc.services.sessions() as s:
        rows = (await s.execute(select(Message).where(Message.text == answer))).scalars()
        row = next(iter(rows))
    assert row.routing is not None
    return row.routing


def source_of(answer: str) -> str:
    """The answer's last line: where a cited answer names its documents."""
    return answer.rsplit("\n", 1)[-1]


async def test_answers_in_every_language_carry_the_fact_and_the_source_until_removed(
    db_url: str, settings_factory: Callable[..., Settings]
) -> None:
    svc = await start_service(quokka_settings(settings_factory, db_url))
    try:
        await add(svc, *RETURNS)
        for lang, (question, fact, label, url) in ASKED.items():
            answer = await ask(svc, question, contact=f"shopper-{lang}")
            assert fact in answer, (lang, answer)
            line = source_of(answer)
            assert line.startswith(label + "[1]") and line.endswith(f" — {url}"), (lang, answer)
            assert "[1]" in answer.rsplit("\n", 1)[0], "the answer itself cites the passage"

        routing = await routing_of(svc, answer)
        assert routing["knowledge"]["collection"] == COLLECTION
        assert [c["n"] for c in routing["knowledge"]["cited"]] == [1]

        for path in RETURNS:
            await svc.services.knowledge.remove(str(path), collection=COLLECTION)
        reply = svc.services.settings.reply
        answer = await ask(svc, ASKED["en"][0], contact="after-en")
        assert answer == reply.no_knowledge_text
        answer = await ask(svc, ASKED["zh"][0], contact="after-zh")
        assert answer == reply.no_knowledge_text_zh
        assert "14" not in answer and "来源" not in answer
    finally:
        await svc.stop()


async def test_a_question_the_documents_do_not_answer_gets_the_check_and_a_person_reply(
    quokka: RunningService,
) -> None:
    await add(quokka, *RETURNS)
    reply = quokka.services.settings.reply
    assert await ask(quokka, "Can I bring my dog to your warehouse?") == reply.no_knowledge_text
    assert await ask(quokka, "你们仓库可以带狗去参观吗？", "zh") == reply.no_knowledge_text_zh
    # The reply's "human" is a request for a person the router understands.
    r = await quokka.post(contact_id="shopper", text="human")
    cid, mid = r.json()["conversation_id"], r.json()["message_id"]
    handed = await eventually(lambda: quokka.answered(cid, mid))
    assert handed["text"] == reply.handoff_notice


async def test_an_html_product_page_and_a_pdf_are_answered_from_with_their_links(
    quokka: RunningService, tmp_path: Path
) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.multi_cell(
        0,
        8,
        "Quokka Buds 2 warranty card\n\n"
        "The warranty on the Quokka Buds 2 lasts 18 months from the date of delivery. "
        "It covers the earbuds and the charging case; ear tips and cables are not covered.",
    )
    card = tmp_path / "warranty-card.pdf"
    pdf.output(str(card))
    await add(quokka, DATA / "earbuds.en.html")
    await add(quokka, card, url="https://quokka.example/docs/warranty-card.pdf")

    answer = await ask(quokka, "What's in the box of the Quokka Buds 2?")
    assert "four pairs of silicone ear tips" in answer, answer
    line = source_of(answer)
    assert line.startswith("Source: [1] Quokka Buds 2"), answer
    assert line.endswith(" — https://quokka.example/products/quokka-buds-2"), answer
    assert "analytics" not in answer and "Home ·" not in answer

    answer = await ask(quokka, "How long is the warranty on the Quokka Buds 2?", "pdf")
    assert "18 months" in answer, answer
    assert source_of(answer).endswith(" — https://quokka.example/docs/warranty-card.pdf")


async def test_each_part_of_a_two_part_message_is_answered_from_what_answers_it(
    quokka: RunningService,
) -> None:
    """The parts of a two-part message are searched one by one too, so the after-sales part
    is answered from the returns page, the product part from the catalogue."""
    await add(quokka, *RETURNS)
    question = "Is the wool coat in stock? Also, can I return opened earbuds after 10 days?"
    answer = await ask(quokka, question)
    assert "within 14 days of delivery" in answer and "in stock" in answer, answer
    assert source_of(answer) == (
        "Source: [1] Quokka Audio returns — https://quokka.example/help/returns"
    )
    routing = await routing_of(quokka, answer)
    assert routing["knowledge"]["found"], "the parts' passages were in the prompts"
    assert "search_products" in routing["specialist_results"]["product"]["tools"]


async def test_the_search_knowledge_tool_searches_the_conversations_collection(
    quokka: RunningService,
) -> None:
    """The built-in tool as a model calls it: numbered passages of the turn's collection
    (continuing the numbers of those already shown), a note when nothing answers, and an
    error that says what to send for bad arguments."""
    await add(quokka, *RETURNS)
    await add(quokka, DATA / "earbuds.en.html", collection="other")
    kb = quokka.services.knowledge
    turn = TurnKnowledge(
        kb, COLLECTION, "no", found=await kb.search("opened earbuds", collection=COLLECTION)
    )
    assert len(turn.sources) == 1
    result = json.loads(await turn.call('{"query": "who pays for the return label?"}'))
    assert [p["n"] for p in result["passages"]] == [2]
    assert "CNY 15" in result["passages"][0]["text"]
    assert result["passages"][0]["url"] == "https://quokka.example/help/returns"
    again = json.loads(await turn.call('{"query": "opened earbuds returns"}'))
    assert again["passages"][0]["n"] == 1, "a passage keeps its number within the turn"
    nothing = json.loads(await turn.call('{"query": "what is in the box of the Quokka Buds 2?"}'))
    assert nothing["passages"] == [] and "do not guess" in nothing["note"]
    bad = json.loads(await turn.call('{"q": 1}'))
    assert "query" in bad["error"]
    # A model naming another collection still searches the conversation's own.
    asked = {"query": "what is in the box of the Quokka Buds 2?", "collection": "other"}
    forged = json.loads(await turn.call(json.dumps(asked)))
    assert forged["passages"] == []


async def test_order_questions_are_still_answered_from_the_order_tools(
    quokka: RunningService,
) -> None:
    await add(quokka, *RETURNS)
    answer = await ask(quokka, "Where is my order ORD-1001?", shop_user_id=DEMO_SHOPPER)
    assert "ORD-1001" in answer and "in transit" in answer, answer
    assert "Source" not in answer
    routing = await routing_of(quokka, answer)
    tools = [t for r in routing["specialist_results"].values() for t in r["tools"]]
    assert "get_order" in tools and "search_knowledge" not in tools


async def test_two_widget_sites_read_only_their_own_collections(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    channels = widget_config(tmp_path)
    sites = channels["widget"]["sites"]
    sites.append({**sites[0], "key": "beta", "name": "Beta shop"})
    settings = settings_factory(
        sqlite_url,
        channels=channels,
        knowledge={
            "collections": [
                {"name": "alpha", "channels": ["widget:shop"]},
                {"name": "beta", "channels": ["widget:beta"]},
            ]
        },
    )
    beta_doc = tmp_path / "beta-returns.md"
    beta_doc.write_text(
        "---\ntitle: Beta returns\nurl: https://beta.example/returns\n---\n\n"
        "## Opened earbuds\n\nOpened earbuds can be returned within 30 days of delivery "
        "at Beta, in any condition.\n\n"
        "## Return shipping\n\nBeta sends a free courier to collect every return.\n\n"
        "## Refunds\n\nThe refund reaches your card 3 working days after we receive the "
        "parcel.\n",
        encoding="utf-8",
    )
    svc = await start_service(settings)
    try:
        await add(svc, DATA / "returns.en.md", collection="alpha")
        await add(svc, beta_doc, collection="beta")

        async def ask_site(site: str) -> str:
            async with socket(svc, site=site) as ws:
                await ws.hello(new_token())
                await ws.say(ASKED["en"][0])
                frames = await ws.until(is_final, timeout=30)
            return str(frames[-1]["text"])

        alpha, beta = await asyncio.gather(ask_site("shop"), ask_site("beta"))
        assert "14 days" in alpha and "https://quokka.example/help/returns" in alpha, alpha
        assert "30 days" not in alpha and "beta.example" not in alpha
        assert "30 days" in beta and source_of(beta).endswith(" — https://beta.example/returns")
        assert "14 days" not in beta and "quokka.example" not in beta
    finally:
        await svc.stop()


async def test_the_demo_shop_answers_policy_questions_from_its_own_documents(
    sqlite_service: RunningService,
) -> None:
    """On the embedded defaults the demo shop's policies are indexed at start-up."""
    docs = await sqlite_service.services.knowledge.documents(DEFAULT_COLLECTION)
    assert {Path(d.source).name for d in docs} >= {"returns.en.md", "returns.zh.md"}
    answer = await ask(sqlite_service, "Can I return opened earbuds after 10 days?")
    assert "7 days" in answer, answer
    assert source_of(answer).endswith(" — https://demo-shop.example/help/returns"), answer


def test_the_source_line_names_only_passages_the_answer_cites() -> None:
    def passage(chunk_id: int, title: str, url: str | None) -> Passage:
        return Passage(chunk_id, chunk_id, "default", f"/{title}.md", title, "", "…", url, 1, 1)

    sources = Sources()
    for p in (
        passage(7, "Returns", "https://shop.example/returns"),
        passage(8, "Returns", "https://shop.example/returns"),
        passage(9, "Shipping", None),
    ):
        sources.number(p)
    assert sources.cited("No markers here.") == []
    assert sources.cited("Made up [4], and [0].") == []
    cited = sources.cited("Within 7 days [2][1]; fees apply 【3】.")
    assert [n for n, _ in cited] == [2, 1, 3]
    assert source_line(cited, "can I return it?") == (
        "Sources: [2][1] Returns — https://shop.example/returns; [3] Shipping"
    )
    assert source_line(cited[:1], "能退吗") == "来源：[2] Returns — https://shop.example/returns"
