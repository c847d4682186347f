"""Redis: entries XADDed to a stream as fast as a pipelined producer can, read by
a running agentwatch (provider "none", Slack to stdout) through its consumer
group; entries stored per second, and whether every one was acknowledged.

    python bench/redis_ingest.py [--entries 20000]

Target (SPEC): >= 1,000 entries a second ingested. Needs `redis-server` on PATH."""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from common import cpu_seconds, free_port, start

STREAM, GROUP = "agentwatch:events", "agentwatch"


def stored(db: Path) -> int:
    try:
        with sqlite3.connect(db) as con:
            return con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.Error:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=20_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="agentwatch-bench-redis-"))
    redis_port = free_port()
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=redis_port)
    config = folder / "agentwatch.toml"
    config.write_text(
        f'[agentwatch]\ndb = "bench.db"\nhealth = "127.0.0.1:{free_port()}"\nmax_age = "3650d"\n\n'
        '[llm]\nprovider = "none"\n\n[slack]\nwebhook_url = ""\n\n'
        f'[[sources]]\nname = "events"\ntype = "redis"\nurl = "redis://127.0.0.1:{redis_port}/0"\n'
        'every = "1s"\nnotify = "all"\n'
    )
    proc = None
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.1)
        proc = start(config)
        while not (client.exists(STREAM) and client.xinfo_groups(STREAM)):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("agentwatch did not create its group; see its log")
            time.sleep(0.1)
        cpu_before = cpu_seconds(proc.pid)
        started = time.monotonic()
        pipe = client.pipeline(transaction=False)
        for n in range(args.entries):
            pipe.xadd(
                STREAM, {"id": f"e{n}", "title": f"Event {n}", "body": "export crashes " * 10}
            )
            if n % 1000 == 999:
                pipe.execute()
        pipe.execute()
        produced = time.monotonic() - started
        db = folder / "bench.db"
        while stored(db) < args.entries and time.monotonic() - started < 300:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        while client.xpending(STREAM, GROUP)["pending"] and time.monotonic() - started < 300:
            time.sleep(0.05)
        acked = time.monotonic() - started
        cpu = cpu_seconds(proc.pid) - cpu_before
        pending = client.xpending(STREAM, GROUP)["pending"]
        lag = client.xinfo_groups(STREAM)[0]["lag"]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        server.terminate()
        server.wait(10)
    n = stored(db)
    print(f"entries: {args.entries} produced in {produced:.2f}s; {n} stored in {elapsed:.2f}s "
          f"= {n / elapsed:,.0f} entries/s; all acked after {acked:.2f}s (pending {pending}, "
          f"lag {lag})")  # fmt: skip
    print(f"agentwatch CPU {cpu:.1f}s ({100 * cpu / elapsed:.0f}% of a core)")
    print("target: >= 1,000 entries/s (provider none)")


if __name__ == "__main__":
    main()
