"""A specialist asked for its own part of a multi-part message answers that part only.

The orchestrator tells each specialist of a multi-part message which part is its own ("Answer
only the part about: refund"); a real model then ignores the rest. The simulator does the
same: it splits the message into its questions, keeps those its keyword classifier files
under the named intents, and answers them — a returns question without an order id with the
demo shop's returns policy, as a shop assistant would.
"""

from __future__ import annotations

import re

from orchestration.language import mostly_chinese
from simulator.classify import ORDER_ID_RE, classify

PART_RE = re.compile(r"only the part about:\s*([a-z_]+(?:\s*,\s*[a-z_]+)*)", re.IGNORECASE)
# Where one question of a message ends and the next begins.
_SPLIT_RE = re.compile(
    r"(?<=[?？!！。；;])|还有[，,]?|另外[，,]?|(?<![a-z])(?:and )?also,?(?![a-z])", re.IGNORECASE
)
# Intents a part may be filed under and still belong to the specialist (an order's status
# and its delivery are asked in the same words).
_RELATED = {"order_status": {"logistics"}, "logistics": {"order_status"}}

RETURNS_POLICY = (
    "Unused items in their original packaging can be returned within 7 days of delivery, "
    "no reason needed. Send me the order id and I will start the return for you."
)
RETURNS_POLICY_ZH = (
    "未使用、包装完好的商品，签收后 7 天内可以无理由退货。把订单号发给我，我马上为您办理退货。"
)


def own_part(system_prompt: str, question: str) -> tuple[str, set[str]]:
    """(the part of `question` the system prompt asks for, its intents); the whole question
    and no intents when the prompt names no part."""
    m = PART_RE.search(system_prompt)
    if m is None:
        return question, set()
    wanted = {w.strip().lower() for w in m.group(1).split(",")}
    for w in list(wanted):
        wanted |= _RELATED.get(w, set())
    clauses = [c.strip(" ，,") for c in _SPLIT_RE.split(question) if c and c.strip(" ，,")]
    intents = [classify(c)["intents"] for c in clauses]
    # A clause is first of all about its first intent ("can I return it if it doesn't fit"
    # is a returns question that mentions the product).
    mine = [c for c, i in zip(clauses, intents, strict=True) if i and i[0] in wanted]
    if not mine:
        mine = [c for c, i in zip(clauses, intents, strict=True) if set(i) & wanted]
    if not mine:
        return question, wanted
    return ("" if mostly_chinese(question) else " ").join(mine), wanted


def policy_answer(part: str, intents: set[str]) -> str | None:
    """The returns policy for a returns question that names no order (nothing to look up)."""
    if "refund" not in intents or ORDER_ID_RE.search(part):
        return None
    if "refund" not in classify(part)["intents"]:
        return None
    return RETURNS_POLICY_ZH if mostly_chinese(part) else RETURNS_POLICY
