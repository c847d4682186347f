"""Slack app mode and the other destinations (issue 14), and Slack text that
Slack cannot refuse (issue 9, item 7)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections import Counter

import pytest
from conftest import closed_port
from fakes import FakeSlackAPI, rss, slack_payload_problem
from helpers import items, recent, rows, wait_until

import agentwatch

# -- mrkdwn that Slack accepts as we meant it ---------------------------------

_ENTITY = re.compile(r"&(?!(?:amp|lt|gt);)")
_ANGLE = re.compile(r"<([^<>]*)>")


def mrkdwn_problem(text: str) -> str | None:
    """What is malformed in `text` as Slack mrkdwn: a bare or cut entity, or a
    `<...>` that is cut, nested or not a link we made."""
    if _ENTITY.search(text):
        return f"an '&' that does not start an entity: {_ENTITY.search(text).start()}"
    rest = _ANGLE.sub("", text)
    if "<" in rest or ">" in rest:
        return "a '<' or '>' outside a whole <url|label>"
    for inside in _ANGLE.findall(text):
        if not re.fullmatch(r"https?://[^\s|]+\|[^|]*", inside):
            return f"<{inside[:40]}…> is not a <url|label> link"
    return None


def mrkdwn_objects(obj) -> list[dict]:
    found = []
    if isinstance(obj, dict):
        if obj.get("type") == "mrkdwn":
            found.append(obj)
        for value in obj.values():
            found.extend(mrkdwn_objects(value))
    elif isinstance(obj, list):
        for value in obj:
            found.extend(mrkdwn_objects(value))
    return found


def row(**kw) -> dict:
    base = {"id": 1, "source": "s", "item_id": "1", "kind": "", "title": "t",
            "url": "https://x/1", "author": "", "body": "", "classification": None,
            "draft": None, "summary": None}  # fmt: skip
    return {**base, **kw}


def test_mrkdwn_is_verbatim_and_never_cut_inside_a_link_or_an_entity():
    # A URL of query parameters: escaped, every '&' becomes five characters, so
    # the link alone is longer than a section may be.
    url = "https://x.example/search?" + "&".join(f"q{i}=a" for i in range(700))
    classification = json.dumps({"relevant": True, "sentiment": "negative",
                                 "intent": "complaint", "urgency": "high",
                                 "summary": "&<>" * 300})  # fmt: skip
    rows = [
        row(title="<b>&amp; " * 80, url=url, author="&" * 300, classification=classification,
            draft="&lt;" * 2000),
        row(title="short", url=url, body="a & b\n" * 900),
        row(title="x & y", url="https://x/" + "&" * 1990, draft="<!channel> & " * 500),
    ]  # fmt: skip
    payloads = [agentwatch.render_message([r]) for r in rows] + [agentwatch.render_message(rows)]
    for payload in payloads:
        assert slack_payload_problem(payload) is None
        objects = mrkdwn_objects(payload["blocks"])
        assert objects
        for obj in objects:
            assert obj.get("verbatim") is True, obj
            assert mrkdwn_problem(obj["text"]) is None, mrkdwn_problem(obj["text"])
            assert len(obj["text"]) <= agentwatch.SECTION_LIMIT
        assert mrkdwn_problem(payload["text"]) is None


def test_cut_counts_escaped_characters_and_keeps_entities_whole():
    for text in ("&" * 100, "a<b>c&" * 40, "<https://x|y>" * 20):
        for limit in (1, 2, 5, 6, 17, 60):
            out = agentwatch.cut(text, limit)
            assert len(out) <= limit
            assert mrkdwn_problem(out) is None, (text, limit, out)


# -- Slack app mode: exactly once --------------------------------------------

APP = """
[agentwatch]
db = "aw.db"
health = ""
retry_base = "1s"
retry_max = "2s"
max_attempts = {max_attempts}

[llm]
provider = "none"

[slack]
bot_token = "${{SLACK_BOT_TOKEN}}"
channel = "C0TEST123"
api_url = "{api_url}"
"""


@pytest.fixture
def slack_api(offline, monkeypatch):
    """A started FakeSlackAPI; $SLACK_BOT_TOKEN is its token."""
    with FakeSlackAPI(token="xoxb-test-token-1") as fake:
        monkeypatch.setenv("SLACK_BOT_TOKEN", fake.token)
        yield fake


def app_config(api, *sources: str, max_attempts: int = 3) -> str:
    return APP.format(api_url=api.url + "/api", max_attempts=max_attempts) + "".join(sources)


def rss_source(name: str, url: str, extra: str = "") -> str:
    return f'\n[[sources]]\nname = "{name}"\ntype = "rss"\nurl = "{url}"\nevery = "1s"\nbackfill = 20\n{extra}\n'


def entry(n: int, title: str) -> dict:
    return {"title": title, "link": f"https://forum.example/t/{n}", "guid": f"urn:post:{n}",
            "description": f"Body of post {n}", "pub_date": recent(1)}  # fmt: skip


def item_ids_posted(api, channel: str = "C0TEST123") -> list[str]:
    return [
        m["metadata"]["event_payload"]["item_id"]
        for m in api.messages(channel, replies=True)
        if m.get("metadata", {}).get("event_type") == "agentwatch_item"
    ]


def test_app_mode_posts_each_item_once_with_metadata_naming_it(
    slack_api, feeds, make_config, run_cli, tmp_path
):
    feeds.set("/a.xml", rss([entry(1, "Acme <!channel> crashes"), entry(2, "Acme & friends")]))
    config = make_config(app_config(slack_api, rss_source("forum", f"{feeds.url}/a.xml")))
    result = run_cli("run", "--once", config=config)
    assert result.returncode == 0, result.stderr
    messages = slack_api.messages()
    assert sorted(item_ids_posted(slack_api)) == ["urn:post:1", "urn:post:2"]
    for message in messages:
        assert message["metadata"]["event_payload"]["source"] == "forum"
        assert "<!channel>" not in json.dumps(message)
    posts = slack_api.calls_of("chat.postMessage")
    assert all(c["args"]["unfurl_links"] is False for c in posts)
    stored = rows(tmp_path / "aw.db", "SELECT * FROM deliveries")
    assert sorted(d["ts"] for d in stored) == sorted(m["ts"] for m in messages)
    assert "xoxb-test-token-1" not in result.stderr
    # A second run finds nothing new and posts nothing, and never needed to look anything up.
    assert run_cli("run", "--once", config=config).returncode == 0
    assert len(slack_api.messages()) == 2
    assert not slack_api.calls_of("conversations.history")


def test_kill_9_while_a_post_is_in_flight_delivers_exactly_once(
    slack_api, feeds, make_config, start_cli, tmp_path
):
    """The fake posts the message at once and answers 4 s later; agentwatch is
    killed in between, so the post happened but its ts was never stored."""
    config = make_config(app_config(slack_api, rss_source("forum", f"{feeds.url}/a.xml")))
    db = tmp_path / "aw.db"
    entries = []
    for round_ in range(3):
        entries.append(entry(round_, f"Acme story number {round_}"))
        feeds.set("/a.xml", rss(entries))
        slack_api.slow("chat.postMessage", 4.0)
        proc = start_cli("run", config=config)
        slack_api.wait_for(lambda n=round_ + 1: len(slack_api.messages()) == n, timeout=20)
        proc.kill(signal.SIGKILL)
        proc.wait()
        (mark,) = rows(db, "SELECT * FROM deliveries WHERE ts IS NULL")
        assert mark["started_at"], "the posting-started mark was committed before the call"

        slack_api.slow("chat.postMessage", 0.0)
        proc = start_cli("run", config=config)
        wait_until(
            lambda: {r["status"] for r in items(db).values()} == {"done"}, what="all items done"
        )
        proc.wait_for_output("was already in Slack .*not posted again")
        proc.kill(signal.SIGTERM)
        assert proc.wait() == 0
        posted = item_ids_posted(slack_api)
        assert sorted(posted) == sorted(e["guid"] for e in entries), posted
    lookups = [c for c in slack_api.calls_of("conversations.history")
               if c["args"].get("include_all_metadata") == "true"]  # fmt: skip
    assert len(lookups) == 3
    stored = rows(db, "SELECT ts FROM deliveries ORDER BY ts")
    assert [d["ts"] for d in stored] == [m["ts"] for m in slack_api.messages()]


def test_a_post_that_failed_ambiguously_is_looked_up_then_sent_once(
    slack_api, feeds, make_config, run_cli, tmp_path
):
    # A 500 does not say whether Slack posted: the retry looks first, finds nothing, posts.
    slack_api.fail("chat.postMessage", "internal_error", status=500)
    feeds.set("/a.xml", rss([entry(1, "Acme breaks")]))
    text = app_config(slack_api, rss_source("forum", f"{feeds.url}/a.xml"))
    config = make_config(text.replace('retry_base = "1s"', 'retry_base = "0s"'))
    assert run_cli("run", "--once", config=config).returncode == 0  # the retry comes at once
    assert [c["status"] for c in slack_api.calls_of("chat.postMessage")] == [500, 200]
    (lookup,) = slack_api.calls_of("conversations.history")
    assert lookup["args"]["include_all_metadata"] == "true"
    assert item_ids_posted(slack_api) == ["urn:post:1"]


# -- Slack app mode: every Web API error's route ------------------------------

RETRIED = ["ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"]
DEAD = {
    "channel_not_found": "channel ID",
    "not_in_channel": "/invite",
    "invalid_auth": "bot_token",
    "missing_scope": "chat:write scope",
    "account_inactive": "reinstall",
    "token_revoked": "revoked",
    "is_archived": "archived",
    "invalid_blocks": "refused",
}


def call_once(api, tmp_path, method="chat.postMessage", **args):
    import httpx2

    async def go():
        async with httpx2.AsyncClient() as http:
            client = agentwatch.SlackAPI(api.token, api.url + "/api", http, Counter())
            return await client.call(method, **args)

    return asyncio.run(go())


@pytest.mark.parametrize("code", RETRIED)
def test_a_passing_slack_error_is_retried(slack_api, tmp_path, code):
    slack_api.fail("chat.postMessage", code)
    with pytest.raises(agentwatch.TransientError) as caught:
        call_once(slack_api, tmp_path, channel="C0TEST123", text="hi")
    assert caught.value.kind == code


@pytest.mark.parametrize("code", sorted(DEAD))
def test_a_lasting_slack_error_is_dead_lettered_saying_what_to_do(slack_api, tmp_path, code):
    extra = (
        {"needed": "chat:write", "provided": "channels:history"} if code == "missing_scope" else {}
    )
    slack_api.fail("chat.postMessage", code, **extra)
    with pytest.raises(agentwatch.PermanentError) as caught:
        call_once(slack_api, tmp_path, channel="C0TEST123", text="hi")
    assert caught.value.kind == code
    assert code in str(caught.value) and DEAD[code] in str(caught.value)


def test_429_waits_its_retry_after_and_is_not_an_attempt(slack_api, tmp_path):
    slack_api.fail("chat.postMessage", "ratelimited", status=429, headers={"Retry-After": "1"})
    started = time.monotonic()
    answer = call_once(slack_api, tmp_path, channel="C0TEST123", text="hi")
    assert answer["ok"] and time.monotonic() - started >= 1.0
    assert [c["status"] for c in slack_api.calls_of("chat.postMessage")] == [429, 200]


def test_garbage_and_5xx_from_the_web_api_are_retried(slack_api, tmp_path):
    slack_api.fail("chat.postMessage", "x", status=502)
    with pytest.raises(agentwatch.TransientError, match="502"):
        call_once(slack_api, tmp_path, channel="C0TEST123", text="hi")


def test_not_in_channel_dead_letters_with_the_error_and_a_plain_log_line(
    slack_api, feeds, make_config, run_cli, tmp_path
):
    slack_api.channels["C0TEST123"]["member"] = False
    slack_api.scopes.discard("chat:write")
    feeds.set("/a.xml", rss([entry(1, "Acme breaks")]))
    config = make_config(
        app_config(
            slack_api,
            rss_source("forum", f"{feeds.url}/a.xml"),
            rss_source("other", f"{feeds.url}/a.xml", extra='slack_channel = "C0OTHER1"'),
        )
    )
    result = run_cli("run", "--once", config=config)
    assert result.returncode == 0
    dead = {
        r["source"]: r
        for r in rows(tmp_path / "aw.db", "SELECT * FROM items WHERE status = 'dead'")
    }
    assert "missing_scope" in dead["forum"]["last_error"]
    assert "chat:write" in dead["forum"]["last_error"]
    slack_api.scopes.add("chat:write")
    run_cli("dlq", "retry", "--all", config=config)
    result = run_cli("run", "--once", config=config)
    dead = {
        r["source"]: r
        for r in rows(tmp_path / "aw.db", "SELECT * FROM items WHERE status = 'dead'")
    }
    assert "not_in_channel" in dead["forum"]["last_error"]
    assert "channel_not_found" in dead["other"]["last_error"]
    assert (
        "Slack app: Slack chat.postMessage: not_in_channel: the app is not in the channel C0TEST123: invite it"
        in result.stderr
    )
    assert dead["forum"]["attempts"] == 1
    shown = run_cli("dlq", "list", config=config)
    assert "not_in_channel" in shown.stdout


def test_app_mode_config_is_checked(make_config, run_cli, slack_api):
    bad = make_config(
        APP.format(api_url="http://x", max_attempts=1).replace('"C0TEST123"', '"#alerts"')
    )
    result = run_cli("check", config=bad)
    assert result.returncode == 2 and "not a channel ID" in result.stderr


def test_metrics_count_web_api_calls(slack_api, feeds, make_config, start_cli):
    import httpx2

    feeds.set("/a.xml", rss([entry(1, "Acme breaks")]))
    text = app_config(slack_api, rss_source("forum", f"{feeds.url}/a.xml"))
    port = closed_port()
    config = make_config(text.replace('health = ""', f'health = "127.0.0.1:{port}"'))
    proc = start_cli("run", config=config)
    slack_api.wait_for(lambda: slack_api.messages())
    body = wait_until(
        lambda: (
            'method="chat.postMessage",status="200"} 1'
            in (
                httpx2.get(f"http://127.0.0.1:{port}/metrics").text
                if proc.returncode is None
                else ""
            )
        ),
        what="the metric",
    )
    assert body
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0


# -- Slack app mode: one thread per story --------------------------------------


def store_item(store, source: str, item_id: str, **kw) -> dict:
    fields = {"title": item_id, "url": "", "kind": "", "extra": "{}", **kw}
    with store.transaction() as db:
        db.execute(
            """INSERT INTO items (source, item_id, title, url, kind, extra, stages, stage, status,
               created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'notify', 'notify', 'pending', ?, ?)""",
            (source, item_id, fields["title"], fields["url"], fields["kind"], fields["extra"],
             time.time(), time.time()),
        )  # fmt: skip
    return store.db.execute(
        "SELECT * FROM items WHERE source = ? AND item_id = ?", (source, item_id)
    ).fetchone()


def deliver_all(api, tmp_path, *specs) -> list[str]:
    """Deliver items (source, item_id, fields) in order through a SlackApp; their ts."""
    import httpx2

    store = agentwatch.Store(tmp_path / "stories.db")
    settings = agentwatch.SlackSettings(bot_token=api.token, channel="C0TEST123",
                                        api_url=api.url + "/api")  # fmt: skip

    async def go():
        async with httpx2.AsyncClient() as http:
            app = agentwatch.SlackApp(settings, store, http, Counter())
            return [
                await app.deliver(store_item(store, source, item_id, **fields), "C0TEST123")
                for source, item_id, fields in specs
            ]

    try:
        return asyncio.run(go())
    finally:
        store.close()


def test_a_reddit_comment_on_a_post_already_sent_goes_in_its_thread(slack_api, tmp_path):
    post, comment, other = deliver_all(
        slack_api, tmp_path,
        ("r", "t3_abc", {"kind": "post", "url": "https://www.reddit.com/r/x/comments/abc/t/"}),
        ("r", "t1_def", {"kind": "comment", "extra": '{"post": "t3_abc"}',
                         "url": "https://www.reddit.com/r/x/comments/abc/t/def/"}),
        ("r", "t1_ghi", {"kind": "comment", "extra": '{"post": "t3_zzz"}'}),
    )  # fmt: skip
    assert [m["ts"] for m in slack_api.messages()] == [post, other]
    assert [m["ts"] for m in slack_api.replies("C0TEST123", post)] == [comment]
    (update,) = slack_api.calls_of("chat.update")
    assert update["args"]["ts"] == post
    assert "1 reply in the thread" in json.dumps(slack_api.messages()[0]["blocks"])
    # The first message still names its item, so exactly-once lookups still find it.
    assert slack_api.messages()[0]["metadata"]["event_payload"]["item_id"] == "t3_abc"


def test_the_same_link_from_another_source_joins_the_story(slack_api, tmp_path):
    first, again, third = deliver_all(
        slack_api, tmp_path,
        ("blog", "1", {"url": "https://www.example.com/post/launch/?utm_source=rss"}),
        ("hn", "2", {"url": "http://example.com/post/launch#comments"}),
        ("forum", "3", {"url": "https://example.com/post/launch?page=2"}),
    )  # fmt: skip
    assert [m["ts"] for m in slack_api.messages()] == [first, third]
    assert [m["ts"] for m in slack_api.replies("C0TEST123", first)] == [again]


def test_recovered_after_down_replies_and_the_first_message_says_for_how_long(slack_api, tmp_path):
    down, up, down_again = deliver_all(
        slack_api, tmp_path,
        ("site", "down:1000", {"kind": "down", "title": "site is down: 503"}),
        ("site", "recovered:1000", {"kind": "recovered", "extra": '{"downtime_s": 720}'}),
        ("site", "down:5000", {"kind": "down", "title": "site is down again"}),
    )  # fmt: skip
    assert [m["ts"] for m in slack_api.messages()] == [down, down_again]
    assert [m["ts"] for m in slack_api.replies("C0TEST123", down)] == [up]
    first = slack_api.messages()[0]
    assert "recovered after 12m · 1 reply in the thread" in json.dumps(
        first["blocks"], ensure_ascii=False
    )
    assert "site is down: 503" in first["text"]  # updated, still the outage's own message


def test_a_later_change_of_a_watched_page_goes_in_the_first_change_thread(slack_api, tmp_path):
    first, *later = deliver_all(
        slack_api, tmp_path,
        *(("page", f"change:{i}", {"kind": "changed"}) for i in range(3)),
    )  # fmt: skip
    assert [m["ts"] for m in slack_api.messages()] == [first]
    assert [m["ts"] for m in slack_api.replies("C0TEST123", first)] == later
    assert "2 replies in the thread" in json.dumps(slack_api.messages()[0]["blocks"])


def test_a_story_thread_end_to_end_survives_a_failed_update(
    slack_api, feeds, make_config, run_cli, tmp_path
):
    feeds.set("/a.xml", rss([entry(1, "Acme launches v2")]))
    same_link = {**entry(1, "Acme v2 is out"), "guid": "other:1"}
    same_link["link"] += "?utm_campaign=hn"
    feeds.set("/b.xml", rss([same_link]))
    slack_api.fail("chat.update", "internal_error")
    config = make_config(
        app_config(
            slack_api,
            rss_source("blog", f"{feeds.url}/a.xml"),
            rss_source("hn", f"{feeds.url}/b.xml"),
        )
    )
    result = run_cli("run", "--once", config=config)
    assert result.returncode == 0, result.stderr
    (first,) = slack_api.messages()
    (reply,) = slack_api.replies("C0TEST123", first["ts"])
    assert "could not update the first message of a story" in result.stderr
    assert {r["status"] for r in rows(tmp_path / "aw.db", "SELECT status FROM items")} == {"done"}
    stored = rows(tmp_path / "aw.db", "SELECT * FROM deliveries WHERE thread_ts IS NOT NULL")
    assert [(d["ts"], d["thread_ts"]) for d in stored] == [(reply["ts"], first["ts"])]


def test_a_reply_cut_off_in_flight_is_found_in_its_thread_not_posted_twice(slack_api, tmp_path):
    import httpx2

    store = agentwatch.Store(tmp_path / "stories.db")
    settings = agentwatch.SlackSettings(bot_token=slack_api.token, channel="C0TEST123",
                                        api_url=slack_api.url + "/api")  # fmt: skip
    link = {"url": "https://example.com/a"}

    async def go():
        async with httpx2.AsyncClient() as http:
            app = agentwatch.SlackApp(settings, store, http, Counter())
            first = await app.deliver(store_item(store, "a", "1", **link), "C0TEST123")
            reply = store_item(store, "b", "2", **link)
            slack_api.slow("chat.postMessage", 3.0)
            with pytest.raises(TimeoutError):  # the process dies with the post in flight
                await asyncio.wait_for(app.deliver(reply, "C0TEST123"), 1.0)
            slack_api.slow("chat.postMessage", 0.0)
            app = agentwatch.SlackApp(settings, store, http, Counter())  # a new process
            return first, await app.deliver(reply, "C0TEST123")

    try:
        first, reply_ts = asyncio.run(go())
    finally:
        store.close()
    assert [m["ts"] for m in slack_api.replies("C0TEST123", first)] == [reply_ts]
    (lookup,) = slack_api.calls_of("conversations.replies")
    assert lookup["args"]["ts"] == first
    assert len(slack_api.calls_of("chat.postMessage")) == 2


# -- Slack app mode: reactions ---------------------------------------------------


def test_reactions_on_its_messages_become_feedback_and_handled(
    slack_api, feeds, make_config, run_cli, start_cli, tmp_path
):
    feeds.set("/a.xml", rss([entry(i, f"Acme story {i}") for i in range(4)]))
    config = make_config(app_config(slack_api, rss_source("forum", f"{feeds.url}/a.xml")))
    assert run_cli("run", "--once", config=config).returncode == 0
    by_title = {m["text"].split("] ")[1].split(" https")[0]: m["ts"] for m in slack_api.messages()}
    slack_api.react("C0TEST123", by_title["Acme story 0"], "-1")
    slack_api.react("C0TEST123", by_title["Acme story 0"], "-1", user="U2")
    slack_api.react("C0TEST123", by_title["Acme story 0"], "+1::skin-tone-3")
    slack_api.react("C0TEST123", by_title["Acme story 1"], "+1")
    slack_api.react("C0TEST123", by_title["Acme story 2"], "white_check_mark")
    slack_api.react("C0TEST123", by_title["Acme story 3"], "tada")
    proc = start_cli("run", config=config)
    db = tmp_path / "aw.db"
    feedback = """SELECT items.title, feedback.verdict, feedback.origin FROM feedback
                  JOIN items ON items.id = feedback.item_row ORDER BY items.title"""
    found = wait_until(lambda: len(rows(db, feedback)) == 2 and rows(db, feedback), what="feedback")
    assert [(r["title"], r["verdict"], r["origin"]) for r in found] == [
        ("Acme story 0", "irrelevant", "slack"),
        ("Acme story 1", "relevant", "slack"),
    ]
    handled = wait_until(
        lambda: rows(db, "SELECT title FROM items WHERE handled_at IS NOT NULL"), what="handled"
    )
    assert [r["title"] for r in handled] == ["Acme story 2"]
    proc.wait_for_output(r"Slack reactions: 3 item\(s\) marked")
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    (read,) = slack_api.calls_of("conversations.history")
    assert float(read["args"]["oldest"]) < time.time() - 6 * 86400


def test_reactions_in_a_story_thread_are_read_and_a_second_pass_changes_nothing(
    slack_api, tmp_path
):
    import httpx2

    store = agentwatch.Store(tmp_path / "r.db")
    settings = agentwatch.SlackSettings(bot_token=slack_api.token, channel="C0TEST123",
                                        api_url=slack_api.url + "/api")  # fmt: skip
    link = {"url": "https://example.com/a"}

    async def go():
        async with httpx2.AsyncClient() as http:
            app = agentwatch.SlackApp(settings, store, http, Counter())
            await app.deliver(store_item(store, "a", "1", **link), "C0TEST123")
            reply = await app.deliver(store_item(store, "b", "2", **link), "C0TEST123")
            slack_api.react("C0TEST123", reply, "-1")
            return await app.read_reactions(), await app.read_reactions()

    try:
        first, second = asyncio.run(go())
        verdicts = store.db.execute("SELECT item_row, verdict FROM feedback").fetchall()
    finally:
        store.close()
    assert (first, second) == (1, 0)
    assert [tuple(v) for v in verdicts] == [(2, "irrelevant")]
    assert slack_api.calls_of("conversations.replies")


def test_a_missing_scope_while_reading_reactions_is_logged_once_and_posting_goes_on(
    slack_api, feeds, make_config, run_cli, start_cli
):
    feeds.set("/a.xml", rss([entry(1, "Acme story")]))
    config = make_config(app_config(slack_api, rss_source("forum", f"{feeds.url}/a.xml")))
    assert run_cli("run", "--once", config=config).returncode == 0
    slack_api.scopes.discard("channels:history")
    proc = start_cli("run", config=config)
    proc.wait_for_output("cannot read Slack reactions: .*missing_scope.*channels:history")
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
