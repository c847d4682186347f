"""An accelerated soak: `agentwatch run` against the loopback fakes with the
mix of a day of real use, time compressed, while its RSS is sampled.

    python bench/soak.py [--minutes 6] [--sources 60] [--sample 10] [--warmup 60]
                         [--seed-items 20000]

How time is compressed: 60x. Normal use is taken to be feeds polled every
minute (the SPEC's "500 every minute" case, with fewer feeds); here they are
polled every second, and everything else that happens "per minute of use" is
driven once a wall second. So a wall second stands for a minute of use and
`--minutes M` covers about M hours: the default 6 minutes is 6 hours, and the
warm-up (60 s) is the first hour. What runs, at its real-use rate / its rate here:

- `--sources` rss feeds (every 60 s / every 1 s), nearly every poll a 304; the
  fleet publishes about 18 new entries an hour (0.3 a wall second), a third of
  them "irrelevant" to the LLM, the rest a crash report, a question or praise.
  A feed serves its last 10 entries, so bodies stay the same size.
- a flaky feed: every 20 wall seconds (20 minutes of use) it switches between
  answering, 503, a hang past `fetch_timeout`, garbage bytes and a dropped
  connection, so the source backs off, recovers, and fails again all along.
- signed GitHub deliveries (bench/webhooks.py's) to POST /hooks/gh on the
  health listener: one every 5 wall seconds (12 an hour of use).
- the LLM (tests/fakes.py's FakeAnthropic, through ANTHROPIC_BASE_URL and the
  real SDK) classifies every new item and drafts replies to crash reports and
  questions; one answer in 30 s is a 529 (overloaded). Slack (FakeSlack)
  receives the posts, one 429 with Retry-After every 45 s.
- /health and /metrics scraped once a wall second (a scrape a minute of use).
- SIGHUP (reload of the same config) once a wall minute: once an hour of use,
  more often than anybody reloads, so a leak there would show.
- the digest ([digest] at = a time half way through the window, with the LLM's
  briefing): one digest per run, as 6 hours of use have at most one.
- retention (default "90d"): its pass at start clears the texts of the seeded
  database's items older than 90 days (`--seed-items`, built once by
  bench/big_db.py's builder, items spread over a year, cached in
  /tmp/agentwatch-bench/), before the warm-up ends.

Not exercised: retention's daily pass (RETENTION_EVERY is 86,400 wall seconds:
it cannot be compressed without patching the daemon), the DLQ alert, the Slack
app, Discord and the signed outgoing webhook, the other source types (Reddit,
Hacker News, GitHub, Mastodon, Bluesky, Stack Exchange, url, redis), and
wall-clock effects that compression does not shorten: Slack's pace of one post
a second per webhook, HTTP keep-alive and TLS (loopback is plain HTTP).

Figures: RSS after the warm-up, at the end, growth, max, a table of samples
(each with use time, polls, items and posts so far), the growth of the first
and second half of the window (plateau or trend), counts, and agentwatch's CPU
over the window divided by its polls (all of its work, the LLM, Slack and
webhook stages included, so more than a bare 304 poll costs).

Target (issue 16): memory growth <= 5 MB over 6 hours of accelerated use."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import shutil
import signal
import sqlite3
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from big_db import CACHE, build
from common import (
    FakeAnthropic,
    FakeFeeds,
    FakeSlack,
    cpu_seconds,
    free_port,
    rss,
    rss_mb,
    start,
    wait,
)
from webhooks import PAYLOAD, SECRET, body_for, deliver

SPEEDUP = 60  # a wall second is a minute of use
KEPT = 10  # entries a feed serves
PUBLISH_RATE = 0.3  # new feed entries a wall second, over the whole fleet
WEBHOOK_EVERY = 5.0  # wall seconds between two GitHub deliveries
FLAP_EVERY = 20.0  # wall seconds between two changes of the flaky feed
FLAKY = [None, ("status", 503), None, ("delay", 5.0), None, ("garbage",), None, ("drop",)]
LLM_FAULT_EVERY = 30.0
SLACK_FAULT_EVERY = 45.0
RELOAD_EVERY = 60.0
TITLES = [
    "irrelevant: a post about something else entirely",
    "The export crashes when the dashboard has {n} charts",
    "How do I move dashboard {n} to another workspace?",
    "Love the new charts, release {n} is great",
    "irrelevant: weekly link roundup {n}",
    "Login broken after upgrade to {n}",
]


def write_config(folder: Path, db: Path, feeds_url: str, n: int, port: int, slack: str,
                 digest_at: str) -> Path:  # fmt: skip
    """Real-use settings compressed 60x where they are durations of the mix:
    retry_base 30 s -> 1 s, retry_max 30 min -> 30 s, fetch_timeout 30 s -> 2 s."""
    lines = [
        "[agentwatch]", f'db = "{db}"', f'health = "127.0.0.1:{port}"', 'retention = "90d"',
        'max_age = "3650d"', 'retry_base = "1s"', 'retry_max = "30s"', 'fetch_timeout = "2s"',
        "", "[llm]", 'provider = "anthropic"', "", "[slack]", f'webhook_url = "{slack}"', "",
        "[digest]", f'at = "{digest_at}"', 'timezone = "UTC"', "",
        "[[sources]]", 'name = "gh"', 'type = "webhook"', f'secret = "{SECRET}"', "",
        "[[sources]]", 'name = "flaky"', 'type = "rss"', f'url = "{feeds_url}/flaky.xml"',
        'every = "1s"', "",
    ]  # fmt: skip
    for i in range(n):
        lines += ["[[sources]]", f'name = "feed-{i}"', 'type = "rss"',
                  f'url = "{feeds_url}/f/{i}.xml"', 'every = "1s"', ""]  # fmt: skip
    path = folder / "agentwatch.toml"
    path.write_text("\n".join(lines))
    return path


class Publisher:
    """The feeds' content: each path serves its last KEPT entries; publish() adds one."""

    def __init__(self, feeds: FakeFeeds, paths: list[str]):
        self.feeds, self.entries, self.count, self.serial = feeds, {p: [] for p in paths}, 0, 0
        for path in paths:
            for _ in range(KEPT):
                self.publish(path)
        self.count = 0  # the baseline is not new

    def publish(self, path: str) -> None:
        self.serial = n = self.serial + 1
        title = TITLES[n % len(TITLES)].format(n=n)
        entries = self.entries[path]
        entries.append({"title": title, "link": f"https://forum.example{path}/{n}",
                        "guid": f"{path}-{n}", "description": f"{title}. " * 20})  # fmt: skip
        del entries[:-KEPT]
        self.feeds.set(path, rss(list(reversed(entries))))
        self.count += 1


def metrics_sums(text: str) -> dict[str, float]:
    """Prometheus text -> the sum of each family over its labels."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = re.split(r"[{ ]", line, maxsplit=1)[0], line.rsplit(" ", 1)[1]
            sums[name] = sums.get(name, 0.0) + float(value)
    return sums


def metric_with(text: str, name: str, label: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line)  # fmt: skip


class Scraper:
    """GET /health and /metrics once a wall second; keeps the latest /metrics."""

    def __init__(self, port: int):
        self.port, self.latest, self.ms, self.failures = port, "", [], 0
        self.lock = threading.Lock()

    def scrape(self) -> None:
        for path in ("/health", "/metrics"):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                    body = r.read().decode()
            except OSError:  # a 503 while starting, or a refused connection
                self.failures += 1
                continue
            if path == "/metrics":
                with self.lock:
                    self.latest = body
                    self.ms.append((time.perf_counter() - started) * 1000)

    def counts(self) -> dict[str, float]:
        with self.lock:
            text = self.latest
        sums = metrics_sums(text)
        return {
            "polls": sums.get("agentwatch_polls_total", 0.0),
            "poll_errors": sums.get("agentwatch_poll_errors_total", 0.0),
            "posts": metric_with(text, "agentwatch_slack_posts_total", 'status="200"'),
            "llm": sums.get("agentwatch_llm_calls_total", 0.0),
            "hooks": metric_with(text, "agentwatch_webhook_deliveries_total", 'status="202"'),
            "items": sums.get("agentwatch_items", 0.0),
        }


def every(seconds: float, stop: threading.Event, action) -> threading.Thread:
    def loop() -> None:
        while not stop.wait(seconds):
            action()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def seeded_db(items: int, folder: Path) -> Path:
    db = folder / "soak.db"
    if items:
        CACHE.mkdir(exist_ok=True)
        cached = CACHE / f"soak-seed-{items}.db"
        if not cached.exists():
            build(cached, items)
        shutil.copy(cached, db)
    return db


def use_time(wall: float) -> str:
    minutes = int(wall * SPEEDUP / 60)
    return f"{minutes // 60}h{minutes % 60:02d}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=6, help="wall minutes (60x: hours of use)")
    parser.add_argument("--sources", type=int, default=60)
    parser.add_argument("--sample", type=float, default=10, help="wall seconds between samples")
    parser.add_argument("--warmup", type=float, default=60, help="wall seconds before start RSS")
    parser.add_argument("--seed-items", type=int, default=20000)
    args = parser.parse_args()
    rng = random.Random(16)
    template = json.loads(PAYLOAD.read_text())["body"]
    window = args.minutes * 60 - args.warmup
    if window <= 0:
        raise SystemExit("--minutes must be longer than --warmup")

    with (
        FakeFeeds() as feeds,
        FakeAnthropic() as llm,
        FakeSlack() as slack,
        tempfile.TemporaryDirectory(dir="/tmp") as tmp,
    ):
        folder = Path(tmp)
        db = seeded_db(args.seed_items, folder)
        paths = ["/flaky.xml"] + [f"/f/{i}.xml" for i in range(args.sources)]
        publisher = Publisher(feeds, paths)
        port = free_port()
        started_at = dt.datetime.now(dt.UTC)
        digest_at = started_at + dt.timedelta(seconds=args.warmup + window / 2)
        config = write_config(folder, db, feeds.url, args.sources, port,
                              slack.url + "/hooks/soak", digest_at.strftime("%H:%M:%S"))  # fmt: skip
        env = {"ANTHROPIC_BASE_URL": llm.url, "ANTHROPIC_API_KEY": "bench"}
        proc = start(config, env=env)
        stop = threading.Event()
        scraper = Scraper(port)
        delivered = [0]
        flap = [0]

        def publish() -> None:
            # About PUBLISH_RATE entries a wall second over the fleet, at random feeds.
            for path in paths:
                if rng.random() < PUBLISH_RATE / len(paths):
                    publisher.publish(path)

        def hook() -> None:
            status, _ = deliver(port, delivered[0], body_for(delivered[0], template))
            delivered[0] += status == 202

        def flip() -> None:
            flap[0] += 1
            feeds.fault("/flaky.xml", FLAKY[flap[0] % len(FLAKY)])

        try:
            t0 = time.monotonic()
            if not wait(lambda: len({r["path"] for r in feeds.requests}) >= len(paths), 120):
                raise SystemExit(
                    f"agentwatch did not poll every feed; see {config.with_suffix('.log')}"
                )
            print(f"first pass: {len(paths)} feeds polled {time.monotonic() - t0:.1f} s after start; "
                  f"RSS {rss_mb(proc.pid):.1f} MB")  # fmt: skip
            threads = [
                every(1.0, stop, publish),
                every(1.0, stop, scraper.scrape),
                every(WEBHOOK_EVERY, stop, hook),
                every(FLAP_EVERY, stop, flip),
                every(LLM_FAULT_EVERY, stop, lambda: llm.script(
                    [("status", 529, "overloaded_error", {"retry-after-ms": "10"})])),
                every(SLACK_FAULT_EVERY, stop, lambda: slack.script(
                    [(429, "rate_limited", {"Retry-After": "1"})])),
                every(RELOAD_EVERY, stop, lambda: proc.send_signal(signal.SIGHUP)),
            ]  # fmt: skip
            time.sleep(max(0.0, t0 + args.warmup - time.monotonic()))
            scraper.scrape()
            cpu0, wall0, base = cpu_seconds(proc.pid), time.monotonic(), scraper.counts()
            published0, delivered0, hits0 = publisher.count, delivered[0], feeds.hits()
            samples = [(0.0, rss_mb(proc.pid), base)]
            while (now := time.monotonic()) < wall0 + window:
                time.sleep(min(args.sample, wall0 + window - now))
                if proc.poll() is not None:
                    raise SystemExit(
                        f"agentwatch exited {proc.returncode}; see {config.with_suffix('.log')}"
                    )
                samples.append((time.monotonic() - wall0, rss_mb(proc.pid), scraper.counts()))
            scraper.scrape()
            cpu1, wall1, end = cpu_seconds(proc.pid), time.monotonic(), scraper.counts()
            hits = feeds.hits() - hits0
            not_modified = sum(1 for r in feeds.requests[hits0:] if r["status"] == 304)
            load = Path("/proc/loadavg").read_text().split()[:3]
            stop.set()
            for thread in threads:
                thread.join(10)
        finally:
            stop.set()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        store = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        digests = store.execute(
            "SELECT COUNT(*), COALESCE(SUM(status = 'done'), 0) FROM items "
            "WHERE source = 'agentwatch' AND item_id LIKE 'digest:%'"
        ).fetchone()
        new_items = store.execute(
            "SELECT COUNT(*) FROM items WHERE created_at >= ?", (started_at.timestamp(),)
        ).fetchone()[0]
        cleared = store.execute(
            "SELECT COUNT(*) FROM items WHERE created_at < ? AND body = ''",
            (started_at.timestamp() - 90 * 86400,),
        ).fetchone()[0]
        store.close()

    rss_values = [s[1] for s in samples]
    half = len(samples) // 2
    polls = end["polls"] - base["polls"]
    cpu = cpu1 - cpu0
    print(f"\nsoak: {args.minutes:g} wall minutes at {SPEEDUP}x = {use_time(args.minutes * 60)} of "
          f"use ({args.warmup:.0f} s warm-up = {use_time(args.warmup)}), {args.sources} feeds + "
          f"flaky + webhook, {args.seed_items:,} seeded items; load average at the end "
          f"{' '.join(load)} (2 cores)")  # fmt: skip
    print(f"{'wall s':>7} {'use':>6} {'RSS MB':>7} {'polls':>7} {'items':>7} {'posts':>6}")
    step = max(1, len(samples) // 15)
    for i, (t, mb, c) in enumerate(samples):
        if i % step == 0 or i == len(samples) - 1:
            print(f"{t:7.0f} {use_time(args.warmup + t):>6} {mb:7.1f} {c['polls'] - base['polls']:7.0f} "
                  f"{c['items'] - base['items']:7.0f} {c['posts'] - base['posts']:6.0f}")  # fmt: skip
    print(f"RSS: {rss_values[0]:.1f} MB after the warm-up, {rss_values[-1]:.1f} MB at the end, "
          f"growth {rss_values[-1] - rss_values[0]:+.1f} MB, max {max(rss_values):.1f} MB; "
          f"first half {rss_values[half] - rss_values[0]:+.1f} MB, "
          f"second half {rss_values[-1] - rss_values[half]:+.1f} MB")  # fmt: skip
    print(f"window ({use_time(window)} of use): {polls:.0f} polls ({hits} feed requests, "
          f"{not_modified} answered 304; {end['poll_errors'] - base['poll_errors']:.0f} failed), "
          f"{publisher.count - published0} entries published, {delivered[0] - delivered0} "
          f"webhook deliveries accepted, {end['llm'] - base['llm']:.0f} LLM calls, "
          f"{end['posts'] - base['posts']:.0f} Slack posts")  # fmt: skip
    print(f"whole run: {new_items} new items stored, {digests[0]} digest item(s), {digests[1]} sent (a "
          f"slot missed before the start is stored as skipped), "
          f"{cleared:,} seeded items older than 90 days with their texts cleared")  # fmt: skip
    print(f"CPU: {cpu:.1f} s over {wall1 - wall0:.0f} s = {100 * cpu / (wall1 - wall0):.1f}% of a "
          f"core; {cpu / max(polls, 1) * 1000:.2f} ms per poll, all work included")  # fmt: skip
    if scraper.ms:
        print(f"/metrics: median {statistics.median(scraper.ms):.1f} ms, max {max(scraper.ms):.1f} ms "
              f"over {len(scraper.ms)} scrapes; {scraper.failures} scrapes failed")  # fmt: skip
    print("target: growth <= 5 MB over 6 hours of use")


if __name__ == "__main__":
    main()
