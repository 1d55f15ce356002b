"""An OpenAI-compatible fake model server: the aiohttp app, and `Simulator` to run it.

Used when no LLM key is configured, by the tests and by the benchmarks. It speaks the
`/v1/chat/completions` protocol (streamed and not), paces tokens like a real model and
injects the failures real providers produce: 429 with Retry-After, 500, a request that
hangs, a stream cut mid-way, a slow first token (simulator.faults). Offered `tools`, it
calls the one that fits the shopper's message and then answers from the tool results;
asked for `response_format: json_object`, it classifies the message (simulator.modes), so
the specialists' tool loop and the router's LLM stage run for real without a model.
`/_sim/...` endpoints steer it at runtime (simulator.control).

It shares a small machine with the service under load, so it does little per request:
replies are generated once per distinct question and cached, pacing is `asyncio.sleep`,
and fast token rates are batched so a stream writes at most about every 10 ms.
"""

from __future__ import annotations

import itertools

from aiohttp import web

from simulator import control
from simulator.completions import chat_completions
from simulator.config import FAULTS, SimulatorConfig, SimulatorStats
from simulator.embeddings import embeddings
from simulator.faults import Fault
from simulator.state import STATE, SimState


async def _models(request: web.Request) -> web.Response:
    created = 1_700_000_000
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "swarmdesk-sim"}
                for name in ("sim-cheap", "sim-premium", "simulator")
            ],
        }
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].closing = True  # lets hung and streaming requests end promptly


def build_simulator_app(config: SimulatorConfig) -> web.Application:
    """The simulator as an aiohttp app; `config` is used live, not copied."""
    app = web.Application()
    app[STATE] = SimState(config)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/healthz", _healthz)
    app.router.add_post("/_sim/faults", control.queue_faults)
    app.router.add_post("/_sim/config", control.update_config)
    app.router.add_get("/_sim/stats", control.get_stats)
    app.router.add_get("/_sim/timings", control.get_timings)
    app.router.add_post("/_sim/reset", control.reset)
    app.on_shutdown.append(_on_shutdown)
    return app


class Simulator:
    """Runs the simulator inside the current event loop (tests, benchmarks, dev mode)."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self.app = build_simulator_app(self.config)
        self._state = self.app[STATE]
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    @property
    def stats(self) -> SimulatorStats:
        return self._state.stats

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on `host:port` (0 picks a free port); returns the `/v1` base URL."""
        if self._runner is not None:
            return self.base_url
        self._state.closing = False
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{url_host}:{bound_port}/v1"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            self._state.closing = True
            await self._runner.cleanup()
            self._runner = None

    def queue_fault(
        self,
        fault: str,
        count: int = 1,
        *,
        retry_after: float | None = None,
        first_token_ms: float | None = None,
    ) -> None:
        """The same as `POST /_sim/faults`, without HTTP."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        item = Fault(fault, retry_after=retry_after, first_token_ms=first_token_ms)
        self._state.queue.extend(itertools.repeat(item, count))

    def reset(self) -> None:
        """The same as `POST /_sim/reset`."""
        self._state.reset()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def run_standalone(host: str, port: int, config: SimulatorConfig) -> None:
    """Serve the simulator until interrupted (blocking)."""

    def announce(message: object) -> None:
        print(message, flush=True)
        print(f"OpenAI base URL: http://{host}:{port}/v1", flush=True)

    web.run_app(
        build_simulator_app(config),
        host=host,
        port=port,
        access_log=None,
        shutdown_timeout=1.0,
        print=announce,
    )
