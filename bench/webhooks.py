"""Webhooks: signed GitHub deliveries POSTed to a running agentwatch at a steady
rate, each on a new connection (as GitHub sends them); the answer latency of
each, and whether every delivery ended up stored.

    python bench/webhooks.py [--rate 200 --seconds 60 --workers 32]

Target (SPEC): 200 deliveries a second for a minute, each answered 202 within
100 ms at the 99th percentile, none lost. Provider "none", Slack to stdout."""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import hmac
import http.client
import json
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, cpu_seconds, free_port, start

SECRET = "bench-webhook-secret"
PAYLOAD = ROOT.parent / "shared" / "corpus" / "github_webhooks" / "issues_opened.json"


def body_for(n: int, template: dict) -> bytes:
    payload = json.loads(json.dumps(template))
    payload["issue"]["id"] = n
    payload["issue"]["title"] = f"Delivery {n}: the export crashes"
    return json.dumps(payload, separators=(",", ":")).encode()


def deliver(port: int, n: int, body: bytes) -> tuple[int, float]:
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "issues",
               "X-GitHub-Delivery": f"bench-{n}", "X-Hub-Signature-256": signature}  # fmt: skip
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/hooks/gh", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        status = response.status
    except OSError:
        status = 0
    finally:
        conn.close()
    return status, time.perf_counter() - started


def probe(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/hooks/gh")
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=32)
    args = parser.parse_args()
    template = json.loads(PAYLOAD.read_text())["body"]
    total = int(args.rate * args.seconds)
    bodies = [body_for(n, template) for n in range(total)]

    folder = Path(tempfile.mkdtemp(prefix="agentwatch-bench-hooks-"))
    port = free_port()
    config = folder / "agentwatch.toml"
    config.write_text(
        f'[agentwatch]\ndb = "bench.db"\nhealth = "127.0.0.1:{port}"\nmax_age = "3650d"\n\n'
        '[llm]\nprovider = "none"\n\n[slack]\nwebhook_url = ""\n\n'
        f'[[sources]]\nname = "gh"\ntype = "webhook"\nsecret = "{SECRET}"\nnotify = "all"\n'
    )
    proc = start(config)
    try:
        deadline = time.monotonic() + 20
        while probe(port) != 405:  # up, and serving /hooks/
            if time.monotonic() > deadline:
                raise SystemExit("agentwatch did not start; see " + str(config.with_suffix(".log")))
            time.sleep(0.2)
        results: list[tuple[int, float]] = [(0, 0.0)] * total
        lock = threading.Lock()
        cpu_before = cpu_seconds(proc.pid)
        started = time.monotonic()

        def one(n: int) -> None:
            wait = started + n / args.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            result = deliver(port, n, bodies[n])
            with lock:
                results[n] = result

        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(one, range(total)))
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(proc.pid) - cpu_before
        db = sqlite3.connect(folder / "bench.db")
        stored = db.execute("SELECT COUNT(*) FROM items WHERE source = 'gh'").fetchone()[0]
    finally:
        proc.terminate()
        proc.wait(30)
    latencies = [seconds * 1000 for status, seconds in results if status == 202]
    statuses: dict[int, int] = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    print(f"deliveries: {total} at {args.rate:g}/s asked, {total / elapsed:.1f}/s achieved "
          f"over {elapsed:.1f}s; answers {statuses}")  # fmt: skip
    if latencies:
        print(f"202 latency ms: p50 {percentile(latencies, 50):.1f}  p99 "
              f"{percentile(latencies, 99):.1f}  max {max(latencies):.1f}")  # fmt: skip
    print(f"stored: {stored} of {total} ({total - stored} lost); agentwatch CPU {cpu:.1f}s "
          f"({100 * cpu / elapsed:.0f}% of a core)")  # fmt: skip
    print("target: p99 <= 100 ms at 200/s for a minute, none lost")


if __name__ == "__main__":
    main()
