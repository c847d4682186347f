"""The redis source against a real redis-server on 127.0.0.1 (a free port), with
agentwatch as a subprocess: entries posted once, duplicates once, kill -9
mid-stream, two processes in one group, Redis going away and coming back,
and poison entries dead-lettered at stage "ingest".

redis-server must be installed (`.ci/run` installs it); its absence is a
failure, never a skip.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from agentwatch_sources.redis import entry_item
from helpers import rows, wait_until

STREAM = "agentwatch:events"
GROUP = "agentwatch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of our own, without persistence, on a free loopback port."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed: `.ci/run` installs it (apt-get install redis-server)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = self.client()
        wait_until(lambda: self._pings(client), timeout=10, what="redis-server to answer PING")
        return self

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return client.ping()
        except redis.exceptions.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server) -> redis.Redis:
    """A client of the session's server, emptied for each test."""
    client = redis_server.client()
    client.flushall()
    return client


def config_for(tmp_path: Path, url: str, *, name: str = "events", extra: str = "",
               settings: str = "", db: str = "agentwatch.db") -> Path:  # fmt: skip
    path = tmp_path / f"{Path(db).stem}.toml"
    path.write_text(
        f'[agentwatch]\nhealth = "127.0.0.1:{free_port()}"\ndb = "{db}"\n'
        f'log_file = "{Path(db).stem}.log"\npidfile = "{Path(db).stem}.pid"\n'
        f'retry_base = "1s"\nretry_max = "2s"\n{settings}\n'
        '[llm]\nprovider = "none"\n\n'
        '[slack]\nwebhook_url = "${SLACK_WEBHOOK_URL}"\n\n'
        f'[[sources]]\nname = "{name}"\ntype = "redis"\nurl = "{url}"\nevery = "1s"\n'
        f'notify = "all"\n{extra}\n',
        encoding="utf-8",
    )
    return path


def wait_for_group(r: redis.Redis, consumers: int = 0) -> None:
    def ready():
        try:
            groups = r.xinfo_groups(STREAM)
        except redis.exceptions.ResponseError:
            return False
        return any(g["name"] == GROUP.encode() and g["consumers"] >= consumers for g in groups) or (
            consumers == 0 and bool(groups)
        )

    wait_until(ready, what="the consumer group")


def pending(r: redis.Redis) -> int:
    return r.xpending(STREAM, GROUP)["pending"]


def stored(db: Path) -> list[dict]:
    return rows(db, "SELECT * FROM items ORDER BY id")


def titles_posted(slack) -> list[str]:
    """The entry titles of every delivered Slack message (grouped ones included); a
    message names each item twice (its text fallback and its blocks): counted once."""
    return [t for text in slack.texts() for t in sorted(set(re.findall(r"entry-\d+-title", text)))]


# -- pure --------------------------------------------------------------------


def test_entry_item_maps_fields_and_falls_back_to_the_entry():
    fields = {"id": "id", "title": "title", "body": "body", "url": "url"}
    item = entry_item(STREAM, "1700000000000-0", {b"id": b"e1", b"title": b"Hi", b"body": b"x",
                                                  b"url": b"https://a/1"}, fields)  # fmt: skip
    assert (item.item_id, item.title, item.url, item.published_at) == (
        "e1", "Hi", "https://a/1", 1700000000.0)  # fmt: skip
    bare = entry_item(STREAM, "1700000000000-1", {b"event": b"signup", b"user": b"ann"}, fields)
    assert bare.item_id == "1700000000000-1"  # no id field: the entry id
    assert bare.body == "event: signup\nuser: ann" and bare.title == "event: signup"
    dated = entry_item(STREAM, "1-0", {b"when": b"2030-01-01T00:00:00Z"}, {"published": "when"})
    assert dated.published_at == 1893456000.0


# -- end to end ----------------------------------------------------------------


def test_entries_are_posted_once_and_acked(start_cli, tmp_path, slack, r, redis_server):
    proc = start_cli("run", config=config_for(tmp_path, redis_server.url))
    wait_for_group(r)
    for n in range(5):
        r.xadd(STREAM, {"id": f"e{n}", "title": f"entry-{n}-title", "body": "hello",
                        "url": f"https://example.com/{n}"})  # fmt: skip
    r.xadd(STREAM, {"id": "e0", "title": "entry-0-title", "body": "sent twice by the producer"})
    wait_until(lambda: len(titles_posted(slack)) >= 5, what="5 entries in Slack")
    wait_until(lambda: pending(r) == 0 and r.xinfo_groups(STREAM)[0]["lag"] == 0,
               what="every entry acked")  # fmt: skip
    time.sleep(1.5)
    assert sorted(titles_posted(slack)) == sorted(f"entry-{n}-title" for n in range(5))
    items = stored(tmp_path / "agentwatch.db")
    assert sorted(i["item_id"] for i in items) == [f"e{n}" for n in range(5)]
    assert "https://example.com/3" in slack.text()
    proc.kill()
    assert proc.wait() == 0


def test_a_new_group_starts_at_new_entries_unless_backfill(start_cli, tmp_path, slack, r,
                                                           redis_server):  # fmt: skip
    for n in range(4):
        r.xadd(STREAM, {"id": f"old{n}", "title": f"entry-{n}-title"})
    start_cli("run", config=config_for(tmp_path, redis_server.url, extra="backfill = 2"))
    wait_until(lambda: len(titles_posted(slack)) >= 2, what="the 2 newest entries")
    time.sleep(1.5)
    assert sorted(titles_posted(slack)) == ["entry-2-title", "entry-3-title"]
    assert r.xinfo_groups(STREAM)[0]["lag"] == 0 and pending(r) == 0


def test_kill_9_mid_stream_then_restart(start_cli, tmp_path, slack, r, redis_server):
    """Killed while entries arrive: the restart re-reads its own pending entries,
    everything is stored once, nothing is posted twice, the pending list ends empty."""
    slack.set_default(500, "internal_error")  # no post can happen before the kill
    config = config_for(tmp_path, redis_server.url, extra='consumer = "one"')
    proc = start_cli("run", config=config)
    wait_for_group(r)
    total = 60

    def produce():
        for n in range(total):
            r.xadd(STREAM, {"id": f"k{n}", "title": f"entry-{n}-title"})
            time.sleep(0.03)

    producer = threading.Thread(target=produce)
    producer.start()
    db = tmp_path / "agentwatch.db"
    wait_until(lambda: len(stored(db)) >= 10, what="some entries stored")
    proc.kill(signal.SIGKILL)
    proc.wait()
    producer.join()
    slack.set_default(200, "ok")
    start_cli("run", config=config)
    wait_until(lambda: len(stored(db)) == total, what="every entry stored")
    wait_until(lambda: pending(r) == 0, what="an empty pending list")
    wait_until(lambda: len(titles_posted(slack)) >= total, timeout=30, what="every entry posted")
    time.sleep(1.5)
    posted = titles_posted(slack)
    assert sorted(posted) == sorted(f"entry-{n}-title" for n in range(total))  # once each


def test_two_processes_in_one_group_share_the_stream(start_cli, tmp_path, slack, r, redis_server):
    one = config_for(tmp_path, redis_server.url, db="one.db", extra='consumer = "one"')
    two = config_for(tmp_path, redis_server.url, db="two.db", extra='consumer = "two"')
    start_cli("run", config=one)
    start_cli("run", config=two)
    wait_until(lambda: r.exists(STREAM) and len(r.xinfo_consumers(STREAM, GROUP)) == 2
               if r.exists(STREAM) and r.xinfo_groups(STREAM) else False,
               what="two consumers in the group")  # fmt: skip
    total = 40
    for n in range(total):
        r.xadd(STREAM, {"id": f"t{n}", "title": f"entry-{n}-title"})
        time.sleep(0.02)
    ids = lambda db: {i["item_id"] for i in stored(tmp_path / db)}  # noqa: E731
    wait_until(lambda: len(ids("one.db") | ids("two.db")) == total, what="every entry stored")
    assert ids("one.db") & ids("two.db") == set()
    wait_until(lambda: len(titles_posted(slack)) >= total, timeout=30, what="every entry posted")
    time.sleep(1.5)
    assert sorted(titles_posted(slack)) == sorted(f"entry-{n}-title" for n in range(total))
    assert pending(r) == 0


def test_redis_stopped_and_restarted(start_cli, tmp_path, slack):
    server = RedisServer(tmp_path / "own-redis").start()
    try:
        client = server.client()
        config = config_for(tmp_path, server.url)
        proc = start_cli("run", config=config)
        wait_for_group(client)
        client.xadd(STREAM, {"id": "before", "title": "entry-1-title"})
        slack.wait_for(1)
        server.stop()  # no persistence: the stream and the group are gone with it
        log = tmp_path / "agentwatch.log"
        wait_until(lambda: "cannot reach Redis" in log.read_text(), what="the failing source")
        assert proc.returncode is None  # a failing source, not a crash
        port = int(re.search(r'health = "127.0.0.1:(\d+)"', config.read_text()).group(1))

        def failing() -> dict | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as a:
                    body = a.read()
            except urllib.error.HTTPError as e:  # a 503 still carries the report
                body = e.read()
            source = json.loads(body)["sources"]["events"]
            return source if source["consecutive_failures"] >= 1 else None

        assert "cannot reach Redis" in wait_until(failing, what="/health to show it")["last_error"]
        server.start()
        client.xadd(STREAM, {"id": "after", "title": "entry-2-title"})
        wait_until(lambda: len(titles_posted(slack)) >= 2, timeout=30, what="the entry after")
        text = log.read_text()
        assert "is gone" in text and "creating it again" in text
        assert sorted(titles_posted(slack)) == ["entry-1-title", "entry-2-title"]
        assert pending(client) == 0
    finally:
        server.stop()


def test_entries_past_max_deliveries_are_dead_lettered_at_ingest(
    start_cli, run_cli, tmp_path, slack, r, redis_server
):
    r.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
    entry = r.xadd(STREAM, {"id": "poison", "title": "entry-9-title"})
    # A consumer that read it and died, again and again (each read is a delivery).
    for _ in range(3):
        r.xreadgroup(GROUP, "crashed", {STREAM: ">" if _ == 0 else "0"})
    extra = 'consumer = "healthy"\nclaim_after = "1s"\nmax_deliveries = 3'
    config = config_for(tmp_path, redis_server.url, extra=extra)
    start_cli("run", config=config)
    db = tmp_path / "agentwatch.db"
    wait_until(lambda: [i for i in stored(db) if i["status"] == "dead"], what="a dead item")
    result = run_cli("dlq", "list", "--json", config=config)
    (dead,) = json.loads(result.stdout)
    assert (dead["item_id"], dead["stage"]) == ("poison", "ingest")
    assert "delivered 4 times" in dead["error"] and entry.decode() in dead["error"]
    assert pending(r) == 0  # acked: Redis is done with it, the DLQ has it
    assert slack.posts() == []
    run_cli("dlq", "retry", str(dead["id"]), config=config)
    wait_until(lambda: titles_posted(slack) == ["entry-9-title"], what="the retried entry")


def test_preview_peeks_and_consumes_nothing(run_cli, tmp_path, r, redis_server):
    r.xadd(STREAM, {"id": "p1", "title": "entry-1-title"})
    result = run_cli("preview", "events", config=config_for(tmp_path, redis_server.url))
    assert result.returncode == 0, result.stderr
    assert "entry-1-title" in result.stdout
    assert r.xinfo_groups(STREAM) == []  # no group created, nothing pending


def test_entries_a_crashed_consumer_left_are_claimed(start_cli, tmp_path, slack, r, redis_server):
    r.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
    r.xadd(STREAM, {"id": "orphan", "title": "entry-7-title"})
    r.xreadgroup(GROUP, "crashed", {STREAM: ">"})  # read, never acked: its reader died
    extra = 'consumer = "healthy"\nclaim_after = "2s"'
    start_cli("run", config=config_for(tmp_path, redis_server.url, extra=extra))
    wait_until(lambda: titles_posted(slack) == ["entry-7-title"], what="the claimed entry")
    wait_until(lambda: pending(r) == 0, what="an empty pending list")
    (item,) = stored(tmp_path / "agentwatch.db")
    assert item["item_id"] == "orphan" and item["status"] == "done"
