"""The work queue of several processes (queue.backend: redis).

Conversations are spread over `queue.partitions` partitions (conversation id modulo the count).
Each partition is one Redis stream and is worked by one process at a time, the one holding its
lease (a key set with NX and an expiry, renewed while the process lives). A process holds about
its share of the partitions (the live processes are counted in a sorted set of heartbeats) and
gives back what it has beyond its share when others join, so the work spreads by itself.

- `put` (ingest, under the chat's lock) appends to the conversation's stream and frees the
  lock in the same script: stream order is storage order, so one conversation's messages are
  answered in order by whichever process holds the partition, through the in-process queue
  (one at a time per conversation).
- A message answered is acknowledged (XACK + XDEL) with the others answered within
  `ACK_DELAY_S`, in one round trip: an entry a crash left unacknowledged is read again and
  found answered.
- Taking a partition raises its fencing token in the database (storage/fences.py) and then
  recovers it from the database (answers cut mid-stream abandoned, undelivered answers sent,
  unanswered messages queued) before reading its stream, so a process killed mid-answer loses
  nothing and an answer is stored once: the old holder's token no longer matches.
- A sweep queues what the database says is waiting but the stream lost (a crash between
  storing and queueing, a Redis restart without persistence).
- The database is the truth everywhere: a message answered already is skipped by the worker,
  so a duplicate queue entry costs one read, never a second answer.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import structlog
from redis.exceptions import ResponseError

from bot import metrics
from bot.locks import HeldLock
from bot.workqueue import WORK_LEASE, Handler, InProcessQueue
from cluster.redis import REDIS_DOWN, RedisParts
from storage import fences
from storage.executor import Database
from storage.fences import Fence
from storage.models import utcnow
from storage.recovery import Partitions, unanswered_messages

log = structlog.get_logger(__name__)

GROUP = "work"
# One consumer name for every holder: entries the last holder read but never acknowledged stay
# pending under it, and the next holder reads them back from id 0.
CONSUMER = "holder"
READ_COUNT = 256
READ_BLOCK_MS = 500
# Stop reading while this many messages wait in this process already (others' partitions are
# not slowed; ours resume once the backlog shrinks).
LOCAL_HIGH_WATER = 2000
# Cap of a stream's length, far above any backlog: entries are deleted once handled.
STREAM_MAXLEN = 1_000_000
# Acknowledgements wait this long to go out together (a crash in between costs one re-read).
ACK_DELAY_S = 0.05
# KEYS: the stream, the chat's lock. ARGV: maxlen, conversation id, message id, lock token.
_PUT_AND_UNLOCK = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'c', ARGV[2], 'm', ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
return 1
"""

# Renew a lease if it is still ours (a takeover, or a Redis restart, make it not).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

Takeover = Callable[[Callable[[int, int], Awaitable[None]], Partitions], Awaitable[Any]]


@dataclass(eq=False, slots=True)
class PartitionLease:
    """A partition this process holds: its fence and until when it surely holds it."""

    queue: RedisQueue
    partition: int
    value: str
    fence: Fence
    deadline: float  # monotonic: renewed before this, or lost
    # Set once the partition is recovered: its turns wait for it, so what the database
    # holds of it is answered first, in order.
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def held(self) -> bool:
        """Not lost nor given back (though perhaps not renewed in time: see `valid`)."""
        return self.queue._held.get(self.partition) is self

    def valid(self) -> bool:
        return self.held() and time.monotonic() < self.deadline


class _LocalQueue(InProcessQueue):
    """The in-process queue under the partitions: one conversation at a time, in order."""

    def forget(self, partitions: int, partition: int) -> list[int]:
        """Drop what waits (not what runs) in the partition's conversations: the partition
        is no longer ours, and if it comes back its recovery queues it again in order.
        Returns the message ids dropped."""
        dropped: list[int] = []
        for cid, q in self._queues.items():
            if cid % partitions == partition and len(q) > 1:
                head = q.popleft()
                dropped += q
                q.clear()
                q.append(head)
        return dropped

    def conversations(self) -> list[int]:
        return list(self._queues)

    def has(self, conversation_id: int, message_id: int) -> bool:
        return message_id in self._queues.get(conversation_id, ())

    async def put_next(self, conversation_id: int, message_id: int) -> None:
        """Queue a message found late (older than what waits after the running one)."""
        q = self._queues.get(conversation_id)
        if q:
            if message_id not in q:
                q.insert(1, message_id)
            return
        await self.put(conversation_id, message_id)

    async def put_again(self, conversation_id: int, message_id: int) -> None:
        """Queue a message even if it is the one running now (its run was under a lease this
        process lost and took again: that run will not store its answer)."""
        q = self._queues.get(conversation_id)
        if q and message_id in list(q)[1:]:
            return
        if q and q[0] == message_id:
            # Again right after the run that will not count, before what came later.
            q.insert(1, message_id)
            return
        await self.put(conversation_id, message_id)


class RedisQueue:
    def __init__(
        self,
        cluster: RedisParts,
        db: Database,
        *,
        partitions: int,
        lease_seconds: float,
        sweep_seconds: float,
        max_concurrent: int,
    ) -> None:
        self._r = cluster.queue
        self._keys = cluster.keys
        self._me = cluster.process
        self._db = db
        self._n = partitions
        self._ttl_ms = int(lease_seconds * 1000)
        # Surely ours until: the renewal was sent before Redis started its expiry, and a
        # margin for the checks and sends in between.
        self._valid_s = lease_seconds * 0.8
        self._renew_every = lease_seconds / 3
        self._sweep_every = sweep_seconds
        self._local = _LocalQueue(max_concurrent)
        self._held: dict[int, PartitionLease] = {}
        self._reading: set[int] = set()  # held, recovered, not being given back
        self._giving: set[int] = set()  # held, to be given back once no turn runs in it
        self._running: dict[int, int] = {}  # conversation id -> its turns running now
        self._read_now: frozenset[int] = frozenset()  # the partitions being read right now
        self._entries: dict[int, list[tuple[str, bytes]]] = {}  # message id -> stream entries
        self._handler: Handler | None = None
        self._takeover: Takeover | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._accepting = True
        self._stopping = False
        self._renew = self._r.register_script(_RENEW)
        self._release = self._r.register_script(_RELEASE)
        self._put_and_unlock = self._r.register_script(_PUT_AND_UNLOCK)
        self._streams = [self._keys("work", partitions, p) for p in range(partitions)]
        self._read_args: tuple[frozenset[int], dict[Any, Any]] = (frozenset(), {})
        self._acks: list[tuple[str, bytes]] = []  # (stream, entry) answered, not yet acked
        self._ack_wake = asyncio.Event()

    # -- the WorkQueue interface ------------------------------------------------------------

    def start(self, handler: Handler) -> None:
        self._handler = handler
        self._local.start(self._run)

    async def on_takeover(self, takeover: Takeover) -> None:
        """What to do with a partition just taken (the pipeline's recovery, scoped to it),
        before its stream is read. Starts the lease, read and sweep loops."""
        await self._check_partition_count()
        self._takeover = takeover
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._lease_loop(), name="work-leases"),
                asyncio.create_task(self._read_loop(), name="work-reader"),
                asyncio.create_task(self._sweep_loop(), name="work-sweeper"),
                asyncio.create_task(self._ack_loop(), name="work-acks"),
            ]

    async def put(
        self, conversation_id: int, message_id: int, unlock: HeldLock | None = None
    ) -> None:
        """Queue a stored message for whichever process holds its conversation (and free the
        chat's lock `unlock` in the same round trip). If Redis is unreachable the message is
        stored all the same: the sweep queues it later."""
        # (Also while this process drains: the others take it.)
        stream = self._stream(conversation_id % self._n)
        try:
            if unlock is None:
                await self._r.xadd(
                    stream,
                    {"c": conversation_id, "m": message_id},
                    maxlen=STREAM_MAXLEN,
                    approximate=True,
                )
            else:
                args: list[int | str] = [STREAM_MAXLEN, conversation_id, message_id, unlock.token]
                await self._put_and_unlock([stream, unlock.name], args)
                unlock.released = True
        except REDIS_DOWN as e:
            metrics.QUEUE_ERRORS.labels("put").inc()
            log.warning("queue_put_failed", message_id=message_id, error=repr(e))

    def pending(self) -> int:
        return self._local.pending()

    def here(self, conversation_id: int) -> bool:
        lease = self._held.get(conversation_id % self._n)
        return lease is not None and lease.valid()

    async def drain(self, grace_s: float) -> bool:
        """Stop reading, finish what runs (within `grace_s`), give every partition back at
        once so the other processes take the work over without waiting for the leases to
        expire (a rolling restart loses nothing and stalls nothing)."""
        self._accepting = False
        self._reading.clear()
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            # (A cancelled Redis call may surface as a connection error: the loops also
            # look at the flag, and nobody waits for them forever.)
            await asyncio.wait(self._tasks, timeout=5)
        finished = await self._local.drain(grace_s)
        try:
            await self._send_acks()
            await self._release_all()
        except REDIS_DOWN:
            pass  # the leases expire by themselves
        return finished

    @property
    def held(self) -> list[int]:
        return sorted(self._held)

    # -- running one message ----------------------------------------------------------------

    async def _run(self, conversation_id: int, message_id: int) -> None:
        assert self._handler is not None
        lease = self._held.get(conversation_id % self._n)
        if lease is not None and not lease.ready.is_set():
            await lease.ready.wait()  # the partition's recovery queues what came before
        # A renewal is late (a busy loop): renewed or lost, soon; skipping the message now
        # would let the conversation's next one go first.
        while lease is not None and lease.held() and not lease.valid():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if lease is None or not lease.valid() or lease.partition in self._giving:
            # Given up meanwhile: the new holder has it from the stream or the database.
            self._entries.pop(message_id, None)
            return
        token = WORK_LEASE.set(lease)
        self._running[conversation_id] = self._running.get(conversation_id, 0) + 1
        try:
            await self._handler(conversation_id, message_id)
        finally:
            WORK_LEASE.reset(token)
            if (left := self._running.pop(conversation_id) - 1) > 0:
                self._running[conversation_id] = left
        entries = self._entries.pop(message_id, None)
        if entries and lease.valid():
            self._acks += entries
            self._ack_wake.set()

    async def _ack_loop(self) -> None:
        while not self._stopping:
            await self._ack_wake.wait()
            await asyncio.sleep(ACK_DELAY_S)
            self._ack_wake.clear()
            await self._send_acks()

    async def _send_acks(self) -> None:
        acks, self._acks = self._acks, []
        if not acks:
            return
        by_stream: dict[str, list[bytes]] = {}
        for stream, entry in acks:
            by_stream.setdefault(stream, []).append(entry)
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                for stream, entries in by_stream.items():
                    pipe.xack(stream, GROUP, *entries)
                    pipe.xdel(stream, *entries)
                await pipe.execute()
        except REDIS_DOWN:
            pass  # left pending: the next read of them finds the messages answered

    # -- leases -------------------------------------------------------------------------------

    def _stream(self, partition: int) -> str:
        return self._streams[partition]

    def _lease_key(self, partition: int) -> str:
        return self._keys("lease", self._n, partition)

    async def _lease_loop(self) -> None:
        while not self._stopping:
            try:
                await self._balance()
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as e:
                self._drop_expired()
                log.warning("queue_redis_unreachable", error=repr(e))
            except Exception:
                log.exception("queue_lease_loop_failed")
            await asyncio.sleep(self._renew_every)

    async def _check_partition_count(self) -> None:
        """Processes that split conversations differently would both answer some: refuse."""
        key = self._keys("partitions")
        try:
            await self._r.set(key, self._n, nx=True)
            found = await self._r.get(key)
        except REDIS_DOWN:
            return
        if found is not None and int(found) != self._n:
            raise RuntimeError(
                f"queue.partitions is {self._n} here but {int(found)} in the other processes "
                "sharing this Redis and prefix: set the same number everywhere, or stop them "
                f"all before changing it and delete the Redis key {key}"
            )

    def _drop_expired(self) -> None:
        for p, lease in list(self._held.items()):
            if time.monotonic() >= lease.deadline:
                self._lose(p)

    def _lose(self, partition: int, why: str = "lost") -> None:
        self._held.pop(partition, None)
        self._reading.discard(partition)
        self._giving.discard(partition)
        for mid in self._local.forget(self._n, partition):
            self._entries.pop(mid, None)  # pending in the stream for the next holder
        metrics.PARTITIONS_HELD.set(len(self._held))
        if why != "given_back":
            log.warning("partition_lost", partition=partition, why=why)

    async def _balance(self) -> None:
        now_ms = int(time.time() * 1000)
        procs = self._keys("processes")
        sent = time.monotonic()
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zadd(procs, {self._me: now_ms})
            pipe.zremrangebyscore(procs, "-inf", now_ms - self._ttl_ms)
            pipe.zcard(procs)
            held = list(self._held.items())
            for p, lease in held:
                await self._renew(
                    keys=[self._lease_key(p)], args=[lease.value, self._ttl_ms], client=pipe
                )
            results = await pipe.execute()
        live = max(1, int(results[2]))
        for (p, lease), renewed in zip(held, results[3:], strict=True):
            if renewed:
                lease.deadline = sent + self._valid_s
            else:
                self._lose(p)  # expired and taken, or Redis forgot it (restart)
        share = math.ceil(self._n / live)
        if len(self._held) <= share and self._giving:
            # Someone left before we gave these back: keep working them.
            self._reading.update(p for p in self._giving if p in self._held)
            self._giving.clear()
        if len(self._held) < share and self._accepting:
            await self._acquire(share - len(self._held), sent)
        elif len(self._held) > share:
            await self._give_back(len(self._held) - share)

    async def _acquire(self, wanted: int, sent: float) -> None:
        free = [p for p in range(self._n) if p not in self._held]
        random.shuffle(free)  # processes starting together don't all race for partition 0
        value = f"{self._me}:{time.time_ns()}"
        got: list[int] = []
        for i in range(0, len(free), max(wanted, 1)):
            batch = free[i : i + wanted - len(got)]
            if not batch:
                break
            async with self._r.pipeline(transaction=False) as pipe:
                for p in batch:
                    pipe.set(self._lease_key(p), value, nx=True, px=self._ttl_ms)
                results = await pipe.execute()
            got += [p for p, ok in zip(batch, results, strict=True) if ok]
            if len(got) >= wanted:
                break
        if not got:
            return
        taken = await self._db.write(
            partial(_take_partitions, partitions=self._n, got=got, holder=self._me)
        )
        for fence in taken:
            p = fence.partition
            self._held[p] = PartitionLease(self, p, value, fence, sent + self._valid_s)
        metrics.PARTITIONS_HELD.set(len(self._held))
        async with self._r.pipeline(transaction=False) as pipe:
            for p in got:
                pipe.xgroup_create(self._stream(p), GROUP, id="0", mkstream=True)
            await pipe.execute(raise_on_error=False)  # BUSYGROUP: it exists
        log.info("partitions_taken", partitions=got, token=taken[0].token)
        # The database first (what the last holder left), then the stream (what came since).
        assert self._takeover is not None
        try:
            await self._takeover(self._local.put_again, Partitions(self._n, tuple(got)))
            await self._read_pending(got)
        except BaseException:
            # Not recovered: not ours to work. Their leases lapse and are taken again.
            for p in got:
                self._lose(p, "not_recovered")
            raise
        finally:
            for p in got:
                if (lease := self._held.get(p)) is not None:
                    lease.ready.set()
        self._reading.update(p for p in got if p in self._held)

    async def _give_back(self, extra: int) -> None:
        """More than our share (another process joined): stop reading the partitions with
        the least work here, let the turns running in them finish, then free their leases.
        What was queued here but not begun is not begun here: the next holder has it from
        the stream's pending entries and the database, in order."""
        busy = {c % self._n for c in self._running}
        self._giving &= set(self._held)
        if (more := extra - len(self._giving)) > 0:
            keep = (p for p in self._held if p not in self._giving)
            spare = sorted(keep, key=lambda p: (p in busy, p))[:more]
            self._giving.update(spare)
            self._reading.difference_update(spare)
            for p in spare:
                # Nothing more begins here: what waits is the next holder's, in order.
                for mid in self._local.forget(self._n, p):
                    self._entries.pop(mid, None)
        # Not while a read that names the partition is still waiting for entries: what it
        # got would be left pending where the next holder (past its take-over) won't look.
        idle = [p for p in self._giving if p not in busy and p not in self._read_now][:extra]
        if not idle:
            return  # next round, once their conversations are done
        async with self._r.pipeline(transaction=False) as pipe:
            for p in idle:
                await self._release(
                    keys=[self._lease_key(p)], args=[self._held[p].value], client=pipe
                )
            await pipe.execute()
        for p in idle:
            self._lose(p, "given_back")
        metrics.PARTITIONS_HELD.set(len(self._held))
        log.info("partitions_given_back", partitions=idle)

    async def _release_all(self) -> None:
        if not self._held:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for p, lease in self._held.items():
                await self._release(keys=[self._lease_key(p)], args=[lease.value], client=pipe)
            pipe.zrem(self._keys("processes"), self._me)
            await pipe.execute()
        self._held.clear()
        metrics.PARTITIONS_HELD.set(0)

    # -- reading the streams ---------------------------------------------------------------

    async def _read_pending(self, partitions: list[int]) -> None:
        """Entries the last holder read and never acknowledged."""
        streams: dict[Any, Any] = {self._stream(p): "0" for p in partitions}
        while streams:
            resp: Any = await self._r.xreadgroup(GROUP, CONSUMER, streams, count=READ_COUNT)
            streams = {}
            for stream, entries in resp or ():
                if entries:
                    await self._take_entries(stream, entries)
                    if len(entries) == READ_COUNT:
                        streams[_s(stream)] = _s(entries[-1][0])

    async def _take_entries(self, stream: bytes | str, entries: list[Any]) -> None:
        name = _s(stream)
        for entry_id, fields in entries:
            if not fields:
                continue  # deleted meanwhile
            cid, mid = int(fields[b"c"]), int(fields[b"m"])
            if cid % self._n not in self._held:
                continue  # not ours any more: left pending for the next holder
            self._entries.setdefault(mid, []).append((name, entry_id))
            await self._local.put(cid, mid)

    async def _read_loop(self) -> None:
        delay = 0.05
        while not self._stopping:
            reading = [p for p in self._reading if p in self._held]
            if not reading or self._local.pending() > LOCAL_HIGH_WATER:
                await asyncio.sleep(0.05)
                continue
            self._read_now = now = frozenset(reading)
            if self._read_args[0] != now:  # (built again only when the partitions change)
                self._read_args = (now, {self._stream(p): ">" for p in sorted(now)})
            streams = self._read_args[1]
            try:
                resp: Any = await self._r.xreadgroup(
                    GROUP, CONSUMER, streams, count=READ_COUNT, block=READ_BLOCK_MS
                )
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                await self._recreate_groups(reading)  # Redis restarted without its data
                continue
            except REDIS_DOWN:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            finally:
                self._read_now = frozenset()
            for stream, entries in resp or ():
                await self._take_entries(stream, entries)

    async def _recreate_groups(self, partitions: list[int]) -> None:
        async with self._r.pipeline(transaction=False) as pipe:
            for p in partitions:
                pipe.xgroup_create(self._stream(p), GROUP, id="0", mkstream=True)
            await pipe.execute(raise_on_error=False)

    # -- the sweep ----------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._sweep_every)
            held = tuple(sorted(p for p in self._reading if p in self._held))
            if not held:
                continue
            before = utcnow() - timedelta(seconds=self._sweep_every)
            try:
                waiting = await self._db.read(
                    partial(unanswered_messages, scope=Partitions(self._n, held), before=before)
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("queue_sweep_failed", error=repr(e))
                continue
            lost = [(c, m) for c, m in waiting if c % self._n in self._held]
            lost = [(c, m) for c, m in lost if not self._local.has(c, m)]
            for cid, mid in lost:
                # Older than anything queued after it: next, after what runs now.
                await self._local.put_next(cid, mid)
            if lost:
                metrics.QUEUE_SWEPT.inc(len(lost))
                log.info("queue_swept", messages=len(lost))


def _take_partitions(conn: Any, partitions: int, got: list[int], holder: str) -> list[Fence]:
    return [fences.take_partition(conn, partitions, p, holder) for p in got]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
