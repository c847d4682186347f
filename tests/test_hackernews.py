"""The hackernews source: the recorded Algolia answers, then polling a fake Algolia on
loopback (since-filters, paging, rate limits, failures), and one run end to end."""

from __future__ import annotations

import signal
import time

import pytest
from agentwatch_sources.hackernews import hackernews_items
from fake_apis import FakeHN, corpus, hn_comment, hn_story
from sources_harness import e2e_config, harness, ids, run

from agentwatch import ConfigError, StageError, build_source_config


@pytest.fixture
def hn():
    with FakeHN() as fake:
        yield fake


# ###########################################################################
# Parsing the recorded answers
# ###########################################################################


def test_a_recorded_comment_decodes_its_entities_and_names_its_story():
    items, pages = hackernews_items(
        corpus("hackernews/algolia_search_by_date_comment_2014.json")["body"]
    )
    assert pages == 1000
    (item,) = items
    assert item.item_id == "7919431" and item.kind == "comment"
    assert item.title == "Comment on: Fibonacci Flim-Flam"
    assert item.url == "https://news.ycombinator.com/item?id=7919431"
    assert item.author == "gohrt" and item.published_at == 1403235595.0
    assert "What's fascinating about this topic" in item.body
    assert "https://hn.algolia.com/?q=Fibonacci+Flim-Flam#!/all/forever/..." in item.body
    assert "&#x27;" not in item.body and "<p>" not in item.body and "<a " not in item.body
    assert item.extra == {"points": 1, "story_id": 7919207, "parent_id": 7919207,
                          "story_url": "http://www.lhup.edu/~dsimanek/pseudo/fibonacc.htm"}  # fmt: skip


def test_recorded_stories_keep_their_link_and_2014_backslashes():
    items, _ = hackernews_items(corpus("hackernews/algolia_search_story_query_2014.json")["body"])
    assert items[0].title == "Steve Jobs Resigns as CEO of Apple" and items[0].kind == "story"
    assert items[0].extra["link"].startswith("http://finance.yahoo.com/news/Steve-Jobs")
    assert items[0].extra["points"] == 1638 and items[0].body == ""  # story_text ""
    items, pages = hackernews_items(
        corpus("hackernews/algolia_search_by_date_ask_hn_page2_2014.json")["body"]
    )
    ask = items[0]
    assert pages == 849 and ask.item_id == "7915384" and "link" not in ask.extra  # url ""
    # The literal two-character "\t" and "\n" of 2014 are kept as written; entities decoded.
    assert ask.body.startswith("\\tHello HN,\\nI'm a college student")


def test_ids_are_unique_strings_and_highlighting_is_ignored():
    body = corpus("hackernews/algolia_search_url_restrict.json")["body"]
    items, pages = hackernews_items(body)
    assert pages == 1 and len(items) == 4 and len(set(ids(items))) == 4
    assert all(isinstance(i, str) and i.isdigit() for i in ids(items))
    assert items[0].title == "Why aren\u2019t we using SSH for everything?"
    assert all("<em>" not in i.title + i.body for i in items)


def test_deleted_authors_null_texts_integer_ids_and_duplicates():
    hits = corpus("hackernews/algolia_search_by_date_comment_2014.json")["body"]["hits"]
    deleted = {**hits[0], "author": None, "comment_text": None, "objectID": 123}
    answer = {"hits": [deleted, dict(deleted), {"title": "no id"}, "garbage"], "nbPages": 1}
    items, _ = hackernews_items(answer)
    assert ids(items) == ["123"]
    assert items[0].author == "" and items[0].body == "" and items[0].title


@pytest.mark.parametrize("answer", [[], {"message": "x"}, {"hits": "no"}, "nope"])
def test_json_without_hits_is_a_bad_response(answer):
    with pytest.raises(StageError) as caught:
        hackernews_items(answer)
    assert caught.value.kind == "bad_response"


@pytest.mark.parametrize(
    ("table", "message"),
    [({}, "query: is required"), ({"query": " "}, "query must not be empty"),
     ({"query": "a", "tags": ["nope"]}, "unknown tag 'nope'"),
     ({"query": "a", "min_points": -1}, "min_points must not be negative"),
     ({"query": "a", "base_url": "ftp://x"}, "base_url must start with")],
)  # fmt: skip
def test_bad_options_are_config_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        build_source_config({"name": "h", "type": "hackernews", **table}, "sources[0]")


# ###########################################################################
# Polling
# ###########################################################################


def test_baseline_then_only_what_is_new_with_a_created_after_filter(hn):
    hn.add(hn_story(title="Acme 1.0", created=time.time() - 3600),
           hn_comment(text="acme is nice", created=time.time() - 60),
           hn_story(title="Unrelated", url="https://other.example/"))  # fmt: skip

    async def go():
        async with harness() as h:
            src = h.source("hackernews", query="acme", base_url=hn.url)
            first = await h.poll(src)
            assert sorted(i.kind for i in first) == ["comment", "story"]
            assert "numericFilters" not in hn.requests()[0]["query"]
            assert hn.requests()[0]["query"]["tags"] == "(story,comment)"
            new = hn_comment(text="Acme crashes on start", story_title="Acme 1.0")
            hn.add(new)
            second = await h.poll(src)
            since = int(src.state["since"])
            assert hn.requests()[1]["query"]["numericFilters"].startswith("created_at_i>")
            assert new["objectID"] in ids(second) and len(hn.requests()) == 2
            assert since >= new["created_at_i"]
            assert "request(s) last poll" in type(src).describe_state(src.state)

    run(go())


def test_a_burst_into_an_empty_search_is_paged_through(hn):
    async def go():
        async with harness() as h:
            src = h.source("hackernews", query="acme", base_url=hn.url)
            assert await h.poll(src) == []  # polled, found nothing: not "never polled"
            assert type(src).describe_state(src.state).startswith("nothing found yet")
            now = time.time()
            burst = [hn_comment(text=f"acme {n}", created=now - 250 + n) for n in range(250)]
            hn.add(*burst)
            found = await h.poll(src)
            assert len(found) == 250 and len(set(ids(found))) == 250
            assert [r["query"]["page"] for r in hn.requests()[1:]] == ["0", "1", "2"]

    run(go())


def test_the_baseline_reads_one_page_only(hn):
    hn.add(*[hn_comment(text=f"acme {n}") for n in range(150)])

    async def go():
        async with harness() as h:
            src = h.source("hackernews", query="acme", base_url=hn.url)
            assert len(await h.poll(src)) == 100 and hn.hits() == 1

    run(go())


def test_min_points_reports_a_story_once_it_reaches_the_bar(hn):
    story = hn_story(title="Acme launches", points=3)
    hn.add(story)

    async def go():
        async with harness() as h:
            src = h.source("hackernews", query="acme", min_points=50, base_url=hn.url)
            await h.poll(src)
            queries = [r["query"] for r in hn.requests()]
            assert {q["tags"] for q in queries} == {"story", "(comment)"}
            points = next(q for q in queries if q["tags"] == "story")["numericFilters"]
            assert points.startswith("points>=50,created_at_i>")
            story["points"] = 120  # the fake serves the same dict: it gained points
            found = await h.poll(src)
            assert ids(found) == [story["objectID"]]

    run(go())


def test_a_429_holds_every_hackernews_source_back(hn):
    hn.script([("status", 429, "Too many requests")])

    async def go():
        async with harness(fetch_timeout=1) as h:
            a = h.source("hackernews", name="a", query="acme", base_url=hn.url)
            b = h.source("hackernews", name="b", query="other", base_url=hn.url)
            with pytest.raises(StageError) as caught:
                await h.poll(a)
            e = caught.value
            assert e.kind == "rate_limited" and 50 <= e.retry_after <= 60
            assert "rate-limited this server (429); resumes in 1m" in str(e)
            with pytest.raises(StageError) as caught:  # no request before the 60 s are over
                await h.poll(b)
            assert caught.value.kind == "rate_limited" and hn.hits() == 1

    run(go())


@pytest.mark.parametrize(
    ("fault", "kind", "words"),
    [(("status", 503), "server_error", "answered 503"),
     (("html", 502), "server_error", "answered 502"),
     (("invalid_json",), "bad_response", "not JSON"),
     (("status", 403), "blocked", "refuses this server"),
     (("status", 400, "invalid tags"), "bad_response", "refused the query (400: invalid tags)")],
)  # fmt: skip
def test_failures_are_told_apart(hn, fault, kind, words):
    hn.script([fault])

    async def go():
        async with harness() as h:
            src = h.source("hackernews", query="acme", base_url=hn.url)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == kind and words in str(caught.value)
            assert src.state == {}  # nothing kept from a failed poll

    run(go())


def test_an_unreachable_api_says_so(offline):
    async def go():
        async with harness() as h:
            src = h.source("hackernews", query="acme", base_url=offline)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == "unreachable"
            assert "cannot reach Hacker News search" in str(caught.value)

    run(go())


# ###########################################################################
# End to end
# ###########################################################################


def test_new_items_reach_slack_once_and_the_baseline_costs_no_llm_call(
    hn, slack, anthropic_fake, make_config, start_cli
):
    hn.add(hn_story(title="Acme 1.0 released"), hn_comment(text="acme looks nice"))
    config = e2e_config(make_config, "hackernews", query="acme", base_url=hn.url)
    proc = start_cli("run", config=config)
    hn.wait_for(lambda: hn.hits("/api/v1/search_by_date", 200) >= 2, timeout=15)
    assert anthropic_fake.calls() == 0  # the baseline is recorded as seen, never classified
    new = hn_comment(text="Acme crashes when I import a CSV", story_title="Acme 1.0 released")
    hn.add(new)
    slack.wait_for(1, timeout=15)
    hn.wait_for(lambda: hn.hits("/api/v1/search_by_date", 200) >= 5, timeout=15)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    assert len(slack.posts()) == 1
    text = slack.text()
    assert f"https://news.ycombinator.com/item?id={new['objectID']}" in text
    assert "Acme 1.0 released" in text
    assert anthropic_fake.calls("classify") == 1
