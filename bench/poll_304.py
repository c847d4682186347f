"""500 feed sources polled every minute, all unchanged: CPU share of one core,
RSS, and the cold first pass (first request to last).

    python bench/poll_304.py [--sources 500] [--every 60] [--minutes 3] [--warmup 3]

The window opens --warmup seconds after the first pass.

Targets (SPEC): steady polling <= 1% of one core; cold first pass <= 3 s."""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path

from common import FakeFeeds, cpu_times, feed_config, rss_mb, serve_feeds, start, wait


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", type=int, default=500)
    parser.add_argument("--every", type=int, default=60)
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--warmup", type=float, default=3, help="seconds after the first pass")
    args = parser.parse_args()
    with FakeFeeds() as feeds, tempfile.TemporaryDirectory() as tmp:
        serve_feeds(feeds, args.sources)
        config = feed_config(Path(tmp), feeds.url, args.sources, f"{args.every}s")
        proc = start(config)
        try:
            assert wait(lambda: len({r["path"] for r in feeds.requests}) >= args.sources, 60)
            times = sorted(r["time"] for r in feeds.requests)
            print(f"cold first pass: {args.sources} feeds in {times[-1] - times[0]:.2f} s "
                  f"(first request to last)")  # fmt: skip
            time.sleep(args.warmup)  # let the baseline writes settle
            (user0, sys0), wall0, hits0 = cpu_times(proc.pid), time.monotonic(), feeds.hits()
            rss_start = rss_mb(proc.pid)
            time.sleep(args.minutes * 60)
            (user1, sys1), wall1 = cpu_times(proc.pid), time.monotonic()
            cpu0, cpu1 = user0 + sys0, user1 + sys1
            polls = feeds.hits() - hits0
            not_modified = sum(1 for r in feeds.requests[hits0:] if r["status"] == 304)
            share = (cpu1 - cpu0) / (wall1 - wall0) * 100
            print(f"steady: {polls} polls ({not_modified} answered 304) in {wall1 - wall0:.0f} s, "
                  f"CPU {cpu1 - cpu0:.2f} s = {share:.2f}% of one core, "
                  f"{(cpu1 - cpu0) / max(polls, 1) * 1000:.2f} ms CPU per poll "
                  f"({(user1 - user0) / max(polls, 1) * 1000:.2f} user, "
                  f"{(sys1 - sys0) / max(polls, 1) * 1000:.2f} system)")  # fmt: skip
            print(
                f"RSS: {rss_start:.1f} MB after the first pass, {rss_mb(proc.pid):.1f} MB at the end"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    main()
