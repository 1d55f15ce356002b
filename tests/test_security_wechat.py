"""WeChat OA callbacks cannot be replayed or re-used for another body (issue 16, High)."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from bot.config_check import check
from channels.wechat.config import OfficialAccountSettings
from channels.wechat.replay import InMemoryNonceStore
from simulator.fakes.wechat_api import sha1_sign, text_xml
from tests.test_wechat_oa import Wx, openid, wx  # noqa: F401  (the fixture)


def signed(token: str, ts: int, nonce: str = "n0nce") -> dict[str, str]:
    return {"signature": sha1_sign(token, str(ts), nonce), "timestamp": str(ts), "nonce": nonce}


async def test_a_captured_url_does_not_sign_another_body(wx: Wx) -> None:  # noqa: F811
    params = signed("shop-token", int(time.time()), "capturedurl")
    victim, attacker = openid(), openid()
    first_id, forged_id = wx.shop.msg_id(), wx.shop.msg_id()
    first = text_xml(victim, "hello", first_id)
    r = await wx.shop.http.post("/wechat/shop", params=params, content=first.encode())
    assert r.status_code == 200
    # WeChat's retry of the same message with the same URL still passes (and is a duplicate).
    r = await wx.shop.http.post("/wechat/shop", params=params, content=first.encode())
    assert r.status_code == 200
    forged = text_xml(attacker, "refund everything", forged_id)
    r = await wx.shop.http.post("/wechat/shop", params=params, content=forged.encode())
    assert r.status_code == 403 and r.json()["error"] == "replayed"
    assert await wx.inbound(first_id) is not None
    assert await wx.inbound(forged_id) is None


async def test_a_callback_outside_the_time_window_is_refused(wx: Wx) -> None:  # noqa: F811
    for skew in (-301, 301):
        msg_id = wx.shop.msg_id()
        params = signed("shop-token", int(time.time()) + skew, f"n{skew}")
        body = text_xml(openid(), "hello", msg_id).encode()
        r = await wx.shop.http.post("/wechat/shop", params=params, content=body)
        assert r.status_code == 403 and r.json()["error"] == "stale_timestamp"
        assert await wx.inbound(msg_id) is None
    params = signed("shop-token", 0, "x") | {"timestamp": "soon"}
    r = await wx.shop.http.post("/wechat/shop", params=params, content=b"<xml/>")
    assert r.status_code == 403


def test_safe_mode_is_the_default_with_a_key() -> None:
    base = {"name": "a", "path": "/wx", "appid": "wx1", "secret_env": "S", "token": "t"}
    assert OfficialAccountSettings(**base, aes_key_env="K").mode() == "safe"
    assert OfficialAccountSettings(**base).mode() == "plain"


async def test_the_nonce_store_forgets_expired_and_stays_bounded() -> None:
    store = InMemoryNonceStore(max_entries=3)
    assert await store.remember("a", "1", 60) is None
    assert await store.remember("a", "2", 60) == "1"
    for key in "bcde":
        await store.remember(key, "x", 60)
    assert len(store._seen) == 3
    assert await store.remember("gone", "x", 0) is None
    assert await store.remember("gone", "y", 0) is None  # expired at once


def test_config_check_recommends_safe_mode(tmp_path: Path) -> None:
    account = {"name": "a", "path": "/wx", "appid": "wx1", "secret_env": "S", "token": "t"}
    f = tmp_path / "swarmdesk.yaml"
    f.write_text(
        yaml.safe_dump({"channels": {"wechat": {"enabled": True, "official_accounts": [account]}}})
    )
    ok, report = check(f)
    assert ok and "WARNING: channels.wechat.official_accounts[a]: plain mode" in report
