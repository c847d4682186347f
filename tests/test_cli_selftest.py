"""`agentwatch test` (issue 15): one test message to every destination, one
minimal LLM call, one poll of every source that stores nothing; a line per check,
exit 1 when any failed. Run as a subprocess against the fakes."""

from __future__ import annotations

import json
import sqlite3

from fakes import FakeReceiver, rss
from helpers import recent

SECRET = "hmac-secret-not-for-output"


def _config(make_config, feeds, *, discord: str = "", webhook: str = "", llm: str = "") -> object:
    feeds.set("/a.xml", rss([{"title": "first post", "link": "https://x/1", "pub_date": recent()}]))
    extra = ""
    if discord:
        extra += f'[discord]\nwebhook_url = "{discord}/d"\n'
    if webhook:
        extra += f'[webhook]\nurl = "{webhook}/w"\nsecret = "{SECRET}"\n'
    return make_config(
        f'[agentwatch]\ndb = "aw.db"\nhealth = ""\n{llm}'
        f'[slack]\nwebhook_url = "${{SLACK_WEBHOOK_URL}}"\n{extra}'
        f'[[sources]]\nname = "blog"\ntype = "rss"\nurl = "{feeds.url}/a.xml"\nbackfill = 5\n'
    )


def _lines(stdout: str) -> dict[str, str]:
    """ "name: rest" lines by name."""
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


def test_all_good_exits_0_and_reaches_every_destination(
    slack, anthropic_fake, feeds, make_config, run_cli
):
    with FakeReceiver(discord=True) as discord, FakeReceiver() as hook:
        config = _config(make_config, feeds, discord=discord.url, webhook=hook.url)
        result = run_cli("test", config=config)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = _lines(result.stdout)
        for name in ("slack", "discord", "webhook", "llm", "source blog"):
            assert lines[name].startswith("ok — "), (name, result.stdout)
        assert "1 item(s)" in lines["source blog"]
        assert "all 5 check(s) passed" in result.stdout
        assert len(slack.posts("/hooks/env")) == 1
        assert "agentwatch test message" in slack.text("/hooks/env")
        assert len(discord.received()) == 1 and len(hook.received()) == 1
        # The signed webhook is signed as the engine signs items.
        assert hook.received()[0]["headers"]["x-agentwatch-signature"].startswith("sha256=")
        calls = anthropic_fake.requests
        assert len(calls) == 1 and calls[0]["json"]["max_tokens"] == 1
        assert SECRET not in result.stdout + result.stderr
        assert slack.url not in result.stdout  # the webhook URL is a secret


def test_a_destination_answering_404_fails_and_is_named(
    slack, anthropic_fake, feeds, make_config, run_cli
):
    slack.set_default(404, "no_service", path="/hooks/env")
    with FakeReceiver(discord=True) as discord:
        config = _config(make_config, feeds, discord=discord.url)
        result = run_cli("test", config=config)
        as_json = run_cli("test", "--json", config=config)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = _lines(result.stdout)
    assert lines["slack"].startswith("FAILED — "), result.stdout
    assert "404" in lines["slack"] and "$SLACK_WEBHOOK_URL" in lines["slack"]
    assert lines["discord"].startswith("ok — ") and lines["llm"].startswith("ok — ")
    assert "1 of 4 check(s) failed" in result.stdout
    assert slack.url not in result.stdout
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    results = {c["check"]: c["result"] for c in report["checks"]}
    assert results == {"slack": "failed", "discord": "ok", "llm": "ok", "source blog": "ok"}


def test_a_failing_source_and_a_refused_key_are_failed_checks(
    slack, anthropic_fake, feeds, make_config, run_cli
):
    config = _config(make_config, feeds)
    with open(config, "a") as f:
        f.write(f'[[sources]]\nname = "gone"\ntype = "rss"\nurl = "{feeds.url}/gone.xml"\n')
    anthropic_fake.set_default_fault(("status", 401, "authentication_error"))
    result = run_cli("test", config=config)
    assert result.returncode == 1
    lines = _lines(result.stdout)
    assert lines["source gone"].startswith("FAILED — ") and "404" in lines["source gone"]
    assert "agentwatch preview gone" in lines["source gone"]
    assert lines["source blog"].startswith("ok — ")
    assert lines["llm"].startswith("FAILED — ") and "ANTHROPIC_API_KEY" in lines["llm"]
    assert lines["slack"].startswith("ok — ")


def test_without_an_llm_the_call_is_skipped(slack, feeds, make_config, run_cli):
    config = _config(make_config, feeds, llm='[llm]\nprovider = "none"\n')
    result = run_cli("test", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _lines(result.stdout)["llm"].startswith("skipped — ")


def _dump(db) -> list[str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(con.iterdump())
    finally:
        con.close()


def test_the_database_is_unchanged(slack, anthropic_fake, feeds, make_config, run_cli, tmp_path):
    config = _config(make_config, feeds)
    assert run_cli("run", "--once", config=config).returncode == 0
    db = tmp_path / "aw.db"
    before = _dump(db)
    assert any("first post" in line for line in before)
    # New items a stored poll would admit, classify and post.
    feeds.set("/a.xml", rss([
        {"title": "second post", "link": "https://x/2", "pub_date": recent(1)},
        {"title": "first post", "link": "https://x/1", "pub_date": recent()},
    ]))  # fmt: skip
    posts, calls = len(slack.posts()), len(anthropic_fake.requests)
    result = run_cli("test", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 item(s)" in _lines(result.stdout)["source blog"]
    assert _dump(db) == before
    assert len(slack.posts()) == posts + 1 and len(anthropic_fake.requests) == calls + 1


def test_help_has_an_example(run_cli):
    result = run_cli("test", "--help")
    assert result.returncode == 0
    assert "Example: agentwatch" in result.stdout
