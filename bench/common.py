"""Shared by the bench scripts: loopback fakes (from tests/fakes.py), a config
writer, and /proc readings of the agentwatch process (CPU seconds, RSS)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fakes import FakeAnthropic, FakeFeeds, FakeSlack, rss  # noqa: E402

__all__ = [
    "FakeAnthropic",
    "FakeFeeds",
    "FakeSlack",
    "cpu_seconds",
    "cpu_times",
    "rss",
    "rss_mb",
    "start",
]

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def agentwatch_command() -> list[str]:
    beside = Path(sys.executable).parent / "agentwatch"
    return [str(beside)] if beside.exists() else [shutil.which("agentwatch") or "agentwatch"]


def start(config: Path, *args: str, env: dict | None = None, log: Path | None = None):
    environment = {**os.environ, **(env or {})}
    environment = {k: v for k, v in environment.items() if v is not None}
    out = open(log or config.with_suffix(".log"), "w")  # noqa: SIM115 - lives with the process
    return subprocess.Popen(
        [*agentwatch_command(), "run", *args, "--config", str(config)],
        stdout=out, stderr=subprocess.STDOUT, env=environment,
    )  # fmt: skip


def feed_config(folder: Path, feeds_url: str, n: int, every: str, *, extra_source: str = "",
                llm: str = 'provider = "none"', slack: str = "") -> Path:  # fmt: skip
    lines = [
        "[agentwatch]", 'db = "bench.db"', f'health = "127.0.0.1:{free_port()}"',
        'max_age = "3650d"', "",
        "[llm]", llm, "", "[slack]", f'webhook_url = "{slack}"', "",
    ]  # fmt: skip
    for i in range(n):
        lines += ["[[sources]]", f'name = "feed-{i}"', 'type = "rss"',
                  f'url = "{feeds_url}/f/{i}.xml"', f'every = "{every}"', extra_source, ""]  # fmt: skip
    path = folder / "agentwatch.toml"
    path.write_text("\n".join(lines))
    return path


def free_port() -> int:
    """The daemon runs with /health on, as it does by default."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_feeds(feeds: FakeFeeds, n: int, items_per_feed: int = 5) -> None:
    for i in range(n):
        feeds.set(
            f"/f/{i}.xml",
            rss(
                [
                    {
                        "title": f"Feed {i} post {j}",
                        "link": f"https://example.com/{i}/{j}",
                        "guid": f"{i}-{j}",
                    }
                    for j in range(items_per_feed)
                ]
            ),
        )


def wait(predicate, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False
