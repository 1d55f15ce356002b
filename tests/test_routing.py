"""Routing on the built-in data: rules, FAQ, classifier, tiers and escalation (no model)."""

from __future__ import annotations

import pytest

from orchestration.routing import Router, RoutingDecision, RoutingSettings


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(RoutingSettings())


def route(router: Router, text: str, **kw: str) -> RoutingDecision:
    return router.route_local(text, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "intent"),
    [
        ("我的快递到哪了 三天没更新", "logistics"),
        ("請問包裹什麼時候會到", "logistics"),  # traditional Chinese
        ("wo de baoguo zenme hai mei dao", "logistics"),  # pinyin
        ("where is my parcel? tracking hasn't moved", "logistics"),
        ("荷物はまだ届きませんか", "logistics"),
        ("đơn hàng của mình giao tới đâu rồi", "logistics"),
        ("怎么取消订单", "order_status"),
        ("my card was declined, can I pay with PayPal", "order_status"),
        ("我要退货 尺码不合适", "refund"),
        ("返品の送料は誰が払いますか", "refund"),
        ("这件毛衣是纯羊毛的吗", "product"),
        ("is the desk lamp dimmable", "product"),
        ("有没有优惠券可以用", "discount"),
        ("mã giảm giá của shop dùng sao vậy", "discount"),
        ("转人工", "human"),
        ("can I talk to a real person please", "human"),
        ("你好", "greeting"),
        ("thanks a lot!", "greeting"),
        ("账号登录不上了", "other"),
        ("我的 parcel 到哪了 tracking 没 update", "logistics"),  # mixed
    ],
)
def test_multilingual_primary_intent(router: Router, text: str, intent: str) -> None:
    d = route(router, text)
    assert d.intents[0] == intent, d
    assert 0.0 <= d.confidence <= 1.0


def test_rule_stage_decides_and_is_cheap(router: Router) -> None:
    d = route(router, "SF1234567890123 这个单号到哪了")
    assert d.stage == "rule"
    assert d.intents == ("logistics",)
    assert d.tier == "cheap" and not d.escalate
    assert d.confidence > 0.8


def test_classifier_stage_without_any_rule(router: Router) -> None:
    trace = router.analyse("这条裙子的腰围能到七十吗")
    assert not trace.rule_hits
    d = router.decide(trace)
    assert d.stage == "classifier"
    assert d.intents[0] == "product"


@pytest.mark.parametrize(
    ("text", "lang_word"),
    [("电子发票在哪里下载", "发票"), ("where can I download my invoice", "invoice")],
)
def test_faq_answers_directly(router: Router, text: str, lang_word: str) -> None:
    d = route(router, text)
    assert d.stage == "faq"
    assert d.faq_answer is not None and lang_word.lower() in d.faq_answer.lower()
    assert d.tier == "cheap"


def test_faq_answers_in_the_shoppers_language(router: Router) -> None:
    zh = route(router, "退货期限是几天")
    en = route(router, "what's your return window")
    assert zh.stage == en.stage == "faq"
    assert zh.faq_answer and "天" in zh.faq_answer
    assert en.faq_answer and "days" in en.faq_answer
    assert route(router, "你们客服几点上班").faq_answer is not None
    assert route(router, "运费多少 包邮吗").intents == ("logistics",)


def test_vietnamese_typed_without_diacritics_gets_the_vietnamese_answer(router: Router) -> None:
    d = route(router, "phi ship bao nhieu, don bao nhieu thi duoc mien phi van chuyen")
    assert d.stage == "faq" and d.faq_answer is not None
    assert "miễn phí" in d.faq_answer.lower(), d.faq_answer


def test_faq_is_not_used_for_an_angry_or_multi_part_message(router: Router) -> None:
    d = route(router, "发票在哪下载？？你们这什么垃圾系统 找了半小时 气死了")
    assert d.stage != "faq" and d.faq_answer is None
    assert d.tier == "premium"


def test_multi_intent_selects_several(router: Router) -> None:
    d = route(router, "这件外套还有L码吗 另外现在有满减活动吗")
    assert d.intents[:2] == ("product", "discount")
    assert d.tier == "premium" and d.complexity == "complex"
    d = route(router, "my parcel still hasn't arrived, and can I return the lamp from last week?")
    assert set(d.intents) >= {"logistics", "refund"}


def test_pleasantries_do_not_add_greeting(router: Router) -> None:
    d = route(router, "谢谢 另外想问下退款多久到账")
    assert d.intents == ("refund",)


def test_negated_topic_is_not_an_intent(router: Router) -> None:
    d = route(router, "不是投诉哈 就问下这个电热水壶容量多大")
    assert d.intents == ("product",)
    assert d.sentiment != "angry" and not d.escalate
    d = route(router, "我不要人工 你直接告诉我退款到哪一步了")
    assert d.intents[0] == "refund" and "human" not in d.intents and not d.escalate


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("帮我转人工", "asks for a person"),
        ("the charger started sparking and smells burnt", "safety"),
        ("再不处理我就去12315投诉你们", "legal"),
        ("someone hacked my account and placed orders", "account takeover"),
        ("问了三次了还是没人管 到底退不退款", "earlier attempts failed"),
        ("傻逼客服", "abuse"),
    ],
)
def test_escalation_signals(router: Router, text: str, reason: str) -> None:
    d = route(router, text)
    assert d.escalate, d
    assert any(reason in r for r in d.reasons), d.reasons


def test_plain_human_request_is_cheap_but_angry_shopper_is_premium(router: Router) -> None:
    plain = route(router, "请帮我转接人工客服")
    assert plain.intents == ("human",) and plain.tier == "cheap" and plain.escalate
    angry = route(router, "你们服务太差了 我要给差评 再也不买了")
    assert angry.intents[0] == "complaint"
    assert angry.tier == "premium" and angry.sentiment in ("negative", "angry")


def test_tier_for_defects_and_price_calculations(router: Router) -> None:
    defect = route(router, "吹风机用了三天就坏了 开不了机")
    assert defect.intents[0] == "refund" and defect.tier == "premium"
    calc = route(router, "两件八折再叠加满300减40 两件分别199和259 最后付多少")
    assert calc.intents[0] == "discount" and calc.tier == "premium"
    simple = route(router, "优惠券在哪里领")
    assert simple.intents[0] == "discount" and simple.tier == "cheap"


def test_long_messages_go_premium(router: Router) -> None:
    text = "我想咨询一下关于订单的一些情况，" * 8
    d = route(router, text)
    assert d.tier == "premium"
    assert any("long message" in r for r in d.reasons)


def test_sticky_premium_stays_premium(router: Router) -> None:
    assert route(router, "你好").tier == "cheap"
    d = route(router, "你好", sticky_tier="premium")
    assert d.tier == "premium"
    assert any("sticky" in r for r in d.reasons)
    # A cheap conversation escalates to premium when the message needs it.
    assert route(router, "东西坏了 还有物流也太慢了", sticky_tier="cheap").tier == "premium"


def test_simulator_directives_do_not_affect_routing(router: Router) -> None:
    a = route(router, "怎么退货")
    b = route(router, "怎么退货 [[sim:tokens=80]] [[sim:fault=500]]")
    assert a.intents == b.intents and a.tier == b.tier


def test_decision_json_is_serialisable(router: Router) -> None:
    d = route(router, "电子发票在哪里下载")
    data = d.as_json()
    assert data["stage"] == "faq" and data["intents"] == ["other"]
    assert "faq_answer" in data and data["tier"] == "cheap"


def test_shop_extends_intents_rules_and_faq() -> None:
    settings = RoutingSettings.model_validate(
        {
            "intents": {
                "wholesale": {
                    "description": "bulk and business purchases",
                    "examples": ["能批发吗", "我要采购一百台", "do you sell in bulk", "B2B price"],
                }
            },
            "rules": [{"name": "bulk", "intent": "wholesale", "keywords": ["批发", "bulk"]}],
            "faq": [
                {
                    "name": "opening_hours",  # replaces the built-in answer
                    "keywords": ["营业时间", "opening hours"],
                    "answers": {"zh": "我们 8 点到 20 点在线。", "en": "We are online 8-20."},
                }
            ],
        }
    )
    r = Router(settings)
    assert r.route_local("能批发吗 要五十个").intents[0] == "wholesale"
    assert r.route_local("what are your opening hours").faq_answer == "We are online 8-20."
    # The built-in data is still there.
    assert r.route_local("怎么退货").intents[0] == "refund"


def test_builtin_data_can_be_switched_off() -> None:
    settings = RoutingSettings.model_validate(
        {
            "builtin": False,
            "intents": {
                "sales": {"examples": ["how much is it", "price please", "buy two"]},
                "support": {"examples": ["it broke", "does not work", "need help fixing"]},
            },
        }
    )
    r = Router(settings)
    assert set(r.labels) == {"sales", "support"}
    assert r.route_local("it broke again").intents[0] == "support"


def test_training_is_fast_and_routing_is_local(router: Router) -> None:
    # Not a timing assertion on the hot path: the start-up figure is reported for people.
    assert router.training_ms > 0
    assert router.classifier.examples > 500


def test_every_builtin_faq_question_is_answered_by_its_entry(router: Router) -> None:
    entries = RoutingSettings().resolved().faq
    assert {e.name for e in entries} >= {
        "opening_hours",
        "shipping_fee",
        "invoice_download",
        "return_window",
    }
    for entry in entries:
        assert entry.questions, entry.name
        for q in entry.questions:
            trace = router.analyse(q)
            d = router.decide(trace)
            assert trace.faq == entry.name and d.stage == "faq", (entry.name, q, d)
            assert d.faq_answer == entry.answers.get(trace.language, entry.answers["en"])
