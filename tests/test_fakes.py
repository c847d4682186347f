"""The fakes behave like the services they stand for (the SDK test uses the real anthropic SDK)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime

import anthropic
import feedparser
import httpx2
import pytest
from fakes import (
    ATOM_TYPE,
    GARBAGE_FEED_BODY,
    FakeSlack,
    atom,
    default_classifier,
    rss,
    slack_payload_problem,
)

CLASSIFY_TOOL = {
    "name": "classify",
    "description": "Record the classification of one item.",
    "input_schema": {
        "type": "object",
        "properties": {
            "relevant": {"type": "boolean"},
            "sentiment": {"enum": ["positive", "neutral", "negative"]},
            "intent": {"type": "string"},
            "urgency": {"enum": ["low", "normal", "high"]},
            "summary": {"type": "string"},
        },
        "required": ["relevant", "sentiment", "intent", "urgency", "summary"],
    },
}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- environment ---------------------------------------------------------------


def test_offline_env_points_outside_urls_at_a_closed_port(offline):
    assert os.environ["ANTHROPIC_BASE_URL"] == offline
    assert os.environ["SLACK_WEBHOOK_URL"].startswith(offline)
    assert os.environ["ANTHROPIC_API_KEY"] == "test-key"
    assert "AGENTWATCH_CONFIG" not in os.environ
    assert not {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"} & set(os.environ)
    with pytest.raises(httpx2.ConnectError):
        httpx2.post(offline + "/v1/messages", timeout=2)


def test_fixtures_point_env_at_their_fake(slack, anthropic_fake):
    assert os.environ["ANTHROPIC_BASE_URL"] == anthropic_fake.url
    assert os.environ["SLACK_WEBHOOK_URL"] == slack.url + "/hooks/env"


# -- Slack -------------------------------------------------------------------------


def test_slack_scripted_429_then_ok(slack):
    slack.script([(429, "rate_limited", {"Retry-After": "1"})], path="/hooks/A")
    with httpx2.Client() as client:
        first = client.post(slack.url + "/hooks/A", json={"text": "hello"})
        second = client.post(slack.url + "/hooks/A", json={"text": "hello"})
        other = client.post(slack.url + "/hooks/B", json={"text": "b"})
    assert (first.status_code, first.text, first.headers["retry-after"]) == (
        429,
        "rate_limited",
        "1",
    )
    assert (second.status_code, second.text) == (200, "ok")
    assert other.status_code == 200
    assert [r["status"] for r in slack.requests] == [429, 200, 200]
    assert len(slack.posts("/hooks/A")) == 1
    assert slack.texts() == ["hello", "b"]


def test_slack_permanent_failure_and_back(slack):
    slack.set_default(404, "channel_not_found")
    with httpx2.Client() as client:
        for _ in range(3):
            r = client.post(slack.url + "/hooks/A", json={"text": "x"})
            assert (r.status_code, r.text) == (404, "channel_not_found")
        slack.set_default(200, "ok")
        assert client.post(slack.url + "/hooks/A", json={"text": "y"}).text == "ok"
    assert len(slack.requests) == 4
    assert slack.texts() == ["y"]


def test_slack_validates_payloads_like_slack(slack):
    with httpx2.Client() as client:
        bad_json = client.post(slack.url + "/h", content=b"{not json")
        no_text = client.post(slack.url + "/h", json={"username": "x"})
        empty_section = client.post(
            slack.url + "/h",
            json={
                "text": "t",
                "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": ""}}],
            },
        )
    assert (bad_json.status_code, bad_json.text) == (400, "invalid_payload")
    assert (no_text.status_code, no_text.text) == (400, "no_text")
    assert (empty_section.status_code, empty_section.text) == (400, "invalid_blocks")
    assert slack.posts() == []
    long_header = {"type": "header", "text": {"type": "plain_text", "text": "x" * 151}}
    assert slack_payload_problem({"text": "t", "blocks": [long_header]}) == "invalid_blocks"
    assert slack_payload_problem({"text": "t", "blocks": [{"type": "divider"}] * 51})


def test_slack_texts_walks_blocks(slack):
    payload = {
        "text": "fallback",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "Title"}},
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "body"},
                "fields": [{"type": "mrkdwn", "text": "*labels*"}],
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "ctx"}]},
        ],
    }
    httpx2.post(slack.url + "/hooks/A", json=payload)
    assert slack.texts("/hooks/A") == ["fallback\nTitle\nbody\n*labels*\nctx"]
    assert "ctx" in slack.text()


def test_slack_wait_for_wakes_on_delivery(slack):
    def post_later():
        time.sleep(0.2)
        httpx2.post(slack.url + "/hooks/A", json={"text": "late"})

    threading.Thread(target=post_later).start()
    posts = slack.wait_for(1, timeout=5)
    assert posts[0]["payload"] == {"text": "late"}
    assert slack.wait_for(lambda s: s.text() == "late")
    with pytest.raises(AssertionError, match="timed out"):
        slack.wait_for(2, timeout=0.2)


def test_slack_keeps_connections_alive():
    with FakeSlack() as fake:
        conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
        socks = []
        for _ in range(2):
            conn.request("POST", "/hooks/A", b'{"text": "x"}', {"Content-Type": "application/json"})
            assert conn.getresponse().read() == b"ok"
            socks.append(conn.sock)
        assert socks[0] is socks[1] is not None  # the second request reused the socket
        conn.close()
    assert len(fake.posts()) == 2


# -- Anthropic, through the real SDK ----------------------------------------------------


def sdk(fake, **kwargs) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=fake.url, api_key="k", **{"max_retries": 0, **kwargs})


async def classify(client, text: str, **kwargs):
    return await client.messages.create(
        model="claude-haiku-5-5",
        max_tokens=500,
        system="Classify the item.",
        messages=user(text),
        tools=[CLASSIFY_TOOL],
        tool_choice={"type": "tool", "name": "classify"},
        **kwargs,
    )


def test_anthropic_forced_tool_returns_classification(anthropic_fake):
    async def main():
        async with sdk(anthropic_fake) as client:
            return await classify(
                client,
                "Classify this; intent is one of bug_report, question.\n"
                "<item>\nTitle: App crashes on start\nIt crashes every time.\n</item>",
            )

    message = asyncio.run(main())
    assert message.stop_reason == "tool_use"
    assert message.model == "claude-haiku-5-5"
    (block,) = message.content
    assert block.type == "tool_use" and block.name == "classify" and block.id.startswith("toolu_")
    assert block.input == {
        "relevant": True,
        "sentiment": "negative",
        "intent": "bug_report",
        "urgency": "high",
        "summary": "Summary of: App crashes on start",
    }
    assert message.usage.input_tokens > 10 and message.usage.output_tokens > 0
    (request,) = anthropic_fake.requests
    assert request["kind"] == "classify"
    assert (
        request["headers"]["authorization"] == "Bearer k" or request["headers"]["x-api-key"] == "k"
    )
    assert anthropic_fake.calls("classify") == 1 and anthropic_fake.calls("text") == 0


def test_anthropic_structured_output_and_text(anthropic_fake):
    anthropic_fake.drafter = lambda body: "Custom draft for " + body["model"]

    async def main():
        async with sdk(anthropic_fake) as client:
            structured = await client.messages.create(
                model="m",
                max_tokens=100,
                messages=user("<item>I love it</item>"),
                output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}},
            )
            text = await client.messages.create(
                model="claude-sonnet-5-5", max_tokens=100, messages=user("Draft a reply")
            )
            return structured, text

    structured, text = asyncio.run(main())
    assert structured.stop_reason == "end_turn"
    assert '"sentiment": "positive"' in structured.content[0].text
    assert text.content[0].type == "text"
    assert text.content[0].text == "Custom draft for claude-sonnet-5-5"
    assert [r["kind"] for r in anthropic_fake.requests] == ["classify", "text"]


def test_anthropic_faults(anthropic_fake):
    anthropic_fake.script([("status", 529, "overloaded_error"), ("garbage",), ("bad_tool_input",)])

    async def main():
        async with sdk(anthropic_fake) as client:
            with pytest.raises(anthropic.APIStatusError) as overloaded:
                await classify(client, "x")
            with pytest.raises(json.JSONDecodeError):  # the SDK lets it through unwrapped
                await classify(client, "x")
            bad = await classify(client, "x")
            return overloaded.value, bad

    overloaded, bad = asyncio.run(main())
    assert isinstance(overloaded, anthropic.OverloadedError)
    assert overloaded.status_code == 529
    assert overloaded.body["error"]["type"] == "overloaded_error"
    assert bad.content[0].input == {"relevant": "maybe"}
    assert [r["status"] for r in anthropic_fake.requests] == [529, 200, 200]


def test_anthropic_hang_times_out(anthropic_fake):
    anthropic_fake.script([("hang",)])

    async def main():
        async with sdk(anthropic_fake, timeout=1) as client:
            await classify(client, "x")

    started = time.monotonic()
    with pytest.raises(anthropic.APITimeoutError):
        asyncio.run(main())
    assert time.monotonic() - started < 5


def test_anthropic_sdk_retries_through_scripted_errors(anthropic_fake):
    # retry-after-ms keeps the SDK's backoff short; "0" would fall back to its default.
    quick = {"retry-after-ms": "10"}
    anthropic_fake.script([("status", 529, "overloaded_error", quick)] * 2)

    async def main():
        async with sdk(anthropic_fake, max_retries=2) as client:
            return await classify(client, "great product")

    message = asyncio.run(main())
    assert message.content[0].input["sentiment"] == "positive"
    assert [r["status"] for r in anthropic_fake.requests] == [529, 529, 200]


def test_anthropic_kind_scripts_and_default_fault(anthropic_fake):
    anthropic_fake.script([("status", 500, "api_error")], kind="text")
    anthropic_fake.set_default_fault(("status", 429, "rate_limit_error", {"retry-after": "0"}))

    async def main():
        async with sdk(anthropic_fake) as client:
            with pytest.raises(anthropic.InternalServerError):
                await client.messages.create(model="m", max_tokens=9, messages=user("draft"))
            with pytest.raises(anthropic.RateLimitError):
                await classify(client, "x")
            anthropic_fake.set_default_fault(None)
            await classify(client, "x")

    asyncio.run(main())
    assert [r["status"] for r in anthropic_fake.requests] == [500, 429, 200]


def test_anthropic_requires_a_key(anthropic_fake):
    r = httpx2.post(anthropic_fake.url + "/v1/messages", json={"model": "m"})
    assert r.status_code == 401
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "authentication_error"
    r = httpx2.post(
        anthropic_fake.url + "/v1/messages", json={"model": "m"}, headers={"x-api-key": "k"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("this is irrelevant?", (False, "neutral", "other", "low")),
        ("it's broken", (True, "negative", "bug_report", "high")),
        ("the new bugs", (True, "negative", "bug_report", "high")),
        ("I love it, whatever", (True, "positive", "praise", "low")),
        ("how do I configure it?", (True, "neutral", "question", "normal")),
        ("debugging notes", (True, "neutral", "other", "low")),
    ],
)
def test_default_classifier(text, expected):
    result = default_classifier(
        {"messages": user(f"Labels: bug_report, praise?\n<item>{text}</item>")}
    )
    assert (
        result["relevant"],
        result["sentiment"],
        result["intent"],
        result["urgency"],
    ) == expected
    assert result["summary"] == "Summary of: " + text[:40]


def test_default_classifier_reads_title_and_content_blocks():
    body = {
        "messages": [
            {"role": "user", "content": "old"},
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [{"type": "text", "text": '{"title": "A long title here"}'}],
            },
        ]
    }
    assert default_classifier(body)["summary"] == "Summary of: A long title here"


# -- feeds ---------------------------------------------------------------------------


def test_feeds_conditional_get(feeds):
    url = feeds.set("/feed.xml", rss([{"title": "a", "link": "https://x/a"}]))
    with httpx2.Client() as client:
        first = client.get(url)
        assert first.status_code == 200 and first.headers["etag"] == feeds.etag("/feed.xml")
        again = client.get(url, headers={"If-None-Match": first.headers["etag"]})
        since = client.get(url, headers={"If-Modified-Since": first.headers["last-modified"]})
        head = client.head(url)
        feeds.set("/feed.xml", rss([{"title": "b", "link": "https://x/b"}]))
        changed = client.get(
            url,
            headers={
                "If-None-Match": first.headers["etag"],
                "If-Modified-Since": first.headers["last-modified"],
            },
        )
        missing = client.get(feeds.url + "/nope")
    assert (again.status_code, again.content) == (304, b"")
    assert since.status_code == 304
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(first.content))
    assert changed.status_code == 200 and b"<title>b</title>" in changed.content
    assert changed.headers["last-modified"] != first.headers["last-modified"]
    assert missing.status_code == 404
    assert (feeds.hits("/feed.xml"), feeds.not_modified("/feed.xml")) == (5, 2)


def test_feeds_faults(feeds):
    url = feeds.set("/f", "hello", content_type="text/plain")
    with httpx2.Client() as client:
        feeds.fault("/f", ("status", 500), times=1)
        assert client.get(url).status_code == 500
        assert client.get(url).text == "hello"  # times=1: back to normal
        feeds.fault("/f", ("garbage",))
        assert client.get(url).content == GARBAGE_FEED_BODY
        feeds.fault("/f", ("drop",))
        with pytest.raises(httpx2.RemoteProtocolError):
            client.get(url)
        feeds.fault("/f", ("delay", 0.3))
        started = time.monotonic()
        assert client.get(url).text == "hello"
        assert time.monotonic() - started >= 0.3
        feeds.fault("/f", None)
    assert [r["status"] for r in feeds.requests] == [500, 200, 200, None, 200]
    assert feeds.wait_for(5, path="/f")


def test_rss_and_atom_parse_with_feedparser():
    items = [
        {
            "title": "Tom & Jerry <3",
            "link": "https://example.com/a?x=1&y=2",
            "guid": "id-1",
            "description": "<b>bold</b> & more",
            "pub_date": datetime(2025, 5, 1, 12, 0, tzinfo=UTC),
            "author": "tom@example.com (Tom)",
        },
        {"title": "Second", "link": "https://example.com/b"},
    ]
    for build in (rss, atom):
        parsed = feedparser.parse(build(items, title="My feed"))
        assert not parsed.bozo, (build.__name__, parsed.bozo_exception)
        assert parsed.feed.title == "My feed"
        assert [e.title for e in parsed.entries] == ["Tom & Jerry <3", "Second"]
        assert [e.link for e in parsed.entries] == [
            "https://example.com/a?x=1&y=2",
            "https://example.com/b",
        ]
        first = parsed.entries[0]
        assert first.id == "id-1"
        assert first.published_parsed[:4] == (2025, 5, 1, 12)
        assert "bold" in first.summary


def test_feeds_serve_atom_to_feedparser(feeds):
    body = atom([{"title": "One", "link": "https://example.com/1"}])
    url = feeds.set("/atom", body, content_type=ATOM_TYPE)
    response = httpx2.get(url)
    parsed = feedparser.parse(response.content, response_headers=dict(response.headers))
    assert parsed.entries[0].title == "One"
    with pytest.raises(TypeError, match="unknown feed item keys"):
        rss([{"title": "x", "url": "typo"}])


# -- the CLI helpers (with a stand-in for agentwatch, which is being written) -------

STAND_IN = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("stdout line", flush=True)
print("ready", sys.argv[1:], file=sys.stderr, flush=True)
time.sleep(30)
"""


def test_cli_helpers(agentwatch, tmp_path, make_config):
    config = make_config("""
        [agentwatch]
        db = "x.db"
    """)
    assert config.read_text().startswith("[agentwatch]\ndb")
    agentwatch.command = [sys.executable, "-c", STAND_IN]
    process = agentwatch.start("run", config=config)
    match = process.wait_for_output(r"ready \[(.*)\]")
    assert "'--config'" in match.group(1)
    process.kill(signal.SIGTERM)
    assert process.wait(5) == 0
    assert "stdout line" in process.stdout_text()
    lingering = agentwatch.start("run")
    lingering.wait_for_output("ready")
    agentwatch.cleanup()  # what the fixture's finalizer does
    assert lingering.returncode == -signal.SIGKILL

    agentwatch.command = [sys.executable, "-c", "import os, sys; print(os.getcwd(), sys.argv[1:])"]
    result = agentwatch.run("status", env={"X": "1"})
    assert result.returncode == 0 and str(tmp_path) in result.stdout and "'status'" in result.stdout


def test_cli_finds_the_console_script(agentwatch):
    assert agentwatch.command[0].endswith("agentwatch")
