"""Engine v2: the Source API a drop-in stands on, and failures that are never silent.

Drop-ins are written into a test's `sources/` folder the way a user adds one;
`agentwatch run` is a subprocess; /health and `status` are read as an operator
would. The store-level tests call the Store and the Pipeline directly, because a
kill between an LLM call and its commit cannot be hit by timing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import signal
import sqlite3
import time
from pathlib import Path
from textwrap import dedent

import pytest
from helpers import rows, wait_until
from test_ops import drop_in, free_port, get, wait_health, write_config

import agentwatch
from agentwatch import Item, RateBudget, Source, SourceConfig, Store

README = Path(__file__).resolve().parent.parent / "README.md"

# -- a drop-in that misbehaves on demand ---------------------------------------

MISBEHAVING = '''
"""Test drop-in: returns what a flag file says, the way a buggy plugin would."""
import json
import math
import datetime
from dataclasses import dataclass

from agentwatch import Item, Secret, Source, source


@source("misbehave")
class Misbehave(Source):
    @dataclass(frozen=True)
    class Options:
        mode_file: str
        api_key: Secret = Secret("")

    async def poll(self):
        mode = open(self.options.mode_file).read().strip()
        self.log.info("polling with key %s in mode %s", self.options.api_key, mode)
        if mode == "good":
            return [Item(item_id="good-1", title="a good item")]
        if mode == "datetime":
            return [Item(item_id="x", published_at=datetime.datetime.now())]
        if mode == "nan":
            return [Item(item_id="x", published_at=math.nan)]
        if mode == "extra":
            return [Item(item_id="x", extra={"when": object()})]
        if mode == "no-id":
            return [Item(item_id="")]
        if mode == "int-title":
            return [Item(item_id="x", title=42)]
        if mode == "not-item":
            return [{"item_id": "x"}]
        if mode == "not-list":
            return None
        raise RuntimeError(f"the plugin broke (key {self.options.api_key})")
'''

# Each invalid answer, and the words its failure is reported with.
INVALID_MODES = {
    "datetime": "published_at datetime.datetime(",
    "nan": "published_at nan",
    "extra": "extra that is not JSON",
    "no-id": "has no item_id",
    "int-title": "title of type int",
    "not-item": "is a dict, not an Item",
    "not-list": "poll returned NoneType",
    "raise": "the plugin broke (key ***)",
}
KEY = "sk-plugin-secret-1234567890"


def test_invalid_items_and_raising_polls_make_a_failing_source_not_a_dead_one(
    tmp_path, slack, feeds, start_cli, run_cli
):
    from fakes import rss

    drop_in(tmp_path, "misbehave", MISBEHAVING)
    mode = tmp_path / "mode"
    mode.write_text("good")
    feeds.set("/ok.xml", rss([{"title": "old", "link": "https://x/old"}]))
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        settings='retry_max = "1s"\ndb = "aw.db"',
        rest=f"""
        [llm]
        provider = "none"

        [slack]
        webhook_url = "${{SLACK_WEBHOOK_URL}}"

        [[sources]]
        name = "bad"
        type = "misbehave"
        every = "1s"
        mode_file = "{mode}"
        api_key = "{KEY}"

        [[sources]]
        name = "fine"
        type = "rss"
        every = "1s"
        url = "{feeds.url}/ok.xml"
        """,
    )
    proc = start_cli("run", config=config)
    db = tmp_path / "aw.db"
    wait_until(
        lambda: rows(db, "SELECT * FROM sources WHERE name='bad' AND last_ok_at IS NOT NULL")
    )
    for bad_mode, words in INVALID_MODES.items():
        mode.write_text(bad_mode)
        # Each invalid answer is one more failed poll, with its reason; the loop lives on.
        wait_until(
            lambda w=words: any(w in r["last_error"] for r in rows(db, "SELECT last_error "
                                "FROM sources WHERE name = 'bad'")),
            timeout=20, what=f"the {bad_mode!r} poll to fail with {words!r}",
        )  # fmt: skip
        health = wait_health(port, proc=proc)
        bad = health["sources"]["bad"]
        assert bad["consecutive_failures"] >= 1
        assert bad["last_error_kind"] in ("invalid_item", "bug")
        assert health["sources"]["fine"]["consecutive_failures"] == 0
    assert proc.returncode is None, "the process stays up"
    stored = {r["item_id"] for r in rows(db, "SELECT item_id FROM items WHERE source = 'bad'")}
    assert stored == {"good-1"}, "nothing of an invalid poll is stored"

    # The declared secret never shows: not in the log, /health, status or metrics.
    health_text = get(port, "/health")[2].decode()
    metrics_text = get(port, "/metrics")[2].decode()
    assert 'agentwatch_source_failing{source="bad"' in metrics_text
    status = run_cli("status", config=config)
    assert status.returncode == 0, status.stderr
    proc.kill()
    proc.wait()
    log_text = (tmp_path / "agentwatch.log").read_text()
    assert "the plugin broke (key ***)" in log_text
    assert "datetime" in log_text and "published_at" in log_text  # the reason is logged
    for text in (log_text, health_text, metrics_text, status.stdout + status.stderr):
        assert KEY not in text


def test_the_readme_drop_in_runs_as_written_and_its_items_reach_slack(
    tmp_path, slack, feeds, make_config, start_cli
):
    text = README.read_text()
    section = text[text.index("## Writing a source") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) < 60
    drop_in(tmp_path, "jsonposts", code)

    def posts(n: int) -> str:
        return json.dumps(
            [
                {
                    "id": i,
                    "title": f"Post {i} about acme",
                    "url": f"https://forum.example/p/{i}",
                    "author": "ann",
                    "created": time.time() - 60 * (n - i),
                    "body": f"body {i}",
                }
                for i in range(n, 0, -1)
            ]
        )

    feeds.set("/posts.json", posts(2), content_type="application/json")
    token = "tok-readme-0123456789"
    config = make_config(
        f"""
        [agentwatch]
        db = "aw.db"
        health = ""
        log_file = "aw.log"

        [llm]
        provider = "none"

        [slack]
        webhook_url = "${{SLACK_WEBHOOK_URL}}"

        [[sources]]
        name = "forum"
        type = "jsonposts"
        every = "1s"
        url = "{feeds.url}/posts.json"
        token = "${{POSTS_TOKEN}}"
        """
    )
    proc = start_cli("run", config=config, env={"POSTS_TOKEN": token})
    feeds.wait_for(2, path="/posts.json")  # the baseline and an unchanged poll
    assert slack.posts() == []
    feeds.set("/posts.json", posts(3), content_type="application/json")
    slack.wait_for(1)
    time.sleep(1.5)
    assert len(slack.posts()) == 1
    assert "https://forum.example/p/3" in slack.text() and "Post 3 about acme" in slack.text()
    asked = [r for r in feeds.requests if r["path"] == "/posts.json"]
    assert {r["headers"].get("authorization") for r in asked} == {f"Bearer {token}"}
    assert any(r["status"] == 304 for r in asked), "conditional GET, validators kept per URL"
    proc.kill()
    proc.wait()
    assert token not in (tmp_path / "aw.log").read_text()


# -- the stage transaction ------------------------------------------------------


def _stored_item(store: Store, stages: tuple = ("classify", "notify")) -> sqlite3.Row:
    config = SourceConfig(name="s", type="rss")
    rows_ = agentwatch.admit(
        config, [Item("i1", "t")], set(), first_poll=False, baseline=True, max_age=1e9,
        stages=lambda item: stages, now=time.time(),
    )  # fmt: skip
    store.record_poll("s", rows_, state={}, validators={}, next_poll_at=0)
    return store.db.execute("SELECT * FROM items").fetchone()


def usage() -> agentwatch.LLMUsage:
    return agentwatch.LLMUsage(model="claude-haiku-5-5", input_tokens=100, output_tokens=20,
                               cost_usd=0.0002)  # fmt: skip


def test_a_stage_result_and_its_llm_usage_commit_together_or_not_at_all(tmp_path):
    store = Store(tmp_path / "aw.db")
    row = _stored_item(store)
    store.record_stage(row, {"stage": "notify", "classification": "{}"}, usage(), "classify")
    assert store.db.execute("SELECT stage FROM items").fetchone()[0] == "notify"
    assert store.db.execute("SELECT COUNT(*) FROM llm_usage").fetchone()[0] == 1

    # The usage insert fails: the result is not stored either (and vice versa).
    store.db.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON llm_usage BEGIN SELECT RAISE(ABORT, 'disk'); END"
    )
    with pytest.raises(sqlite3.Error):
        store.record_stage(row, {"stage": "done", "status": "done"}, usage(), "draft")
    assert store.db.execute("SELECT stage FROM items").fetchone()[0] == "notify"
    assert store.db.execute("SELECT COUNT(*) FROM llm_usage").fetchone()[0] == 1
    assert not store.db.in_transaction


class FlakyStore(Store):
    """A store whose stage writes fail while `refusing` (a full disk, a held lock)."""

    refusing = True

    def record_stage(self, *args, **kwargs):
        if self.refusing:
            raise sqlite3.OperationalError("database or disk is full")
        return super().record_stage(*args, **kwargs)


class CountingLLM:
    """A narrow stand-in for the LLM: counts the (paid) calls."""

    def __init__(self):
        self.calls = 0

    async def classify(self, row, *context):
        self.calls += 1
        result = {"relevant": True, "sentiment": "neutral", "intent": "other",
                  "urgency": "low", "summary": "s"}  # fmt: skip
        return result, usage()


def test_a_refused_write_after_an_llm_call_is_retried_not_the_call(tmp_path, caplog):
    async def scenario():
        store = FlakyStore(tmp_path / "aw.db")
        store.refusing = False
        _stored_item(store, ("classify",))
        store.refusing = True
        config = agentwatch.Config(
            tmp_path / "c.toml", agentwatch.Settings(), agentwatch.LLMSettings(),
            agentwatch.SlackSettings(), [SourceConfig(name="s", type="rss")],
        )  # fmt: skip
        llm = CountingLLM()
        rt = agentwatch.Runtime(config=config, store=store, http=None, llm=llm,
                                slack=None, dry_run=True)  # fmt: skip
        pipeline = agentwatch.Pipeline(rt)
        assert pipeline.dispatch_due() == 1
        await asyncio.wait(list(pipeline.busy.values()))
        assert llm.calls == 1 and pipeline.unsaved, "the outcome is kept, not lost"
        assert rt.store_failing_since is not None and "disk is full" in rt.store_error
        # Every tick while the disk is full: no new LLM call, no busy loop.
        for _ in range(5):
            pipeline.dispatch_due()
            await asyncio.sleep(0.3)
            if pipeline.busy:
                await asyncio.wait(list(pipeline.busy.values()))
        assert llm.calls == 1
        tries = next(iter(pipeline.unsaved.values())).tries
        assert 1 <= tries <= 2, "refused writes back off"
        store.refusing = False
        deadline = time.monotonic() + 10
        while pipeline.unsaved and time.monotonic() < deadline:
            pipeline.dispatch_due()
            await asyncio.sleep(0.2)
        if pipeline.busy:
            await asyncio.wait(list(pipeline.busy.values()))
        row = store.db.execute("SELECT * FROM items").fetchone()
        paid = store.db.execute("SELECT COUNT(*) FROM llm_usage").fetchone()[0]
        return llm.calls, row, paid, rt.store_failing_since

    calls, row, paid, failing = asyncio.run(scenario())
    assert calls == 1, "the LLM was paid once"
    assert paid == 1, "and counted once against the budget"
    assert row["classification"] and row["status"] == "done"
    assert failing is None


def test_a_locked_database_while_items_flow_posts_each_once_and_loses_none(
    tmp_path, slack, feeds, make_config, start_cli
):
    from fakes import rss

    def entries(n):
        return [{"title": f"acme item {i}", "link": f"https://x/{i}", "guid": f"g{i}"}
                for i in range(n)]  # fmt: skip

    feeds.set("/f.xml", rss(entries(1)))
    config = make_config(
        f"""
        [agentwatch]
        db = "aw.db"
        health = ""
        log_file = "aw.log"
        retry_base = "1s"

        [llm]
        provider = "none"

        [slack]
        webhook_url = "${{SLACK_WEBHOOK_URL}}"

        [[sources]]
        name = "f"
        type = "rss"
        every = "1s"
        url = "{feeds.url}/f.xml"
        """
    )
    proc = start_cli("run", config=config)
    db = tmp_path / "aw.db"
    wait_until(lambda: rows(db, "SELECT 1 FROM sources WHERE last_ok_at IS NOT NULL"))
    other = sqlite3.connect(db, timeout=1)
    try:
        for round_ in range(3):
            feeds.set("/f.xml", rss(entries(5 * (round_ + 1) + 1)))
            # Let the new items be admitted and start their notify stage, then hold
            # the write lock longer than the process's busy_timeout (5 s).
            wait_until(lambda r=round_: len(slack.posts()) >= 5 * r + 1, timeout=20)
            other.execute("BEGIN EXCLUSIVE")
            time.sleep(6.5)
            other.execute("ROLLBACK")
        wait_until(lambda: len(rows(db, "SELECT 1 FROM items WHERE status='done'")) == 15,
                   timeout=40, what="every item done")  # fmt: skip
    finally:
        other.close()
    time.sleep(2)
    posted = slack.texts()
    assert proc.returncode is None
    assert len(posted) == 15 and len(set(posted)) == 15, "each item posted once, none lost"
    assert len(rows(db, "SELECT 1 FROM items WHERE status='pending'")) == 0
    log_text = (tmp_path / "aw.log").read_text()
    assert "database error" in log_text and "locked" in log_text


# -- the scheduler and the budgets -----------------------------------------------


class Quiet(Source):
    """A narrow test source: one item per poll; polls take `pause` seconds."""

    pause = 0.0

    async def poll(self):
        await asyncio.sleep(self.pause)
        return []


def test_a_rate_budget_wait_lends_the_poll_slot_to_other_sources():
    async def scenario():
        slots = asyncio.Semaphore(1)
        config = SourceConfig(name="a", type="quiet")
        waiting = Quiet(config, agentwatch.Settings(), None, {})
        other = Quiet(SourceConfig(name="b", type="quiet"), agentwatch.Settings(), None, {})
        budget = waiting.rate_budget("k")
        budget.penalize(0.6)

        async def hold_slot_and_wait():
            await slots.acquire()
            waiting._slot, waiting._slot_held = slots, True
            await budget.acquire()
            done_at = time.monotonic()
            slots.release()
            return done_at

        async def other_poll():
            await asyncio.sleep(0.05)
            async with slots:
                await other.poll()
                return time.monotonic()

        return await asyncio.gather(hold_slot_and_wait(), other_poll())

    waited_until, other_done = asyncio.run(scenario())
    assert other_done < waited_until, "the other source polled while the first waited"


def test_a_paced_budget_serves_its_waiters_in_the_order_they_came():
    # Three callers that ask again as soon as they are served, and a fourth that
    # asks once: it goes out within one round, not whenever it wins a race.
    async def scenario():
        budget = RateBudget("k")
        budget.pace(0.05)
        order = []

        async def eager(name):
            for _ in range(8):
                await budget.acquire()
                order.append(name)

        async def once():
            await asyncio.sleep(0.12)
            await budget.acquire()
            order.append("once")

        await asyncio.gather(*(eager(n) for n in "abc"), once())
        return order

    order = asyncio.run(scenario())
    assert order.index("once") <= 7, order
    later = [name for name in order[2:] if name != "once"]
    assert later[:9] == ["b", "c", "a"] * 3, order  # in turn


def test_retry_after_and_times_are_bounded_and_total():
    assert agentwatch.parse_retry_after("inf") is None
    assert agentwatch.parse_retry_after("nan") is None
    assert agentwatch.parse_retry_after("1e12") == 86400.0
    assert agentwatch.parse_retry_after("1e12", cap=1800) == 1800
    assert agentwatch.parse_retry_after("-5") == 0.0
    assert agentwatch.parse_retry_after("garbage") is None
    assert agentwatch.iso(math.inf) is None and agentwatch.iso(1e20) is None
    assert agentwatch.human_duration(math.inf) == "0s"
    budget = RateBudget("x")
    budget.settle({"retry-after": "inf", "x-ratelimit-remaining": "nan", "x-ratelimit-reset": "1"})
    assert budget.delay(time.monotonic()) == 0


def test_a_hostile_retry_after_cannot_push_a_source_to_infinity(
    tmp_path, feeds, start_cli, run_cli
):
    feeds.set("/f.xml", "busy", status=429, headers={"Retry-After": "1e12"})
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        settings='db = "aw.db"\nretry_max = "10m"',
        rest=f"""
        [llm]
        provider = "none"

        [[sources]]
        name = "f"
        type = "rss"
        every = "1s"
        url = "{feeds.url}/f.xml"
        """,
    )
    proc = start_cli("run", config=config)
    db = tmp_path / "aw.db"
    wait_until(lambda: rows(db, "SELECT 1 FROM sources WHERE consecutive_failures > 0"))
    row = rows(db, "SELECT next_poll_at FROM sources")[0]
    assert row["next_poll_at"] - time.time() <= 600 * 1.1 + 5, "clamped to retry_max"
    health = wait_health(port, proc=proc)
    assert health["sources"]["f"]["last_error_kind"] == "rate_limited"
    status = run_cli("status", config=config)
    assert status.returncode == 0, status.stderr


SLOW = """
import asyncio
import time
from dataclasses import dataclass

from agentwatch import Source, source


@source("slow")
class Slow(Source):
    @dataclass(frozen=True)
    class Options:
        log_file: str

    async def poll(self):
        with open(self.options.log_file, "a") as log:
            log.write(f"{self.name} start {time.time()}\\n")
        await asyncio.sleep(1.5)  # longer than its `every`
        with open(self.options.log_file, "a") as log:
            log.write(f"{self.name} end {time.time()}\\n")
        return []
"""


def test_a_poll_longer_than_its_interval_never_overlaps_itself(tmp_path, start_cli):
    drop_in(tmp_path, "slow", SLOW)
    polls = tmp_path / "polls.log"
    port = free_port()
    config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"\n' + "".join(
        f'[[sources]]\nname = "{name}"\ntype = "slow"\nlog_file = "{polls}"\nevery = "1s"\n'
        for name in ("a", "b")))  # fmt: skip
    proc = start_cli("run", config=config)

    def spans(name: str) -> list[tuple[float, float]]:
        lines = [line.split() for line in polls.read_text().splitlines()] if polls.exists() else []
        starts = [float(t) for n, what, t in lines if n == name and what == "start"]
        ends = [float(t) for n, what, t in lines if n == name and what == "end"]
        return list(zip(starts, ends, strict=False))

    wait_until(lambda: min(len(spans("a")), len(spans("b"))) >= 3,
               timeout=30, what="three polls of each source")  # fmt: skip
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    for name in ("a", "b"):
        mine = spans(name)
        assert all(start < end for start, end in mine)
        assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(mine)), mine
    # ...while two sources poll at the same time: both were due at start.
    (a_start, a_end), (b_start, b_end) = spans("a")[0], spans("b")[0]
    assert a_start < b_end and b_start < a_end


def test_v1_drop_in_names_keep_working(tmp_path):
    code = dedent("""
        from dataclasses import dataclass
        from agentwatch import source, Source, Item, TransientError, PermanentError


        @source("v1echo")
        class Echo(Source):
            baseline = False

            @dataclass(frozen=True)
            class Options:
                words: str
                token: str = ""

            async def poll(self) -> list[Item]:
                self.state["n"] = self.state.get("n", 0) + 1
                self.log.info("poll %d", self.state["n"])
                return [Item(item_id=w, title=w) for w in self.options.words.split()]
    """)
    drop_in(tmp_path, "v1echo", code)
    path = tmp_path / "agentwatch.toml"
    path.write_text('[[sources]]\nname = "e"\ntype = "v1echo"\nwords = "a b"\n'
                    'token = "v1-token-secret"\n')  # fmt: skip
    config = agentwatch.load_config(path)
    src = agentwatch.make_source(config.sources[0], config.agentwatch, None, {})
    assert src.baseline is False, "baseline = False still means: report the first poll"
    assert "v1-token-secret" in config.secrets(), "a v1 option named token is still a secret"
    items = asyncio.run(src.poll())
    assert [i.item_id for i in agentwatch.validate_items(items, "e")] == ["a", "b"]


def test_secrets_inside_urls_are_redacted(tmp_path):
    path = tmp_path / "agentwatch.toml"
    path.write_text(
        '[[sources]]\nname = "private"\ntype = "rss"\n'
        'url = "https://user:hunter22pass@example.com/feed?feed=abcdef123456&user=me&x=1"\n'
    )
    secrets = agentwatch.load_config(path).secrets()
    assert "abcdef123456" in secrets and "hunter22pass" in secrets
    assert "me" not in secrets
