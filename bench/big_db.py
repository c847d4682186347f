"""A year of use: a database of a million items, built through the product's
own code paths, then what its size costs: `dlq list`, `status`, /health and
/metrics latencies, CPU per unchanged (304) poll, and the file before and after
retention.

    python bench/big_db.py [--items 1000000] [--sources 300 --every 5 --seconds 60]
                           [--rebuild] [--compare-empty]

The database is built once and cached under /tmp/agentwatch-bench/ (a million
items take a few minutes on 2 cores); each run measures a copy. Building: a
hundred sources, a simulated year (the clock is moved, so items are fetched
over 365 days), each source's first poll a baseline of large feeds and every
later poll new items that `admit` lets in and `Store.record_poll` stores; then
those items are finished as the pipeline would leave them (done or skipped,
with labels, a summary, a draft for one in ten) in one bulk UPDATE per poll
(the one shortcut: running a million items through the pipeline's stages
would take hours and measure the fakes). A few hundred items end dead-lettered
and a few dozen wait for a retry.

Targets (SPEC): with 1,000,000 items `dlq list` <= 0.2 s, `status` <= 0.5 s,
/metrics <= 50 ms; CPU per 304 poll as with an empty database (<= 0.5 ms)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from unittest import mock

from common import (
    FakeFeeds,
    agentwatch_command,
    cpu_seconds,
    free_port,
    rss_mb,
    serve_feeds,
    start,
    wait,
)

import agentwatch
from agentwatch import Item, SourceConfig, Store, admit

CACHE = Path("/tmp/agentwatch-bench")
DAY = 86400.0
BUILD_SOURCES = 100
BASELINE = 2000  # items in a source's first poll (a large feed)
PER_POLL = 1000  # new items a later poll brings (so a million items take ~1,000 polls)
DEAD = 300
WAITING = 40
WORDS = ["acme", "dashboard", "export", "crash", "login", "billing", "question", "thanks",
         "feature", "request", "slow", "release", "upgrade", "docker", "selfhosted", "postgres",
         "analytics", "chart", "broken", "love", "support"]  # fmt: skip


def text_pool(seed: int = 1) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(200_000))


def build(path: Path, total: int) -> None:
    """Fill `path` with `total` items over a simulated year."""
    pool, rng = text_pool(), random.Random(2)
    tmp = path.with_suffix(".building")
    for leftover in tmp.parent.glob(tmp.name + "*"):
        leftover.unlink()
    year_ago = time.time() - 365 * DAY
    clock = [year_ago]
    started = time.monotonic()
    with mock.patch("time.time", lambda: clock[0]):
        store = Store(tmp)
        names = [f"src-{i:03d}" for i in range(BUILD_SOURCES)]
        for name in names:
            store.source_row(name, "rss")
        configs = {n: SourceConfig(name=n, type="rss") for n in names}
        stages = lambda _item: ("classify", "draft", "notify")  # noqa: E731
        stored, poll, first = 0, 0, set(names)
        while stored < total:
            name = names[poll % len(names)]
            first_poll = name in first
            n = min(BASELINE if first_poll else PER_POLL, total - stored)
            found = []
            for j in range(n):
                start_at = rng.randrange(0, len(pool) - 3000)
                found.append(
                    Item(
                        item_id=f"urn:{name}:{poll}:{j}",
                        title=pool[start_at : start_at + rng.randrange(30, 120)],
                        url=f"https://forum.example/{name}/{poll}/{j}",
                        author="someone",
                        published_at=clock[0] - rng.uniform(0, 3600),
                        body=pool[start_at : start_at + rng.randrange(200, 3000)],
                        kind="entry",
                    )
                )
            known = store.known_ids(name, [i.item_id for i in found])
            rows = admit(
                configs[name], found, known, first_poll=first_poll, baseline=True,
                max_age=3650 * DAY, stages=stages, now=clock[0],
            )  # fmt: skip
            store.record_poll(name, rows, state={}, validators={}, next_poll_at=clock[0] + 300)
            first.discard(name)
            if not first_poll:
                finish(store, name, rng, clock[0], last=stored + n >= total)
            stored += n
            poll += 1
            clock[0] = year_ago + 365 * DAY * stored / total
            if poll % 100 == 0:
                print(f"  built {stored:,} items ({time.monotonic() - started:.0f} s)", flush=True)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
    tmp.rename(path)
    for wal in tmp.parent.glob(tmp.name + "-*"):
        wal.unlink()
    print(f"built {total:,} items in {time.monotonic() - started:.0f} s: {path}", flush=True)


def finish(store: Store, source: str, rng: random.Random, now: float, last: bool) -> None:
    """Leave a poll's new items as the pipeline would: mostly skipped or done, a
    draft for one in ten; the very last poll also leaves dead and waiting items."""
    ids = [
        r[0]
        for r in store.db.execute(
            "SELECT id FROM items WHERE status = 'pending' AND source = ? ORDER BY id", (source,)
        )
    ]
    labels = json.dumps({"relevant": True, "sentiment": "negative", "intent": "question",
                         "urgency": "normal", "summary": "Someone asks about exporting."})  # fmt: skip
    done, dead, waiting = [], [], []
    for row_id in ids:
        if last and len(dead) < DEAD:
            dead.append(row_id)
        elif last and len(waiting) < WAITING:
            waiting.append(row_id)
        else:
            done.append(row_id)
    with store.transaction() as db:
        db.executemany(
            """UPDATE items SET stage = 'done', status = ?, classification = ?, summary = ?,
               draft = ?, notified_at = ?, updated_at = ? WHERE id = ?""",
            [
                (
                    "done" if (drafted := rng.random() < 0.1) or rng.random() < 0.2 else "skipped",
                    labels, "Someone asks about exporting their dashboards.",
                    ("Thanks for asking! You can export from Settings → Data. " * 8)
                    if drafted else None,
                    now, now, row_id,
                )
                for row_id in done
            ],
        )  # fmt: skip
        db.executemany(
            """UPDATE items SET stage = 'notify', status = 'dead', attempts = 3, failed_at = ?,
               last_error = 'Slack answered 404 channel_not_found', updated_at = ? WHERE id = ?""",
            [(now, now, row_id) for row_id in dead],
        )
        db.executemany(  # waiting for tomorrow's LLM budget: not due during the bench
            "UPDATE items SET next_attempt_at = ? WHERE id = ?",
            [(time.time() + 30 * DAY, row_id) for row_id in waiting],
        )


def cli_seconds(args: list[str], config: Path, runs: int = 5) -> tuple[float, float, str]:
    times, out = [], ""
    for _ in range(runs):
        t = time.perf_counter()
        result = subprocess.run(
            [*agentwatch_command(), *args, "--config", str(config)],
            capture_output=True, text=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        times.append(time.perf_counter() - t)
        if result.returncode != 0:
            sys.exit(f"{' '.join(args)} failed: {result.stderr}")
        out = result.stdout
    return statistics.median(times), max(times), out


def http_ms(url: str, runs: int = 30) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), max(times)


def write_config(folder: Path, db: Path, feeds_url: str, n: int, every: int, port: int) -> Path:
    lines = ["[agentwatch]", f'db = "{db}"', f'health = "127.0.0.1:{port}"', "retention = 0",
             'max_age = "3650d"', "", "[llm]", 'provider = "none"', "", "[slack]",
             'webhook_url = ""', ""]  # fmt: skip
    for i in range(n):
        lines += ["[[sources]]", f'name = "feed-{i}"', 'type = "rss"',
                  f'url = "{feeds_url}/f/{i}.xml"', f'every = "{every}s"', ""]  # fmt: skip
    path = folder / "agentwatch.toml"
    path.write_text("\n".join(lines))
    return path


def daemon_figures(db: Path, folder: Path, args, label: str) -> None:
    """/health and /metrics latencies, then CPU per 304 poll over a window."""
    with FakeFeeds() as feeds:
        serve_feeds(feeds, args.sources)
        port = free_port()
        config = write_config(folder, db, feeds.url, args.sources, args.every, port)
        proc = start(config, log=folder / f"{label}.log")
        try:
            assert wait(lambda: len({r["path"] for r in feeds.requests}) >= args.sources, 120)
            time.sleep(3)  # the first pass's writes settle
            for path in ("health", "metrics"):
                median, worst = http_ms(f"http://127.0.0.1:{port}/{path}")
                print(f"  [{label}] /{path}: median {median:.1f} ms, max {worst:.1f} ms (30 GETs)")
            cpu0, wall0, hits0 = cpu_seconds(proc.pid), time.monotonic(), feeds.hits()
            time.sleep(args.seconds)
            cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
            polls = feeds.hits() - hits0
            not_modified = sum(1 for r in feeds.requests[hits0:] if r["status"] == 304)
            print(f"  [{label}] {args.sources} sources every {args.every} s: {polls} polls "
                  f"({not_modified} answered 304) in {wall1 - wall0:.0f} s, CPU "
                  f"{cpu1 - cpu0:.2f} s = {(cpu1 - cpu0) / max(polls, 1) * 1000:.3f} ms per poll, "
                  f"{(cpu1 - cpu0) / (wall1 - wall0) * 100:.1f}% of a core; "
                  f"RSS {rss_mb(proc.pid):.1f} MB")  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def size_mb(db: Path) -> str:
    wal = db.with_name(db.name + "-wal")
    return f"{db.stat().st_size / 1e6:.0f} MB" + (
        f" (+ WAL {wal.stat().st_size / 1e6:.0f} MB)" if wal.exists() and wal.stat().st_size else ""
    )


def spread(seconds: list[float]) -> str:
    if not seconds:
        return "none"
    ranked = sorted(seconds)
    return (f"median {statistics.median(ranked) * 1000:.1f} ms, p99 "
            f"{ranked[int(len(ranked) * 0.99)] * 1000:.0f} ms, longest {ranked[-1] * 1000:.0f} ms, "
            f"{sum(s > 0.1 for s in ranked)} over 100 ms")  # fmt: skip


def retention_figures(db: Path) -> None:
    """The product's own retention pass, with each batch's write lock timed."""
    batches, vacuums = [], []
    clear, vacuum = agentwatch.clear_old_items, agentwatch.vacuum_step

    def timed(record, fn):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                record.append(time.perf_counter() - t)

        return run

    store = Store(db)
    items = store.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    with_text = store.db.execute(
        f"SELECT COUNT(*) FROM items INDEXED BY items_retained WHERE {agentwatch.RETAINED}"
    ).fetchone()[0]
    print(f"  before retention: {size_mb(db)}, {items:,} items, {with_text:,} finished with text")
    with (
        mock.patch.object(agentwatch, "clear_old_items", timed(batches, clear)),
        mock.patch.object(agentwatch, "vacuum_step", timed(vacuums, vacuum)),
    ):
        t = time.perf_counter()
        cleared = asyncio.run(agentwatch.retention_pass(store, 90 * DAY))
        took = time.perf_counter() - t
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    left = store.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    print(f"  retention = 90d: cleared {cleared:,} items in {took:.0f} s ({len(batches)} "
          f"batches: {spread(batches)}; {len(vacuums)} vacuum steps: {spread(vacuums)})")  # fmt: skip
    print(f"  after retention: {size_mb(db)}, {left:,} items (every id kept)")
    t = time.perf_counter()
    again = asyncio.run(agentwatch.retention_pass(store, 90 * DAY))
    print(f"  the next day's pass with nothing to clear: {again} items, "
          f"{(time.perf_counter() - t) * 1000:.1f} ms")  # fmt: skip
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--sources", type=int, default=300)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--compare-empty", action="store_true", help="the same daemon figures "
                        "with an empty database first")  # fmt: skip
    parser.add_argument("--no-daemon", action="store_true", help="skip /health, /metrics, CPU")
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    cached = CACHE / f"big-{args.items}.db"
    if args.rebuild or not cached.exists():
        build(cached, args.items)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        folder = Path(tmp)
        if args.compare_empty and not args.no_daemon:
            print("empty database:")
            daemon_figures(folder / "empty.db", folder, args, "empty")
        db = folder / "big.db"
        t = time.perf_counter()
        shutil.copyfile(cached, db)
        os.sync()  # else the copy's 2.5 GB of writeback lands in the figures below
        print(f"{args.items:,} items: {size_mb(db)} (copied in {time.perf_counter() - t:.0f} s)")
        config = write_config(folder, db, "http://127.0.0.1:9", args.sources, args.every, 9)
        cli_seconds(["status"], config, runs=1)  # opens (and migrates) once, warms the cache
        for command in (["dlq", "list"], ["dlq", "list", "--json"], ["status"]):
            median, worst, out = cli_seconds(command, config)
            extra = f", {len(json.loads(out))} items" if "--json" in command else ""
            print(f"  agentwatch {' '.join(command)}: median {median:.3f} s, max {worst:.3f} s"
                  f"{extra}")  # fmt: skip
        if not args.no_daemon:
            daemon_figures(db, folder, args, "big")
        retention_figures(db)


if __name__ == "__main__":
    main()
