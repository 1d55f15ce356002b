"""WeChat and WeCom callback signatures are compared in constant time on every route (the
forged one goes through hmac.compare_digest before wechatpy's `!=` sees anything), and a
refused callback gets a fixed text, never our exception's repr."""

from __future__ import annotations

import hmac
from typing import Any

import pytest
from wechatpy.exceptions import InvalidSignatureException

from channels.wechat.runtime import require_signature
from simulator.fakes.wechat_api import DOC_BODY, DOC_NONCE, DOC_TIMESTAMP, sha1_sign
from tests.test_wechat_oa import Wx, openid, wx  # noqa: F401 (the fixture)
from tests.test_wechat_wecom import Wc, wc  # noqa: F401 (the fixture)

FORGED = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The signatures our code handed to hmac.compare_digest."""
    seen: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return seen


def test_require_signature_takes_the_right_one_only() -> None:
    right = sha1_sign("tok", "123", "n")
    require_signature(right, "tok", "123", "n")
    for wrong in (right[:-1] + ("0" if right[-1] != "0" else "1"), "", "é" * 40, "\ud800"):
        with pytest.raises(InvalidSignatureException):
            require_signature(wrong, "tok", "123", "n")


async def test_forged_official_account_callbacks_meet_compare_digest(
    wx: Wx,  # noqa: F811
    compared: list[bytes],
) -> None:
    r = await wx.shop.verify("echo", signature=FORGED)
    assert r.status_code == 403
    r = await wx.shop.post_xml("<xml/>", params={"signature": FORGED})
    assert r.status_code == 403
    # Safe mode: the outer signature is right, the msg_signature over the body is forged.
    r = await wx.safe.post_xml(DOC_BODY, params={"encrypt_type": "aes", "msg_signature": FORGED})
    assert r.status_code == 403
    assert compared.count(FORGED.encode()) == 3
    assert await wx.message_count() == 0


async def test_forged_wecom_callbacks_meet_compare_digest(
    wc: Wc,  # noqa: F811
    compared: list[bytes],
) -> None:
    params = {"msg_signature": FORGED, "timestamp": DOC_TIMESTAMP, "nonce": DOC_NONCE}
    r = await wc.http.get("/wecom/staff", params={**params, "echostr": "abc"})
    assert r.status_code == 403
    r = await wc.http.post("/wecom/staff", params=params, content=DOC_BODY.encode())
    assert r.status_code == 403
    r = await wc.http.post("/wecom/bot", params=params, json={"encrypt": "abc"})
    assert r.status_code == 403
    assert compared.count(FORGED.encode()) == 3
    assert await wc.message_count() == 0


async def test_a_message_wechatpy_cannot_read_gets_a_fixed_text(wx: Wx) -> None:  # noqa: F811
    r = await wx.shop.post_xml("<xml><ToUserName>x</ToUserName></xml>")
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_message", "detail": "not a WeChat message"}
    assert await wx.message_count() == 0
    user = openid()
    ok = await wx.shop.send_text(user, "在吗？", wx.shop.msg_id())
    assert ok.status_code == 200


async def test_wecom_bot_fields_of_odd_shapes_are_refused_not_500(wc: Wc) -> None:  # noqa: F811
    odd: list[dict[str, Any]] = [
        {"msgtype": "text", "from": [1], "text": {"content": "hi"}},
        {"msgtype": "text", "from": {"userid": "u1"}, "text": ["hi"]},
        {"msgtype": "mixed", "from": {"userid": "u1"}, "mixed": {"msg_item": ["x", 1]}},
        {"msgtype": "stream", "stream": "sd1c1q1"},
    ]
    for payload in odd:
        r = await wc.bot.post(payload)
        assert r.status_code in (200, 400), (payload, r.status_code, r.text)
        if r.status_code == 400:
            assert r.json() == {"error": "invalid_message", "detail": "not a WeCom bot message"}
    # A stream id past 64 bits is not ours: WeCom is told to stop polling it.
    polled = await wc.bot.post({"msgtype": "stream", "stream": {"id": "sd1c" + "9" * 25 + "q1"}})
    assert polled.status_code == 200
    assert await wc.message_count() == 0
