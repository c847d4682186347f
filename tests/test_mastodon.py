"""The mastodon source: the recorded answers, then polling a fake Mastodon on loopback
(since_id, paging, ISO rate-limit resets, tokens, closed timelines), and one run
end to end."""

from __future__ import annotations

import signal
import time

import pytest
from agentwatch_sources.mastodon import id_key, mastodon_items, next_max_id, reset_seconds
from fake_apis import FakeMastodon, corpus, md_status
from sources_harness import e2e_config, harness, ids, run

from agentwatch import ConfigError, StageError, build_source_config

TOKEN = "mastodon-token-0123456789abcdef"


@pytest.fixture
def md():
    with FakeMastodon() as fake:
        fake.add_token(TOKEN)
        yield fake


# ###########################################################################
# Parsing the recorded answers
# ###########################################################################


def test_a_recorded_tag_timeline_page_becomes_statuses():
    recorded = corpus("mastodon/timeline_tag_page1_link_header.json")
    items = mastodon_items(recorded["body"])
    assert len(items) == 10 and len(set(ids(items))) == 10
    first = items[0]
    assert first.item_id == "117020582251615632"  # a string: too big for a float
    assert first.url == "http://localhost:3000/@mastodonpy_test_2/117020582251615632"
    assert first.author == "mastodonpy_test_2" and first.kind == "status"
    assert first.body.startswith("Toot number 29! #fgizts") and "<" not in first.body
    assert first.published_at == 1785592380.55
    assert next_max_id(recorded["headers"]["link"]) == "117020582177108552"
    assert sorted(ids(items), key=id_key, reverse=True) == ids(items)


def test_a_recorded_search_keeps_only_statuses_and_decodes_html():
    items = mastodon_items(corpus("mastodon/search_v2_mastodon_social.json")["body"])
    assert len(items) == 2
    reply = items[0]
    assert reply.kind == "reply" and reply.author == "greg@icosahedron.website"
    assert "@cancel @halcy not only is this the classic hip-hop" in reply.body
    assert "it's ALSO the dnb sample" in reply.body and "&#39;" not in reply.body
    assert mastodon_items(corpus("mastodon/search_v2_type_statuses_empty.json")["body"]) == []


def test_a_content_warning_is_the_title_and_custom_emoji_stay_text():
    (item,) = mastodon_items(
        [corpus("mastodon/status_mastodon_social_cw_emoji_edited.json")["body"]]
    )
    assert item.title == "CW: test post for mastodon.py stuff"
    assert ":trans_heart:" in item.body and "#ThisIsAHashtag" in item.body
    assert item.extra["edited_at"] == "2023-05-28T12:09:44.000Z"


def test_missing_accounts_null_content_integer_ids_and_reblogs():
    status = corpus("mastodon/status_mastodon_social_edited.json")["body"]
    odd = {**status, "account": None, "content": None, "id": 42}
    reblog = {**status, "id": "9", "reblog": dict(status)}
    items = mastodon_items([odd, dict(odd), reblog, {"content": "no id"}, "garbage"])
    assert ids(items) == ["42"] and items[0].author == "" and items[0].body == ""


def test_the_iso_rate_limit_reset_becomes_seconds():
    future = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + 120))
    assert 115 <= reset_seconds({"x-ratelimit-reset": future}) <= 121
    recorded = corpus("mastodon/search_v2_mastodon_social.json")["headers"]
    assert reset_seconds(recorded) == 0.0  # 2026-04-11: long past
    assert reset_seconds({}) is None


@pytest.mark.parametrize("answer", [{"error": "x"}, "nope", {"statuses": "no"}])
def test_json_that_is_not_statuses_is_a_bad_response(answer):
    with pytest.raises(StageError) as caught:
        mastodon_items(answer)
    assert caught.value.kind == "bad_response"


@pytest.mark.parametrize(
    ("table", "message"),
    [({}, "instance: is required"), ({"instance": "mastodon.social", "hashtag": "a"}, "instance must be"),
     ({"instance": "https://m.example"}, "needs one of hashtag or query"),
     ({"instance": "https://m.example", "hashtag": "a", "query": "b"}, "not both"),
     ({"instance": "https://m.example", "query": "acme"}, "query \\(search\\) needs token"),
     ({"instance": "https://m.example", "hashtag": "two words"}, "hashtag must be a word")],
)  # fmt: skip
def test_bad_options_are_config_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        build_source_config({"name": "m", "type": "mastodon", **table}, "sources[0]")


# ###########################################################################
# Polling
# ###########################################################################


def test_baseline_then_since_id(md):
    md.add(md_status("old one"), md_status("older one", tag="other"))

    async def go():
        async with harness() as h:
            src = h.source("mastodon", instance=md.url, hashtag="#Acme")
            assert len(await h.poll(src)) == 1
            assert "since_id" not in md.requests()[0]["query"]
            assert md.requests()[0]["path"] == "/api/v1/timelines/tag/Acme"
            new = md_status("Acme crashes on start", reply_to="1")
            md.add(new)
            found = await h.poll(src)
            assert ids(found) == [new["id"]] and found[0].kind == "reply"
            assert src.state["since_id"] == new["id"]
            assert await h.poll(src) == []
            assert md.requests()[2]["query"]["since_id"] == new["id"]

    run(go())


def test_a_burst_into_an_empty_timeline_is_paged_through(md):
    async def go():
        async with harness() as h:
            src = h.source("mastodon", instance=md.url, hashtag="acme")
            assert await h.poll(src) == []
            assert type(src).describe_state(src.state).startswith("no status found yet")
            md.add(*[md_status(f"acme {n}") for n in range(100)])
            found = await h.poll(src)
            assert len(set(ids(found))) == 100
            assert len(md.requests()) == 4  # 40 + 40 + 20
            # And with a since_id: a second burst is paged through down to it.
            md.add(*[md_status(f"acme again {n}") for n in range(50)])
            assert len(await h.poll(src)) == 50
            last = md.requests()[-2:]
            assert all(r["query"]["since_id"] == found[0].item_id for r in last)
            assert "max_id" in last[1]["query"]

    run(go())


def test_search_uses_the_token_and_min_id(md):
    md.add(md_status("we love acme", tag="x"))

    async def go():
        async with harness() as h:
            src = h.source("mastodon", instance=md.url, query="acme", token=TOKEN)
            assert len(await h.poll(src)) == 1
            first = md.requests()[0]
            assert first["path"] == "/api/v2/search" and first["query"]["type"] == "statuses"
            assert first["headers"]["authorization"] == f"Bearer {TOKEN}"
            await h.poll(src)
            assert md.requests()[1]["query"]["min_id"] == src.state["since_id"]

    run(go())


def test_a_server_with_closed_timelines_asks_for_a_token(md):
    md.public_tags = False

    async def go():
        async with harness() as h:
            src = h.source("mastodon", instance=md.url, hashtag="acme")
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            e = caught.value
            assert e.kind == "auth_failed" and "set `token`" in str(e)
            assert "/settings/applications" in str(e) and "read:statuses" in str(e)
            ok = h.source("mastodon", name="t", instance=md.url, hashtag="acme", token=TOKEN)
            assert await h.poll(ok) == []

    run(go())


def test_a_refused_token_is_auth_failed(md):
    async def go():
        async with harness() as h:
            src = h.source("mastodon", instance=md.url, hashtag="acme", token="wrong-token-value")
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            e = caught.value
            assert e.kind == "auth_failed" and "The access token is invalid" in str(e)
            assert "wrong-token-value" not in str(e)

    run(go())


def test_the_budget_reads_the_iso_reset_and_a_429_waits_for_it(md):
    md.rate_limit(2, window=3600)

    async def go():
        async with harness(fetch_timeout=1) as h:
            src = h.source("mastodon", instance=md.url, hashtag="acme")
            await h.poll(src)
            assert src.budget.remaining == 1 and src.budget.reset_at > time.monotonic() + 60
            await h.poll(src)  # the last one of the window
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == "rate_limited" and caught.value.retry_after > 60
            assert md.hits() == 2  # nothing sent before the reset

    run(go())


def test_a_429_holds_back_for_the_reset(md):
    md.script([("status", 429, "Too many requests")])

    async def go():
        async with harness(fetch_timeout=1) as h:
            src = h.source("mastodon", instance=md.url, hashtag="acme")
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            e = caught.value
            assert e.kind == "rate_limited" and e.retry_after == 60 and "resumes in 1m" in str(e)
            with pytest.raises(StageError):
                await h.poll(src)
            assert md.hits() == 1

    run(go())


@pytest.mark.parametrize(
    ("fault", "kind", "words"),
    [(("status", 503), "server_error", "answered 503"),
     (("html", 502), "server_error", "answered 502"),
     (("invalid_json",), "bad_response", "not JSON"),
     (("status", 404), "bad_response", "check `instance`"),
     (("status", 403, "This action is not allowed"), "blocked", "403 This action is not allowed")],
)  # fmt: skip
def test_failures_are_told_apart(md, fault, kind, words):
    md.script([fault])

    async def go():
        async with harness() as h:
            src = h.source("mastodon", instance=md.url, hashtag="acme", token=TOKEN)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == kind and words in str(caught.value)

    run(go())


# ###########################################################################
# End to end
# ###########################################################################


def test_new_statuses_reach_slack_once_and_the_token_never_shows(
    md, slack, anthropic_fake, make_config, start_cli, run_cli
):
    md.add(md_status("acme 1.0 is out"))
    config = e2e_config(make_config, "mastodon", instance=md.url, hashtag="acme",
                        token="${MASTODON_TOKEN}")  # fmt: skip
    env = {"MASTODON_TOKEN": TOKEN}
    proc = start_cli("run", config=config, env=env)
    md.wait_for(lambda: md.hits(status=200) >= 2, timeout=15)
    assert anthropic_fake.calls() == 0
    new = md_status("Acme crashes when I export", acct="ann@example.social")
    md.add(new)
    slack.wait_for(1, timeout=15)
    md.wait_for(lambda: md.hits(status=200) >= 5, timeout=15)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    assert len(slack.posts()) == 1 and new["url"] in slack.text()
    assert anthropic_fake.calls("classify") == 1
    status = run_cli("status", config=config, env=env)
    assert status.returncode == 0 and "newest status" in status.stdout
    for text in (proc.stderr_text(), proc.stdout_text(), status.stdout, slack.text()):
        assert TOKEN not in text
