"""The event loop `swarmdesk serve` runs on.

uvloop by default: its transports and scheduling are C, and `bench api` measured about a
tenth less CPU per message with it (the loop's own share of a streamed answer is large:
every token is a socket read and a write). `server.event_loop: asyncio` is the plain one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

LoopKind = Literal["uvloop", "asyncio"]


def run(main: Coroutine[Any, Any, T], kind: LoopKind = "uvloop") -> T:
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:  # e.g. on Windows, where uvloop does not exist
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
