"""How 10 Reddit sources sharing one client id live with Reddit's rate limit.

Runs the real Scheduler in-process against the fake Reddit of tests/, with time
compressed 30 times: `every = "2s"` stands for a minute, a 20 s window for
Reddit's 10-minute one, fetch_timeout 1 s for 30 s. Request counts are not
scaled, so the budget per window is Reddit's own figure. Prints figures; it
asserts nothing.

    python bench/reddit_rate_budget.py            # both scenarios, 45 s each
    python bench/reddit_rate_budget.py 25         # shorter

Scenario "oauth": 1,000 requests per window (Reddit's free OAuth tier, 100 a
minute averaged over 10 minutes). Scenario "tight": 100 per window (Reddit's
10 a minute for unauthenticated clients, where it is not blocked outright).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_reddit import FakeReddit, comment, post

import agentwatch

SCALE = 30  # real seconds per bench second
SOURCES = 10
WINDOW = 20.0  # Reddit's 600 s window, scaled


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def config_text(fake: FakeReddit, folder: Path) -> str:
    head = f"""
[agentwatch]
db = "{folder}/bench.db"
health = ""
fetch_timeout = "1s"
retry_base = "1s"
retry_max = "60s"

[llm]
provider = "none"

[slack]
webhook_url = ""
"""
    sources = []
    for i in range(SOURCES):
        sources.append(f"""
[[sources]]
name = "r{i}"
type = "reddit"
subreddit = "sub{i}"
comments = true
every = "2s"
client_id = "bench"
client_secret = "bench-secret"
base_url = "{fake.url}"
oauth_base_url = "{fake.url}"
""")
    return head + "".join(sources)


async def scenario(name: str, limit: int, duration: float) -> None:
    with FakeReddit(token_ttl=86400) as fake, tempfile.TemporaryDirectory() as tmp:
        fake.add_client("bench", "bench-secret")
        fake.rate_limit(limit, window=WINDOW)
        for i in range(SOURCES):
            fake.listing(f"/r/sub{i}/new").add(post(subreddit=f"sub{i}"))
            fake.listing(f"/r/sub{i}/comments").add(comment(subreddit=f"sub{i}"))
        path = Path(tmp) / "agentwatch.toml"
        path.write_text(config_text(fake, Path(tmp)))
        config = agentwatch.load_config(path)
        collect = Collect()
        logging.getLogger().addHandler(collect)
        logging.getLogger().setLevel(logging.WARNING)
        scheduler = agentwatch.Scheduler(config)
        task = asyncio.create_task(scheduler.run())
        await asyncio.sleep(duration)
        scheduler.stop()
        await task
        logging.getLogger().removeHandler(collect)

        listings = [r for r in fake.requests() if r["path"] != "/api/v1/access_token"]
        statuses = Counter(r["status"] for r in listings)
        # Windows as the fake counts them: fixed, aligned to multiples of WINDOW.
        per_window = Counter(int(r["time"] // WINDOW) for r in listings)
        polls = sum(n for (k, _), n in scheduler.rt.metrics.items() if k == "polls")
        failed = sum(n for (k, _), n in scheduler.rt.metrics.items() if k == "poll_errors")
        ideal = SOURCES * duration / 2
        limited = [m for m in collect.messages if "rate-limited" in m or "budget" in m]
        print(f"\n== {name}: {SOURCES} sources x (posts + comments), every minute; "
              f"budget {limit} requests per 10-minute window")  # fmt: skip
        print(f"  ran {duration:.0f}s = {duration * SCALE / 60:.0f} min of real time")
        print(f"  polls: {polls} (an unhindered schedule: ~{ideal:.0f}), failed: {failed}")
        print(f"  requests: {len(listings)} listings + {fake.token_requests()} token; "
              f"by status {dict(statuses)}")  # fmt: skip
        print("  requests per window: " + ", ".join(
            str(n) for _, n in sorted(per_window.items())) + " (first and last partial)")  # fmt: skip
        print(f"  requests per real minute: {len(listings) / (duration * SCALE / 60):.1f}")
        if limited:
            print(f"  first rate-limit message: {limited[0][:220]}")
        for m in collect.messages:
            if m not in limited:
                print("  other warning:", m[:200])


def main() -> None:
    duration = float(sys.argv[1]) if len(sys.argv) > 1 else 45.0
    asyncio.run(scenario("oauth", 1000, duration))
    asyncio.run(scenario("tight", 100, duration))


if __name__ == "__main__":
    main()
