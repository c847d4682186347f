"""The reddit source: parsing the recorded corpus, then OAuth, paging, rate limits
and the access ladder against a fake Reddit on loopback, and one run end to end."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import re
import signal
import time

import agentwatch_sources.reddit as reddit_source
import pytest
from agentwatch_sources.reddit import reddit_feed_items, reddit_items
from fake_reddit import (
    TOKEN_PATH,
    FakeReddit,
    atom_feed,
    comment,
    corpus,
    corpus_children,
    listing_body,
    post,
)
from sources_harness import e2e_config, harness, ids, run

import agentwatch
from agentwatch import ConfigError, StageError

CLIENT_ID, SECRET = "cid-acme", "s3cret-value-123"


@pytest.fixture
def reddit():
    with FakeReddit() as fake:
        fake.add_client(CLIENT_ID, SECRET)
        yield fake


def options(fake: FakeReddit, oauth: bool = True, **more) -> dict:
    found = {"subreddit": "acme", "base_url": fake.url, "oauth_base_url": fake.url}
    if oauth:
        found.update(client_id=CLIENT_ID, client_secret=SECRET)
    else:
        found.update(anonymous_pace="1s")
    return {**found, **more}


# ###########################################################################
# Parsing the recorded answers
# ###########################################################################


def test_new_posts_of_a_subreddit_parse_into_items():
    items, after = reddit_items(corpus("subreddit_new.json")["body"])
    assert len(items) == 100 and after == "t3_48f6io"
    first = items[0]
    assert first.item_id == "t3_48fbm9"
    assert first.title.startswith("[Serious] Parents of Reddit, what's the biggest lie")
    assert first.url == (
        "https://www.reddit.com/r/AskReddit/comments/48fbm9/"
        "serious_parents_of_reddit_whats_the_biggest_lie/"
    )
    assert first.author == "RedHeadQc"
    assert first.published_at == 1456821458.0
    assert first.kind == "post" and first.extra == {"subreddit": "AskReddit"}
    assert all(i.item_id.startswith("t3_") and i.kind == "post" for i in items)
    assert all(i.url.startswith("https://www.reddit.com/r/") for i in items)


def test_comments_carry_their_posts_title_and_a_full_permalink():
    # 2016 listings have no permalink on comments: it is built from link_id.
    items, _ = reddit_items(corpus("subreddit_comments.json")["body"])
    first = items[0]
    assert first.item_id == "t1_d4y8bdp" and first.kind == "comment"
    assert first.title == '[Serious] To anyone who "followed their dreams", how has it panned out?'
    assert first.body == "great, life is so much better when you can do what you enjoy for a living"
    assert first.url == "https://www.reddit.com/r/AskReddit/comments/4r4inc/_/d4y8bdp/"
    assert first.extra == {"subreddit": "AskReddit", "post": "t3_4r4inc"}
    # Recent listings carry it.
    items, after = reddit_items(corpus("comments_stream_with_ratelimit_headers.json")["body"])
    assert items[0].url == (
        "https://www.reddit.com/r/<TEST_SUBREDDIT>/comments/agi5zf/<TEST_SUBREDDIT>/k3yrfii/"
    )
    assert items[0].author == "Acceptable-Bread-566" and after == "t1_k3uzsxu"
    assert len({i.item_id for i in items}) == 100


def test_search_results_lose_the_search_tracking_suffix():
    items, after = reddit_items(corpus("search_all.json")["body"])
    assert len(items) == 6 and after is None
    assert items[0].item_id == "t3_3gpbiu"
    assert items[0].url == (
        "https://www.reddit.com/r/redditdev/comments/3gpbiu/prawoauth2util_problem_using_get_banned_raise/"
    )
    assert "Problem solved with this" in items[0].body


def test_a_mixed_listing_keeps_posts_and_comments_apart():
    items, _ = reddit_items(corpus("redditor_overview_new_with_ratelimit_headers.json")["body"])
    kinds = [i.kind for i in items]
    assert kinds.count("comment") == 90 and kinds.count("post") == 10
    crosspost = next(i for i in items if i.item_id == "t3_1tvsa59")
    # A link post's own link is kept; a relative one is made absolute.
    assert crosspost.extra["link"] == (
        "https://www.reddit.com/r/RDDT/comments/1tvs5jj/steve_jen_and_drew_here_ask_us_anything/"
    )


def test_deleted_authors_stay_and_odd_children_are_skipped():
    children = corpus_children("comments_stream_with_ratelimit_headers.json")[:3]
    children[0]["data"].update(author="[deleted]", body="[deleted]")
    children[1]["data"]["author"] = None
    odd = [
        {"kind": "more", "data": {"count": 4, "children": ["abc"]}},
        {"kind": "t5", "data": {"name": "t5_2qh1i", "display_name": "AskReddit"}},
        "garbage",
        copy.deepcopy(children[2]),  # a duplicate
    ]
    items, _ = reddit_items(listing_body(children + odd, None, None))
    assert ids(items) == [c["data"]["name"] for c in children]
    assert items[0].author == "[deleted]" and items[0].body == "[deleted]"
    assert items[1].author == ""


@pytest.mark.parametrize(
    "answer",
    [{"message": "Forbidden", "error": 403}, [], "nope", {"kind": "Listing", "data": {}}],
)
def test_json_that_is_not_a_listing_is_a_bad_response(answer):
    with pytest.raises(StageError) as caught:
        reddit_items(answer)
    assert caught.value.kind == "bad_response"


@pytest.mark.parametrize(
    "name",
    [
        "subreddit_new.json",
        "subreddit_comments.json",
        "comments_stream_with_ratelimit_headers.json",
        "search_all.json",
        "redditor_overview_new_with_ratelimit_headers.json",
    ],
)
def test_the_rss_form_of_a_listing_gives_the_same_items_as_its_json(name):
    # The corpus has no recorded Atom listing: the fake writes the recorded
    # things in the Atom Reddit serves (see fake_reddit.atom_entry).
    children = corpus_children(name)
    from_json, _ = reddit_items(corpus(name)["body"])
    from_rss = reddit_feed_items(atom_feed(children, "/r/x/new"), None, "test")
    assert len(from_rss) == len(from_json) > 0
    for a, b in zip(from_json, from_rss, strict=True):
        assert (b.item_id, b.title, b.url, b.kind) == (a.item_id, a.title, a.url, a.kind)
        assert (b.author, b.published_at, b.extra) == (a.author, a.published_at, a.extra)
        assert b.body == " ".join(a.body.split())  # as HTML, its line breaks are spaces


def test_a_feed_entry_that_is_not_a_post_or_a_comment_is_skipped():
    body = atom_feed(corpus_children("subreddit_new.json")[:2], "/r/x/new")
    body = body.replace(b"<id>t3_48fbm9</id>", b"<id>t5_2qh1i</id>")
    assert [i.item_id for i in reddit_feed_items(body)] == ["t3_48fbig"]
    with pytest.raises(StageError) as caught:
        reddit_feed_items(b"<html><body>nope</body></html>", {}, "Reddit's feed of /r/x/new")
    assert caught.value.kind == "bad_response"


# ###########################################################################
# Options
# ###########################################################################


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "needs a subreddit, a query, or both"),
        ({"query": "acme", "comments": True}, "comments = true needs a subreddit"),
        ({"subreddit": "acme", "client_id": "x"}, "client_id and client_secret go together"),
        ({"subreddit": "bad name!"}, "subreddit must be a name"),
        ({"subreddit": "acme", "user_agent": "Mozilla/5.0"}, "user_agent must have Reddit's form"),
        ({"subreddit": "acme", "base_url": "ftp://x"}, "base_url must start with http"),
    ],
)
def test_bad_options_are_config_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        agentwatch.build_source_config({"name": "r", "type": "reddit", **table}, "sources[0]")


def test_default_user_agent_has_reddits_form_and_a_prefix_is_forgiven():
    config = agentwatch.build_source_config(
        {"name": "r", "type": "reddit", "subreddit": "/r/SelfHosted/"}, "s"
    )
    assert config.options.subreddit == "SelfHosted"
    assert config.options.user_agent == (
        f"python:agentwatch:v{agentwatch.__version__} (by /u/agentwatch)"
    )


# ###########################################################################
# OAuth
# ###########################################################################


def test_token_is_fetched_once_and_shared_by_sources_with_the_same_app(reddit):
    reddit.listing("/r/acme/new").load("subreddit_new.json")
    reddit.listing("/r/other/new").add(post(subreddit="other"))

    async def scenario():
        async with harness() as h:
            a = h.source("reddit", "a", **options(reddit))
            b = h.source("reddit", "b", **options(reddit, subreddit="other"))
            for _ in range(3):
                assert len(await h.poll(a)) == 100
                assert len(await h.poll(b)) == 1

    run(scenario())
    assert reddit.token_requests() == 1
    listings = [r for r in reddit.requests() if r["path"] != TOKEN_PATH]
    assert len(listings) == 6 and all(r["status"] == 200 for r in listings)
    assert {r["auth"] for r in listings} == {"bearer"}
    assert {r["client"] for r in listings} == {CLIENT_ID}
    token = reddit.requests(TOKEN_PATH)[0]
    assert token["auth"] == "basic" and token["method"] == "POST"
    assert listings[0]["path"] == "/r/acme/new"  # oauth.reddit.com takes no .json
    assert listings[0]["query"] == {"limit": "100", "raw_json": "1"}
    user_agent = reddit_source.REDDIT_USER_AGENT
    assert {r["headers"]["user-agent"] for r in reddit.requests()} == {user_agent}


def test_token_is_refreshed_before_it_expires():
    with FakeReddit(token_ttl=2) as fake:
        fake.add_client(CLIENT_ID, SECRET)
        fake.listing("/r/acme/new")

        async def scenario():
            async with harness() as h:
                src = h.source("reddit", **options(fake))
                await h.poll(src)
                await h.poll(src)
                await asyncio.sleep(2)
                await h.poll(src)

        run(scenario())
        assert fake.token_requests() == 2
        assert fake.hits(status=401) == 0


def test_a_refused_token_is_refreshed_once(reddit):
    reddit.listing("/r/acme/new").add(post())

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit))
            await h.poll(src)
            reddit.revoke_tokens()  # Reddit dropped it early
            assert len(await h.poll(src)) == 1
            # Refused again right after a refresh: say so, do not loop.
            reddit.script([("expired",), ("expired",)], path="/r/acme/new")
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            return caught.value

    error = run(scenario())
    assert error.kind == "auth_failed"
    assert "freshly issued access token" in str(error) and "reddit.com/prefs/apps" in str(error)
    assert reddit.token_requests() == 3
    assert reddit.hits("/r/acme/new") == 5  # 1 + (401, 200) + (401, 401)


def test_bad_credentials_are_reported_as_auth_failed(reddit):
    reddit.listing("/r/acme/new")

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit, client_secret="wrong-secret"))
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            return caught.value

    error = run(scenario())
    assert error.kind == "auth_failed"
    assert "client_id/client_secret" in str(error) and "prefs/apps" in str(error)
    assert "wrong-secret" not in str(error)
    assert reddit.hits("/r/acme/new") == 0


def test_a_token_answer_with_an_error_field_is_auth_failed(reddit):
    reddit.script([("status", 200, {"error": "unsupported_grant_type"})], path=TOKEN_PATH)

    async def scenario():
        async with harness() as h:
            with pytest.raises(StageError) as caught:
                await h.poll(h.source("reddit", **options(reddit)))
            return caught.value

    error = run(scenario())
    assert error.kind == "auth_failed" and "'script'" in str(error)


# ###########################################################################
# What a poll reads
# ###########################################################################


def test_without_credentials_the_public_json_endpoints_are_used(reddit):
    reddit.listing("/r/acme/new").add(post(title="hello"))

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit, oauth=False))
            return await h.poll(src), src

    items, src = run(scenario())
    assert [i.title for i in items] == ["hello"]
    (request,) = reddit.requests()
    assert request["path"] == "/r/acme/new.json" and request["auth"] is None
    assert src.describe_state(src.state).startswith(
        "public JSON (no client_id/client_secret); newest post"
    )


def test_each_kind_of_source_reads_its_listings(reddit):
    reddit.listing("/r/acme/new").add(post(title="acme is slow"), post(title="unrelated"))
    reddit.listing("/r/acme/comments").add(comment(body="meh"))
    reddit.listing("/r/elsewhere/new").add(post(title="acme rocks", subreddit="elsewhere"))

    async def scenario():
        async with harness() as h:
            results = {}
            for name, opts in {
                "posts": {},
                "comments": {"comments": True},
                "search_in": {"query": "acme"},
                "search_all": {"query": "acme", "subreddit": ""},
                "combined": {"query": "acme", "comments": True},
            }.items():
                src = h.source("reddit", name, **options(reddit, **opts))
                results[name] = (await h.poll(src), src.state["requests"])
            return results

    results = run(scenario())
    titles = {name: sorted(i.title for i in items) for name, (items, _) in results.items()}
    assert titles["posts"] == ["acme is slow", "unrelated"]
    assert titles["comments"] == ["A post", "acme is slow", "unrelated"]
    assert titles["search_in"] == ["acme is slow"]
    assert titles["search_all"] == ["acme is slow", "acme rocks"]
    assert titles["combined"] == ["A post", "acme is slow"]
    # One request per listing, plus the one token request they all share.
    assert {name: n for name, (_, n) in results.items()} == {
        "posts": 2, "comments": 2, "search_in": 1, "search_all": 1, "combined": 2,
    }  # fmt: skip
    assert reddit.token_requests() == 1
    search = reddit.requests("/r/acme/search")[0]["query"]
    assert search["sort"] == "new" and search["restrict_sr"] == "1" and search["q"] == "acme"
    assert "restrict_sr" not in reddit.requests("/search")[0]["query"]


def test_a_quiet_subreddit_is_not_a_failure(reddit):
    reddit.listing("/r/acme/new")

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit))
            return [await h.poll(src) for _ in range(3)], src

    polls, src = run(scenario())
    assert polls == [[], [], []]
    assert src.describe_state(src.state) == "OAuth; no post yet; 1 request(s) last poll"


# ###########################################################################
# Paging
# ###########################################################################


def comments_at(n: int, start: float) -> list[dict]:
    return [comment(body=f"c{i}", created=start + i) for i in range(n)]


def test_a_burst_of_more_than_100_new_items_is_paged_through(reddit):
    comments = reddit.listing("/r/acme/comments")
    comments.add(*comments_at(100, 1_000_000))

    async def scenario():
        async with harness() as h:
            src = h.source(
                "reddit", **options(reddit, subreddit="acme", comments=True, query="zzz")
            )
            baseline = await h.poll(src)
            burst = comments_at(250, 2_000_000)
            comments.add(*burst)
            found = await h.poll(src)
            again = await h.poll(src)
            return baseline, burst, found, again

    baseline, burst, found, again = run(scenario())
    assert len(baseline) == 100  # the first poll reads one page: the baseline
    assert {t["data"]["name"] for t in burst} <= set(ids(found))
    pages = [r["query"] for r in reddit.requests("/r/acme/comments")]
    assert len(pages) == 1 + 3 + 1
    assert "after" not in pages[1]
    assert pages[2]["after"] == burst[150]["data"]["name"] and pages[2]["count"] == "100"
    assert pages[3]["after"] == burst[50]["data"]["name"] and pages[3]["count"] == "200"
    assert ids(again) == ids(found)[:100]  # nothing new: one page, already known


def test_a_burst_into_a_listing_that_was_empty_is_paged_through(reddit):
    """Issue 9, item 14: "never polled" and "polled, found nothing" differ. A quiet
    listing that then gets 250 new comments between two polls yields all 250,
    not only the newest page."""
    comments = reddit.listing("/r/acme/comments")

    async def scenario():
        async with harness() as h:
            src = h.source(
                "reddit", **options(reddit, subreddit="acme", comments=True, query="zzz")
            )
            baseline = await h.poll(src)
            burst = comments_at(250, 2_000_000)
            comments.add(*burst)
            return baseline, burst, await h.poll(src)

    baseline, burst, found = run(scenario())
    assert [i for i in baseline if i.kind == "comment"] == []
    assert {t["data"]["name"] for t in burst} == {i.item_id for i in found if i.kind == "comment"}


def test_paging_is_bounded(reddit, caplog):
    comments = reddit.listing("/r/acme/comments")
    comments.add(*comments_at(5, 1_000_000))

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit, query="zzz", comments=True))
            await h.poll(src)
            comments.add(*comments_at(1200, 2_000_000))
            return await h.poll(src)

    with caplog.at_level(logging.WARNING):
        found = run(scenario())
    assert len(found) == 1000
    assert reddit.hits("/r/acme/comments") == 1 + reddit_source.REDDIT_MAX_PAGES
    assert "more than 1000 new items" in caplog.text


def test_a_deleted_newest_item_does_not_stop_the_next_poll(reddit):
    new = reddit.listing("/r/acme/new")
    new.add(*[post(title=f"p{i}", created=1_000_000 + i) for i in range(3)])

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit))
            await h.poll(src)
            del new.things[0]  # the newest post seen is removed
            new.add(post(title="fresh", created=1_000_010))
            return await h.poll(src)

    assert [i.title for i in run(scenario())] == ["fresh", "p1", "p0"]
    assert reddit.hits("/r/acme/new") == 2


# ###########################################################################
# Rate limits
# ###########################################################################


def test_rate_limit_headers_slow_polls_before_a_429(reddit):
    """Two sources of one app, two requests a poll each, against a budget of 6
    requests a 1-second window: the budget runs out every round and a half, and
    the sources wait for the reset instead of running into 429s."""
    reddit.listing("/r/acme/new")
    reddit.listing("/r/acme/comments")
    reddit.rate_limit(6, window=1)

    async def scenario():
        async with harness() as h:
            a = h.source("reddit", "a", **options(reddit, comments=True))
            b = h.source("reddit", "b", **options(reddit, comments=True))
            started = time.monotonic()
            for _ in range(4):
                await asyncio.gather(h.poll(a), h.poll(b))
            return time.monotonic() - started

    took = run(scenario())
    listings = [r for r in reddit.requests() if r["path"] != TOKEN_PATH]
    assert len(listings) == 16 and reddit.hits(status=429) == 0
    assert {r["status"] for r in listings} == {200}
    assert took >= 1  # 16 requests at 6 a window span at least three windows


def test_a_low_budget_is_spread_evenly_until_the_reset():
    budget = agentwatch.RateBudget("client id x")
    now = time.monotonic()
    budget.settle(
        {"x-ratelimit-remaining": "500.0", "x-ratelimit-used": "500", "x-ratelimit-reset": "100"}
    )
    assert budget.delay(now) == 0  # plenty left: no pacing
    budget.last_sent = now
    budget.settle(
        {"x-ratelimit-remaining": "50.0", "x-ratelimit-used": "950", "x-ratelimit-reset": "100"}
    )
    assert budget.delay(now) == pytest.approx(100 / 50, abs=0.05)  # 50 left for 100 s
    # An answer that overtook an older one does not raise the count back up...
    budget.settle(
        {"x-ratelimit-remaining": "60.0", "x-ratelimit-used": "940", "x-ratelimit-reset": "100"}
    )
    assert budget.remaining == 50
    # ...but a new window (a later reset) does.
    budget.settle(
        {"x-ratelimit-remaining": "999.0", "x-ratelimit-used": "1", "x-ratelimit-reset": "599"}
    )
    assert budget.remaining == 999 and budget.delay(time.monotonic()) == 0
    budget.settle(
        {"x-ratelimit-remaining": "0.0", "x-ratelimit-used": "1000", "x-ratelimit-reset": "30"}
    )
    assert budget.delay(time.monotonic()) == pytest.approx(30, abs=0.1)  # spent: wait for the reset


def test_a_spent_budget_with_a_distant_reset_fails_the_poll_without_a_request(reddit):
    reddit.listing("/r/acme/new")
    reddit.script([("ratelimit", "0.0", "300")], path="/r/acme/new")

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit))
            await h.poll(src)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            return caught.value

    error = run(scenario())
    assert error.kind == "rate_limited" and 290 <= error.retry_after <= 300
    assert "budget" in str(error) and "used up" in str(error) and CLIENT_ID in str(error)
    assert reddit.hits("/r/acme/new") == 1


def test_429_retry_after_is_respected_by_every_source_of_the_app(reddit):
    reddit.listing("/r/acme/new").add(post())
    reddit.script([("429", "2")], path="/r/acme/new")

    async def scenario():
        async with harness(fetch_timeout=2) as h:
            a = h.source("reddit", "a", **options(reddit))
            b = h.source("reddit", "b", **options(reddit))
            with pytest.raises(StageError) as caught:
                await h.poll(a)
            limited_at = time.time()
            items = await h.poll(b)  # waits out the penalty, then reads
            return caught.value, limited_at, items

    error, limited_at, items = run(scenario())
    assert error.kind == "rate_limited" and error.retry_after == 2
    assert "429" in str(error) and "every" in str(error)
    assert len(items) == 1
    times = [r["time"] for r in reddit.requests("/r/acme/new")]
    during = [t for t in times if limited_at < t < limited_at + 1.9]
    assert len(times) == 2 and during == []


def test_a_long_429_penalty_fails_other_sources_without_requests(reddit):
    reddit.listing("/r/acme/new")
    reddit.script([("429", "120")], path="/r/acme/new")

    async def scenario():
        async with harness() as h:
            a, b = (
                h.source("reddit", "a", **options(reddit)),
                h.source("reddit", "b", **options(reddit)),
            )
            errors = []
            for src in (a, b, a):
                with pytest.raises(StageError) as caught:
                    await h.poll(src)
                errors.append(caught.value)
            return errors

    errors = run(scenario())
    assert [e.kind for e in errors] == ["rate_limited"] * 3
    assert all(100 < e.retry_after <= 120 for e in errors)
    assert reddit.hits("/r/acme/new") == 1


# ###########################################################################
# The access ladder
# ###########################################################################


@pytest.mark.parametrize(
    ("fault", "oauth", "kind", "words"),
    [
        (("429", "30"), False, "rate_limited", ["429", "this server (no client_id)"]),
        (("blocked",), True, "blocked", ["although they carry an OAuth token", "user_agent"]),
        (("html", 200), True, "blocked", ["HTML page where JSON was expected"]),
        (("status", 403, {"reason": "private"}), True, "blocked", ["r/acme", "private"]),
        (("status", 404), True, "bad_response", ["no r/acme", "subreddit"]),
        (("invalid_json",), True, "bad_response", ["not valid JSON", "retries"]),
        (("status", 503), True, "server_error", ["503", "retries"]),
        (("429", None), True, "rate_limited", ["429", "every"]),
    ],
)
def test_failures_are_told_apart_in_plain_words(reddit, fault, oauth, kind, words):
    reddit.listing("/r/acme/new").add(post())
    reddit.script([fault], path="/r/acme/new.json" if not oauth else "/r/acme/new")

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit, oauth=oauth))
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            return caught.value

    error = run(scenario())
    assert error.kind == kind
    for word in words:
        assert word in str(error)


def test_blocked_json_and_rss_point_at_oauth_and_the_private_feed(reddit):
    reddit.block_public = reddit.block_rss = True

    async def scenario():
        async with harness() as h:
            with pytest.raises(StageError) as caught:
                await h.poll(h.source("reddit", **options(reddit, oauth=False)))
            return caught.value

    error = run(scenario())
    assert error.kind == "blocked"
    assert str(error) == (
        "Reddit blocks both its public JSON and its RSS listings for this server (403, an HTML "
        "page): create a 'script' app at https://www.reddit.com/prefs/apps and set client_id and "
        "client_secret, or set feed_token and feed_user from https://www.reddit.com/prefs/feeds"
    )
    assert [r["path"] for r in reddit.requests()] == ["/r/acme/new.json", "/r/acme/new/.rss"]


def test_an_unreachable_reddit_says_so(offline):
    async def scenario():
        async with harness() as h:
            src = h.source("reddit", subreddit="acme", base_url=offline)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            return caught.value

    error = run(scenario())
    assert error.kind == "unreachable" and "cannot reach Reddit" in str(error)


# ###########################################################################
# The RSS rung: no OAuth, and Reddit blocking its public JSON
# ###########################################################################


def test_a_blocked_public_json_falls_back_to_rss_and_stays_there(reddit):
    reddit.block_public = True
    reddit.listing("/r/acme/new").add(post(title="acme is slow"))
    reddit.listing("/r/acme/comments").add(comment(body="it crashes", post_title="Acme 2"))

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit, oauth=False, comments=True))
            first = await h.poll(src)
            described = src.describe_state(src.state)
            reddit.listing("/r/acme/new").add(post(title="new one"))
            second = await h.poll(src)
            return first, second, described, src.state

    first, second, described, state = run(scenario())
    assert [i.kind for i in first] == ["post", "comment"]
    assert first[1].title == "Acme 2" and first[1].body == "it crashes"
    assert [i.title for i in second] == ["new one", "acme is slow"]  # the store knows the second
    paths = [(r["path"], r["status"]) for r in reddit.requests()]
    assert paths == [
        ("/r/acme/new.json", 403),
        ("/r/acme/new/.rss", 200),
        ("/r/acme/comments/.rss", 200),
        ("/r/acme/new/.rss", 200),  # read least recently read first, no JSON again
        ("/r/acme/comments/.rss", 304),  # conditional: unchanged
    ]
    assert re.match(
        r"RSS \(Reddit blocked the public JSON \ds ago \(403, an HTML page\); tried again daily\)",
        described,
    )
    assert reddit.requests()[1]["query"]["limit"] == "100"
    assert state["mode"] == "rss" and "feed" not in reddit.requests()[1]["query"]


def test_the_public_json_is_tried_again_after_a_day(reddit, monkeypatch):
    reddit.listing("/r/acme/new").add(post(title="hello"))

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit, oauth=False))
            src.state = {"mode": "rss", "json_blocked_at": time.time() - 86400 - 5}
            return await h.poll(src), src.state

    items, state = run(scenario())
    assert [i.title for i in items] == ["hello"]
    assert [r["path"] for r in reddit.requests()] == ["/r/acme/new.json"]
    assert state["mode"] == "public" and "json_blocked_at" not in state


def test_ids_are_the_same_on_every_rung(reddit):
    reddit.listing("/r/acme/new").load("subreddit_new.json")
    reddit.listing("/r/acme/comments").load("subreddit_comments.json")

    async def scenario():
        async with harness() as h:
            found = {}
            for rung, opts in {"oauth": {}, "public": {"oauth": False}}.items():
                src = h.source("reddit", rung, **options(reddit, comments=True, **opts))
                found[rung] = await h.poll(src)
            reddit.block_public = True
            src = h.source("reddit", "rss", **options(reddit, oauth=False, comments=True))
            found["rss"] = await h.poll(src)
            return found

    found = run(scenario())
    assert len(found["oauth"]) == 200
    assert ids(found["oauth"]) == ids(found["public"]) == ids(found["rss"])
    assert [i.url for i in found["rss"]] == [i.url for i in found["oauth"]]


def test_anonymous_requests_of_every_source_share_one_pace(reddit):
    for sub in ("a1", "b2", "c3"):
        reddit.listing(f"/r/{sub}/new").add(post(subreddit=sub))

    async def scenario():
        async with harness() as h:
            paces = {"a1": "2s", "b2": "1s", "c3": "3s"}
            sources = [
                h.source("reddit", sub, **options(reddit, oauth=False, subreddit=sub, anonymous_pace=pace))
                for sub, pace in paces.items()
            ]  # fmt: skip
            await asyncio.gather(*(h.poll(src) for src in sources))
            return [src.state["mode"] for src in sources]

    assert run(scenario()) == ["public"] * 3
    times = sorted(r["time"] for r in reddit.requests())
    assert len(times) == 3
    # The shortest pace set on any source (1s) spaces all of them.
    assert all(0.95 <= later - earlier < 1.6 for earlier, later in itertools.pairwise(times))


def test_a_listing_the_pace_cannot_fit_is_left_for_the_next_poll(reddit):
    reddit.listing("/r/acme/new").add(post(title="p"))
    reddit.listing("/r/acme/comments").add(comment(body="c"))

    async def scenario():
        async with harness(fetch_timeout=1) as h:  # a poll may take 14 s: less than the pace
            src = h.source("reddit", **options(reddit, oauth=False, comments=True,
                                               anonymous_pace="60s"))  # fmt: skip
            first = await h.poll(src)
            described = src.describe_state(src.state)
            h.shared.clear()  # as if the pace's minute had passed
            second = await h.poll(src)
            reddit.listing("/r/acme/comments").add(comment(body="new"))
            h.shared.clear()
            await h.poll(src)  # the posts' turn
            h.shared.clear()
            third = await h.poll(src)
            return first, second, third, described

    first, second, third, described = run(scenario())
    assert [i.kind for i in first] == ["post"]
    assert "1 listing(s) left for the next poll by anonymous_pace" in described
    # The one not read goes first; what it held before is its own baseline,
    # not new items: the engine's baseline was the first poll.
    assert second == []
    assert [i.body for i in third] == ["new"]
    assert [r["path"] for r in reddit.requests()] == [
        "/r/acme/new.json", "/r/acme/comments.json", "/r/acme/new.json", "/r/acme/comments.json",
    ]  # fmt: skip


FEED_USER, FEED_TOKEN = "acme_founder", "f00dfeedcafe1234"


def test_a_private_feed_reads_what_only_its_user_may_see(reddit):
    reddit.add_feed_token(FEED_USER, FEED_TOKEN)
    reddit.private_listing("/r/acmeteam/new").add(post(title="internal", subreddit="acmeteam"))

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit, oauth=False, subreddit="acmeteam",
                                               feed_token=FEED_TOKEN, feed_user=FEED_USER))  # fmt: skip
            items = await h.poll(src)
            return items, src.describe_state(src.state), src.describe(), src.validators

    items, described, description, validators = run(scenario())
    assert [i.title for i in items] == ["internal"] and items[0].item_id.startswith("t3_")
    (request,) = reddit.requests()
    assert request["path"] == "/r/acmeteam/new/.rss"
    assert request["query"]["feed"] == FEED_TOKEN and request["query"]["user"] == FEED_USER
    assert described.startswith("private RSS feed; newest post")
    assert description == "r/acmeteam new posts (the private RSS feed of u/acme_founder)"
    assert FEED_TOKEN not in json.dumps(validators)  # kept under a key, not the URL


def test_a_wrong_feed_pair_is_auth_failed_and_never_shows_the_token(reddit):
    reddit.add_feed_token(FEED_USER, FEED_TOKEN)

    async def scenario():
        async with harness() as h:
            src = h.source("reddit", **options(reddit, oauth=False, feed_token="wrong-token-99",
                                               feed_user=FEED_USER))  # fmt: skip
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            return caught.value

    error = run(scenario())
    assert error.kind == "auth_failed"
    assert str(error) == (
        "Reddit refused the private feed of u/acme_founder (403, an HTML page): copy feed_token "
        "and feed_user again from a feed link at https://www.reddit.com/prefs/feeds (feed= and "
        "user= of the URL)"
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"feed_token": "x"}, "feed_token and feed_user go together"),
        ({"feed_token": "x", "feed_user": "u", "client_id": "c", "client_secret": "s"},
         "two ways into Reddit"),
        ({"anonymous_pace": "0.5s"}, 'anonymous_pace must be at least "1s"'),
    ],
)  # fmt: skip
def test_bad_rss_options_are_config_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        agentwatch.build_source_config(
            {"name": "r", "type": "reddit", "subreddit": "acme", **table}, "sources[0]"
        )


# ###########################################################################
# End to end: the agentwatch process
# ###########################################################################


def reddit_config(
    make_config, fake: FakeReddit, llm: str = 'about = "Acme is an analytics tool."', **source
):
    return e2e_config(make_config, "reddit", llm, name="r-acme", base_url=fake.url,
                      oauth_base_url=fake.url, **source)  # fmt: skip


def test_a_new_negative_comment_reaches_slack_with_a_draft(
    reddit, slack, anthropic_fake, make_config, start_cli
):
    reddit.listing("/r/acme/new").add(post(title="Acme 2.0 is out"))
    comments = reddit.listing("/r/acme/comments")
    comments.add(comment(body="nice", post_title="Acme 2.0 is out"))
    config = reddit_config(
        make_config, reddit, subreddit="acme", comments=True, client_id=CLIENT_ID,
        client_secret="${REDDIT_SECRET}",
    )  # fmt: skip
    proc = start_cli("run", config=config, env={"REDDIT_SECRET": SECRET})
    reddit.wait_for(lambda: reddit.hits("/r/acme/comments", 200) >= 2, timeout=15)
    new = comment(
        body="Since 2.0 the dashboard crashes every time I open it",
        author="[deleted]", post_title="Acme 2.0 is out",
    )  # fmt: skip
    comments.add(new)
    slack.wait_for(1, timeout=15)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    text = slack.text()
    assert "Acme 2.0 is out" in text
    assert new["data"]["permalink"] in text
    assert "Thanks for the report" in text  # the draft
    assert len(slack.posts()) == 1  # the baseline stayed quiet
    assert reddit.token_requests() == 1
    assert SECRET not in proc.stderr_text()


def test_the_process_stays_up_and_status_says_why_nothing_arrives(
    reddit, make_config, start_cli, run_cli
):
    reddit.listing("/r/acme/new").add(post())
    config = reddit_config(make_config, reddit, llm='provider = "none"', subreddit="acme",
                           anonymous_pace="1s")  # fmt: skip
    reddit.block_public = reddit.block_rss = True
    proc = start_cli("run", config=config)
    proc.wait_for_output(r"poll r-acme failed .*blocks both its public JSON and its RSS")
    status = run_cli("status", config=config, env={"COLUMNS": "1000"})
    assert status.returncode == 0, status.stderr
    assert "Reddit blocks both its public JSON and its RSS listings" in status.stdout
    assert "reddit.com/prefs/apps" in status.stdout
    reddit.script([("invalid_json",)])  # taken by the next request, blocked or not
    reddit.block_public = reddit.block_rss = False
    proc.wait_for_output(r"poll r-acme failed .*not valid JSON")
    proc.wait_for_output(r"source r-acme recovered")
    status = run_cli("status", config=config, env={"COLUMNS": "1000"})
    assert "public JSON (no client_id/client_secret); newest post" in status.stdout
    assert "blocks" not in status.stdout
    assert proc.returncode is None
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0


def test_preview_shows_what_the_source_returns_now(reddit, make_config, run_cli):
    reddit.listing("/r/acme/new").load("subreddit_new.json")
    config = reddit_config(make_config, reddit, subreddit="acme", client_id=CLIENT_ID,
                           client_secret=SECRET)  # fmt: skip
    result = run_cli("preview", "r-acme", config=config)
    assert result.returncode == 0, result.stderr
    assert "r-acme: 100 item(s)" in result.stdout and "t3_48fbm9" in result.stdout
    check = run_cli("check", config=config)
    assert f"r/acme new posts (OAuth as client id {CLIENT_ID})" in check.stdout
    reddit.script([("blocked",)])
    result = run_cli("preview", "r-acme", config=config)
    assert result.returncode == 1
    assert "r-acme: Reddit blocked this server's requests" in result.stderr


def three_sources_config(make_config, fake: FakeReddit, oauth: str = "", health: str = ""):
    sources = "".join(
        f"""
        [[sources]]
        name = "r-{sub}"
        type = "reddit"
        every = "1s"
        notify = "all"
        subreddit = "{sub}"
        comments = {json.dumps(sub == "acme")}
        anonymous_pace = "1s"
        base_url = "{fake.url}"
        oauth_base_url = "{fake.url}"
        {oauth}
        """
        for sub in ("acme", "beta", "gamma")
    )
    return make_config(f"""
        [agentwatch]
        db = "aw.db"
        health = "{health}"
        retry_base = "1s"
        retry_max = "2s"

        [llm]
        about = "Acme is an analytics tool."

        [slack]
        webhook_url = "${{SLACK_WEBHOOK_URL}}"
        {sources}
    """)


def test_without_oauth_rss_delivers_paced_and_oauth_later_posts_nothing_twice(
    reddit, slack, anthropic_fake, make_config, start_cli, run_cli
):
    reddit.block_public = True  # Reddit since May 2026
    for sub in ("acme", "beta", "gamma"):
        reddit.listing(f"/r/{sub}/new").add(post(title=f"old {sub} post", subreddit=sub))
    reddit.listing("/r/acme/comments").add(comment(body="old comment"))
    config = three_sources_config(make_config, reddit)
    proc = start_cli("run", config=config)
    feeds = ["/r/acme/new/.rss", "/r/acme/comments/.rss", "/r/beta/new/.rss", "/r/gamma/new/.rss"]
    reddit.wait_for(lambda: all(reddit.hits(f, 200) for f in feeds), timeout=30)
    assert anthropic_fake.calls() == 0  # the baseline costs no LLM call

    new = [
        post(title="Acme lost my dashboards", subreddit="acme"),
        comment(body="Acme crashes since 2.0", post_title="old acme post", post_id="zz9"),
        post(title="Is Acme worth it?", subreddit="beta"),
    ]
    reddit.listing("/r/acme/new").add(new[0])
    reddit.listing("/r/acme/comments").add(new[1])
    reddit.listing("/r/beta/new").add(new[2])
    slack.wait_for(3, timeout=40)
    status = run_cli("status", config=config, env={"COLUMNS": "1000"})
    assert status.returncode == 0, status.stderr
    assert "RSS (Reddit blocked the public JSON" in status.stdout
    assert "(403, an HTML page); tried again daily)" in status.stdout
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    assert anthropic_fake.calls("classify") == 3

    anonymous = reddit.requests()
    assert {r["path"] for r in anonymous if r["path"].endswith(".json")} == {
        "/r/acme/new.json", "/r/beta/new.json", "/r/gamma/new.json",
    }  # fmt: skip
    assert all(reddit.hits(p) == 1 for p in ("/r/acme/new.json", "/r/beta/new.json"))
    times = sorted(r["time"] for r in anonymous)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(times) >= 8 and min(gaps) >= 0.95, gaps  # one pace for the three sources

    # An approved app arrives: the same items come through OAuth, and only the
    # one that is new reaches Slack.
    reddit.listing("/r/gamma/new").add(new_gamma := post(title="Acme vs Bcme", subreddit="gamma"))
    oauth = f'client_id = "{CLIENT_ID}"\n        client_secret = "{SECRET}"'
    config = three_sources_config(make_config, reddit, oauth=oauth)
    before = len(reddit.requests())
    proc = start_cli("run", config=config)
    slack.wait_for(4, timeout=20)
    reddit.wait_for(lambda: reddit.hits("/r/acme/comments", 200) >= 2, timeout=15)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    assert all(r["auth"] == "bearer" for r in reddit.requests()[before:] if r["path"] != TOKEN_PATH)
    texts = slack.texts()
    assert len(texts) == 4
    for thing in [*new, new_gamma]:
        assert sum(thing["data"]["permalink"] in text for text in texts) == 1, (
            thing["data"]["permalink"],
            texts,
        )
    assert "Acme vs Bcme" in texts[3]


def test_a_private_feed_token_never_shows_in_the_log_status_or_health(
    reddit, make_config, start_cli, run_cli
):
    from test_ops import free_port, get, wait_health

    reddit.add_feed_token(FEED_USER, FEED_TOKEN)
    port = free_port()
    config = e2e_config(
        make_config, "reddit", 'provider = "none"', name="r-team", base_url=reddit.url,
        subreddit="acmeteam", feed_user=FEED_USER, feed_token="${FEED_TOKEN}",
    )  # fmt: skip
    config.write_text(config.read_text().replace('health = ""', f'health = "127.0.0.1:{port}"'))
    wrong = "wrong" + FEED_TOKEN
    proc = start_cli("run", config=config, env={"FEED_TOKEN": wrong})
    proc.wait_for_output(r"poll r-team failed .*auth_failed.*Reddit refused the private feed")
    health = wait_health(port, proc=proc)
    assert health["sources"]["r-team"]["last_error_kind"] == "auth_failed"
    texts = [get(port, "/health")[2].decode(), get(port, "/metrics")[2].decode()]
    status = run_cli("status", config=config, env={"FEED_TOKEN": wrong, "COLUMNS": "1000"})
    assert "Reddit refused the private feed of u/acme_founder" in status.stdout
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    assert reddit.requests()[0]["query"]["feed"] == wrong  # it was sent, to Reddit only
    for text in [*texts, status.stdout, status.stderr, proc.stderr_text(), proc.stdout_text()]:
        assert FEED_TOKEN not in text
