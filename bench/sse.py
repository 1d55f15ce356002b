"""A small incremental Server-Sent Events parser (bytes in, events out).

Cheap on purpose: the load generator reads thousands of delta events per second on a
2-core machine that also runs the service, so it splits on blank lines instead of reading
the stream line by line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SseEvent:
    event: str
    data: str
    id: str | None


class SseParser:
    def __init__(self) -> None:
        self._buf = b""
        self.last_id: str | None = None
        self.comments = 0  # keep-alive comment blocks seen

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Events completed by `chunk` (a partial event waits for the next chunk)."""
        buf = self._buf + chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *blocks, self._buf = buf.split(b"\n\n")
        events: list[SseEvent] = []
        for block in blocks:
            ev = self._block(block.decode("utf-8", errors="replace"))
            if ev is not None:
                events.append(ev)
        return events

    def _block(self, block: str) -> SseEvent | None:
        kind = "message"
        data: list[str] = []
        has_data = False
        event_id: str | None = None
        for line in block.split("\n"):
            if not line:
                continue
            if line[0] == ":":
                self.comments += 1
                continue
            name, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
                has_data = True
            elif name == "event":
                kind = value
            elif name == "id":
                event_id = value
        if event_id is not None:
            self.last_id = event_id
        if not has_data:
            return None  # retry: lines, comments
        return SseEvent(kind, "\n".join(data), event_id)
