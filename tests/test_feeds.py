"""The rss source against the real-world corpus, served over loopback HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import feedparser
import pytest
from fakes import rss

import agentwatch
from agentwatch import SourceConfig, StageError, TransientError

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "feeds"
FEEDS = sorted(CORPUS.glob("*.xml"))


def poll(url: str, settings: agentwatch.Settings | None = None, etag=None, last_modified=None):
    """Poll an rss source once with a real HTTP client; returns (items, source)."""
    settings = settings or agentwatch.Settings()

    async def go():
        http = agentwatch.make_http_client(settings)
        try:
            config = SourceConfig(name="t", type="rss", options=agentwatch.RSSSource.Options(url))
            src = agentwatch.RSSSource(config, settings, http, {})
            if etag or last_modified:
                src.validators[url] = {"etag": etag, "last_modified": last_modified}
            return await src.poll(), src
        finally:
            await http.aclose()

    return asyncio.run(go())


def test_the_corpus_is_there():
    assert len(FEEDS) >= 20


@pytest.mark.parametrize("path", FEEDS, ids=[p.name for p in FEEDS])
def test_every_corpus_feed_polls_and_yields_unique_ids(path, feeds):
    body = path.read_bytes()
    feeds.set("/f.xml", body, content_type="application/xml")
    expected = feedparser.parse(body).entries
    try:
        items, _ = poll(f"{feeds.url}/f.xml")
    except StageError as e:  # documents with no feed in them are a reported failure, not a crash
        assert not expected, f"{path.name} has entries but failed: {e}"
        assert e.kind == "bad_response"
        return
    ids = [i.item_id for i in items]
    assert len(ids) == len(set(ids))
    assert len(items) == len({e.get("id") or e.get("link") or e.get("title") for e in expected})
    for item in items:
        assert item.item_id and isinstance(item.title, str)


def test_ids_are_stable_across_polls_and_fall_back_to_link_then_hash():
    body = rss(
        [
            {"title": "has guid", "link": "https://x/1", "guid": "g-1"},
            {"title": "link only", "link": "https://x/2"},
            {"title": "nothing else"},
        ]
    )
    first = [i.item_id for i in agentwatch.feed_items(body)]
    second = [i.item_id for i in agentwatch.feed_items(body)]
    assert first == second
    assert first[0] == "g-1" and first[1] == "https://x/2" and first[2].startswith("sha1:")


def test_encodings_are_decoded(feeds):
    feeds.set("/f.xml", (CORPUS / "miniflux_parser_encoding_WINDOWS-1251.xml").read_bytes())
    items, _ = poll(f"{feeds.url}/f.xml")
    assert any(any("\u0400" <= ch <= "\u04ff" for ch in i.title) for i in items), "Cyrillic"


def test_conditional_get_sends_validators_and_304_yields_nothing(feeds):
    feeds.set("/f.xml", rss([{"title": "one", "link": "https://x/1"}]))
    url = f"{feeds.url}/f.xml"
    items, src = poll(url)
    kept = src.validators[url]  # validators are kept per URL
    assert len(items) == 1 and kept["etag"] and kept["last_modified"]
    again, _ = poll(url, etag=kept["etag"], last_modified=kept["last_modified"])
    assert again == []
    assert feeds.not_modified("/f.xml") == 1
    assert feeds.requests[-1]["headers"].get("if-none-match") == kept["etag"]


def test_body_cap_timeout_and_server_errors_are_poll_failures(feeds):
    feeds.set("/big.xml", rss([{"title": "x" * 5000, "link": f"https://x/{i}"} for i in range(50)]))
    with pytest.raises(StageError, match="max_bytes"):
        poll(f"{feeds.url}/big.xml", agentwatch.Settings(max_bytes=agentwatch.ByteSize(10_000)))

    feeds.set("/slow.xml", rss([]))
    feeds.fault("/slow.xml", ("delay", 3))
    with pytest.raises(TransientError) as slow:
        poll(f"{feeds.url}/slow.xml", agentwatch.Settings(fetch_timeout=agentwatch.Duration(1)))
    assert slow.value.kind == "timeout"

    feeds.set("/err.xml", rss([]))
    feeds.fault("/err.xml", ("status", 503))
    with pytest.raises(TransientError, match="503"):
        poll(f"{feeds.url}/err.xml")

    feeds.fault("/err.xml", ("garbage",))
    with pytest.raises(TransientError, match="not an RSS or Atom feed"):
        poll(f"{feeds.url}/err.xml")

    feeds.fault("/err.xml", ("drop",))
    with pytest.raises(TransientError):
        poll(f"{feeds.url}/err.xml")


def test_a_failing_source_backs_off_and_stays_out_of_the_dlq(feeds, make_config, run_cli, tmp_path):
    from helpers import rows

    feeds.set("/f.xml", rss([]))
    feeds.fault("/f.xml", ("status", 500))
    config = make_config(
        f'[agentwatch]\nhealth = ""\ndb = "aw.db"\n[[sources]]\nname = "f"\ntype = "rss"\n'
        f'url = "{feeds.url}/f.xml"\nevery = "1s"\n'
    )
    assert run_cli("run", "--once", config=config).returncode == 0
    assert run_cli("run", "--once", config=config).returncode == 0
    (source,) = rows(tmp_path / "aw.db", "SELECT * FROM sources")
    assert source["consecutive_failures"] == 2
    assert "500" in source["last_error"]
    assert source["next_poll_at"] - source["last_poll_at"] >= 3, "backed off beyond `every`"
    assert rows(tmp_path / "aw.db", "SELECT * FROM items") == []
    status = run_cli("status", config=config)
    assert "500" in status.stdout and "dead-letter queue: 0" in status.stdout


def test_sources_due_within_the_same_second_poll_together(
    feeds, make_config, run_cli, start_cli, tmp_path
):
    # Each wake-up costs about as much CPU as a poll: the scheduler wakes once a tick
    # (POLL_TICK, a second) for every source due in it, not once per source.
    import sqlite3
    import time

    names = ["a", "b", "c", "d"]
    for name in names:
        feeds.set(f"/{name}.xml", rss([]))
    config = make_config(
        '[agentwatch]\nhealth = ""\ndb = "aw.db"\n'
        + "".join(
            f'[[sources]]\nname = "{n}"\ntype = "rss"\nurl = "{feeds.url}/{n}.xml"\nevery = "1s"\n'
            for n in names
        )
    )
    assert run_cli("run", "--once", config=config).returncode == 0
    # Schedules a quarter of a second apart, as after a restart: kept, but rounded up
    # to the tick, so they poll in one wave a second.
    with sqlite3.connect(tmp_path / "aw.db") as db:
        for i, name in enumerate(names):
            db.execute("UPDATE sources SET next_poll_at = ? WHERE name = ?",
                       (time.time() + 3 + i * 0.25, name))  # fmt: skip
    first = len(feeds.requests)
    proc = start_cli("run", config=config)
    try:
        feeds.wait_for(first + 4 * 7, timeout=30)
    finally:
        proc.kill()
        proc.wait()
    times = sorted(r["time"] for r in feeds.requests[first:])
    waves = [[times[0]]]
    for t in times[1:]:
        if t - waves[-1][0] < 0.5:
            waves[-1].append(t)
        else:
            waves.append([t])
    # (the first wave may be cut by start-up: a source overdue by then polls at once)
    assert all(len(w) == 4 for w in waves[1:-1]), f"polls not grouped by tick: {times}"
