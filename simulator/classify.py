"""The simulator's JSON classification mode (`response_format: {"type": "json_object"}`).

A cheap-tier model asked to classify a shopper's message answers with JSON; the simulator
imitates that with keyword matching over the last user message (Chinese and English, a few
Japanese and Vietnamese words), deterministically: the same text, the same labels.
"""

from __future__ import annotations

import re
from typing import Any

from simulator.keywords import keyword_pattern

# English entries match whole words; the others match anywhere (CJK has no spaces).
_KEYWORDS: dict[str, tuple[str, ...]] = {
    "logistics": (
        "where is my parcel", "where's my parcel", "where is my package", "where is my order",
        "where's my order", "track", "tracking", "parcel", "package", "shipping", "shipped",
        "ship", "delivery", "deliver", "delivered", "courier", "arrive", "arrived", "eta",
        "logistics", "dispatch", "dispatched", "address",
        "快递", "物流", "包裹", "到哪", "发货", "配送", "派送", "签收", "运单", "到货", "几时到",
        "什么时候到", "地址", "顺丰", "中通", "圆通", "京东物流", "寄到",
        "配達", "荷物", "発送", "giao hàng", "vận chuyển",
        "when will it arrive", "when will i get", "not arrived", "hasn't arrived", "post",
        "postage", "shipping fee", "送到", "寄", "多久到", "几天到", "没到", "还没到", "运费",
        "邮费", "快遞", "物流信息", "貨到", "kuaidi", "wuliu", "fahuo",
    ),
    "order_status": (
        "order status", "payment", "pay", "paid", "cancel", "cancelled", "change my order",
        "placed", "checkout",
        "付款", "支付", "取消", "修改订单", "改订单", "下单", "订单状态", "没付", "付不了",
        "注文", "キャンセル", "đơn hàng", "hủy",
        "payment failed", "confirm", "confirmed", "拍下", "拍错", "改颜色", "改尺码", "备注",
        "訂單", "付款失败", "扣款", "dingdan",
    ),
    "refund": (
        "refund", "refunds", "return", "returns", "exchange", "money back", "damaged", "broken",
        "defective", "faulty", "wrong item", "missing", "warranty", "repair",
        "退款", "退货", "换货", "退钱", "坏了", "破损", "质量问题", "保修", "维修", "少发",
        "发错", "退换", "返品", "返金", "交換", "hoàn tiền", "đổi trả",
        "doesn't work", "not working", "stopped working", "cracked", "scratched",
        "send it back", "faded", "leaking", "wrong size", "too small", "too big",
        "尺码不对", "不合适", "太小", "太大",
        "退", "换", "不能用", "用不了", "坏", "漏", "裂", "瑕疵", "掉色", "质量", "退貨",
        "tuikuan", "tuihuo",
    ),
    "product": (
        "product", "spec", "specs", "size", "sizes", "sizing", "fit", "colour", "color",
        "compatible", "compatibility", "in stock", "stock", "restock", "recommend", "compare",
        "difference", "material", "waterproof", "battery", "how much is", "price of",
        "尺码", "尺寸", "颜色", "规格", "参数", "有货", "库存", "补货", "推荐", "对比", "区别",
        "兼容", "材质", "适合", "多少钱", "防水", "续航",
        "サイズ", "在庫", "kích thước", "còn hàng",
        "which one", "better", "vs", "model", "version", "does it", "will it", "is it",
        "can it", "available", "how long does", "what's the difference",
        "哪个好", "哪款", "能不能用", "可以用", "有没有", "支持", "多大", "多重", "能装", "是什么",
        "貨", "尺碼", "顏色",
    ),
    "discount": (
        "coupon", "coupons", "code", "promo", "promotion", "promotions", "voucher", "discount",
        "sale", "deal", "deals", "points", "price protection", "price drop", "cheaper",
        "double 11", "11.11", "618", "black friday", "presale", "pre-sale",
        "优惠", "优惠券", "券", "折扣", "打折", "满减", "活动", "双11", "双十一", "积分",
        "价保", "降价", "便宜", "预售", "定金", "叠加",
        "クーポン", "セール", "割引", "giảm giá", "khuyến mãi",
        "off", "cashback", "lowest price", "price match", "红包", "返现", "满", "包邮",
        "保价", "凑单", "最低价", "折", "優惠", "youhui", "youhuiquan",
    ),
    "human": (
        "human", "real person", "a person", "live agent", "agent", "representative",
        "call me", "call back", "speak to someone", "talk to someone", "manager",
        "人工", "转人工", "真人", "人工客服", "客服经理", "找人", "打电话给我",
        "オペレーター", "担当者", "nhân viên",
        "someone", "person", "staff", "operator", "speak to", "talk to",
        "有人吗", "人呢", "客服电话", "真人客服", "人工服务",
    ),
    "complaint": (
        "complain", "complaint", "terrible", "worst", "ridiculous", "unacceptable", "scam",
        "fraud", "lawyer", "sue", "bad review", "disgusting", "useless",
        "投诉", "差评", "垃圾", "骗子", "太差", "气死", "坑人", "举报", "12315", "消协", "无语",
        "最悪", "tệ",
        "awful", "horrible", "pathetic", "rubbish", "garbage", "joke", "never again", "wtf",
        "shit", "fuck", "烂", "恶心", "服了", "坑", "离谱", "搞什么", "再也不", "什么破",
        "气人",
    ),
    "greeting": (
        "hi", "hello", "hey", "thanks", "thank you", "bye", "good morning", "good evening",
        "你好", "您好", "在吗", "谢谢", "再见", "哈喽", "嗨",
        "こんにちは", "ありがとう", "xin chào", "cảm ơn",
        "thx", "ty", "cheers", "good night", "ok", "okay", "谢了", "多谢", "拜拜", "早上好",
        "晚上好", "辛苦了", "好的", "謝謝", "nihao", "xiexie", "yo", "heyy", "heyyy", "appreciate",
        "have a good one", "感谢", "喂", "哈哈", "お疲れ", "承知", "chúc",
    ),
}  # fmt: skip

# The labels it answers with (the router's built-in set), in the order that breaks ties
# between intents found at the same place: the keyword labels, then "other".
LABELS = (*_KEYWORDS, "other")

# Question words that, with no other clue, most often ask about a product's details.
_PRODUCT_QUESTION = (
    "how many", "how big", "how long", "how heavy", "what's the", "what is the", "does the",
    "does it", "do they", "is there", "can i use", "have a", "多少", "多厚", "多大", "多高",
    "多长", "多重", "几", "会不会", "能不能", "是不是", "有没有", "是否", "吗", "ですか", "ますか",
    "không", "ko",
)  # fmt: skip
# Words that only say "an order" without a task: they count when nothing else matched.
_WEAK_ORDER = ("order", "orders", "订单", "单号")
# ASCII look-arounds, not \b: in "订单ORD-1001" the id touches a CJK word character.
ORDER_ID_RE = re.compile(r"(?<![A-Za-z0-9])ORD-?\d{3,}(?![0-9])", re.IGNORECASE)
_TRACKING_RE = re.compile(
    r"(?<![A-Za-z0-9])(?:(?:SF|YT|JDV?|ZTO|STO|YD|EMS)\d{9,15}|7\d{13})(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_COUPON_RE = re.compile(r"(?<![A-Za-z0-9-])[A-Z]{2,}[A-Z0-9]*\d[A-Z0-9]*(?![A-Za-z0-9-])")

_ANGRY = (
    "furious", "ridiculous", "scam", "fraud", "lawyer", "sue", "worst", "disgusting", "wtf",
    "damn", "unacceptable", "useless",
    "pathetic", "rubbish", "garbage", "shit", "fuck", "恶心", "离谱", "搞什么", "什么破",
    "骗子", "垃圾", "气死", "坑人", "妈的", "tmd", "滚", "举报", "12315", "消协", "律师", "起诉",
    "最悪",
)  # fmt: skip
_NEGATIVE = (
    "broken", "damaged", "faulty", "defective", "late", "delay", "delayed", "still not",
    "wrong", "missing",
    "disappointed", "problem", "issue", "slow", "bad", "not happy", "never arrived",
    "坏", "破", "慢", "还没", "没收到", "错", "失望", "问题", "怎么还", "不满意", "差",
)  # fmt: skip
_POSITIVE = (
    "thanks", "thank you", "great", "love", "awesome", "perfect", "excellent", "happy",
    "谢谢", "感谢", "好评", "满意", "棒", "喜欢", "ありがとう", "cảm ơn",
)  # fmt: skip
_LEGAL = ("lawyer", "sue", "court", "律师", "起诉", "法院", "12315", "消协", "工商")
_CALCULATION = (
    "calculate", "in total", "final price", "how much will i pay", "stack", "combine",
    "一共", "算一下", "到手价", "叠加", "总共",
)  # fmt: skip
_NEGATIONS = ("不是", "没有要", "not a ", "not to ", "no ")


_LABEL_RES = {label: keyword_pattern(words) for label, words in _KEYWORDS.items()}
_WEAK_ORDER_RE = keyword_pattern(_WEAK_ORDER)
_PRODUCT_QUESTION_RE = keyword_pattern(_PRODUCT_QUESTION)
_ANGRY_RE = keyword_pattern(_ANGRY)
_NEGATIVE_RE = keyword_pattern(_NEGATIVE)
_POSITIVE_RE = keyword_pattern(_POSITIVE)
_LEGAL_RE = keyword_pattern(_LEGAL)
_CALCULATION_RE = keyword_pattern(_CALCULATION)


def _first_hit(pattern: re.Pattern[str], text: str) -> int | None:
    """Position of the first match that is not negated just before it."""
    for match in pattern.finditer(text):
        before = text[max(0, match.start() - 4) : match.start()]
        if not any(before.endswith(n) for n in _NEGATIONS):
            return match.start()
    return None


def classify(text: str) -> dict[str, Any]:
    """{"intents": [...], "complexity", "sentiment", "needs_human"} for one message."""
    lowered = text.lower()
    found: dict[str, int] = {}
    for label, pattern in _LABEL_RES.items():
        at = _first_hit(pattern, lowered)
        if at is not None:
            found[label] = at
    if (m := _TRACKING_RE.search(text)) is not None:
        found["logistics"] = min(found.get("logistics", m.start()), m.start())
    if (m := _COUPON_RE.search(text)) is not None and not _TRACKING_RE.fullmatch(m.group()):
        found["discount"] = min(found.get("discount", m.start()), m.start())
    weak_order = ORDER_ID_RE.search(text) or _WEAK_ORDER_RE.search(lowered)
    if weak_order is not None and not found.keys() - {"greeting"}:
        found["order_status"] = weak_order.start()
    if not found and (m := _PRODUCT_QUESTION_RE.search(lowered)) is not None:
        found["product"] = m.start()
    if len(found) > 1:
        found.pop("greeting", None)  # pleasantries around a real question add nothing

    sentiment = _sentiment(text, lowered)
    intents = sorted(found, key=lambda label: (found[label], LABELS.index(label)))
    if "complaint" in intents and len(intents) > 1:
        # An angry message that asks for something: the task first, then the complaint.
        intents.remove("complaint")
        intents.append("complaint")
    if not intents:
        intents = ["complaint"] if sentiment == "angry" else ["other"]
    intents = intents[:3]

    tasks = [i for i in intents if i not in ("greeting", "other")]
    han = sum(1 for c in text if "\u4e00" <= c <= "\u9fff")
    long_text = len(text) > 160 or han > 70
    complex_ = (
        len(tasks) >= 2
        or long_text
        or sentiment == "angry"
        or (sentiment == "negative" and "refund" in intents)
        or _CALCULATION_RE.search(lowered) is not None
    )
    needs_human = (
        "human" in intents or sentiment == "angry" or _LEGAL_RE.search(lowered) is not None
    )
    return {
        "intents": intents,
        "complexity": "complex" if complex_ else "simple",
        "sentiment": sentiment,
        "needs_human": needs_human,
    }


def _sentiment(text: str, lowered: str) -> str:
    # Shouting is several all-caps words; order ids (ORD-1021), tracking numbers and product
    # acronyms (LED, USB) are not.
    plain = _TRACKING_RE.sub(" ", ORDER_ID_RE.sub(" ", text))
    shouting = sum(1 for w in re.findall(r"\b[A-Z]{4,}\b", plain) if not _COUPON_RE.fullmatch(w))
    if (
        _first_hit(_ANGRY_RE, lowered) is not None
        or "!!!" in text
        or "！！！" in text
        or shouting >= 2
    ):
        return "angry"
    if _first_hit(_NEGATIVE_RE, lowered) is not None:
        return "negative"
    if _POSITIVE_RE.search(lowered) is not None:
        return "positive"
    return "neutral"
