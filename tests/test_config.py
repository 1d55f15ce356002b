"""`swarmdesk config check` explains mistakes; the shipped example is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_example_config_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, text = run(capsys, "config", "example")
    assert code == 0 and "providers:" in text
    f = tmp_path / "swarmdesk.yaml"
    f.write_text(text)
    # A real deployment: no start while a named provider's key is missing.
    code, report = run(capsys, "config", "check", str(f))
    assert code == 1 and "DEEPSEEK_API_KEY is not set" in report
    for var in ("DEEPSEEK_API_KEY", "MOONSHOT_API_KEY", "SWARMDESK_METRICS_TOKEN"):
        monkeypatch.setenv(var, "x")
    code, report = run(capsys, "config", "check", str(f))
    assert code == 0, report
    assert "OK" in report


def test_mistakes_are_explained_with_their_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(
        """
server:
  portt: 8080
database:
  url: postgresql://localhost/shop
providers:
  - name: ds
    base_url: api.deepseek.com
    models:
      - name: deepseek-chat
        input_price_per_mtok: cheap
tiers:
  cheap: [ds/deepseek-chat]
"""
    )
    code, report = run(capsys, "config", "check", str(f))
    assert code == 1
    assert "server.portt: unknown key - did you mean 'port'?" in report
    assert "database.url: use an async driver" in report
    assert "providers[0].base_url: base_url must start with http://" in report
    assert "providers[0].models[0].input_price_per_mtok" in report and "'cheap'" in report


def test_tier_naming_an_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "tiers.yaml"
    f.write_text(
        "providers:\n  - {name: ds, base_url: 'http://x/v1', models: [{name: m1}]}\n"
        "tiers:\n  cheap: [ds/m2]\n"
    )
    code, report = run(capsys, "config", "check", str(f))
    assert code == 1
    assert "tiers.cheap[0]: 'ds/m2' is not a configured 'provider/model' (known: ds/m1)" in report


def test_broken_yaml_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("server:\n  port: 8080\n   host: x\n")
    code, report = run(capsys, "config", "check", str(f))
    assert code == 1 and "not valid YAML at line 3" in report


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run(capsys, "config", "check", str(tmp_path / "nope.yaml"))
    assert code == 1 and "file not found" in report


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.settings import load_settings

    f = tmp_path / "s.yaml"
    f.write_text("server: {port: 8080}\n")
    monkeypatch.setenv("SWARMDESK_SERVER__PORT", "9191")
    assert load_settings(f).server.port == 9191


def test_wecom_kf_mistakes_are_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "kf.yaml"
    f.write_text(
        """
channels:
  wecom_kf:
    enabled: true
    corp_id: ww123
    path: wecom/kf
    accounts:
      - {name: shop, open_kfid: wk1, handoff_to: servicer}
      - {name: shop2, open_kfid: wk1, recepton: wecom}
"""
    )
    code, report = run(capsys, "config", "check", str(f))
    assert code == 1
    assert "channels.wecom_kf.path: 'wecom/kf' is not a URL path" in report
    assert "account 'shop': handoff_to 'servicer' needs servicer_userid" in report
    assert "accounts[1].recepton: unknown key - did you mean 'reception'?" in report
    f.write_text(
        "channels:\n  wecom_kf:\n    enabled: true\n    corp_id: ww123\n"
        "    accounts: [{name: shop, open_kfid: wk1}]\n"
    )
    code, report = run(capsys, "config", "check", str(f))
    assert code == 1
    assert "enabled, but secret_env, aes_key_env, token (or token_env) not set" in report


def test_knowledge_mistakes_are_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "kb.yaml"
    f.write_text(
        "knowledge:\n"
        "  folders: [{path: ./no-such-folder, collection: brand-b}]\n"
        "  collections: [{name: brand-b, channels: [widget]}]\n"
    )
    code, report = run(capsys, "config", "check", str(f))
    assert code == 1
    assert "knowledge.collections[0].channels: 'widget': write channel:account" in report
    f.write_text(
        "knowledge:\n"
        f"  folders: [{{path: {tmp_path / 'no-such-folder'}, collection: brand-b}}]\n"
        "  collections: [{name: brand-b, channels: ['widget:brand-b']}]\n"
    )
    code, report = run(capsys, "config", "check", str(f))
    assert code == 0, report
    assert "knowledge.folders[0].path" in report and "is not a folder here" in report


def test_distributed_mode_mistakes_are_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "swarmdesk.yaml"
    # Several processes cannot share a SQLite file.
    f.write_text("queue: {backend: redis}\n")
    code, report = run(capsys, "config", "check", str(f))
    assert code == 1 and "set database.url to PostgreSQL" in report
    f.write_text("queue: {backend: rabbit}\n")
    code, report = run(capsys, "config", "check", str(f))
    assert code == 1 and "queue.backend" in report
    # A Redis beyond this machine without a password holds tokens anyone could read.
    f.write_text(
        "database: {url: 'postgresql+asyncpg://db.internal/shop'}\n"
        "queue: {backend: redis, url: 'redis://10.0.0.5:6379/0', lease_seconds: 2}\n"
    )
    code, report = run(capsys, "config", "check", str(f))
    assert code == 0, report
    assert "Redis at 10.0.0.5 without a password" in report
    assert "queue.lease_seconds 2" in report
    f.write_text(
        "database: {url: 'postgresql+asyncpg://db.internal/shop'}\n"
        "queue: {backend: redis, url: 'redis://:s3cret@10.0.0.5:6379/0'}\n"
    )
    code, report = run(capsys, "config", "check", str(f))
    assert code == 0 and "without a password" not in report and "s3cret" not in report
