"""What a hostile or broken world does to a process that must run for months
(issue 9): a disk that fills, a database another process holds, a feed or a page
built to exhaust memory or CPU, a restart without the API key, a damaged
database file. Every hostile input is built here, never downloaded."""

from __future__ import annotations

import codecs
import contextlib
import importlib.metadata
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import pytest
from fakes import FakeSlack, rss
from helpers import rows, wait_until
from test_ops import (
    free_port,
    get,
    live,
    log_text,
    pidfile_pid,
    run_watchdog,
    wait_health,
    watchdog_env,
    write_config,
)
from test_ops import reap as reap  # the fixture: kills what watchdog.sh started

import agentwatch

ROOT = Path(__file__).resolve().parent.parent


# -- Store.transaction -------------------------------------------------------


def test_a_commit_that_fails_busy_leaves_no_transaction_open(tmp_path):
    """Without WAL (a filesystem that refuses it) a reader blocks the COMMIT. The
    failed COMMIT must not leave the connection inside the transaction, or every
    later BEGIN fails with "cannot start a transaction within a transaction"."""
    store = agentwatch.Store(tmp_path / "aw.db")
    store.source_row("s", "rss")
    store.db.execute("PRAGMA journal_mode = DELETE")  # what a filesystem without WAL leaves
    store.db.execute("PRAGMA busy_timeout = 100")
    reader = sqlite3.connect(tmp_path / "aw.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM sources").fetchall()  # a SHARED lock: COMMIT cannot finish
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.record_poll_failure("s", "boom", "", time.time() + 60, 1)
    assert not store.db.in_transaction, "the failed COMMIT left the transaction open"
    reader.execute("COMMIT")
    reader.close()
    assert store.sources()[0]["last_error"] == "", "the failed write was rolled back"
    store.record_poll_failure("s", "second", "", time.time() + 60, 1)  # the next write works
    assert store.sources()[0]["last_error"] == "second"
    assert store.sources()[0]["consecutive_failures"] == 1
    store.close()


def test_a_full_disk_raises_its_own_error_not_no_transaction_is_active(tmp_path):
    """On SQLITE_FULL SQLite has rolled back already; a second ROLLBACK would raise
    "cannot rollback - no transaction is active" and hide why the write failed."""
    store = agentwatch.Store(tmp_path / "aw.db")
    store.source_row("s", "rss")
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
    with pytest.raises(sqlite3.OperationalError, match="full") as raised:
        store.record_poll_failure("s", "x" * 200_000, "", time.time() + 60, 1)
    assert raised.value.sqlite_errorname == "SQLITE_FULL"
    assert not store.db.in_transaction
    store.db.execute(f"PRAGMA max_page_count = {pages * 100}")  # space again
    store.record_poll_failure("s", "fits", "", time.time() + 60, 1)
    assert store.sources()[0]["last_error"] == "fits"
    store.close()


def test_the_store_says_plainly_when_the_database_is_not_in_wal_mode(caplog):
    # An in-memory database cannot be WAL: PRAGMA journal_mode answers "memory".
    with caplog.at_level(logging.WARNING, logger="agentwatch"):
        store = agentwatch.Store(":memory:")
    assert store.journal_mode == "memory"
    assert any("not in WAL mode" in r.getMessage() for r in caplog.records), caplog.text
    store.close()


def test_a_database_on_disk_is_in_wal_mode(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="agentwatch"):
        store = agentwatch.Store(tmp_path / "aw.db")
    assert store.journal_mode == "wal"
    assert "WAL" not in caplog.text
    store.close()


# -- hostile feeds -----------------------------------------------------------


def quadratic_entity_feed(size: int = 13_000, encoding: str = "utf-8") -> bytes:
    """One big entity referenced a few thousand times: expat refuses it, and
    feedparser's loose parser expands it (a 13 KB feed, a 10 MB title)."""
    entity = "A" * (size // 2)
    refs = "&e;" * (size // 2 // 3 // 2)
    text = (
        f'<?xml version="1.0" encoding="{encoding}"?>\n'
        f'<!DOCTYPE rss [\n<!ENTITY e "{entity}">\n<!ENTITY copy "(C)">\n]>\n'
        '<rss version="2.0"><channel><title>x</title>'
        f"<item><title>Acme {refs}</title><link>https://x.example/1</link>"
        f"<description>{refs}</description></item>"
        "<item><title>second &amp; last</title><link>https://x.example/2</link></item>"
        "</channel></rss>"
    )
    return codecs.encode(text, encoding)


def billion_laughs_feed(levels: int = 9) -> bytes:
    entities = ['<!ENTITY lol0 "lollollollollollollollollollol">'] + [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, levels)
    ]
    return (
        '<?xml version="1.0"?>\n<!DOCTYPE rss [' + "".join(entities) + "]>\n"
        f'<rss version="2.0"><channel><title>x</title><item><title>&lol{levels - 1};</title>'
        "<link>https://x.example/1</link></item></channel></rss>"
    ).encode()


def produced(items: list[agentwatch.Item]) -> int:
    return sum(len(i.title) + len(i.body) + len(i.url) + len(i.author) for i in items)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-7"])
def test_entity_declarations_in_a_feed_are_not_expanded(encoding):
    body = quadratic_entity_feed(encoding=encoding)
    assert len(body) < 30_000
    items = agentwatch.feed_items(body, {"content-type": "application/rss+xml"})
    assert produced(items) < 50_000, f"a {len(body)} byte feed produced {produced(items)} chars"
    # Nothing is lost: both items come through, the entity left as written.
    assert [i.url for i in items] == ["https://x.example/1", "https://x.example/2"]
    assert items[0].title.startswith("Acme &e;&e;")
    assert items[1].title == "second & last"


def test_nested_entities_are_not_expanded():
    items = agentwatch.feed_items(billion_laughs_feed())
    assert produced(items) < 10_000
    assert [i.url for i in items] == ["https://x.example/1"]


def test_what_one_feed_entry_may_produce_is_bounded():
    huge = "word " * 400_000  # 2 MB in one title, one author, one link
    body = rss([{"title": huge, "link": "https://x.example/" + "a" * 100_000, "author": huge,
                 "guid": "g" * 100_000, "description": huge}])  # fmt: skip
    (item,) = agentwatch.feed_items(body)
    assert len(item.title) <= agentwatch.TITLE_LIMIT
    assert len(item.author) <= agentwatch.TITLE_LIMIT
    assert len(item.url) <= agentwatch.URL_LIMIT
    assert len(item.body) <= agentwatch.BODY_LIMIT
    assert len(item.item_id) <= agentwatch.URL_LIMIT
    # A long id is replaced by its hash, so two long ids that differ late stay apart.
    other = rss([{"title": "t", "guid": "g" * 99_999 + "h"}])
    assert agentwatch.feed_items(other)[0].item_id != item.item_id


def test_a_hostile_feed_is_polled_without_harm_and_the_process_stays_up(
    slack, feeds, make_config, run_cli, tmp_path
):
    feeds.set("/evil.xml", quadratic_entity_feed(30_000))
    feeds.set("/good.xml", rss([{"title": "fine", "link": "https://x.example/g"}]))
    config = make_config(f"""
        [agentwatch]
        db = "aw.db"
        health = ""
        [llm]
        provider = "none"
        [slack]
        webhook_url = "${{SLACK_WEBHOOK_URL}}"
        [[sources]]
        name = "evil"
        type = "rss"
        url = "{feeds.url}/evil.xml"
        [[sources]]
        name = "good"
        type = "rss"
        url = "{feeds.url}/good.xml"
    """)
    started = time.monotonic()
    result = run_cli("run", "--once", config=config)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    stored = rows(tmp_path / "aw.db", "SELECT source, title FROM items ORDER BY id")
    assert {r["source"] for r in stored} == {"evil", "good"}
    assert max(len(r["title"]) for r in stored) <= agentwatch.TITLE_LIMIT


# -- html_to_text ------------------------------------------------------------

HOSTILE_MARKUP = {
    "lt": "<" * 200_000,
    "lt-a": "<a" * 100_000,
    "end-tags": "</" * 100_000,
    "bangs": "<!" * 100_000,
    "pis": "<?" * 100_000,
    "open-attrs": "<div a=" * 30_000,
    "unclosed-scripts": "<script>" * 25_000,
    "unclosed-comments": "<!--" * 50_000,
    "unclosed-style": "<style>" + "<" * 200_000,
    "entities": "&" * 200_000,
    "unclosed-quote": '<a x="' + "<" * 200_000,
    "quotes": '<a x="' * 40_000,
    "one-quote-many-tags": "<a x='" + "<a y=" * 40_000,
}


def test_html_to_text_is_linear_on_hostile_markup():
    """200 KB of `<` took ~23 s with the old regexes, holding the GIL (so /health
    froze too). Generous bound: a linear pass does all of these in well under 1 s."""
    started = time.monotonic()
    for markup in HOSTILE_MARKUP.values():
        agentwatch.html_to_text(markup)
    assert time.monotonic() - started < 5


def test_a_pages_visible_text_is_linear_on_hostile_markup():
    from agentwatch_sources import url as url_source

    started = time.monotonic()
    for markup in HOSTILE_MARKUP.values():
        url_source.visible_text(markup)
    assert time.monotonic() - started < 5
    page = "<title>T</title><p>one<br>two</p><noscript>x</noscript><template>y</template>z"
    assert url_source.visible_text(page) == "T\none\ntwo\nz"


def test_html_to_text_caps_its_input():
    text = agentwatch.html_to_text("<p>" + "x " * (agentwatch.HTML_INPUT_LIMIT) + "</p>")
    assert len(text) <= agentwatch.HTML_INPUT_LIMIT


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("<p>Acme <b>rocks</b></p><p>again</p>", "Acme rocks again"),
        ("<script>var a = '<p>no</p>';</script>kept<style>p{}</style>", "kept"),
        ("<SCRIPT type=x>hidden</SCRIPT >shown", "shown"),
        ("a <!-- a comment <p> --> b", "a b"),
        ("1 < 2 &amp;&amp; 3 &gt; 2", "1 < 2 && 3 > 2"),
        ('<a href="https://x.example/?a=1&amp;b=2" title="x > y">link</a>', "link"),
        ("caf&eacute; &#8212; &#x263A;", "café — ☺"),
        ("unclosed <b", "unclosed"),
        ("  lots\n\n of\t space ", "lots of space"),
    ],
)
def test_html_to_text(html, text):
    assert agentwatch.html_to_text(html) == text


def one_error_line(stderr: str) -> str:
    """The CLI's one `agentwatch: ...` line (the log, on stderr here, may say it too)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("agentwatch: ")]
    assert len(lines) == 1, stderr
    return lines[0]


# -- a restart without the API key -------------------------------------------

SIMPLE = """
[agentwatch]
db = "aw.db"
health = ""
[llm]
provider = "{provider}"
[slack]
webhook_url = "${{SLACK_WEBHOOK_URL}}"
[[sources]]
name = "blog"
type = "rss"
url = "{url}"
"""


def test_a_database_that_saw_llm_triage_refuses_to_run_without_the_key(
    slack, feeds, make_config, run_cli, tmp_path
):
    feeds.set("/f.xml", rss([{"title": "old", "link": "https://x.example/1"}]))
    config = make_config(SIMPLE.format(provider="anthropic", url=f"{feeds.url}/f.xml"))
    no_key = {"ANTHROPIC_API_KEY": None}
    # A fresh install runs without a key (as provider "none").
    first = run_cli("run", "--once", config=config, env=no_key)
    assert first.returncode == 0, first.stderr
    # Later the database shows LLM triage: a classified item.
    db = sqlite3.connect(tmp_path / "aw.db")
    db.execute("""UPDATE items SET classification = '{"relevant": true}'""")
    db.commit()
    db.close()
    feeds.set("/f.xml", rss([{"title": f"new {n}", "link": f"https://x.example/n{n}"}
                             for n in range(5)]))  # fmt: skip
    refused = run_cli("run", "--once", config=config, env=no_key)
    assert refused.returncode == 2, refused.stderr
    assert "ANTHROPIC_API_KEY" in refused.stderr and 'provider = "none"' in refused.stderr
    assert "Traceback" not in refused.stderr
    assert one_error_line(refused.stderr).startswith("agentwatch: ANTHROPIC_API_KEY is not set")
    assert not slack.requests, "nothing may be posted untriaged"
    assert len(rows(tmp_path / "aw.db", "SELECT * FROM items")) == 1, "nothing was polled"
    # Saying provider = "none" on purpose runs it.
    config.write_text(SIMPLE.format(provider="none", url=f"{feeds.url}/f.xml"))
    assert run_cli("run", "--once", config=config, env=no_key).returncode == 0


def test_recorded_llm_usage_also_counts_as_triage(feeds, make_config, run_cli, tmp_path):
    config = make_config(SIMPLE.format(provider="anthropic", url=f"{feeds.url}/f.xml"))
    agentwatch.Store(tmp_path / "aw.db").close()
    db = sqlite3.connect(tmp_path / "aw.db")
    db.execute("""INSERT INTO llm_usage (at, source, item_id, stage, model, input_tokens,
                  output_tokens) VALUES (0, 'blog', 'x', 'classify', 'm', 1, 1)""")
    db.commit()
    db.close()
    refused = run_cli("run", "--once", config=config, env={"ANTHROPIC_API_KEY": None})
    assert refused.returncode == 2, refused.stderr
    assert "ANTHROPIC_API_KEY" in refused.stderr


# -- dependencies ------------------------------------------------------------


def requirement(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = [d for d in deps if re.match(rf"{re.escape(name)}\b(?![-_])", d)]
    assert found, f"{name} is not declared in pyproject.toml"
    return found[0]


def test_h11_is_declared_with_the_request_smuggling_fix():
    assert re.search(r">=\s*0\.16", requirement("h11"))


@pytest.mark.parametrize("name", ["httpx2", "anthropic", "h11"])
def test_direct_dependencies_are_bounded_below_their_next_major(name):
    installed = int(importlib.metadata.version(name).split(".")[0])
    bound = re.search(r"<\s*(\d+)", requirement(name))
    assert bound, f"{requirement(name)} has no upper bound"
    assert int(bound.group(1)) == installed + 1, (requirement(name), installed)


# -- a damaged database ------------------------------------------------------


def damage(db: Path, how: str) -> None:
    if how == "not-a-database":
        db.write_bytes(b"this is not an SQLite file at all" * 200)
    else:  # a real database with every page after the header overwritten
        store = agentwatch.Store(db)
        store.source_row("blog", "rss")
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
        data = bytearray(db.read_bytes())
        data[100:] = b"\xa5" * (len(data) - 100)
        db.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["not-a-database", "malformed"])
def test_a_damaged_database_is_one_clear_line_and_exit_2(how, make_config, run_cli, tmp_path):
    config = make_config(SIMPLE.format(provider="none", url="http://127.0.0.1:9/f.xml"))
    damage(tmp_path / "aw.db", how)
    for command in (["run"], ["status"]):
        result = run_cli(*command, config=config)
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr
        line = one_error_line(result.stderr)
        assert "damaged" in line and ".recover" in line and "backup" in line
        assert str(tmp_path / "aw.db") in line


# -- watchdog.sh, the systemd unit, file modes ------------------------------


def test_watchdog_leaves_alone_a_process_that_only_looks_like_agentwatch_run(tmp_path, reap):
    """`tail -f .../agentwatch/run.log` matched the old `*agentwatch*run*` test."""
    port = free_port()
    config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"')
    reap(config)
    (tmp_path / "agentwatch").mkdir()
    (tmp_path / "agentwatch" / "run.log").write_text("")
    bystander = subprocess.Popen(["tail", "-f", str(tmp_path / "agentwatch" / "run.log")])
    try:
        (tmp_path / "agentwatch.pid").write_text(f"{bystander.pid}\n")  # a recycled pid
        result = run_watchdog(tmp_path, watchdog_env(tmp_path, config, port))
        log = log_text(tmp_path, "watchdog.log")
        assert result.returncode == 0, log
        assert bystander.poll() is None, "the watchdog signalled `tail -f`"
        assert f"pid {bystander.pid} (from {tmp_path / 'agentwatch.pid'}) is not agentwatch" in log
        assert wait_health(port)["pid"] == pidfile_pid(tmp_path) != bystander.pid
    finally:
        bystander.kill()
        bystander.wait()


def test_watchdog_leaves_another_instance_alone(tmp_path, start_cli, reap):
    """The pidfile names an agentwatch, but one running on another database."""
    (tmp_path / "other").mkdir()
    other_port, port = free_port(), free_port()
    other_config = write_config(tmp_path / "other", other_port, rest='[llm]\nprovider = "none"')
    other = start_cli("run", config=other_config)
    wait_health(other_port, proc=other)
    config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"')
    reap(config)
    (tmp_path / "agentwatch.pid").write_text(f"{other.pid}\n")
    result = run_watchdog(tmp_path, watchdog_env(tmp_path, config, port))
    log = log_text(tmp_path, "watchdog.log")
    assert result.returncode == 0, log
    assert other.returncode is None and wait_health(other_port)["pid"] == other.pid
    assert f"pid {other.pid} (from" in log and "leaving it alone" in log
    assert wait_health(port)["pid"] == pidfile_pid(tmp_path) != other.pid


def test_watchdog_finds_a_hung_process_by_its_lock_whatever_the_pidfile_says(tmp_path, reap):
    """A watchdog whose pidfile path is not run's used to leave a hung process forever
    (and start one that the lock refused, every minute)."""
    port = free_port()
    config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"')
    reap(config)
    env = watchdog_env(tmp_path, config, port, AGENTWATCH_HEALTH_TIMEOUT="2")
    assert run_watchdog(tmp_path, env).returncode == 0, log_text(tmp_path, "watchdog.log")
    hung = pidfile_pid(tmp_path)
    os.kill(hung, signal.SIGSTOP)
    elsewhere = {**env, "AGENTWATCH_PIDFILE": str(tmp_path / "not-runs.pid")}
    result = run_watchdog(tmp_path, elsewhere)
    log = log_text(tmp_path, "watchdog.log")
    assert result.returncode == 0, log
    assert f"pid {hung} holds ./agentwatch.db.lock" in log
    assert f"stopping pid {hung} (TERM)" in log
    assert not live(hung)
    assert wait_health(port)["pid"] == pidfile_pid(tmp_path) != hung


def test_the_systemd_unit_pings_a_watchdog_and_is_bounded():
    unit = (ROOT / "agentwatch.service").read_text()
    keys = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0].isalpha()
    )
    assert keys["Type"] == "notify"
    assert keys["NotifyAccess"] == "main"
    assert keys["UMask"] == "0077"
    assert re.fullmatch(r"\d+[KMG]", keys["MemoryMax"])
    assert re.fullmatch(r"\d+s?", keys["WatchdogSec"])
    assert keys["Restart"] in ("on-failure", "always")  # a watchdog timeout is a failure


def test_run_tells_systemd_ready_watchdog_and_stopping(tmp_path, start_cli, make_config):
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(15)
    config = make_config('[agentwatch]\ndb = "aw.db"\nhealth = ""\n[llm]\nprovider = "none"\n')
    proc = start_cli("run", config=config, env={"NOTIFY_SOCKET": str(sock_path)})
    try:
        first = listener.recv(4096).decode()
        assert "READY=1" in first.split("\n"), first
        pings = [listener.recv(4096).decode() for _ in range(2)]  # one a tick (a second)
        assert pings == ["WATCHDOG=1", "WATCHDOG=1"], pings
        proc.kill(signal.SIGTERM)
        while (message := listener.recv(4096).decode()) == "WATCHDOG=1":
            pass
        assert message == "STOPPING=1"
        assert proc.wait() == 0
    finally:
        listener.close()


def test_the_database_its_wal_and_the_log_are_created_0600(tmp_path, start_cli, make_config):
    config = make_config(
        '[agentwatch]\ndb = "aw.db"\nhealth = ""\nlog_file = "aw.log"\n[llm]\nprovider = "none"\n'
    )
    before = os.umask(0o022)  # a usual login umask: files would be world-readable
    try:
        proc = start_cli("run", config=config)
    finally:
        os.umask(before)
    names = ("aw.db", "aw.db-wal", "aw.db-shm", "aw.log")
    deadline = time.monotonic() + 15
    while not all((tmp_path / n).exists() for n in names):
        assert proc.returncode is None and time.monotonic() < deadline, proc.stderr_text()
        time.sleep(0.05)
    modes = {n: oct((tmp_path / n).stat().st_mode & 0o777) for n in names}
    assert modes == dict.fromkeys(names, "0o600")
    while "starting" not in (tmp_path / "aw.log").read_text():  # SIGTERM handled from here
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0


# -- a full disk and a locked database while items flow (item 1) ------------
# The harm to prevent: a write that fails after a side effect (a Slack post, a
# paid LLM call) must neither lose the item nor repeat the side effect, and the
# process stays up, saying in its log and /health that the database is failing.


class TrippingSlack(FakeSlack):
    """A Slack webhook that calls `trip()` once, as the first post arrives and
    before it answers 200: the post has happened; its record cannot be written."""

    def __init__(self, trip) -> None:
        super().__init__()
        self.trip, self.tripped = trip, threading.Event()

    def _handle(self, request):
        if not self.tripped.is_set():
            self.tripped.set()
            self.trip()
        return super()._handle(request)


FLOW = """
[agentwatch]
db = "{db}"
health = "127.0.0.1:{port}"
log_file = "aw.log"
retry_base = "1s"
retry_max = "2s"
[llm]
about = "Acme, an analytics tool"
[slack]
webhook_url = "{slack}/hooks/T"
[[sources]]
name = "forum"
type = "rss"
url = "{feed}"
every = "1s"
"""

NEW_POSTS = [
    {"title": f"Acme crashes on export, case {n}", "link": f"https://forum.example/t/{n}",
     "guid": f"urn:t:{n}"}
    for n in range(1, 4)
]  # fmt: skip


def health_database(port: int) -> dict:
    status, _, body = get(port, timeout=10)
    assert status == 200, body
    return json.loads(body)["database"]


def flow_through_a_failing_database(tmp_path, db, feeds, anthropic_fake, start_cli, trip, mend):
    """Baseline, then three new posts; the database fails as the first post is
    sent (`trip`) and is mended (`mend`) once /health says it is failing."""
    feeds.set("/f.xml", rss([{"title": "old", "link": "https://forum.example/old"}]))
    port = free_port()
    with TrippingSlack(trip) as slack:
        config = tmp_path / "agentwatch.toml"
        config.write_text(FLOW.format(db=db, port=port, slack=slack.url,
                                      feed=f"{feeds.url}/f.xml"))  # fmt: skip
        proc = start_cli("run", config=config)
        wait_health(port, proc=proc)
        feeds.wait_for(2, path="/f.xml")  # the baseline poll and one more
        feeds.set(
            "/f.xml", rss([*NEW_POSTS, {"title": "old", "link": "https://forum.example/old"}])
        )
        wait_until(lambda: slack.tripped.is_set(), timeout=30, what="the first post")
        failing = wait_until(lambda: health_database(port)["status"] == "failing" and
                             health_database(port), timeout=30, what="/health: database failing")  # fmt: skip
        assert failing["failing_since"] and failing["error"]
        # The window this is about: a post went out and its record was refused.
        wait_until(lambda: "stage=notify sent, but not stored yet (database failing)"
                   in log_text(tmp_path, "aw.log"), timeout=40, what="a refused record of a post")  # fmt: skip
        time.sleep(3)  # ticks and write retries while it fails: nothing may be sent again
        posted_while_failing = slack.texts()
        assert proc.returncode is None, "the process died"
        mend()
        wait_until(lambda: len(slack.texts()) >= 3, timeout=60, what="three posts")
        wait_until(lambda: health_database(port)["status"] == "ok", timeout=30, what="recovery")
        wait_until(lambda: len([r for r in rows(db, "SELECT * FROM items WHERE item_id LIKE "
                                                    "'urn:t:%' AND status = 'done'")]) == 3,
                   timeout=30, what="three items done")  # fmt: skip
        time.sleep(2)  # two more polls and ticks: still nothing twice
        texts = slack.texts()
        proc.kill(signal.SIGTERM)
        assert proc.wait(30) == 0
    for post in NEW_POSTS:  # every item posted, exactly once
        assert sum(post["link"] in t for t in texts) == 1, (post["link"], texts)
    assert len(texts) == 3, texts
    assert all(sum(p["link"] in t for t in posted_while_failing) <= 1 for p in NEW_POSTS)
    # The LLM was paid once per item and stage, and every call is counted.
    assert anthropic_fake.calls("classify") == 3
    drafts = rows(db, "SELECT * FROM items WHERE item_id LIKE 'urn:t:%' AND draft IS NOT NULL")
    assert anthropic_fake.calls("text") == len(drafts)
    usage = rows(db, "SELECT stage, COUNT(*) AS n FROM llm_usage GROUP BY stage")
    assert {r["stage"]: r["n"] for r in usage} == {"classify": 3, "draft": len(drafts)}
    log = (tmp_path / "aw.log").read_text()
    assert "database error while" in log and "stored after the database recovered" in log
    assert "Slack answered" not in log, "the fake failed a post: a test bug"
    return log


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs of its own, so the database's disk can really fill (ENOSPC)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_items_flow_loses_nothing_and_posts_nothing_twice(
    tmp_path, small_disk, feeds, anthropic_fake, start_cli
):
    filler = small_disk / "filler"

    def fill():
        with filler.open("wb", buffering=0) as f:  # unbuffered: ENOSPC comes at write()
            for chunk in (1 << 16, 1 << 12, 512):
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * chunk)

    log = flow_through_a_failing_database(
        tmp_path, small_disk / "aw.db", feeds, anthropic_fake, start_cli, fill, filler.unlink
    )
    assert "full" in log


def test_a_locked_database_while_items_flow_loses_nothing_and_posts_nothing_twice(
    tmp_path, feeds, anthropic_fake, start_cli
):
    db = tmp_path / "aw.db"
    held, release = threading.Event(), threading.Event()

    def hold():  # another process's long write: BEGIN EXCLUSIVE, held until mended
        con = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        con.execute("BEGIN EXCLUSIVE")
        held.set()
        release.wait(60)
        con.execute("COMMIT")
        con.close()

    holder = threading.Thread(target=hold, daemon=True)

    def lock():
        holder.start()
        held.wait(10)

    def unlock():
        release.set()
        holder.join(10)

    log = flow_through_a_failing_database(
        tmp_path, db, feeds, anthropic_fake, start_cli, lock, unlock
    )
    assert "locked" in log
