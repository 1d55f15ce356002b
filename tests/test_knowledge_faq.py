"""`swarmdesk kb faq`: routing FAQ entries from the knowledge base's Q&A pages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.cli import main
from bot.settings import Settings
from knowledge.evaluate import DEMO_DOCS
from orchestration.routing.config import FaqSpec
from tests.support import RunningService, eventually, start_service

FAQ_PAGES = [str(DEMO_DOCS / f"faq.{lang}.md") for lang in ("en", "zh", "ja", "vi")]


def generated(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    assert main(list(argv)) == 0
    entries = yaml.safe_load(capsys.readouterr().out)
    assert isinstance(entries, list)
    return entries


async def answer(svc: RunningService, text: str, contact: str) -> str:
    r = await svc.post(contact_id=contact, text=text, client_message_id=f"{contact}-1")
    assert r.status_code == 202
    body = r.json()
    stored = await eventually(lambda: svc.answered(body["conversation_id"], body["message_id"]))
    return str(stored["text"])


async def test_faq_from_the_demo_qa_pages_answers_through_the_service(
    sqlite_url: str,
    settings_factory: Callable[..., Settings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    entries = generated(capsys, "kb", "faq", *FAQ_PAGES)
    # One entry per question, its four language versions in it, each a valid FAQ entry.
    assert len(entries) == 10
    specs = [FaqSpec.model_validate(e) for e in entries]
    assert len({s.name for s in specs}) == len(specs)
    assert all(set(s.answers) == {"en", "zh", "ja", "vi"} for s in specs)
    gift = next(s for s in specs if "可以礼品包装吗？" in s.questions)
    assert "CNY 10" in gift.answers["en"] and "10 元" in gift.answers["zh"]

    # Pasted under routing: faq:, the service answers those questions with no model call.
    svc = await start_service(settings_factory(sqlite_url, routing={"faq": entries}))
    try:
        assert await answer(svc, "可以礼品包装吗？", "zh-shopper") == gift.answers["zh"]
        assert await answer(svc, "Do you offer gift wrapping?", "en-shopper") == gift.answers["en"]
        assert (
            await answer(svc, "ギフトラッピングはできますか？", "ja-shopper") == gift.answers["ja"]
        )
        cancel = next(s for s in specs if "Can I cancel my order?" in s.questions)
        # A question about one particular order is looked up, not answered from the FAQ.
        got = await answer(svc, "can I cancel my order ORD-1003?", "order-shopper")
        assert got != cancel.answers["en"]
    finally:
        await svc.stop()


def test_kb_faq_reads_the_collection_and_q_a_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "swarmdesk.yaml"
    config.write_text(
        f"database:\n  url: sqlite+aiosqlite:///{tmp_path / 'kb.db'}\n", encoding="utf-8"
    )
    page = tmp_path / "help.txt"
    page.write_text(
        "Shop help\n\n"
        "Q: Do you deliver on Sundays?\n"
        "A: Yes, SF Express delivers every day,\n"
        "including Sundays and public holidays.\n\n"
        "Q: Can I pick up my order at the warehouse?\n"
        "A: No, we only deliver by courier.\n",
        encoding="utf-8",
    )
    assert main(["--config", str(config), "kb", "add", str(page)]) == 0
    capsys.readouterr()
    entries = generated(capsys, "--config", str(config), "kb", "faq")
    answers = {q: e["answers"]["en"] for e in entries for q in e["questions"]}
    assert answers == {
        "Do you deliver on Sundays?": "Yes, SF Express delivers every day, including Sundays "
        "and public holidays.",
        "Can I pick up my order at the warehouse?": "No, we only deliver by courier.",
    }
    for e in entries:
        FaqSpec.model_validate(e)


def test_a_page_without_questions_says_how_to_write_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["kb", "faq", str(DEMO_DOCS / "returns.en.md")]) == 2
    assert "write questions as headings" in capsys.readouterr().err
