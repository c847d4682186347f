"""The stackexchange source: the recorded answers, then polling a fake Stack Exchange
on loopback (fromdate, paging, backoff, quota, errors in the body, gzip without
a header, keys), and one run end to end."""

from __future__ import annotations

import gzip
import json
import signal
import time

import pytest
from agentwatch_sources.stackexchange import decode, stackexchange_items
from fake_apis import FakeStackExchange, corpus, se_question
from sources_harness import e2e_config, harness, ids, run

from agentwatch import ConfigError, StageError, build_source_config

KEY = "se-app-key-0123456789"


@pytest.fixture
def se():
    with FakeStackExchange() as fake:
        fake.add_key(KEY)
        yield fake


# ###########################################################################
# Parsing the recorded answers
# ###########################################################################


def test_recorded_questions_become_items_with_their_paging_flag():
    body = corpus("stackexchange/questions_tagged_openshift_has_more.json")["body"]
    items, more = stackexchange_items(body, "stackoverflow")
    assert more and len(items) == 5 and len(set(ids(items))) == 5
    first = items[0]
    assert first.item_id == "27751666" and first.kind == "question"
    assert first.title == "Websocket with Tyrus in Openshift" and first.author == "H_DANILO"
    assert (
        first.url == "http://stackoverflow.com/questions/27751666/websocket-with-tyrus-in-openshift"
    )
    assert first.published_at == 1420258632.0
    assert first.extra["tags"] == ["java", "websocket", "openshift", "wildfly-8", "tyrus"]
    items, more = stackexchange_items(
        corpus("stackexchange/questions_tagged_openshift_enterprise_last_page.json")["body"]
    )
    assert not more and len(items) == 8


def test_html_entities_of_plain_fields_are_decoded_once():
    question = corpus("stackexchange/questions_tagged_openshift_has_more.json")["body"]["items"][0]
    # The recorded comment author's name, and a title as the API encodes it.
    name = corpus("stackexchange/question_comments_html_entities.json")["body"]["items"][0]["owner"]
    odd = {**question, "title": "Tom &amp; Jerry&#39;s &quot;app&quot; &amp;lt;3", "owner": name,
           "body": "<p>a &lt;b&gt; tag</p>"}  # fmt: skip
    (item,) = stackexchange_items({"items": [odd]})[0]
    assert item.author == "André Caron"
    assert item.title == 'Tom & Jerry\'s "app" &lt;3'  # decoded once, not twice
    assert item.body == "a <b> tag"


def test_missing_and_deleted_owners_string_ids_and_duplicates():
    question = corpus("stackexchange/questions_tagged_openshift_has_more.json")["body"]["items"][0]
    gone = {**question, "question_id": "77"}
    gone.pop("owner")
    deleted = {**question, "question_id": 78, "owner": {"user_type": "does_not_exist",
                                                        "display_name": "user123"}}  # fmt: skip
    items, _ = stackexchange_items({"items": [gone, dict(gone), deleted, {"title": "no id"}, 1]})
    assert ids(items) == ["77", "78"]
    assert items[0].author == "" and items[1].extra["owner_deleted"] is True


def test_recorded_error_bodies_and_gzip_without_a_header():
    error = corpus("stackexchange/error_502_throttle_violation_backoff.json")["body"]
    assert decode(gzip.compress(json.dumps(error).encode())) == error
    assert decode(json.dumps(error).encode())["error_name"] == "throttle_violation"
    with pytest.raises(StageError) as caught:
        decode(b"<html>")
    assert caught.value.kind == "bad_response"


@pytest.mark.parametrize(
    ("table", "message"),
    [({}, "needs a query, tagged, or both"), ({"query": "a", "site": "Stack Overflow"}, "site must be"),
     ({"query": "a", "base_url": "ftp://x"}, "base_url must start with")],
)  # fmt: skip
def test_bad_options_are_config_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        build_source_config({"name": "s", "type": "stackexchange", **table}, "sources[0]")


# ###########################################################################
# Polling
# ###########################################################################


def test_baseline_then_fromdate_with_tags_and_the_key(se):
    se.add(se_question(title="acme old", created=time.time() - 3600, tags=["acme", "python"]))

    async def go():
        async with harness() as h:
            src = h.source("stackexchange", query="acme", tagged=["Acme"], key=KEY, base_url=se.url)
            (first,) = await h.poll(src)
            assert first.body == "It fails & I don't know why" and first.author == "André Caron"
            q = se.requests()[0]["query"]
            assert q["tagged"] == "acme" and q["sort"] == "creation" and q["filter"] == "withbody"
            assert q["key"] == KEY and "fromdate" not in q
            new = se_question(title="acme &amp; docker crash", name=None)
            se.add(new)
            found = await h.poll(src)
            assert (
                ids(found) == [str(new["question_id"])] and found[0].title == "acme & docker crash"
            )
            assert int(se.requests()[1]["query"]["fromdate"]) >= first.published_at - 60
            assert "quota left today 9998" in type(src).describe_state(src.state)

    run(go())


def test_a_burst_into_an_empty_search_is_paged_through(se):
    async def go():
        async with harness() as h:
            src = h.source("stackexchange", query="acme", base_url=se.url)
            assert await h.poll(src) == []
            later = time.time() + 1  # the burst comes after the empty poll
            se.add(*[se_question(title=f"acme {n}", created=later + n) for n in range(250)])
            found = await h.poll(src)
            assert len(set(ids(found))) == 250
            assert [r["query"]["page"] for r in se.requests()[1:]] == ["1", "2", "3"]

    run(go())


def test_backoff_is_obeyed_by_the_next_request(se):
    se.backoff = 1
    se.add(*[se_question(title=f"acme {n}", created=time.time() - 10) for n in range(150)])

    async def go():
        async with harness() as h:
            src = h.source("stackexchange", query="acme", base_url=se.url)
            src.state = {"since": time.time() - 100}
            assert len(await h.poll(src)) == 150  # two pages, the second after the backoff
            first, second = se.requests()
            assert second["time"] - first["time"] >= 0.95
            assert all(r["status"] == 200 for r in se.requests())

    run(go())


def test_a_long_backoff_fails_the_next_poll_without_a_request(se):
    se.script([("backoff", 120)])

    async def go():
        async with harness(fetch_timeout=1) as h:
            a = h.source("stackexchange", name="a", query="acme", base_url=se.url)
            b = h.source("stackexchange", name="b", query="other", base_url=se.url)
            await h.poll(a)
            with pytest.raises(StageError) as caught:
                await h.poll(b)
            assert caught.value.kind == "rate_limited" and caught.value.retry_after > 100
            assert se.hits() == 1

    run(go())


def test_a_spent_quota_waits_for_midnight_utc(se):
    se.quota = 1

    async def go():
        async with harness(fetch_timeout=1) as h:
            src = h.source("stackexchange", query="acme", base_url=se.url)
            await h.poll(src)  # quota_remaining: 0
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == "rate_limited" and se.hits() == 1
            midnight = 86400 - time.time() % 86400
            assert abs(caught.value.retry_after - midnight) < 5

    run(go())


def test_a_throttle_violation_says_when_it_resumes(se):
    se.script(
        [
            (
                "error",
                502,
                "throttle_violation",
                "too many requests from this IP, more requests available in 45 seconds",
            )
        ]
    )

    async def go():
        async with harness(fetch_timeout=1) as h:
            src = h.source("stackexchange", query="acme", base_url=se.url)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            e = caught.value
            assert e.kind == "rate_limited" and e.retry_after == 45
            assert "resumes in 45s" in str(e) and "a `key`" in str(e)

    run(go())


def test_a_bad_key_is_auth_failed(se):
    async def go():
        async with harness() as h:
            src = h.source("stackexchange", query="acme", key="wrong-key-value", base_url=se.url)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            e = caught.value
            assert e.kind == "auth_failed" and "set `key`" in str(e) and "wrong-key" not in str(e)

    run(go())


def test_answers_gzipped_without_a_header_are_read(se):
    se.gzip_always = True
    se.add(se_question(title="acme"))

    async def go():
        async with harness() as h:
            src = h.source("stackexchange", query="acme", base_url=se.url)
            assert len(await h.poll(src)) == 1

    run(go())


@pytest.mark.parametrize(
    ("fault", "kind", "words"),
    [(("error", 503, "temporarily_unavailable", "down"), "server_error", "503 temporarily_unavailable"),
     (("error", 400, "bad_parameter", "site"), "bad_response", "check `site`"),
     (("html", 503), "server_error", "answered 503"),
     (("invalid_json",), "bad_response", "not JSON")],
)  # fmt: skip
def test_failures_are_told_apart(se, fault, kind, words):
    se.script([fault])

    async def go():
        async with harness() as h:
            src = h.source("stackexchange", query="acme", base_url=se.url)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == kind and words in str(caught.value)

    run(go())


# ###########################################################################
# End to end
# ###########################################################################


def test_new_questions_reach_slack_once_and_the_key_never_shows(
    se, slack, anthropic_fake, make_config, start_cli, run_cli
):
    se.add(se_question(title="acme setup", created=time.time() - 600))
    config = e2e_config(
        make_config, "stackexchange", query="acme", key="${SE_KEY}", base_url=se.url
    )
    env = {"SE_KEY": KEY}
    proc = start_cli("run", config=config, env=env)
    se.wait_for(lambda: se.hits(status=200) >= 2, timeout=15)
    assert anthropic_fake.calls() == 0
    new = se_question(title="acme crashes on import", body="<p>Traceback &hellip;</p>")
    se.add(new)
    slack.wait_for(1, timeout=15)
    se.wait_for(lambda: se.hits(status=200) >= 5, timeout=15)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    assert len(slack.posts()) == 1 and new["link"] in slack.text()
    assert anthropic_fake.calls("classify") == 1
    status = run_cli("status", config=config, env=env)
    assert status.returncode == 0
    for text in (proc.stderr_text(), proc.stdout_text(), status.stdout, slack.text()):
        assert KEY not in text
