"""Where an unchanged (304) poll's CPU goes: the real `agentwatch run` under
cProfile against loopback feeds that all answer 304, ended with SIGTERM so the
profile is written; then the top functions by cumulative and by own time.

    python bench/profile_poll.py [--sources 300] [--every 5] [--seconds 60]
                                 [--top 30] [--out /tmp/poll.prof]

The profile covers the whole run (start and the first pass too); the first
pass is over within a few seconds, so a window of a minute is mostly 304
polls. cProfile slows Python code down about twofold: read the shares, not
the absolute times (bench/poll_304.py gives those)."""

from __future__ import annotations

import argparse
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import FakeFeeds, agentwatch_command, feed_config, serve_feeds, wait


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", type=int, default=300)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    with FakeFeeds() as feeds, tempfile.TemporaryDirectory() as tmp:
        serve_feeds(feeds, args.sources)
        config = feed_config(Path(tmp), feeds.url, args.sources, f"{args.every}s")
        out = Path(args.out or Path(tmp) / "poll.prof")
        script = agentwatch_command()[0]  # the console script, run by this Python
        log = open(Path(tmp) / "agentwatch.log", "w")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "cProfile", "-o", str(out), script,
             "run", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            assert wait(lambda: len({r["path"] for r in feeds.requests}) >= args.sources, 60)
            hits0 = feeds.hits()
            time.sleep(args.seconds)
            polls = feeds.hits() - hits0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        not_modified = sum(1 for r in feeds.requests[hits0:] if r["status"] == 304)
        print(f"{polls} polls ({not_modified} answered 304) in the {args.seconds:.0f} s window; "
              f"profile: {out}")  # fmt: skip
        stats = pstats.Stats(str(out))
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
