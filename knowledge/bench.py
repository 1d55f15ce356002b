"""How fast a search is on a big collection: `swarmdesk kb bench --chunks 10000`.

The collection is made up from real sentences (the given documents' chunks, else a built-in
multilingual set) recombined into `chunks` passages, with product codes and numbers so the
vocabulary grows like a real shop's. The figure is the whole search a shopper's question
costs: tokenising the question and scoring every chunk.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from knowledge import tokenize
from knowledge.index import CollectionIndex
from storage.knowledge import StoredChunk

SENTENCES = [
    "Unopened items can be returned within 30 days of delivery for a full refund.",
    "Opened earbuds and headphones can be returned within 15 days if all accessories are included.",
    "Standard shipping is free on orders over 49 EUR; express delivery costs 9.90 EUR.",
    "We ship to the EU, the UK, Switzerland and Norway; customs fees are paid by the buyer.",
    "Every device has a two-year warranty covering manufacturing defects, not accidental damage.",
    "Invoices are issued automatically and can be downloaded from the order page.",
    "Coupons cannot be combined, and a coupon expires 90 days after it is issued.",
    "未拆封商品自签收之日起30天内可无理由退货，退款将原路返回。",
    "已拆封的耳机在15天内可退货，但需附带全部配件和原包装。",
    "订单满299元包邮，偏远地区另收运费，顺丰快递一般2-3天送达。",
    "所有电子产品享受一年保修，人为损坏不在保修范围内。",
    "电子发票在订单完成后自动开具，可在订单详情页下载。",
    "未開封の商品はお届けから30日以内であれば返品できます。",
    "開封済みのイヤホンは付属品がすべて揃っている場合、15日以内に返品可能です。",
    "5,000円以上のご注文で送料無料となります。",
    "保証期間はお届け日から1年間です。",
    "Sản phẩm chưa mở hộp có thể trả hàng trong vòng 30 ngày kể từ ngày nhận.",
    "Tai nghe đã mở hộp được đổi trả trong 15 ngày nếu còn đủ phụ kiện.",
    "Miễn phí vận chuyển cho đơn hàng từ 500.000 đồng.",
    "Thời gian bảo hành là 12 tháng kể từ ngày mua.",
]

QUERIES = [
    "can I return opened earbuds after 10 days?",
    "how much is express shipping",
    "do you ship to Norway",
    "what does the warranty cover",
    "where do I download my invoice",
    "can I use two coupons",
    "耳机拆封了还能退吗",
    "多少钱包邮",
    "保修多久",
    "怎么开发票",
    "開封したイヤホンは返品できますか",
    "送料はいくらですか",
    "tai nghe đã mở hộp có trả được không",
    "tra hang trong bao lau",
    "bảo hành bao lâu",
    "退货 policy 是几天",
    "EL-1001 的保修是多久",
    "what's the weather today",
    "do you sell cars",
    "ORD-1001 shipping",
]


@dataclass(frozen=True, slots=True)
class BenchResult:
    chunks: int
    queries: int
    build_seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "chunks": self.chunks,
            "queries": self.queries,
            "build_seconds": round(self.build_seconds, 2),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3),
        }


def synthetic_chunks(
    n: int, sentences: Sequence[str] = SENTENCES, seed: int = 7
) -> list[StoredChunk]:
    rng = random.Random(seed)
    tokenised = [(s, tokenize.terms(s)) for s in sentences]
    out: list[StoredChunk] = []
    for i in range(n):
        picked = rng.sample(tokenised, k=min(3, len(tokenised)))
        code = f"SKU-{rng.randint(1000, 99999)}"
        extra = [code.lower(), str(rng.randint(1, 500)), f"model{rng.randint(1, 3000)}"]
        text = " ".join(s for s, _ in picked) + f" {code}"
        terms = [t for _, ts in picked for t in ts] + extra
        out.append(
            StoredChunk(
                id=i + 1,
                document_id=i // 10 + 1,
                collection="bench",
                source=f"/bench/doc-{i // 10}.md",
                title=f"Document {i // 10}",
                heading=f"Section {i % 10}",
                text=text,
                url=None,
                version=1,
                terms=" ".join(terms),
                embedding=None,
            )
        )
    return out


def run(
    chunks: int = 10_000,
    *,
    rounds: int = 50,
    sentences: Sequence[str] = SENTENCES,
    queries: Sequence[str] = QUERIES,
    k: int = 3,
    min_relevance: float = 0.3,
) -> BenchResult:
    """Build an index of `chunks` passages and time `rounds` passes over `queries`."""
    tokenize.warm_up()
    corpus = synthetic_chunks(chunks, sentences)
    started = time.perf_counter()
    index = CollectionIndex(corpus)
    build = time.perf_counter() - started
    for q in queries:  # warm caches (stemmer, jieba's) before timing
        index.search(tokenize.terms(q), k=k, min_relevance=min_relevance)
    times: list[float] = []
    for _ in range(rounds):
        for q in queries:
            t0 = time.perf_counter()
            index.search(tokenize.terms(q), k=k, min_relevance=min_relevance)
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return BenchResult(
        chunks=chunks,
        queries=len(times),
        build_seconds=build,
        p50_ms=statistics.median(times),
        p99_ms=p99,
        max_ms=times[-1],
    )
