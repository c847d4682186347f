"""`agentwatch backup PATH` (issue 15): SQLite's online backup, taken while a real
`run` keeps writing; the copy passes `PRAGMA integrity_check` and holds whole
transactions only (a prefix of the live items, every poll's batch complete)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

from fakes import rss
from helpers import rows, wait_until
from test_cli import PROBE

import agentwatch

FEEDS = 4
NEW_PER_UPDATE = 40  # items each feed gains per update
KEPT = 400  # the newest items a feed shows


class GrowingFeeds:
    """Feeds that gain NEW_PER_UPDATE items every `every` seconds, until stopped."""

    def __init__(self, feeds, every: float = 0.2):
        self.feeds = feeds
        self.every = every
        self.count = 0
        self.stop = threading.Event()
        self.update()
        self.thread = threading.Thread(target=self._grow, daemon=True)
        self.thread.start()

    def update(self) -> None:
        self.count += NEW_PER_UPDATE
        now = datetime.now(UTC)
        for f in range(FEEDS):
            newest = range(self.count, max(0, self.count - KEPT), -1)
            self.feeds.set(f"/f{f}.xml", rss([
                {"title": f"feed {f} post {n}", "link": f"https://example.com/{f}/{n}",
                 "guid": f"{f}-{n}", "pub_date": now} for n in newest
            ]))  # fmt: skip

    def _grow(self) -> None:
        while not self.stop.wait(self.every):
            self.update()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def _config(make_config, feeds) -> object:
    sources = "".join(
        f'[[sources]]\nname = "feed-{f}"\ntype = "rss"\nurl = "{feeds.url}/f{f}.xml"\n'
        f'every = "1s"\nbackfill = 1000\n'
        for f in range(FEEDS)
    )
    # No Slack webhook: messages go to stdout, so the pipeline writes as fast as it can.
    return make_config(
        f'[agentwatch]\ndb = "aw.db"\nhealth = ""\n[llm]\nprovider = "none"\n{sources}'
    )


def _read(db, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_backup_while_run_writes_is_whole_and_consistent(
    feeds, make_config, run_cli, start_cli, tmp_path
):
    config = _config(make_config, feeds)
    growing = GrowingFeeds(feeds)
    try:
        running = start_cli("run", config=config)
        live = tmp_path / "aw.db"
        wait_until(lambda: rows(live, "SELECT id FROM items LIMIT 1"), what="the first items")
        copies = []
        for n in range(6):
            copy = tmp_path / f"copy-{n}.db"
            result = run_cli("backup", copy, config=config)
            assert result.returncode == 0, result.stderr
            assert f"to {copy}:" in result.stdout and "MB" in result.stdout
            count = _read(copy, "SELECT count(*) FROM items")[0][0]
            assert f", {count} item(s)" in result.stdout
            copies.append((copy, count))
            time.sleep(0.4)
        # On a loaded machine the run may not have polled since the last copy yet.
        wait_until(
            lambda: _read(live, "SELECT count(*) FROM items")[0][0] > copies[-1][1],
            what="a write after the last backup",
        )
        assert running.returncode is None, running.stderr_text()
    finally:
        growing.close()
    running.kill()
    assert running.wait(30) == 0, running.stderr_text()

    counts = [count for _, count in copies]
    final_ids = dict(_read(live, "SELECT id, source || '/' || item_id FROM items"))
    assert len(set(counts)) > 1 and counts[-1] < len(final_ids), (
        f"the run did not write between the backups: {counts}, {len(final_ids)} at the end"
    )
    final_batches = dict(
        _read(live, "SELECT source || '@' || created_at, count(*) FROM items GROUP BY 1")
    )
    for copy, count in copies:
        assert _read(copy, "PRAGMA integrity_check") == [("ok",)], copy
        assert _read(copy, "PRAGMA journal_mode") == [("delete",)], "one file, no -wal beside it"
        assert not copy.with_name(copy.name + "-wal").exists()
        assert (copy.stat().st_mode & 0o777) == 0o600, "it holds what the database holds"
        # A prefix: exactly the live items up to the copy's newest, the same ones.
        copied = dict(_read(copy, "SELECT id, source || '/' || item_id FROM items"))
        newest = max(copied)
        assert copied == {i: key for i, key in final_ids.items() if i <= newest}, copy
        assert len(copied) == count
        # Whole transactions: each poll stored its batch with one created_at, and the
        # source's last_ok_at in the same commit.
        batches = _read(copy, "SELECT source || '@' || created_at, count(*) FROM items GROUP BY 1")
        assert all(final_batches[key] == n for key, n in batches), copy
        for source, last_ok, newest_item in _read(
            copy, "SELECT s.name, s.last_ok_at, max(i.created_at) FROM sources s "
            "JOIN items i ON i.source = s.name GROUP BY s.name"
        ):  # fmt: skip
            assert last_ok >= newest_item, (copy, source)
    assert not list(tmp_path.glob(".*partial")), "no half copy left behind"


def _small_db(make_config, tmp_path) -> object:
    config = make_config(
        '[agentwatch]\ndb = "aw.db"\nhealth = ""\n[slack]\nwebhook_url = "${AW_UNSET_HOOK}"\n'
        '[[sources]]\nname = "f"\ntype = "rss"\nurl = "https://example.com/feed.xml"\n'
    )
    store = agentwatch.Store(tmp_path / "aw.db")
    now = time.time()
    with store.transaction() as db:
        db.executemany(
            "INSERT INTO items (source, item_id, title, stages, stage, status, created_at, "
            "updated_at) VALUES ('f', ?, 't', '', 'done', 'seen', ?, ?)",
            [(str(i), now, now) for i in range(25)],
        )
    store.close()
    return config


def test_backup_refuses_to_overwrite_without_force(make_config, run_cli, tmp_path):
    config = _small_db(make_config, tmp_path)
    target = tmp_path / "backups" / "aw.db"
    target.parent.mkdir()
    target.write_text("an older copy")
    unset = {"AW_UNSET_HOOK": None, "ANTHROPIC_API_KEY": None}
    refused = run_cli("backup", target, config=config, env=unset)
    assert refused.returncode == 1 and "exists; use --force" in refused.stderr
    assert target.read_text() == "an older copy"
    forced = run_cli("backup", target, "--force", config=config, env=unset)
    assert forced.returncode == 0, forced.stderr
    assert "25 item(s)" in forced.stdout
    assert _read(target, "SELECT count(*) FROM items") == [(25,)]

    itself = run_cli("backup", tmp_path / "aw.db", "--force", config=config, env=unset)
    assert itself.returncode == 1 and "is the database itself" in itself.stderr
    folder = run_cli("backup", target.parent, config=config, env=unset)
    assert folder.returncode == 1 and "is a folder" in folder.stderr


def test_backup_without_a_database_says_so_and_creates_none(make_config, run_cli, tmp_path):
    config = make_config('[agentwatch]\ndb = "aw.db"\nhealth = ""\n')
    result = run_cli("backup", tmp_path / "copy.db", config=config)
    assert result.returncode == 1 and "no database at" in result.stderr
    assert not (tmp_path / "aw.db").exists() and not (tmp_path / "copy.db").exists()


def test_backup_does_not_import_the_sdk(make_config, tmp_path):
    config = _small_db(make_config, tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "backup", str(tmp_path / "copy.db"), "-c", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "AW_UNSET_HOOK"},
    )  # fmt: skip
    assert "backed up" in out.stdout, out.stderr
    assert "anthropic" not in out.stdout.rsplit("LOADED:", 1)[1]
