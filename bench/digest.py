"""The time to build a digest over 100,000 stored items.

    python bench/digest.py [--items 100000] [--days 1 --days 90] [--sources 100]

Builds a database per `--days` (cached under /tmp/agentwatch-bench/), through
the product's own code paths as bench/big_db.py does: each poll's items pass
`admit` and are stored by `Store.record_poll` (the clock is moved, so they are
fetched over `--days` days), then they are finished as the pipeline would
leave them in one bulk UPDATE per poll (labels of every kind, a draft for one
in ten, some marked handled, a few hundred dead-lettered under a few errors),
with two LLM calls per item in llm_usage. `--days 1` puts every item in the
digest's period (the worst case); `--days 90` is a quarter of steady use.

It then times what a slot costs: `digest_facts` (every query), and rendering
the Block Kit and the text, over the last day; the median and worst of 7 runs,
and `agentwatch digest` end to end as a command. Target (issue 12): < 1 s."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time
from pathlib import Path
from unittest import mock

from common import agentwatch_command

import agentwatch
from agentwatch import Item, SourceConfig, Store, admit

CACHE = Path("/tmp/agentwatch-bench")
DAY = 86400.0
PER_POLL = 1000
SENTIMENTS, INTENTS, URGENCIES = agentwatch.SENTIMENTS, agentwatch.INTENTS, agentwatch.URGENCIES
ERRORS = ["Slack refused the message: 404 channel_not_found", "LLM API answered 529: overloaded",
          "the poll took longer than 130s"]  # fmt: skip


def build(path: Path, total: int, days: float, sources: int, now: float) -> None:
    rng = random.Random(1)
    tmp = path.with_suffix(".building")
    for leftover in tmp.parent.glob(tmp.name + "*"):
        leftover.unlink()
    names = [f"src-{i:03d}" for i in range(sources)]
    configs = {n: SourceConfig(name=n, type="rss") for n in names}
    polls = max(1, total // PER_POLL)
    clock = [now - days * DAY]
    started = time.monotonic()
    with mock.patch("time.time", lambda: clock[0]):
        store = Store(tmp)
        for name in names:
            store.source_row(name, "rss")
        for poll in range(polls):
            clock[0] = now - days * DAY + days * DAY * (poll + 0.5) / polls
            name = names[poll % sources]
            found = [Item(item_id=f"urn:{poll}:{j}", title=f"Acme post {poll}/{j} about exports",
                          url=f"https://forum.example/{poll}/{j}", author="someone",
                          published_at=clock[0] - 60, body="body " * rng.randrange(20, 200),
                          kind="post") for j in range(PER_POLL)]  # fmt: skip
            rows = admit(
                configs[name], found, set(), first_poll=False, baseline=True, max_age=3650 * DAY,
                stages=lambda _: ("classify", "draft", "notify"), now=clock[0],
            )  # fmt: skip
            store.record_poll(name, rows, state={}, validators={}, next_poll_at=clock[0] + 300)
            finish(store, name, rng, clock[0], last=poll == polls - 1)
        for name in names[:5]:  # a few failing sources
            store.record_poll_failure(name, "cannot connect to feed.example: refused", "unreachable",
                                      now + 60, 7)  # fmt: skip
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
    tmp.rename(path)
    print(f"built {polls * PER_POLL:,} items over {days:g} day(s) in "
          f"{time.monotonic() - started:.0f} s: {path}", flush=True)  # fmt: skip


def finish(store: Store, source: str, rng: random.Random, now: float, last: bool) -> None:
    ids = [r[0] for r in store.db.execute(
        "SELECT id, item_id FROM items WHERE status = 'pending' AND source = ?", (source,))]  # fmt: skip
    updates, dead, usage = [], [], []
    for n, row_id in enumerate(ids):
        relevant = rng.random() < 0.6
        labels = {"relevant": relevant, "sentiment": rng.choice(SENTIMENTS),
                  "intent": rng.choice(INTENTS), "urgency": rng.choice(URGENCIES),
                  "summary": "Someone asks about exporting dashboards."}  # fmt: skip
        drafted = relevant and rng.random() < 0.1
        if last and n < 300:
            dead.append((json.dumps(labels), ERRORS[n % len(ERRORS)], now, now, row_id))
        else:
            updates.append((
                "done" if relevant else "skipped", json.dumps(labels),
                "Thanks! Settings → Export does it." if drafted else None,
                now if relevant else None, now if drafted and rng.random() < 0.5 else None,
                now, row_id,
            ))  # fmt: skip
        usage.append(
            (now, source, f"row:{row_id}", "classify", "claude-haiku-5-5", 600, 40, 0.00008)
        )
        if drafted:
            usage.append(
                (now, source, f"row:{row_id}", "draft", "claude-sonnet-5-5", 900, 150, 0.0033)
            )
    with store.transaction() as db:
        db.executemany(
            """UPDATE items SET stage = 'done', status = ?, classification = ?, draft = ?,
               notified_at = ?, handled_at = ?, updated_at = ? WHERE id = ?""", updates)  # fmt: skip
        db.executemany(
            """UPDATE items SET stage = 'notify', status = 'dead', classification = ?, attempts = 3,
               last_error = ?, failed_at = ?, updated_at = ? WHERE id = ?""", dead)  # fmt: skip
        db.executemany(
            """INSERT INTO llm_usage (at, source, item_id, stage, model, input_tokens,
               output_tokens, cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""", usage)  # fmt: skip


def write_config(folder: Path, db: Path, sources: int) -> Path:
    lines = ["[agentwatch]", f'db = "{db}"', 'health = ""', "", "[llm]", "daily_budget_usd = 5",
             "", "[digest]", 'at = "07:00"', 'timezone = "Europe/Berlin"', ""]  # fmt: skip
    for i in range(sources):
        lines += ["[[sources]]", f'name = "src-{i:03d}"', 'type = "rss"',
                  f'url = "https://feed.example/{i}.xml"', ""]  # fmt: skip
    path = folder / f"digest-bench-{db.stem}.toml"
    path.write_text("\n".join(lines))
    return path


def measure(db: Path, config_path: Path, now: float, runs: int = 7) -> None:
    config = agentwatch.load_config(config_path)
    store = Store(db)
    facts_s, render_s, total_s = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        facts = agentwatch.digest_facts(store, config, now - DAY, now)
        t1 = time.perf_counter()
        payload = agentwatch.digest_message(facts, ["One.", "Two.", "Three."])
        agentwatch.digest_lines(facts, [])
        t2 = time.perf_counter()
        facts_s.append(t1 - t0)
        render_s.append(t2 - t1)
        total_s.append(t2 - t0)
    stored = store.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    store.close()
    print(f"  {stored:,} items stored, {facts['items']['total']:,} in the digest's day "
          f"({facts['items']['sources']} sources, DLQ {facts['dlq']['depth']}, "
          f"{len(payload['blocks'])} blocks)")  # fmt: skip
    print(f"  build a digest (facts + Block Kit + text): median {statistics.median(total_s):.3f} s, "
          f"max {max(total_s):.3f} s, first {total_s[0]:.3f} s  [facts median "
          f"{statistics.median(facts_s):.3f} s, rendering {statistics.median(render_s) * 1000:.1f} ms; "
          f"{runs} runs]")  # fmt: skip
    cli = []
    for _ in range(3):
        t = time.perf_counter()
        since = f"{time.time() - now + DAY:.0f}s"  # the same day, however old the cached build
        done = subprocess.run([*agentwatch_command(), "digest", "--since", since, "-c", str(config_path)],
                              capture_output=True, text=True)  # fmt: skip
        cli.append(time.perf_counter() - t)
        if done.returncode != 0:
            raise SystemExit(done.stderr)
    print(f"  `agentwatch digest` over that day, as a command: median {statistics.median(cli):.3f} s "
          f"(start-up included)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--days", type=float, action="append")
    parser.add_argument("--sources", type=int, default=100)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    for days in args.days or [1.0, 90.0]:
        db = CACHE / f"digest-{args.items}-{days:g}d-{args.sources}s.db"
        stamp = db.with_suffix(".now")
        if args.rebuild or not db.exists():
            now = time.time()
            build(db, args.items, days, args.sources, now)
            stamp.write_text(repr(now))
        now = float(stamp.read_text())  # the digest's slot: the end of the built history
        print(f"{args.items:,} items over {days:g} day(s):")
        measure(db, write_config(CACHE, db, args.sources), now)


if __name__ == "__main__":
    main()
