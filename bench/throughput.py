"""Throughput: fetch → dedup → filter in-process, and end to end through the
real CLI with instant loopback fakes (the real anthropic SDK included).

    python bench/throughput.py [--items 2000]

Targets (SPEC): fetch → dedup → filter >= 5,000 items/s; end to end >= 200 items/s.
End to end delivers to stdout: one Slack webhook is paced at one post a second
(ten items a post in a burst), so Slack itself caps one channel at ~10 items/s."""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import tempfile
import time
from pathlib import Path

from common import FakeAnthropic, FakeFeeds, agentwatch_command, rss

import agentwatch


def feed(n: int, offset: int) -> bytes:
    return rss([{"title": f"Post {i} about acme", "link": f"https://example.com/p/{i}",
                 "guid": f"g{i}", "description": f"Body of post {i} " * 20}
                for i in range(offset, offset + n)])  # fmt: skip


async def fetch_dedup_filter(url: str, store: agentwatch.Store, rounds: int) -> tuple[int, float]:
    settings = agentwatch.Settings(max_age=agentwatch.Duration(10**9))
    http = agentwatch.make_http_client(settings)
    config = agentwatch.SourceConfig(name="bench", type="rss", include=["acme"],
                                     options=agentwatch.RSSSource.Options(url))  # fmt: skip
    src = agentwatch.RSSSource(config, settings, http, {})
    store.source_row("bench", "rss")
    total, started = 0, time.perf_counter()
    for r in range(rounds):
        items = await src.poll()
        known = store.known_ids("bench", [i.item_id for i in items])
        rows = agentwatch.admit(config, items, known, first_poll=r == 0, baseline=True,
                                max_age=settings.max_age, stages=src.stages, now=time.time())  # fmt: skip
        store.record_poll("bench", rows, state={}, validators={}, next_poll_at=0)
        total += len(items)
    await http.aclose()
    return total, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args()
    n = args.items
    with FakeFeeds() as feeds, FakeAnthropic() as llm, tempfile.TemporaryDirectory() as tmp:
        feeds.set("/f.xml", feed(n, 0), conditional=False)
        store = agentwatch.Store(Path(tmp) / "ffd.db")
        total, seconds = asyncio.run(fetch_dedup_filter(f"{feeds.url}/f.xml", store, rounds=5))
        print(f"fetch → dedup → filter: {total} items in {seconds:.2f} s = {total / seconds:,.0f} items/s "
              f"(one {n}-item feed over HTTP, 5 polls: first a baseline, then all known)")  # fmt: skip

        feeds.set("/e.xml", feed(n, 10**6))
        config = Path(tmp) / "agentwatch.toml"
        config.write_text(
            f'[agentwatch]\ndb = "e2e.db"\nhealth = ""\nmax_age = "3650d"\n'
            f"[llm]\nconcurrency = 16\n"
            f'[[sources]]\nname = "bench"\ntype = "rss"\nurl = "{feeds.url}/e.xml"\n'
            f'backfill = {n}\nnotify = "all"\ndraft = []\n'
        )
        started = time.perf_counter()
        out = subprocess.run(
            [*agentwatch_command(), "run", "--once", "--config", str(config)],
            capture_output=True, text=True,
            env={"ANTHROPIC_BASE_URL": llm.url, "ANTHROPIC_API_KEY": "bench", "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        wall = time.perf_counter() - started
        sent = len(re.findall(r"stage=notify sent", out.stderr))
        stamps = re.findall(r"^(\S+) INFO +item .* stage=(classify|notify)", out.stderr, re.M)
        first = agentwatch.dt.datetime.fromisoformat(stamps[0][0].replace("Z", "+00:00"))
        last = agentwatch.dt.datetime.fromisoformat(stamps[-1][0].replace("Z", "+00:00"))
        pipeline = (last - first).total_seconds()
        print(f"end to end: {sent} items classified (real SDK, {llm.calls()} calls) and delivered "
              f"in {pipeline:.2f} s = {sent / pipeline:,.0f} items/s "
              f"({wall:.2f} s for the whole `run --once`, start-up and poll included)")  # fmt: skip


if __name__ == "__main__":
    main()
