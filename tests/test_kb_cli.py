"""`swarmdesk kb ...`: a shop manages its documents from the shell, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bot.cli import main
from tests.knowledge_support import DATA


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> str:
    f = tmp_path / "swarmdesk.yaml"
    f.write_text(f"log: {{level: warning}}\ndatabase: {{url: '{db_url}'}}\n")
    return str(f)


def test_add_list_search_remove(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    returns = tmp_path / "returns.md"
    shutil.copy(DATA / "returns.en.md", returns)
    empty = tmp_path / "empty.md"
    empty.write_text("")

    code, out = run(capsys, "-c", config, "kb", "add", str(returns), str(DATA / "shipping.zh.md"))
    assert code == 0
    assert "Returns and refunds (v1, 4 chunks)  https://shop.example/help/returns" in out
    assert "配送说明 (v1" in out

    # A batch with bad files: the good ones are added, each bad one explained, exit code 2.
    code, out = run(
        capsys, "-c", config, "kb", "add", str(empty), str(DATA / "warranty.ja.md"), "--url",
        "https://shop.example/ja/warranty",
    )  # fmt: skip
    assert code == 2
    assert "保証について (v1" in out and "https://shop.example/ja/warranty" in out
    assert f"failed: {empty}: the file is empty" in out
    assert "1 added, 1 failed" in out

    code, out = run(capsys, "-c", config, "kb", "list", "--json")
    docs = [json.loads(line) for line in out.splitlines()]
    assert sorted(d["title"] for d in docs) == ["Returns and refunds", "保証について", "配送说明"]
    assert {d["collection"] for d in docs} == {"default"}

    code, out = run(capsys, "-c", config, "kb", "search", "can I return opened earbuds?")
    assert code == 0
    assert "[1] Returns and refunds › Opened items" in out
    assert "https://shop.example/help/returns" in out and "14 days" in out

    code, out = run(capsys, "-c", config, "kb", "search", "what's the weather tomorrow")
    assert code == 0 and "nothing relevant" in out

    code, out = run(capsys, "-c", config, "kb", "remove", str(returns))
    assert code == 0 and "removed" in out and "Returns and refunds" in out
    code, out = run(capsys, "-c", config, "kb", "search", "can I return opened earbuds?")
    assert "nothing relevant" in out
    code, out = run(capsys, "-c", config, "kb", "remove", str(returns))
    assert code == 2 and "no document" in out and "kb list" in out


def test_collections_and_remove_by_id(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run(capsys, "-c", config, "kb", "add", str(DATA / "returns.en.md"), "-C", "brand-a")
    assert code == 0
    code, out = run(capsys, "-c", config, "kb", "search", "opened earbuds", "-C", "brand-b")
    assert "nothing relevant" in out
    code, out = run(capsys, "-c", config, "kb", "list", "-C", "brand-a", "--json")
    [doc] = [json.loads(line) for line in out.splitlines()]
    code, out = run(capsys, "-c", config, "kb", "remove", str(doc["id"]), "-C", "brand-a")
    assert code == 0 and "removed" in out
    code, out = run(capsys, "-c", config, "kb", "add", "x.md", "-C", "bad name")
    assert code == 2 and "collection 'bad name'" in out


def test_reindex_reads_changed_files(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "coupons.md"
    f.write_text("# Coupons\n\nOne coupon per order.\n")
    assert run(capsys, "-c", config, "kb", "add", str(f))[0] == 0
    f.write_text("# Coupons\n\nTwo coupons per order.\n")
    code, out = run(capsys, "-c", config, "kb", "reindex")
    assert code == 0 and "Coupons (v2, 1 chunks)" in out
    f.unlink()
    code, out = run(capsys, "-c", config, "kb", "reindex")
    assert code == 2 and "no such file" in out


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_bench_prints_latency(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "-c", config, "kb", "bench", "--chunks", "300", "--rounds", "1")
    assert code == 0
    figures = json.loads(out.splitlines()[0])
    assert figures["chunks"] == 300 and figures["p99_ms"] > 0
    assert "search p50" in out
