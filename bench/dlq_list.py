"""Wall time of `agentwatch dlq list` (and --json, and status) on a store with
1,000 dead-lettered items among 50,000. Target (SPEC): dlq list <= 0.2 s.

    python bench/dlq_list.py [--runs 10]"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import agentwatch_command

import agentwatch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "agentwatch.toml"
        config.write_text('[agentwatch]\ndb = "aw.db"\n[[sources]]\nname = "f"\ntype = "rss"\n'
                          'url = "https://example.com/feed.xml"\n')  # fmt: skip
        store = agentwatch.Store(Path(tmp) / "aw.db")
        now = time.time()
        with store.transaction() as db:
            db.executemany(
                """INSERT INTO items (source, item_id, title, url, stages, stage, status, attempts,
                   last_error, created_at, updated_at, failed_at)
                   VALUES ('f', ?, ?, ?, 'classify draft notify', 'notify', ?, 3, ?, ?, ?, ?)""",
                [(f"id{i}", f"Title {i}", f"https://example.com/{i}",
                  "dead" if i % 50 == 0 else "done", "Slack refused the message: 404 channel_not_found",
                  now, now, now) for i in range(50_000)],
            )  # fmt: skip
        store.close()
        for command in (["dlq", "list"], ["dlq", "list", "--json"], ["status"], ["--help"]):
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                subprocess.run([*agentwatch_command(), *command, "--config", str(config)]
                               if command != ["--help"] else [*agentwatch_command(), "--help"],
                               capture_output=True, check=True)  # fmt: skip
                times.append(time.perf_counter() - started)
            print(f"agentwatch {' '.join(command)}: median {statistics.median(times) * 1000:.0f} ms, "
                  f"max {max(times) * 1000:.0f} ms over {args.runs} runs")  # fmt: skip


if __name__ == "__main__":
    main()
