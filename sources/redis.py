"""A Redis stream read through a consumer group: another program XADDs events,
agentwatch takes each one in as an item, once.

Each poll, in this order:

1. this consumer's own pending entries (`XREADGROUP ... 0`): read before but not
   acknowledged, because the process died or the commit failed;
2. entries other consumers of the group left idle past `claim_after`
   (`XAUTOCLAIM`): a crashed agentwatch elsewhere;
3. new entries (`XREADGROUP ... >`), in batches, until none are left or the
   poll has taken its share.

The engine stores the items (new ones run the pipeline, ids seen before are
skipped), and only then calls `committed`, which `XACK`s every entry the poll
read. A crash between the two leaves the entries pending: they are read again
(step 1 or 2), recognised by their item id, and acknowledged without being
processed twice. Redis counts every delivery; an entry delivered more than
`max_deliveries` times is stored dead-lettered at stage "ingest".

redis-py is imported in `poll` only, so `dlq list` and `status` never load it.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from agentwatch import (
    Duration,
    Item,
    PermanentError,
    Source,
    TransientError,
    parse_published,
    source,
)

READ_BATCH = 1000  # entries per XREADGROUP / XAUTOCLAIM call
POLL_ENTRIES = 20_000  # at most this many new entries per poll; the rest wait for the next
POLL_SECONDS = 2.0  # and at most this long reading them
PREVIEW_ENTRIES = 20  # what `agentwatch preview` shows
REDIS_TIMEOUT = 10.0  # seconds for one command or connection
ITEM_ID_LIMIT = 500
FIELDS = ("id", "title", "body", "url", "author", "published")


# One client (so one connection pool) per URL and event loop, for the process.
_CLIENTS: dict[tuple[str, int], Any] = {}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def entry_item(stream: str, entry_id: str, raw: dict, fields: dict[str, str]) -> Item:
    """One stream entry as an Item. Pure: tested without Redis. The item id is the
    entry's `fields.id` value, so a producer that sends the same event twice gets
    one item; without one, the entry id."""
    values = {_text(k): _text(v) for k, v in raw.items()}
    get = {name: values.get(fields[name], "") if name in fields else "" for name in FIELDS}
    item_id = get["id"].strip() or entry_id
    if len(item_id) > ITEM_ID_LIMIT:
        item_id = entry_id
    body = get["body"]
    if not body and not get["title"]:
        # No mapped text: the entry's own fields are the text the LLM reads.
        body = "\n".join(f"{k}: {v}" for k, v in values.items())
    # Epoch seconds (or milliseconds) or ISO 8601, read as webhook payloads are.
    published = parse_published(get["published"]) if get["published"] else None
    if published is None:  # an entry id starts with its milliseconds since the epoch
        published = int(entry_id.split("-")[0]) / 1000
    return Item(
        item_id=item_id,
        title=get["title"] or (body.strip().splitlines() or [f"{stream} {entry_id}"])[0][:120],
        url=get["url"],
        author=get["author"],
        published_at=published,
        body=body,
        kind="entry",
        extra={"stream": stream, "entry_id": entry_id},
    )


def _where(url: str) -> str:
    """host:port/db of a Redis URL, without its password."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}{parts.path or ''}"


@source("redis")
class RedisStream(Source):
    """A Redis stream, read through a consumer group (XREADGROUP, XACK after commit)."""

    # The consumer group decides what is new (a new group starts at new entries).
    first_poll = "report"

    @dataclass(frozen=True)
    class Options:
        url: str = "redis://127.0.0.1:6379/0"
        stream: str = "agentwatch:events"
        group: str = "agentwatch"
        consumer: str = ""  # default: the host name
        fields: dict[str, str] = field(
            default_factory=lambda: {"id": "id", "title": "title", "body": "body", "url": "url"}
        )
        claim_after: Duration = Duration(300)
        max_deliveries: int = 5

        def __post_init__(self):
            if not re.match(r"^(redis|rediss|unix)://", self.url):
                raise ValueError(
                    f"url must start with redis://, rediss:// or unix://, got {_where(self.url)!r}"
                )
            for key in ("stream", "group"):
                if not getattr(self, key):
                    raise ValueError(f"{key} must not be empty")
            unknown = sorted(set(self.fields) - set(FIELDS))
            if unknown:
                raise ValueError(
                    f"fields: unknown {', '.join(unknown)} (known: {', '.join(FIELDS)})"
                )
            if self.max_deliveries < 1:
                raise ValueError("max_deliveries must be at least 1")
            if self.claim_after < 1:
                raise ValueError("claim_after must be at least 1s")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.unacked: list[str] = []  # entry ids read by the current poll
        self.group_ready = False

    @property
    def consumer(self) -> str:
        return self.options.consumer or os.uname().nodename  # the host name

    def describe(self) -> str:
        o = self.options
        return f"{_where(o.url)} stream {o.stream}, group {o.group}, consumer {self.consumer}"

    def stages(self, item: Item) -> tuple[str, ...]:
        if item.extra.get("dead_letter"):
            return ("ingest", *super().stages(item))
        return super().stages(item)

    # --- Redis --------------------------------------------------------------

    def client(self) -> Any:
        import asyncio  # not at the top: `dlq list` and `status` import every source

        import redis.asyncio

        key = (self.options.url, id(asyncio.get_running_loop()))
        found = _CLIENTS.get(key)
        if found is None:
            found = redis.asyncio.Redis.from_url(
                self.options.url, socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT, health_check_interval=30,
            )  # fmt: skip
            _CLIENTS[key] = found
        return found

    async def poll(self) -> list[Item]:
        import asyncio

        import redis.exceptions

        self.unacked = []
        where = f"Redis {_where(self.options.url)}"
        try:
            async with asyncio.timeout(max(1.0, self.deadline - time.monotonic() - 1)):
                return await self.read(self.client())
        except redis.exceptions.AuthenticationError as e:
            raise PermanentError(f"{where} refused the password: {e}", kind="auth_failed") from None
        except (redis.exceptions.ConnectionError, OSError) as e:
            raise TransientError(
                f"cannot reach {where}: {e}; agentwatch keeps trying", kind="unreachable"
            ) from None
        except (redis.exceptions.TimeoutError, TimeoutError):
            raise TransientError(f"{where} did not answer in time", kind="timeout") from None
        except redis.exceptions.ResponseError as e:
            raise TransientError(f"{where} answered an error: {e}", kind="server_error") from None

    async def read(self, r: Any) -> list[Item]:
        import redis.exceptions

        if self.previewing:  # `agentwatch preview`: the newest entries, nothing consumed
            newest = await r.xrevrange(self.options.stream, count=PREVIEW_ENTRIES)
            return [entry_item(self.options.stream, _text(i), f, self.options.fields)
                    for i, f in newest]  # fmt: skip
        try:
            return await self.read_entries(r)
        except redis.exceptions.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # The group vanished: Redis restarted without persistence, or someone
            # deleted it. Created again from the stream's start: ids seen before
            # are recognised, so nothing is processed twice.
            self.log.warning(
                "%s: consumer group %s of stream %s is gone (%s); creating it again",
                self.name, self.options.group, self.options.stream, e,
            )  # fmt: skip
            self.group_ready = False
            self.unacked = []
            await self.ensure_group(r, start="0")
            return await self.read_entries(r)

    async def ensure_group(self, r: Any, start: str | None = None) -> None:
        import redis.exceptions

        o = self.options
        if start is None:
            start = "$"  # a new group starts at new entries ...
            if self.config.backfill:  # ... or just before the `backfill` newest
                newest = await r.xrevrange(o.stream, count=self.config.backfill + 1)
                start = _text(newest[-1][0]) if len(newest) > self.config.backfill else "0"
        try:
            await r.xgroup_create(o.stream, o.group, id=start, mkstream=True)
            self.log.info("%s: created consumer group %s on stream %s at %s",
                          self.name, o.group, o.stream, start)  # fmt: skip
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self.group_ready = True

    async def read_entries(self, r: Any) -> list[Item]:
        o = self.options
        if not self.group_ready:
            await self.ensure_group(r)
        entries: list[tuple[str, dict | None]] = []
        # 1. Our own pending entries (re-reading them counts as a delivery).
        after = "0"
        while True:
            got = await self.xreadgroup(r, after)
            entries += got
            if len(got) < READ_BATCH:
                break
            after = got[-1][0]
        # 2. Entries a crashed consumer left idle past claim_after.
        claimed = await r.xautoclaim(o.stream, o.group, self.consumer,
                                     int(o.claim_after * 1000), "0-0", count=READ_BATCH)  # fmt: skip
        entries += [(_text(i), f) for i, f in claimed[1]]
        entries += [(_text(i), None) for i in (claimed[2] if len(claimed) > 2 else [])]
        again = {i for i, _ in entries}
        # 3. New entries.
        started = time.monotonic()
        new = 0
        while new < POLL_ENTRIES and time.monotonic() - started < POLL_SECONDS:
            got = await self.xreadgroup(r, ">")
            entries += got
            new += len(got)
            if len(got) < READ_BATCH:
                break
        counts = await self.delivery_counts(r, sorted(again)) if again else {}
        items = []
        for entry_id, raw in entries:
            self.unacked.append(entry_id)
            if raw is None:  # deleted from the stream (XDEL, MAXLEN) while pending
                continue
            item = entry_item(o.stream, entry_id, raw, o.fields)
            delivered = counts.get(entry_id, 1)
            if delivered > o.max_deliveries:
                item.extra["dead_letter"] = (
                    f"stream entry {entry_id} was delivered {delivered} times "
                    f"(max_deliveries {o.max_deliveries}) without being stored; "
                    "`agentwatch dlq retry` takes it in"
                )
            items.append(item)
        return items

    async def xreadgroup(self, r: Any, after: str) -> list[tuple[str, dict | None]]:
        o = self.options
        answer = await r.xreadgroup(o.group, self.consumer, {o.stream: after}, count=READ_BATCH)
        found = []
        for _, stream_entries in answer or []:
            found += [(_text(i), f if f else None) for i, f in stream_entries]
        return found

    async def delivery_counts(self, r: Any, ids: list[str]) -> dict[str, int]:
        """How many times each entry has been delivered, from the group's pending list."""
        o = self.options
        counts: dict[str, int] = {}
        for start in range(0, len(ids), READ_BATCH):
            chunk = ids[start : start + READ_BATCH]
            rows = await r.xpending_range(o.stream, o.group, min=chunk[0], max=chunk[-1],
                                          count=len(chunk) * 2, consumername=self.consumer)  # fmt: skip
            counts.update({_text(p["message_id"]): int(p["times_delivered"]) for p in rows})
        return counts

    async def committed(self, items: list[Item]) -> None:
        """The poll's items are stored: now Redis may forget the entries."""
        if not self.unacked:
            return
        ids, self.unacked = self.unacked, []
        r = self.client()
        try:
            for start in range(0, len(ids), READ_BATCH):
                await r.xack(
                    self.options.stream, self.options.group, *ids[start : start + READ_BATCH]
                )
        except Exception as e:  # stored already: read again next poll, recognised, acked then
            raise TransientError(
                f"could not acknowledge {len(ids)} entries on Redis {_where(self.options.url)}: {e}",
                kind="unreachable",
            ) from None
