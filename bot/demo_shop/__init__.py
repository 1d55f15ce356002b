"""A small sample shop backend (orders, tracking, products, coupons, refunds) under /demo-shop.

The default specialists' tools (tools.yaml) call it, so the whole tool loop runs on the
embedded defaults without a real shop behind it.
"""

from bot.demo_shop.api import build_demo_shop_app

__all__ = ["build_demo_shop_app"]
