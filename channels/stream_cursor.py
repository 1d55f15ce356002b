"""Resume bookkeeping for streaming clients (SSE, WebSocket).

A client's position is a watermark W: it has every durable message with seq <= W. Answers
finish out of seq order (a reply reserved at seq 9 may finish after the shopper's seq 10), so
the watermark only advances over contiguous seqs and a resumed client may see a message above
W again: clients dedupe by seq. Deltas carry their answer's seq and index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from channels.base import ConversationEvent


@dataclass(slots=True)
class StreamCursor:
    watermark: int = 0
    seen_above: set[int] = field(default_factory=set)
    delta_seq: int = -1
    delta_index: int = -1

    @classmethod
    def parse(cls, token: str | None, default_watermark: int) -> StreamCursor:
        """Read an event id we produced earlier ("W" or "W-seq.index"); garbage -> default."""
        if not token:
            return cls(watermark=default_watermark)
        head, _, tail = token.strip().partition("-")
        try:
            cur = cls(watermark=max(0, int(head)))
            if tail:
                seq, _, idx = tail.partition(".")
                cur.delta_seq, cur.delta_index = int(seq), int(idx)
            return cur
        except ValueError:
            return cls(watermark=default_watermark)

    def token(self) -> str:
        if self.delta_seq > self.watermark and self.delta_seq not in self.seen_above:
            return f"{self.watermark}-{self.delta_seq}.{self.delta_index}"
        return str(self.watermark)

    def admit(self, event: ConversationEvent) -> bool:
        """Whether the client still needs `event`; records it as sent if so."""
        if event.durable:
            s = event.seq
            if s <= self.watermark or s in self.seen_above:
                return False
            if s == self.watermark + 1:
                self.watermark = s
                while self.watermark + 1 in self.seen_above:
                    self.watermark += 1
                    self.seen_above.discard(self.watermark)
            else:
                self.seen_above.add(s)
            return True
        if event.type == "delta":
            if event.seq <= self.watermark or event.seq in self.seen_above:
                return False  # its answer is complete on the client already
            idx = event.index if event.index is not None else 0
            if event.seq == self.delta_seq and idx <= self.delta_index:
                return False
            self.delta_seq, self.delta_index = event.seq, idx
            return True
        return True  # typing and other transient signals
