"""RSS of one `agentwatch run` with 1,000 feed sources, with the LLM in use
(classifying one new item per source through the real SDK against a loopback
fake) and with provider "none".

    python bench/memory.py [--sources 1000] [--settle 60]

Targets (SPEC): <= 100 MB with the LLM, <= 45 MB with provider "none"."""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path

from common import FakeAnthropic, FakeFeeds, feed_config, rss_mb, serve_feeds, start, wait


def measure(n: int, settle: float, with_llm: bool) -> None:
    with FakeFeeds() as feeds, FakeAnthropic() as llm, tempfile.TemporaryDirectory() as tmp:
        serve_feeds(feeds, n)
        # One new item per source goes through classification; "negative" items only
        # are notified, and the fake calls these neutral, so Slack stays quiet.
        extra = 'backfill = 1\nnotify = ["negative"]' if with_llm else ""
        config = feed_config(
            Path(tmp), feeds.url, n, "20s", extra_source=extra,
            llm='provider = "anthropic"' if with_llm else 'provider = "none"',
        )  # fmt: skip
        env = {"ANTHROPIC_BASE_URL": llm.url, "ANTHROPIC_API_KEY": "bench"}
        proc = start(config, env=env)
        try:
            started = time.monotonic()
            assert wait(lambda: len({r["path"] for r in feeds.requests}) >= n, 120)
            if with_llm:
                assert wait(lambda: llm.calls() >= n, 600), f"only {llm.calls()} LLM calls"
                print(f"  {llm.calls()} classifications in {time.monotonic() - started:.1f} s")
            peak = rss_mb(proc.pid)
            time.sleep(settle)  # more polling rounds (every 20 s)
            label = "LLM in use" if with_llm else 'provider "none"'
            print(f"{n} sources, {label}: RSS {peak:.1f} MB when the first pass was done, "
                  f"{rss_mb(proc.pid):.1f} MB after {settle:.0f} s more polling "
                  f"({feeds.hits()} polls in all)")  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", type=int, default=1000)
    parser.add_argument("--settle", type=float, default=60)
    args = parser.parse_args()
    measure(args.sources, args.settle, with_llm=False)
    measure(args.sources, args.settle, with_llm=True)


if __name__ == "__main__":
    main()
