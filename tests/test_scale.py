"""A year of use: counts kept by triggers, queries that use their indexes, and
retention that clears old texts without forgetting what was seen."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import time

import pytest
from fakes import rss
from helpers import items, recent, rows

import agentwatch
from agentwatch import (
    Item,
    SourceConfig,
    Store,
    admit,
    clear_old_items,
    feed_items,
    item_counts,
    retention_pass,
)

DAY = 86400.0


def poll_into(store: Store, source: str, found: list[Item], *, first_poll: bool = False) -> int:
    """Admit and record one poll the way the scheduler does; returns the rows stored."""
    known = store.known_ids(source, [i.item_id for i in found])
    new = admit(
        SourceConfig(name=source, type="rss"), found, known, first_poll=first_poll,
        baseline=True, max_age=3650 * DAY, stages=lambda _: ("classify", "draft", "notify"),
        now=time.time(),
    )  # fmt: skip
    store.record_poll(source, new, state={}, validators={}, next_poll_at=0)
    return len(new)


def finish(store: Store, title: str, **fields) -> int:
    row_id = store.db.execute("SELECT id FROM items WHERE title = ?", (title,)).fetchone()[0]
    store.update_item(row_id, **fields)
    return row_id


def age(store: Store, days: float) -> None:
    """Time passes: every stored item was fetched `days` ago."""
    with store.transaction() as db:
        db.execute("UPDATE items SET created_at = created_at - ?", (days * DAY,))


def exact_counts(store: Store) -> dict[tuple[str, str], int]:
    rows = store.db.execute("SELECT stage, status, COUNT(*) FROM items GROUP BY 1, 2")
    return {(stage, status): n for stage, status, n in rows}


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "aw.db")
    s.source_row("feed", "rss")
    yield s
    s.close()


def make_items(store: Store) -> dict[str, int]:
    """One item in each state an item can be in, every one with a body and most
    with a draft; returns their row ids by title."""
    found = [
        Item(f"id-{name}", title=name, url=f"https://x/{name}", body=f"the text of {name}")
        for name in ("done", "skipped", "dropped", "pending", "dead", "retrying")
    ]
    assert poll_into(store, "feed", found) == 6
    ids = {
        "done": finish(
            store,
            "done",
            stage="done",
            status="done",
            draft="a reply",
            summary="s",
            classification='{"relevant": true}',
        ),
        "skipped": finish(store, "skipped", stage="done", status="skipped", note="not notified"),
        "dropped": finish(store, "dropped", status="dead", draft="a reply", failed_at=1.0),
        "pending": finish(store, "pending", stage="notify", draft="a reply"),
        "dead": finish(store, "dead", stage="notify", status="dead", draft="a reply"),
        "retrying": finish(store, "retrying", attempts=2, next_attempt_at=time.time() + 60),
    }
    store.dlq_drop([ids["dropped"]])
    return ids


# -- counts kept by triggers ---------------------------------------------------


def test_item_counts_follow_every_write(store):
    assert item_counts(store.db) == {}
    poll_into(
        store, "feed", [Item(f"old-{i}", title=f"old {i}") for i in range(30)], first_poll=True
    )
    assert item_counts(store.db) == {("done", "seen"): 30} == exact_counts(store)
    ids = make_items(store)
    assert item_counts(store.db) == exact_counts(store)
    store.dlq_retry([ids["dead"]])
    store.update_item(ids["pending"], stage="done", status="done")
    store.update_item(ids["retrying"], last_error="only a column the counts ignore")
    assert item_counts(store.db) == exact_counts(store)
    with store.transaction() as db:
        db.execute("DELETE FROM items WHERE title LIKE 'old 1%'")
    assert item_counts(store.db) == exact_counts(store)
    assert store.dlq_depth() == 0
    asyncio.run(retention_pass(store, 90 * DAY, now=time.time() + 365 * DAY, pause=0))
    assert item_counts(store.db) == exact_counts(store), "retention moves no item between counts"


def test_the_counts_of_an_existing_database_are_taken_when_it_migrates(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE migrations (number INTEGER PRIMARY KEY, at REAL)")
    for statement in agentwatch.sql_statements(agentwatch.MIGRATIONS[0]):
        db.execute(statement)
    db.execute("INSERT INTO migrations VALUES (1, 0)")
    db.executemany(
        """INSERT INTO items (source, item_id, stages, stage, status, created_at, updated_at)
           VALUES ('feed', ?, '', ?, ?, 0, 0)""",
        [(f"i{i}", "done" if i % 3 else "notify", "seen" if i % 3 else "dead") for i in range(50)],
    )
    db.close()
    store = Store(path)
    assert item_counts(store.db) == {("done", "seen"): 33, ("notify", "dead"): 17}
    assert store.dlq_depth() == 17
    store.close()


# -- the plans of the queries that must not grow with the table ----------------


def captured_plans(store: Store, calls) -> dict[str, list[str]]:
    """Run `calls()` with a trace on the connection; EXPLAIN every SELECT it ran."""
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    try:
        calls()
    finally:
        store.db.set_trace_callback(None)
    plans = {}
    for sql in statements:
        if sql.lstrip().upper().startswith("SELECT"):
            plan = store.db.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
            plans[sql] = [r[3] for r in plan]
    return plans


def test_the_queries_of_health_metrics_status_dlq_and_scheduler_use_indexes(
    store, make_config, tmp_path
):
    config = agentwatch.load_config(make_config(f'[agentwatch]\ndb = "{tmp_path}/aw.db"\n'))
    make_items(store)
    poll_into(store, "feed", [Item(f"n{i}", title=f"n {i}") for i in range(300)])
    rt = agentwatch.Runtime(config=config, store=store, http=None, llm=None, slack=None)
    now = time.time()

    def everything_that_must_stay_cheap():
        agentwatch.health_report(rt, store.db, now)
        agentwatch.metrics_text(rt, store.db, now)
        store.dead()  # dlq list
        store.dlq_depth()  # status
        store.item_counts_since(agentwatch.utc_midnight())
        store.usage_since(agentwatch.utc_midnight())
        store.sources()
        store.due_items(now, 200, [1, 2, 3])  # the scheduler, each second
        store.next_due_at()
        store.known_ids("feed", ["n1", "n2", "nope"])  # dedup, each poll
        clear_old_items(store, now - 90 * DAY)  # retention

    plans = captured_plans(store, everything_that_must_stay_cheap)
    assert len(plans) >= 10, plans
    for sql, plan in plans.items():
        for step in plan:
            # "SCAN items" reads every item (with or without an index); the small
            # tables (sources, item_counts) may be read whole.
            assert not re.match(r"SCAN items\b", step), f"{sql}\n  {plan}"

    def plan_of(fragment: str) -> str:
        (found,) = [" ".join(p) for sql, p in plans.items() if fragment in sql]
        return found

    assert "USING INDEX items_due (status=? AND next_attempt_at<?)" in plan_of("next_attempt_at <=")
    assert "TEMP B-TREE" not in plan_of("next_attempt_at <="), "the index gives the order"
    assert "USING COVERING INDEX items_created (created_at>?)" in plan_of("created_at >=")
    assert "USING INDEX items_retained (created_at<?)" in plan_of("ORDER BY created_at LIMIT")
    assert "USING INDEX items_due (status=?)" in plan_of("status = 'dead' ORDER BY")
    assert "item_counts" in plan_of("FROM item_counts")


# -- retention -----------------------------------------------------------------


def test_retention_clears_only_old_finished_items_and_keeps_every_row(store):
    ids = make_items(store)
    before = {r["id"]: dict(r) for r in store.db.execute("SELECT * FROM items")}
    # Not old enough yet: nothing changes.
    assert asyncio.run(retention_pass(store, 90 * DAY, pause=0)) == 0
    age(store, 91)
    cleared = asyncio.run(retention_pass(store, 90 * DAY, pause=0))
    assert cleared == 3
    after = {r["id"]: dict(r) for r in store.db.execute("SELECT * FROM items")}
    assert after.keys() == before.keys(), "every row keeps its id"
    for title in ("done", "skipped", "dropped"):
        row = after[ids[title]]
        assert row["body"] == "" and row["draft"] is None, title
        for kept in ("item_id", "title", "url", "status", "stage", "summary", "classification"):
            assert row[kept] == before[ids[title]][kept], (title, kept)
    for title in ("pending", "dead", "retrying"):  # unfinished and dead-lettered: untouched
        assert after[ids[title]]["body"] == f"the text of {title}", title
        assert after[ids[title]]["draft"] == before[ids[title]]["draft"], title
        assert {k: v for k, v in after[ids[title]].items() if k != "created_at"} == {
            k: v for k, v in before[ids[title]].items() if k != "created_at"
        }
    # A second pass finds nothing left to do.
    assert asyncio.run(retention_pass(store, 90 * DAY, pause=0)) == 0
    assert asyncio.run(retention_pass(store, 0, now=time.time() + 999 * DAY, pause=0)) == 0


def test_retention_zero_keeps_everything(store):
    make_items(store)
    age(store, 3650)
    assert asyncio.run(retention_pass(store, 0, pause=0)) == 0
    assert store.db.execute("SELECT COUNT(*) FROM items WHERE body = ''").fetchone()[0] == 0


def test_an_item_whose_body_was_cleared_is_not_fetched_as_new(store):
    # An entry with neither id nor link: its id is a hash of its title (and link).
    doc = rss(
        [
            {
                "title": "Acme ate my data",
                "link": "https://x/1",
                "guid": "urn:1",
                "description": "It crashed twice",
            },
            {"title": "No id, no link: how do I export?", "description": "Export steps?"},
        ]
    )
    found = feed_items(doc)
    assert found[1].item_id.startswith("sha1:")
    assert poll_into(store, "feed", found) == 2
    for title in ("Acme ate my data", "No id, no link: how do I export?"):
        finish(store, title, stage="done", status="done", draft="reply")
    age(store, 100)
    assert asyncio.run(retention_pass(store, 90 * DAY, pause=0)) == 2
    assert store.db.execute("SELECT COUNT(*) FROM items WHERE body != ''").fetchone()[0] == 0
    again = feed_items(doc)  # the same feed, parsed anew
    assert [i.item_id for i in again] == [i.item_id for i in found]
    assert poll_into(store, "feed", again) == 0, "nothing is new after its body was cleared"


def finished_with_text(path, n: int) -> Store:
    """A store of `n` skipped items with 2.7 KB bodies each, just fetched."""
    store = Store(path)
    store.source_row("feed", "rss")
    text = "lorem ipsum dolor sit amet " * 100
    poll_into(store, "feed", [Item(f"i{i}", title=f"t{i}", body=text) for i in range(n)])
    with store.transaction() as db:
        db.execute("UPDATE items SET stage = 'done', status = 'skipped'")
    return store


def test_retention_gives_the_space_back(tmp_path):
    store = finished_with_text(tmp_path / "aw.db", 3000)
    assert store.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2, "new files: incremental"
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = (tmp_path / "aw.db").stat().st_size
    age(store, 100)
    cleared = 0
    while n := clear_old_items(store, time.time() - 90 * DAY):
        cleared += n
    assert cleared == 3000
    free = store.db.execute("PRAGMA freelist_count").fetchone()[0]
    assert free > 2 * agentwatch.VACUUM_PAGES
    assert agentwatch.vacuum_step(store) == free - agentwatch.VACUUM_PAGES, "a step frees a MB"
    asyncio.run(retention_pass(store, 90 * DAY, pause=0))  # and the rest
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shrunk = (tmp_path / "aw.db").stat().st_size
    assert shrunk < size / 3, (size, shrunk)
    assert store.db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    store.close()


def test_vacuum_steps_shrink_on_a_slow_disk_and_grow_on_a_fast_one(tmp_path, monkeypatch):
    """Each vacuum step holds the write lock and the event loop: one that took
    longer than VACUUM_STEP_SECONDS halves the next, one far quicker doubles it."""
    assert agentwatch.vacuum_pages_after(256, 10.0) == 128
    assert agentwatch.vacuum_pages_after(256, 0.001) == 512
    assert agentwatch.vacuum_pages_after(1024, 0.001) == 1024, "at most 4 MB a step"
    assert agentwatch.vacuum_pages_after(256, agentwatch.VACUUM_STEP_SECONDS / 2) == 256
    store = finished_with_text(tmp_path / "aw.db", 3000)
    age(store, 100)
    steps, vacuum_step = [], agentwatch.vacuum_step

    def recorded(store, pages):
        steps.append(pages)
        return vacuum_step(store, pages)

    monkeypatch.setattr(agentwatch, "vacuum_step", recorded)
    monkeypatch.setattr(agentwatch, "VACUUM_STEP_SECONDS", 0.0)  # every step is too slow
    assert asyncio.run(retention_pass(store, 90 * DAY, pause=0)) == 3000
    assert steps[:6] == [256, 128, 64, 32, 16, 16], steps
    assert store.db.execute("PRAGMA freelist_count").fetchone()[0] == 0, "and the file shrank"
    store.close()


def test_rows_that_reference_items_survive_retention(store):
    """A batch deletes and re-inserts its rows: a table referring to items(id)
    without ON DELETE keeps its rows and its foreign key holds."""
    ids = make_items(store)
    with store.transaction() as db:
        db.execute("CREATE TABLE notes (item INTEGER NOT NULL REFERENCES items (id), text TEXT)")
        db.execute("INSERT INTO notes VALUES (?, 'seen in Slack')", (ids["done"],))
    age(store, 100)
    assert asyncio.run(retention_pass(store, 90 * DAY, pause=0)) == 3
    assert [tuple(r) for r in store.db.execute("SELECT item FROM notes")] == [(ids["done"],)]
    assert store.db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_no_table_cascades_from_items(store):
    """Retention re-inserts rows under their ids: a cascading foreign key would
    lose the rows that point at them."""
    tables = [r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        for fk in store.db.execute(f'PRAGMA foreign_key_list("{table}")').fetchall():
            if fk["table"] == "items":
                assert fk["on_delete"] == "NO ACTION", (table, dict(fk))


@pytest.mark.parametrize(
    ("value", "error"),
    [("90", "at least"), (3600, "at least"), (-1, "negative"), ("90d", None), (0, None)],
)
def test_retention_config(make_config, value, error):
    shown = json.dumps(value)
    path = make_config(f"[agentwatch]\nretention = {shown}\n")
    if error is None:
        assert agentwatch.load_config(path).agentwatch.retention in (0, 90 * DAY)
    else:
        with pytest.raises(agentwatch.ConfigError, match=f"agentwatch.retention.*{error}"):
            agentwatch.load_config(path)
    assert agentwatch.Settings().retention == 90 * DAY


def test_the_daemon_clears_old_texts_and_nothing_comes_back(
    slack, feeds, make_config, run_cli, start_cli, tmp_path
):
    entries = [
        {"title": "Acme crashes on start", "link": "https://forum.example/t/1",
         "guid": "urn:post:1", "description": "Stack trace attached", "pub_date": recent(3)},
        {"title": "Untitled link-less question about acme",
         "description": "How do I export?", "pub_date": recent(2)},
    ]  # fmt: skip
    feeds.set("/a.xml", rss(entries), conditional=False)  # every poll parses the whole feed
    config = make_config(f"""
        [agentwatch]
        db = "aw.db"
        health = ""
        retention = "90d"

        [llm]
        provider = "none"

        [slack]
        webhook_url = "${{SLACK_WEBHOOK_URL}}"

        [[sources]]
        name = "forum"
        type = "rss"
        url = "{feeds.url}/a.xml"
        every = "1s"
        backfill = 5
    """)
    db = tmp_path / "aw.db"
    assert run_cli("run", "--once", config=config).returncode == 0
    slack.wait_for(2)
    assert {r["status"] for r in items(db).values()} == {"done"}
    assert all(r["body"] for r in items(db).values())

    # A hundred days go by (the rows are aged in place), then the daemon starts.
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("UPDATE items SET created_at = created_at - 100 * 86400")
    con.close()
    proc = start_cli("run", config=config)
    proc.wait_for_output(r"retention: cleared the texts of 2 item\(s\) older than")
    polls = feeds.hits("/a.xml")
    while feeds.hits("/a.xml") < polls + 2:  # two more polls of the full feed
        time.sleep(0.1)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    stored = rows(db, "SELECT * FROM items")
    assert len(stored) == 2 and all(r["body"] == "" for r in stored)
    assert {r["title"] for r in stored} == {e["title"] for e in entries}

    assert run_cli("run", "--once", config=config).returncode == 0
    assert len(rows(db, "SELECT * FROM items")) == 2, "nothing was fetched as new"
    assert len(slack.requests) == 2, "nothing was posted again"
