"""Which part of the shop's documents answers a question, on the demo shop (issue 17): the
built-in FAQ answers only the general rule and leaves specific cases to the documents, and
the model simulator answers from the sentence that says it — the row of a size table, the
section a heading names, the rule about combining two coupon codes."""

from __future__ import annotations

import re

import pytest

from knowledge.evaluate import DEMO_DOCS
from orchestration.routing import Router
from orchestration.routing.config import RoutingSettings
from tests.support import RunningService, eventually

# FAQ entry -> the demo document its answers summarise.
FAQ_DOCUMENTS = {
    "shipping_fee": "shipping",
    "invoice_download": "invoices",
    "return_window": "returns",
}
_FIGURE = re.compile(r"\d+(?:\.\d+)?")


async def ask(svc: RunningService, text: str, contact: str) -> str:
    r = await svc.post(contact_id=contact, text=text)
    assert r.status_code == 202, r.text
    cid, mid = r.json()["conversation_id"], r.json()["message_id"]
    answer = await eventually(lambda: svc.answered(cid, mid))
    return str(answer["text"])


def source_of(answer: str) -> str:
    return answer.rsplit("\n", 1)[-1]


def test_every_figure_of_a_faq_answer_is_in_the_document_it_summarises() -> None:
    """A no-model answer never states a fee, a limit or a deadline the shop's own page
    does not (in the same language)."""
    entries = {f.name: f for f in RoutingSettings().resolved().faq}
    for name, slug in FAQ_DOCUMENTS.items():
        for lang, text in entries[name].answers.items():
            page = (DEMO_DOCS / f"{slug}.{lang}.md").read_text(encoding="utf-8")
            for figure in _FIGURE.findall(text):
                assert figure in page, (name, lang, figure, text)


@pytest.mark.parametrize(
    "question",
    [
        "新疆包邮吗",
        "寄到台湾运费多少钱",
        "手机已经激活了还能七天无理由吗",
        "how do I get an invoice for my company",
        "is the shipping fee on the invoice",
        "日本に住んでいますが、領収書はもらえますか",
        "Phí ship trả hàng ai chịu vậy shop?",
    ],
)
def test_a_specific_case_is_not_answered_with_the_general_faq(question: str) -> None:
    assert Router(RoutingSettings()).route_local(question).faq_answer is None


@pytest.mark.parametrize(
    "question", ["包邮吗", "how much is shipping", "电子发票在哪下载", "what is your return policy"]
)
def test_the_general_question_still_gets_the_faq_answer(question: str) -> None:
    assert Router(RoutingSettings()).route_local(question).stage == "faq"


# (question, what the answer must say, the link of the document it cites)
CASES = [
    ("新疆包邮吗", "20 元", "https://demo-shop.example/zh/help/shipping"),
    ("手机已经激活了还能七天无理由吗", "15 天", "https://demo-shop.example/zh/help/returns"),
    (
        "how do I get an invoice for my company",
        "taxpayer identification number",
        "https://demo-shop.example/help/invoices",
    ),
    (
        "who pays the postage when I return something I just don't want anymore?",
        "CNY 12",
        "https://demo-shop.example/help/returns",
    ),
    (
        "which running shoe size for a 26 cm foot",
        "42",
        "https://demo-shop.example/products/CL-2003",
    ),
    (
        "what's in the box with the earbuds pro",
        "USB-C",
        "https://demo-shop.example/products/EL-1001",
    ),
    (
        "can I use SAVE50 and WELCOME10 on the same order",
        "One store coupon per order",
        "https://demo-shop.example/help/coupons",
    ),
]


async def test_the_demo_shop_answers_from_the_sentence_that_says_it(
    sqlite_service: RunningService,
) -> None:
    for i, (question, fact, link) in enumerate(CASES):
        answer = await ask(sqlite_service, question, contact=f"shopper-{i}")
        assert fact in answer, (question, answer)
        assert link in source_of(answer), (question, answer)
        assert "ORD-1001" not in answer, "a rules question needs no order id"
