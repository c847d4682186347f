"""The bluesky source: the recorded searchPosts answer, then a fake PDS on loopback
(sessions made once and shared, refreshed once on expiry, bad credentials,
paging with cursor, rate limits), and one run end to end."""

from __future__ import annotations

import signal
import time

import pytest
from agentwatch_sources.bluesky import bluesky_items, jwt_lifetime, limit_headers, post_link
from fake_apis import FakeBluesky, bs_post, corpus
from sources_harness import e2e_config, harness, ids, run

from agentwatch import ConfigError, StageError, build_source_config

HANDLE, PASSWORD = "acme.bsky.social", "abcd-efgh-ijkl-mnop"
SEARCH = "/xrpc/app.bsky.feed.searchPosts"
CREATE = "/xrpc/com.atproto.server.createSession"
REFRESH = "/xrpc/com.atproto.server.refreshSession"


@pytest.fixture
def bs():
    with FakeBluesky() as fake:
        fake.add_account(HANDLE, PASSWORD)
        yield fake


def opts(fake, **more) -> dict:
    return {
        "query": "acme",
        "handle": HANDLE,
        "app_password": PASSWORD,
        "service": fake.url,
        **more,
    }


# ###########################################################################
# Parsing the recorded answers
# ###########################################################################


def test_recorded_search_results_become_posts_and_replies():
    recorded = corpus("bluesky/searchPosts_q_redistricting.json")
    items, cursor = bluesky_items(recorded["body"])
    assert cursor == "25" and len(items) == 25 and len(set(ids(items))) == 25
    first = items[0]
    assert first.item_id == "at://did:plc:kkergqgbhb56ptpwj2wenkje/app.bsky.feed.post/3lpk2u6qo222m"
    assert first.url == "https://bsky.app/profile/socpaperbot.bsky.social/post/3lpk2u6qo222m"
    assert first.author == "socpaperbot.bsky.social" and first.kind == "post"
    assert first.title.startswith("Ends Versus Means: Public Opinion")
    assert first.published_at == 1747674609.813  # indexedAt, the server's clock
    kinds = [i.kind for i in items]
    assert kinds.count("reply") == 12
    labelled = [i for i in items if "!no-unauthenticated" in i.extra.get("author_labels", [])]
    assert len(labelled) == 4


def test_odd_times_missing_authors_and_bad_uris():
    post = corpus("bluesky/searchPosts_q_redistricting.json")["body"]["posts"][0]
    naive = {**post, "indexedAt": None, "author": None,
             "record": {**post["record"], "createdAt": "2023-08-07T05:49:40.501"}}  # fmt: skip
    answer = {"posts": [naive, dict(naive), {**post, "uri": "https://x"}, "garbage"]}
    items, cursor = bluesky_items(answer)
    assert len(items) == 1 and cursor is None
    assert items[0].author == "" and items[0].published_at == 1691387380.501  # no zone: UTC
    assert items[0].url.startswith("https://bsky.app/profile/did:plc:")


def test_an_empty_text_with_an_embed_has_a_title():
    thread = corpus("bluesky/getPostThread_embed_recordWithMedia.json")["body"]["thread"]["post"]
    (item,) = bluesky_items({"posts": [thread]})[0]
    assert item.body == "" and item.title == "(a post with an embed)"
    assert "recordWithMedia" in item.extra["embed"]


def test_links_jwt_lifetimes_and_rate_limit_headers():
    assert post_link("at://did:plc:x/app.bsky.feed.post/abc", "handle.invalid") == (
        "https://bsky.app/profile/did:plc:x/post/abc"
    )
    assert post_link("at://did:plc:x/app.bsky.feed.like/abc", "a.b") == ""
    assert jwt_lifetime("not a jwt") is None
    headers = corpus("bluesky/searchPosts_q_redistricting.json")["headers"]
    assert limit_headers(headers) == {
        "x-ratelimit-remaining": "2983",
        "x-ratelimit-reset": "1747676784",
    }


@pytest.mark.parametrize("answer", [{"error": "x"}, [], {"posts": "no"}])
def test_json_without_posts_is_a_bad_response(answer):
    with pytest.raises(StageError) as caught:
        bluesky_items(answer)
    assert caught.value.kind == "bad_response"


@pytest.mark.parametrize(
    ("table", "message"),
    [({"handle": "a.b", "app_password": "x"}, "query: is required"),
     ({"query": "a", "handle": "not a handle", "app_password": "x"}, "handle must be"),
     ({"query": "a", "handle": "a.bsky.social", "app_password": ""}, "app_password must not be empty"),
     ({"query": "a", "handle": "a.bsky.social"}, "app_password: is required")],
)  # fmt: skip
def test_bad_options_are_config_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        build_source_config({"name": "b", "type": "bluesky", **table}, "sources[0]")


# ###########################################################################
# Polling
# ###########################################################################


def test_one_session_for_every_source_of_the_account_then_since(bs):
    bs.add(bs_post("acme 1.0"), bs_post("unrelated"))

    async def go():
        async with harness() as h:
            a = h.source("bluesky", name="a", **opts(bs))
            b = h.source("bluesky", name="b", **opts(bs, query="other"))
            assert len(await h.poll(a)) == 1
            assert await h.poll(b) == []
            assert bs.sessions_created == 1 and bs.hits(CREATE) == 1
            q = bs.requests(SEARCH)[0]["query"]
            assert q["sort"] == "latest" and q["limit"] == "100" and "since" not in q
            new = bs_post("acme crashes", reply=True)
            bs.add(new)
            found = await h.poll(a)
            assert found[0].item_id == new["uri"] and found[0].kind == "reply"  # newest first
            assert "since" in bs.requests(SEARCH)[2]["query"]
            assert bs.hits(CREATE) == 1

    run(go())


def test_an_expired_session_is_refreshed_once(bs):
    async def go():
        async with harness() as h:
            src = h.source("bluesky", **opts(bs))
            await h.poll(src)
            bs.expire_tokens()
            await h.poll(src)
            assert bs.sessions_refreshed == 1 and bs.sessions_created == 1
            statuses = [r["status"] for r in bs.requests(SEARCH)]
            assert statuses == [200, 400, 200]
            await h.poll(src)  # the refreshed token is reused
            assert bs.hits(REFRESH) == 1 and bs.hits(SEARCH) == 4

    run(go())


def test_a_session_that_stays_refused_is_auth_failed_after_one_retry(bs):
    async def go():
        async with harness() as h:
            src = h.source("bluesky", **opts(bs))
            await h.poll(src)
            bs.script([("status", 400, "ExpiredToken", "Token has expired")] * 2, path=SEARCH)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == "auth_failed" and "set `app_password`" in str(caught.value)
            assert bs.hits(REFRESH) == 1

    run(go())


def test_a_dead_refresh_token_logs_in_again(bs):
    bs.access_ttl = 0.5

    async def go():
        async with harness() as h:
            src = h.source("bluesky", **opts(bs))
            await h.poll(src)
            bs.script([("status", 400, "ExpiredToken", "Token has expired")], path=REFRESH)
            time.sleep(0.6)
            await h.poll(src)
            assert bs.sessions_created == 2

    run(go())


def test_a_wrong_app_password_says_what_to_set(bs):
    async def go():
        async with harness() as h:
            src = h.source("bluesky", **opts(bs, app_password="wrong-pass-word"))
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            e = caught.value
            assert e.kind == "auth_failed" and "Invalid identifier or password" in str(e)
            assert "bsky.app/settings/app-passwords" in str(e) and "wrong-pass" not in str(e)
            assert bs.hits(SEARCH) == 0

    run(go())


def test_a_burst_into_an_empty_search_is_paged_with_the_cursor(bs):
    async def go():
        async with harness() as h:
            src = h.source("bluesky", **opts(bs))
            assert await h.poll(src) == []
            bs.add(*[bs_post(f"acme {n}", indexed=time.time() + n / 1000) for n in range(250)])
            found = await h.poll(src)
            assert len(set(ids(found))) == 250
            cursors = [r["query"].get("cursor") for r in bs.requests(SEARCH)[1:]]
            assert cursors == [None, "100", "200"]

    run(go())


def test_a_429_waits_for_the_ratelimit_reset(bs):
    bs.rate_limit(2, window=300)

    async def go():
        async with harness(fetch_timeout=1) as h:
            src = h.source("bluesky", **opts(bs))
            await h.poll(src)  # createSession + search: the window's two
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == "rate_limited" and caught.value.retry_after > 1
            assert bs.hits() == 2  # the budget read RateLimit-Remaining 0: nothing sent

    run(go())


@pytest.mark.parametrize(
    ("fault", "kind", "words"),
    [(("status", 502, "UpstreamFailure", "upstream"), "server_error", "answered 502"),
     (("invalid_json",), "bad_response", "not JSON"),
     (("status", 400, "InvalidRequest", "bad q"), "bad_response", "check `query`"),
     (("status", 429, "RateLimitExceeded", "slow down"), "rate_limited", "rate-limited the search")],
)  # fmt: skip
def test_failures_are_told_apart(bs, fault, kind, words):
    async def go():
        async with harness(fetch_timeout=1) as h:
            src = h.source("bluesky", **opts(bs))
            bs.script([fault], path=SEARCH)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == kind and words in str(caught.value)

    run(go())


# ###########################################################################
# End to end
# ###########################################################################


def test_new_posts_reach_slack_once_and_the_app_password_never_shows(
    bs, slack, anthropic_fake, make_config, start_cli, run_cli
):
    bs.add(bs_post("acme launch day"))
    config = e2e_config(make_config, "bluesky", query="acme", handle=HANDLE,
                        app_password="${BSKY_APP_PASSWORD}", service=bs.url)  # fmt: skip
    env = {"BSKY_APP_PASSWORD": PASSWORD}
    proc = start_cli("run", config=config, env=env)
    bs.wait_for(lambda: bs.hits(SEARCH, 200) >= 2, timeout=15)
    assert anthropic_fake.calls() == 0
    new = bs_post("acme crashes every time I open it", handle="ann.bsky.social")
    bs.add(new)
    slack.wait_for(1, timeout=15)
    bs.wait_for(lambda: bs.hits(SEARCH, 200) >= 5, timeout=15)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    rkey = new["uri"].rsplit("/", 1)[1]
    assert len(slack.posts()) == 1
    assert f"https://bsky.app/profile/ann.bsky.social/post/{rkey}" in slack.text()
    assert anthropic_fake.calls("classify") == 1 and bs.sessions_created == 1
    status = run_cli("status", config=config, env=env)
    assert status.returncode == 0
    for text in (proc.stderr_text(), proc.stdout_text(), status.stdout, slack.text()):
        assert PASSWORD not in text
