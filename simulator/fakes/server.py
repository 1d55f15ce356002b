"""A fake platform API served on a free loopback port (the base of the WeChat fakes)."""

from __future__ import annotations

from aiohttp import web


class LocalServer:
    """Subclasses build their routes in `app()`; `start()` serves them, `stop()` ends it."""

    _runner: web.AppRunner | None = None
    base_url: str = ""

    def app(self) -> web.Application:
        raise NotImplementedError

    async def start(self, port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
