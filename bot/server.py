"""Run the app until SIGINT/SIGTERM, then stop gracefully: close the listener, end streams,
let in-flight answers finish within the grace period (the rest resume at next start)."""

from __future__ import annotations

import asyncio
import signal

import structlog
from aiohttp import web

from bot.app import SERVICES, build_app
from bot.settings import Settings

log = structlog.get_logger(__name__)


async def serve(
    settings: Settings, *, ready: asyncio.Event | None = None, reuse_port: bool = False
) -> None:
    """`reuse_port`: share the port with the other processes of `serve --workers N`; the
    kernel spreads new connections over them."""
    app = build_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.server.shutdown_grace_seconds,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.server.host,
        settings.server.port,
        reuse_address=True,
        reuse_port=reuse_port or None,
    )
    await site.start()
    port = settings.server.port
    if runner.addresses:
        port = runner.addresses[0][1]
    host = settings.server.host if settings.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    app[SERVICES].listening_on(f"http://{host}:{port}")
    log.info("listening", url=f"http://{settings.server.host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("stopping", grace_seconds=settings.server.shutdown_grace_seconds)
        await runner.cleanup()
        log.info("stopped")
