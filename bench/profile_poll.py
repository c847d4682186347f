"""Where an unchanged (304) poll's CPU goes: the real `agentwatch run` under
cProfile against loopback feeds that all answer 304, ended with SIGTERM so the
profile is written; then the top functions by cumulative and by own time.

    python bench/profile_poll.py [--sources 300] [--every 5] [--seconds 60]
                                 [--top 30] [--out /tmp/poll.prof]

The profile covers the whole run (start and the first pass too); the first
pass is over within a few seconds, so a window of a minute is mostly 304
polls. cProfile slows Python code down about twofold: read the shares, not
the absolute times (bench/poll_304.py gives those).

With --py-spy (`pip install py-spy`), the daemon runs as it does in use and is
sampled from outside instead, for --seconds after its first pass: no slowdown
of Python code, C time (SQLite, the JSON codec) counted in the Python function
that called it. It prints the share of the busy samples (waits in the event
loop's `select` and in idle worker threads left out) by package, by own time
and including callees, and the top functions by own time."""

from __future__ import annotations

import argparse
import collections
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import FakeFeeds, agentwatch_command, feed_config, serve_feeds, start, wait

IDLE = ("EpollSelector.select (selectors.py", "_worker (concurrent/futures/thread.py")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", type=int, default=300)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="")
    parser.add_argument("--py-spy", action="store_true", help="sample with py-spy, no cProfile")
    args = parser.parse_args()
    if args.py_spy:
        sample_with_py_spy(args)
        return
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


def sample_with_py_spy(args: argparse.Namespace) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with FakeFeeds() as feeds, tempfile.TemporaryDirectory() as tmp:
        serve_feeds(feeds, args.sources)
        config = feed_config(Path(tmp), feeds.url, args.sources, f"{args.every}s")
        out = Path(args.out or Path(tmp) / "poll.txt")
        proc = start(config)
        try:
            assert wait(lambda: len({r["path"] for r in feeds.requests}) >= args.sources, 60)
            time.sleep(5)  # the first pass's writes settle
            hits0 = feeds.hits()
            subprocess.run([py_spy, "record", "--pid", str(proc.pid), "--rate", "1000",
                            "--duration", str(int(args.seconds)), "--format", "raw",
                            "--output", str(out)], check=True)  # fmt: skip
            polls = feeds.hits() - hits0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        print(f"{polls} polls in the {args.seconds:.0f} s window; samples: {out}")
        print_shares(out, args.top)


def print_shares(raw: Path, top: int) -> None:
    """py-spy's raw format: one line per distinct stack, `frame;frame;... count`,
    each frame `function (path:line)`."""
    own, including, functions = collections.Counter(), collections.Counter(), collections.Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames[-1].startswith(IDLE):
            continue
        busy += int(count)
        own[package(frames[-1])] += int(count)
        for name in {package(frame) for frame in frames}:
            including[name] += int(count)
        functions[re.sub(r":\d+\)$", ")", frames[-1])] += int(count)
    print(f"{busy} busy samples")
    for title, counter in (("own time", own), ("including callees", including),
                           ("functions, own time", functions)):  # fmt: skip
        print(f"\n{title}:")
        for name, count in counter.most_common(top):
            print(f"  {count / max(busy, 1) * 100:5.1f} %  {name}")


def package(frame: str) -> str:
    """`is_closed (httpcore2/_async/http11.py:272)` -> httpcore2."""
    path = frame.rpartition(" (")[2].rstrip(")").rpartition(":")[0]
    return path.split("/")[0].removesuffix(".py")


if __name__ == "__main__":
    main()
