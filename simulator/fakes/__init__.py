"""Fake platform servers (Telegram Bot API, WeChat, a fixed-answer model) that tests and
benchmarks run swarmdesk's real client code against."""
