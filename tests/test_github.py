"""The github source: the recorded search answers, then polling a fake GitHub on
loopback (created-after filters, paging, primary and secondary rate limits,
tokens), and one run end to end."""

from __future__ import annotations

import signal
import time

import pytest
from agentwatch_sources.github import github_items, next_page
from fake_apis import FakeGitHub, corpus, gh_issue
from sources_harness import e2e_config, harness, ids, run

from agentwatch import ConfigError, StageError, build_source_config

TOKEN = "ghp_fakeTokenValue0123456789"


@pytest.fixture
def gh():
    with FakeGitHub() as fake:
        fake.add_token(TOKEN)
        yield fake


# ###########################################################################
# Parsing the recorded answers
# ###########################################################################


def test_recorded_search_results_become_issues_and_pull_requests():
    items, incomplete = github_items(corpus("github/search_issues_pygithub_2014.json")["body"])
    assert len(items) == 30 and len(set(ids(items))) == 30 and not incomplete
    first = items[0]
    assert first.item_id == "12068673" and first.kind == "pull_request"
    assert first.url == "https://github.com/hrydgard/ppsspp/pull/997"
    assert first.author == "oioitff" and first.published_at == 1363362376.0
    assert first.extra["repo"] == "hrydgard/ppsspp" and first.extra["number"] == 997
    # 2014 issues carry a pull_request object with null URLs: they are issues.
    assert [i.kind for i in items].count("issue") == 11  # their html_url is /issues/
    items, _ = github_items(
        {"items": corpus("github/repo_issues_includes_pull_requests_2024.json")["body"]}
    )
    assert [i.kind for i in items].count("pull_request") == 9 and len(items) == 30


def test_recent_search_answer_with_unicode_and_rate_limit_headers():
    recorded = corpus("github/search_issues_with_ratelimit_headers.json")
    items, _ = github_items(recorded["body"])
    assert ids(items) == ["1308970076", "1308970043"]
    assert items[0].title == "Sesame seeds split without a pop!"
    assert items[0].body == "I\u2019ve waited all year long, but there was no pop \U0001f62d"
    assert recorded["headers"]["x-ratelimit-resource"] == "search"


def test_null_bodies_deleted_users_and_string_ids():
    issue = corpus("github/search_issues_with_ratelimit_headers.json")["body"]["items"][0]
    ghost = {**issue, "body": None, "user": None, "id": "1234"}
    answer = {
        "items": [ghost, dict(ghost), {"title": "no id"}, "garbage"],
        "incomplete_results": True,
    }
    items, incomplete = github_items(answer)
    assert ids(items) == ["1234"] and incomplete
    assert items[0].body == "" and items[0].author == ""


def test_the_incomplete_flag_of_a_recorded_answer():
    _, incomplete = github_items(corpus("github/search_code_incomplete_results_2026.json")["body"])
    assert incomplete


def test_paging_reads_rel_next_from_the_recorded_link_headers():
    assert next_page(corpus("github/search_issues_pygithub_2014.json")["headers"]["link"]) == 2
    assert next_page(corpus("github/repo_issues_page1_link_header.json")["headers"]["link"]) == 2
    assert (
        next_page(corpus("github/repo_issues_last_page_link_header.json")["headers"]["link"])
        is None
    )
    assert next_page(None) is None


@pytest.mark.parametrize("answer", [[], {"message": "x"}, {"items": "no"}])
def test_json_without_items_is_a_bad_response(answer):
    with pytest.raises(StageError) as caught:
        github_items(answer)
    assert caught.value.kind == "bad_response"


@pytest.mark.parametrize(
    ("table", "message"),
    [({}, "query: is required"), ({"query": "acme created:>2020-01-01"}, "must not contain created:"),
     ({"query": "a", "base_url": "ftp://x"}, "base_url must start with")],
)  # fmt: skip
def test_bad_options_are_config_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        build_source_config({"name": "g", "type": "github", **table}, "sources[0]")


# ###########################################################################
# Polling
# ###########################################################################


def test_baseline_then_new_items_with_a_created_filter(gh):
    gh.add(gh_issue(title="acme is slow", created=time.time() - 3600), gh_issue(title="other"))

    async def go():
        async with harness() as h:
            src = h.source("github", query="acme", base_url=gh.url)
            assert len(await h.poll(src)) == 1
            q = gh.requests()[0]["query"]
            assert q["q"] == "acme" and q["sort"] == "created" and q["order"] == "desc"
            assert "authorization" not in gh.requests()[0]["headers"]
            new = gh_issue(title="acme crashes", body=None, login=None, pull=True)
            gh.add(new)
            found = await h.poll(src)
            assert str(new["id"]) in ids(found) and found[0].kind == "pull_request"
            assert " created:>=" in gh.requests()[1]["query"]["q"]

    run(go())


def test_a_burst_into_an_empty_search_is_paged_through(gh):
    async def go():
        async with harness() as h:
            src = h.source("github", query="acme", base_url=gh.url)
            assert await h.poll(src) == []
            now = time.time()
            gh.add(*[gh_issue(title=f"acme {n}", created=now - 250 + n) for n in range(250)])
            found = await h.poll(src)
            assert len(set(ids(found))) == 250
            assert [r["query"]["page"] for r in gh.requests()[1:]] == ["1", "2", "3"]

    run(go())


def test_the_token_is_sent_and_its_budget_read(gh):
    gh.rate_limit(30)
    gh.add(gh_issue(title="acme"))

    async def go():
        async with harness() as h:
            src = h.source("github", query="acme", token=TOKEN, base_url=gh.url)
            await h.poll(src)
            assert gh.requests()[0]["headers"]["authorization"] == f"Bearer {TOKEN}"
            assert src.budget.remaining == 29 and src.budget.sent == 1

    run(go())


def test_a_spent_search_budget_waits_for_the_reset_without_requests(gh):
    gh.rate_limit(1, window=3600)

    async def go():
        async with harness(fetch_timeout=1) as h:
            src = h.source("github", query="acme", base_url=gh.url)
            await h.poll(src)  # the window's one request; Remaining is now 0
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == "rate_limited" and caught.value.retry_after > 60
            assert gh.hits() == 1  # no request went out before the reset

    run(go())


def test_a_primary_limit_answer_names_the_token_as_the_way_out(gh):
    gh.rate_limit(0, window=3600)

    async def go():
        async with harness(fetch_timeout=1) as h:
            src = h.source("github", query="acme", base_url=gh.url)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            e = caught.value
            assert e.kind == "rate_limited" and "search limit for this server's address" in str(e)
            assert "a `token`" in str(e) and "resumes in" in str(e)

    run(go())


@pytest.mark.parametrize("status", [403, 429])
def test_a_secondary_limit_holds_every_source_of_the_token_back(gh, status):
    gh.script([("secondary", status, 30)])

    async def go():
        async with harness(fetch_timeout=1) as h:
            a = h.source("github", name="a", query="acme", token=TOKEN, base_url=gh.url)
            b = h.source("github", name="b", query="other", token=TOKEN, base_url=gh.url)
            with pytest.raises(StageError) as caught:
                await h.poll(a)
            e = caught.value
            assert e.kind == "rate_limited" and e.retry_after == 30
            assert f"secondary rate limit holds back this token ({status})" in str(e)
            with pytest.raises(StageError) as caught:
                await h.poll(b)
            assert caught.value.kind == "rate_limited" and gh.hits() == 1

    run(go())


def test_the_recorded_abuse_answer_is_a_rate_limit(gh):
    gh.script([("recorded", "search_403_abuse_rate_limit_retry_after.json")])

    async def go():
        async with harness(fetch_timeout=1) as h:
            src = h.source("github", query="acme", base_url=gh.url)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == "rate_limited" and caught.value.retry_after == 60

    run(go())


def test_a_short_secondary_limit_is_waited_out_then_the_poll_goes_on(gh):
    gh.script([("secondary", 429, 1)])
    gh.add(gh_issue(title="acme"))

    async def go():
        async with harness() as h:
            a = h.source("github", name="a", query="acme", base_url=gh.url)
            b = h.source("github", name="b", query="acme", base_url=gh.url)
            with pytest.raises(StageError):
                await h.poll(a)
            assert len(await h.poll(b)) == 1  # waited for the Retry-After, then asked
            first, second = gh.requests()
            assert second["time"] - first["time"] >= 0.95

    run(go())


def test_a_bad_token_is_auth_failed_and_says_what_to_set(gh):
    async def go():
        async with harness() as h:
            src = h.source("github", query="acme", token="ghp_wrong_token_value", base_url=gh.url)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            e = caught.value
            assert e.kind == "auth_failed" and "set `token`" in str(e)
            assert "github.com/settings/tokens" in str(e) and "ghp_wrong" not in str(e)

    run(go())


@pytest.mark.parametrize(
    ("fault", "kind", "words"),
    [(("status", 503), "server_error", "answered 503"),
     (("invalid_json",), "bad_response", "not JSON"),
     (("status", 403, "Resource not accessible"), "blocked", "403 Resource not accessible"),
     (("status", 422, "Validation Failed"), "bad_response", "check `query`")],
)  # fmt: skip
def test_failures_are_told_apart(gh, fault, kind, words):
    gh.script([fault])

    async def go():
        async with harness() as h:
            src = h.source("github", query="acme", base_url=gh.url)
            with pytest.raises(StageError) as caught:
                await h.poll(src)
            assert caught.value.kind == kind and words in str(caught.value)

    run(go())


# ###########################################################################
# End to end
# ###########################################################################


def test_new_issues_reach_slack_once_and_the_token_never_shows(
    gh, slack, anthropic_fake, make_config, start_cli, run_cli
):
    gh.rate_limit(30)
    gh.add(gh_issue(title="acme: old issue", created=time.time() - 600))
    config = e2e_config(make_config, "github", query="acme", token="${GH_TOKEN}", base_url=gh.url)
    env = {"GH_TOKEN": TOKEN}
    proc = start_cli("run", config=config, env=env)
    gh.wait_for(lambda: gh.hits("/search/issues", 200) >= 2, timeout=15)
    assert anthropic_fake.calls() == 0
    new = gh_issue(title="acme crashes on login", body="Stack trace attached", repo="acme/app")
    gh.add(new)
    slack.wait_for(1, timeout=15)
    gh.wait_for(lambda: gh.hits("/search/issues", 200) >= 5, timeout=15)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    assert len(slack.posts()) == 1 and new["html_url"] in slack.text()
    assert anthropic_fake.calls("classify") == 1
    status = run_cli("status", config=config, env=env)
    assert status.returncode == 0, status.stderr
    for text in (
        proc.stderr_text(),
        proc.stdout_text(),
        status.stdout,
        status.stderr,
        slack.text(),
    ):
        assert TOKEN not in text
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in gh.requests())
