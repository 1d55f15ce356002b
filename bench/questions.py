"""Shopper questions the load generators send (and the simulator baseline asks)."""

from __future__ import annotations

QUESTIONS = (
    "Where is my order?",
    "When will my parcel arrive?",
    "Can I change the delivery address?",
    "How do I return a pair of shoes?",
    "Do you ship to Canada?",
    "My package arrived damaged, what now?",
    "Can I cancel my order?",
    "Is this jacket available in size M?",
    "How long does a refund take?",
    "Do you have a discount code for students?",
    "Why was my card declined?",
    "Can I pay with PayPal?",
    "The tracking number does not work.",
    "How do I reset my password?",
    "Is the blue kettle back in stock?",
    "Can I add an item to my order?",
    "What is your warranty on headphones?",
    "I received the wrong colour.",
    "Do you offer gift wrapping?",
    "How much is express shipping?",
    "我的订单什么时候发货？",
    "这个优惠券怎么用？",
    "这件衣服有大码吗？",
    "退货运费谁承担？",
)
