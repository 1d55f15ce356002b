"""Finding the shop's rules: questions in every language shoppers use reach the right
section; questions the documents don't answer get nothing; collections stay apart; changes
made elsewhere are seen."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from bot.settings import Settings
from knowledge import tokenize
from knowledge.base import DEFAULT_COLLECTION
from knowledge.config import KnowledgeSettings
from knowledge.evaluate import DEMO_DOCS
from knowledge.service import KnowledgeBase
from orchestration.config import ProviderSettings
from simulator.server import Simulator
from storage.knowledge import load_chunks
from tests.knowledge_support import DATA, open_database, open_kb

DOCS = [
    "returns.en.md",
    "shipping.zh.md",
    "warranty.ja.md",
    "doi-tra.vi.md",
    "invoices.zh.md",
    "catalogue.csv",
    "catalogue.json",
]

QUESTIONS = [
    # (language group, question, file, heading, a fact the passage carries)
    (
        "en",
        "Can I return opened earbuds after 10 days?",
        "returns.en.md",
        "Opened items",
        "14 days",
    ),
    ("en", "when will I get my refund", "returns.en.md", "Refund timing", "5 business days"),
    ("zh", "运费多少钱？多少包邮", "shipping.zh.md", "运费", "199 元包邮"),
    ("zh", "今天付款什么时候发货", "shipping.zh.md", "发货时间", "当天发货"),
    ("zh", "可以寄到海外地址吗", "shipping.zh.md", "配送范围", "港澳台"),
    ("ja", "保証期間はどのくらいですか", "warranty.ja.md", "保証期間", "1年間"),
    ("ja", "水没した場合は保証されますか", "warranty.ja.md", "保証の対象外", "水没"),
    ("vi", "Tôi có thể trả hàng trong bao lâu?", "doi-tra.vi.md", "Thời hạn trả hàng", "7 ngày"),
    ("vi", "tra hang trong bao lau", "doi-tra.vi.md", "Thời hạn trả hàng", "7 ngày"),
    ("vi", "bao lâu thì nhận được tiền hoàn", "doi-tra.vi.md", "Hoàn tiền", "3 đến 5 ngày"),
    ("mixed", "invoice 怎么开？", "invoices.zh.md", "电子发票", "申请发票"),
    ("mixed", "公司要开 VAT 专票需要什么", "invoices.zh.md", "增值税专用发票", "税号"),
    ("mixed", "EL-1001 的 battery 能用多久", "catalogue.csv", "EL-1001", "30 hours"),
    ("en", "what sizes does the Glacier Down Jacket come in", "catalogue.json", "CL-2001", '"M"'),
]

OFF_TOPIC = [
    "what's the weather like tomorrow?",
    "do you sell cars",
    "who won the football match last night",
    "明天天气怎么样",
    "帮我写一首关于秋天的诗",
    "明日の天気はどうですか",
    "ngày mai trời có mưa không",
]


async def _add_all(kb: KnowledgeBase, collection: str = DEFAULT_COLLECTION) -> None:
    added, failed = await kb.add_many([DATA / d for d in DOCS], collection=collection)
    assert failed == []
    assert len(added) == len(DOCS)


async def test_questions_in_every_language_find_their_section(db_url: str) -> None:
    async with open_database(db_url) as database, open_kb(database) as kb:
        await _add_all(kb)
        misses = []
        for lang, question, file, heading, fact in QUESTIONS:
            passages = await kb.search(question, collection=DEFAULT_COLLECTION)
            top = passages[0] if passages else None
            if top is None or Path(top.source).name != file or top.heading != heading:
                misses.append(
                    (lang, question, [(Path(p.source).name, p.heading) for p in passages])
                )
                continue
            assert fact in top.text, (question, top.text)
        assert misses == []

        [hit, *_] = await kb.search("opened earbuds return", collection=DEFAULT_COLLECTION)
        assert hit.url == "https://shop.example/help/returns"
        assert hit.title == "Returns and refunds"
        assert hit.collection == DEFAULT_COLLECTION and hit.version == 1
        [product, *_] = await kb.search("Aurora Wireless Earbuds battery", collection="default")
        assert (product.title, product.heading) == ("Aurora Wireless Earbuds", "EL-1001")
        assert product.url == "https://shop.example/p/el-1001"


async def test_questions_the_documents_dont_answer_find_nothing(sqlite_url: str) -> None:
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        await _add_all(kb)
        for question in OFF_TOPIC:
            assert await kb.search(question, collection=DEFAULT_COLLECTION) == [], question
        assert await kb.search("   ", collection=DEFAULT_COLLECTION) == []
        assert await kb.search("returns", collection="empty-collection") == []


async def test_k_limits_the_passages(sqlite_url: str) -> None:
    async with open_database(sqlite_url) as database, open_kb(database, k=1) as kb:
        await _add_all(kb)
        assert len(await kb.search("returns refund opened unopened items")) == 1
        assert len(await kb.search("returns refund opened unopened items", k=3)) > 1


async def test_two_sites_do_not_see_each_others_documents(db_url: str, tmp_path: Path) -> None:
    brand_a = tmp_path / "a.md"
    brand_a.write_text("# Returns\n\nBrand A accepts returns within 30 days.\n")
    brand_b = tmp_path / "b.md"
    brand_b.write_text("# Returns\n\nBrand B accepts returns within 90 days.\n")
    routes = [
        {"name": "brand-a", "channels": ["widget:site-a", "telegram:*"]},
        {"name": "brand-b", "channels": ["widget:site-b", "api:b"]},
    ]
    async with open_database(db_url) as database, open_kb(database, collections=routes) as kb:
        await kb.add(brand_a, collection="brand-a")
        await kb.add(brand_b, collection="brand-b")
        assert kb.collection_for("widget", "site-a") == "brand-a"
        assert kb.collection_for("telegram", "anybot") == "brand-a"
        assert kb.collection_for("api", "b") == "brand-b"
        assert kb.collection_for("wechat", "gh_x") == DEFAULT_COLLECTION
        for site, days, other in (
            ("site-a", "30 days", "90 days"),
            ("site-b", "90 days", "30 days"),
        ):
            collection = kb.collection_for("widget", site)
            passages = await kb.search("how many days to return", collection=collection)
            assert passages and all(days in p.text and other not in p.text for p in passages)
        assert await kb.search("how many days to return", collection=DEFAULT_COLLECTION) == []
        # Removing from one collection leaves the other's document of the same name alone.
        with pytest.raises(ValueError, match="no document"):
            await kb.remove(str(brand_a), collection="brand-b")
        assert len(await kb.documents()) == 2


async def test_changes_from_another_process_are_seen_after_refresh(
    db_url: str, tmp_path: Path
) -> None:
    doc = tmp_path / "payment.md"
    doc.write_text("# Payment\n\nWe accept Alipay and WeChat Pay.\n")
    async with (
        open_database(db_url) as database,
        open_kb(database) as serving,
        open_kb(database) as cli,
    ):
        assert await serving.search("do you accept alipay") == []  # builds the (empty) index
        await cli.add(doc)
        await serving.refresh()
        [hit] = await serving.search("do you accept alipay")
        assert "Alipay" in hit.text

        await cli.remove(str(doc))
        await serving.refresh()
        assert await serving.search("do you accept alipay") == []


async def test_a_running_search_notices_changes_by_itself(sqlite_url: str, tmp_path: Path) -> None:
    doc = tmp_path / "payment.md"
    doc.write_text("# Payment\n\nWe accept Alipay and WeChat Pay.\n")
    async with (
        open_database(sqlite_url) as database,
        open_kb(database, refresh_seconds=0) as serving,
        open_kb(database) as cli,
    ):
        assert await serving.search("do you accept alipay") == []
        await cli.add(doc)
        found = []
        for _ in range(200):  # the rebuild runs in the background; the old index answers
            found = await serving.search("do you accept alipay")
            if found:
                break
            await asyncio.sleep(0.05)
        assert found and "Alipay" in found[0].text


async def test_watched_folder_follows_its_files(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    shutil.copy(DATA / "returns.en.md", folder / "returns.md")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    (folder / "readme.docx").write_bytes(b"ignored: not a kind we read")
    settings = {"folders": [{"path": str(folder), "url_prefix": "https://shop.example/help"}]}
    async with open_database(db_url) as database, open_kb(database, **settings) as kb:
        await kb.start()  # indexes the folder; the broken file is skipped, not fatal
        docs = await kb.documents()
        assert [Path(d.source).name for d in docs] == ["returns.md"]
        assert await kb.search("opened earbuds return")

        (folder / "shipping.md").write_text("# Shipping\n\nExpress delivery costs 9 EUR.\n")
        await kb.scan()
        [hit] = await kb.search("express delivery cost")
        assert hit.url == "https://shop.example/help/shipping"  # the prefix + the file's stem

        (folder / "returns.md").unlink()
        await kb.scan()
        assert [Path(d.source).name for d in await kb.documents()] == ["shipping.md"]
        assert await kb.search("opened earbuds return") == []


async def test_extra_folder_added_by_the_application(sqlite_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    shutil.copy(DATA / "shipping.zh.md", folder / "shipping.zh.md")
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        kb.add_folder(folder, collection="demo")
        await kb.start()
        assert await kb.search("运费多少", collection="demo")
        assert await kb.search("运费多少", collection=DEFAULT_COLLECTION) == []


async def test_embeddings_from_an_openai_compatible_endpoint(
    db_url: str, simulator: Simulator
) -> None:
    provider = ProviderSettings(
        name="local", base_url=simulator.base_url, models=[{"name": "embed-small"}]
    )
    settings = {"embeddings": {"provider": "local", "model": "embed-small"}}
    async with (
        open_database(db_url) as database,
        open_kb(database, providers=[provider], **settings) as kb,
    ):
        await _add_all(kb)
        chunks = await database.read(lambda conn: load_chunks(conn, DEFAULT_COLLECTION))
        assert chunks and all(c.embedding and len(c.embedding) == 256 for c in chunks)
        [top, *_] = await kb.search("Can I return opened earbuds after 10 days?")
        assert top.heading == "Opened items"
        assert await kb.search("who won the football match last night") == []


async def test_embeddings_endpoint_down_means_lexical_search_until_it_is_back(
    sqlite_url: str,
) -> None:
    sim = Simulator()
    base_url = await sim.start()
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    await sim.stop()  # the endpoint is away while the documents are added
    provider = ProviderSettings(name="emb", base_url=base_url, models=[{"name": "embed-small"}])
    settings = {"embeddings": {"provider": "emb", "model": "m", "timeout_seconds": 2}}
    async with (
        open_database(sqlite_url) as database,
        open_kb(database, providers=[provider], **settings) as kb,
    ):
        await _add_all(kb)
        [top, *_] = await kb.search("Can I return opened earbuds after 10 days?")
        assert top.heading == "Opened items"
        chunks = await database.read(lambda conn: load_chunks(conn, DEFAULT_COLLECTION))
        assert all(c.embedding is None for c in chunks)

        await sim.start(port=port)
        try:
            assert await kb.embed_missing() == len(chunks)
            chunks = await database.read(lambda conn: load_chunks(conn, DEFAULT_COLLECTION))
            assert all(c.embedding for c in chunks)
            [top, *_] = await kb.search("Can I return opened earbuds after 10 days?")
            assert top.heading == "Opened items"
        finally:
            await sim.stop()


def test_settings_explain_mistakes() -> None:
    with pytest.raises(ValueError, match="write channel:account"):
        KnowledgeSettings(collections=[{"name": "a", "channels": ["widget"]}])
    with pytest.raises(ValueError, match="collection name is 1-64 letters"):
        KnowledgeSettings(folders=[{"path": "/x", "collection": "brand a"}])
    with pytest.raises(ValueError, match="listed twice"):
        KnowledgeSettings(
            collections=[{"name": "a", "channels": ["*"]}, {"name": "a", "channels": ["api:x"]}]
        )
    with pytest.raises(ValueError, match=r"knowledge\.embeddings\.provider: 'nope' is not in"):
        Settings(knowledge={"embeddings": {"provider": "nope", "model": "m"}})


# --- relevance in a small collection, the shopper's language, shop words, typos ------------


FIRST_POLICY = """---
title: Returns policy
url: https://shop.example/returns
---
# Returns policy

## Return window

Items can be sent back within 30 days of delivery for a full refund.

## Opened items

Opened items can be returned within 14 days if every accessory is included. A restocking fee
of 5 EUR applies.

## Refunds

Refunds reach your card within 5 business days after we receive the parcel.
"""
MORE_OFF_TOPIC = [
    "what's the weather tomorrow",
    "ngay mai troi co mua khong",
    "what time is it in London?",
    "can you book me a flight to Paris",
    "你们卖汽车吗",
]


async def test_a_shops_first_document_answers_its_questions(
    sqlite_url: str, tmp_path: Path
) -> None:
    """One returns policy that never says "earbuds" or "fit": the shopper's words it doesn't
    use don't hide it, and questions about anything else still find nothing."""
    doc = tmp_path / "returns.md"
    doc.write_text(FIRST_POLICY)
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        await kb.add(doc)
        [top, *_] = await kb.search("Can I return opened earbuds after 10 days?")
        assert top.heading == "Opened items" and "14 days" in top.text
        assert top.url == "https://shop.example/returns"
        assert await kb.search("And can I return it if it doesn't fit?")
        for question in OFF_TOPIC + MORE_OFF_TOPIC:
            assert await kb.search(question) == [], question


async def test_the_demo_shop_answers_each_part_of_a_two_part_question(sqlite_url: str) -> None:
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        await kb.add_many([DEMO_DOCS])
        # The parts the orchestrator searches for "Is the wool coat in stock? And can I
        # return it if it doesn't fit?": the second shares only "return" with the policy.
        [top, *_] = await kb.search("And can I return it if it doesn't fit?")
        assert Path(top.source).name == "returns.en.md"
        for question in OFF_TOPIC + MORE_OFF_TOPIC:
            assert await kb.search(question) == [], question


LANGUAGE_DOCS = [
    f"{slug}.{lang}.md" for slug in ("returns", "shipping") for lang in ("en", "zh", "ja", "vi")
]


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("耳机拆封了还能return吗", "returns.zh.md"),
        ("SF express 顺丰发货吗", "shipping.zh.md"),
        # No Chinese word of these is in the Chinese page: their English words are put in
        # Chinese (knowledge/glossary.en-zh.txt) before the search.
        ("shipping fee怎么算的", "shipping.zh.md"),
        ("退货要寄到哪个address", "returns.zh.md"),
        ("開封したイヤホンは返品できますか", "returns.ja.md"),
        ("tai nghe đã mở hộp có trả lại được không", "returns.vi.md"),
        ("can I return opened earbuds", "returns.en.md"),
    ],
)
async def test_the_page_in_the_shoppers_language_comes_first(
    sqlite_url: str, question: str, expected: str
) -> None:
    """The answer is written from the first passage: in the shopper's language, even when
    the question mixes in a few English words."""
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        await kb.add_many([DEMO_DOCS / d for d in LANGUAGE_DOCS])
        [top, *_] = await kb.search(question)
        assert Path(top.source).name == expected


async def test_english_only_pages_still_answer_mixed_questions(sqlite_url: str) -> None:
    """A shop whose pages are all in English: the words as written still find them."""
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        await kb.add(DEMO_DOCS / "shipping.en.md")
        [top, *_] = await kb.search("shipping fee怎么算的")
        assert Path(top.source).name == "shipping.en.md"


async def test_shop_words_stay_whole_in_chinese(sqlite_url: str) -> None:
    """Couriers, coupon and invoice kinds the general dictionary cuts apart or glues on."""
    assert "中通" in tokenize.terms("可以指定发中通吗")
    assert "花呗" in tokenize.terms("能用花呗分期吗")
    assert {"店铺券", "平台券"} <= set(tokenize.terms("店铺券和平台券能一起用吗"))
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        await kb.add_many([DEMO_DOCS / f"{s}.zh.md" for s in ("shipping", "invoices", "payment")])
        for question, expected in (
            ("可以指定发中通吗", "shipping.zh.md"),
            ("公司要开VAT专票可以吗", "invoices.zh.md"),
            ("能用花呗分期吗", "payment.zh.md"),
        ):
            [top, *_] = await kb.search(question)
            assert Path(top.source).name == expected, question


async def test_english_typos_find_the_word_meant(sqlite_url: str) -> None:
    async with open_database(sqlite_url) as database, open_kb(database) as kb:
        await kb.add_many([DEMO_DOCS / d for d in ("returns.en.md", "shipping.en.md")])
        [top, *_] = await kb.search("can i retrun earbuds i opend last week??")
        assert (Path(top.source).name, top.heading) == ("returns.en.md", "Opened items")
        [top, *_] = await kb.search("shiping fee to hongkong?")
        assert Path(top.source).name == "shipping.en.md"
        # A misspelt question about something else stays unanswered.
        assert await kb.search("whats the wether tomorow") == []
        assert await kb.search("do you sel cars") == []


async def test_passages_an_older_version_cut_are_cut_again_on_load(
    db_url: str, tmp_path: Path
) -> None:
    """After an upgrade that cuts words differently, search matches without `kb reindex`."""
    from sqlalchemy import update
    from sqlalchemy.engine import Connection

    from storage.models import KbChunk

    doc = tmp_path / "payment.md"
    doc.write_text("# Payment\n\nWe accept Alipay and WeChat Pay.\n")
    async with open_database(db_url) as database:
        async with open_kb(database) as before:
            await before.add(doc)

        def as_if_old(conn: Connection) -> None:
            conn.execute(update(KbChunk).values(terms="zzz", tokenizer="1"))

        await database.write(as_if_old)
        async with open_kb(database) as after:
            [hit] = await after.search("do you accept alipay")
            assert "Alipay" in hit.text
        chunks = await database.read(lambda conn: load_chunks(conn, DEFAULT_COLLECTION))
        assert {c.tokenizer for c in chunks} == {tokenize.VERSION}, "saved: cut once"
        assert all("alipay" in c.terms.split() for c in chunks)
