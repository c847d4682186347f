"""agentwatch as a user runs it: a subprocess, real fakes on loopback, signals."""

from __future__ import annotations

import itertools
import json
import signal
import time

from fakes import atom, rss
from helpers import items, recent, rows, wait_until

BASE = """
[agentwatch]
db = "aw.db"
health = ""
retry_base = "1s"
retry_max = "2s"
max_attempts = {max_attempts}

[llm]
about = "Acme, a self-hosted analytics tool"
timeout = "{llm_timeout}"

[slack]
webhook_url = "${{SLACK_WEBHOOK_URL}}"
"""


def config_text(*sources: str, max_attempts: int = 3, llm_timeout: str = "5s") -> str:
    return BASE.format(max_attempts=max_attempts, llm_timeout=llm_timeout) + "\n".join(sources)


def rss_source(name: str, url: str, every: str = "1s", extra: str = "") -> str:
    return (
        f'\n[[sources]]\nname = "{name}"\ntype = "rss"\nurl = "{url}"\nevery = "{every}"\n{extra}\n'
    )


def entry(n: int, title: str, minutes_ago: float = 1) -> dict:
    return {
        "title": title,
        "link": f"https://forum.example/t/{n}",
        "guid": f"urn:post:{n}",
        "description": f"Body of post {n}: {title}",
        "pub_date": recent(minutes_ago),
    }


OLD = [entry(i, f"Old post number {i}", 30 + i) for i in range(1, 4)]


def test_baseline_then_new_items_reach_slack_once(
    slack, anthropic_fake, feeds, make_config, start_cli, tmp_path
):
    feeds.set("/a.xml", rss(OLD))
    feeds.set("/b.xml", atom([entry(10, "Old atom entry", 40)]))
    config = make_config(
        config_text(
            rss_source("forum", f"{feeds.url}/a.xml"), rss_source("blog", f"{feeds.url}/b.xml")
        )
    )
    proc = start_cli("run", config=config)
    feeds.wait_for(2, path="/a.xml")  # the baseline poll and one more
    feeds.wait_for(2, path="/b.xml")
    db = tmp_path / "aw.db"
    assert {r["status"] for r in items(db).values()} == {"seen"}, "the first poll is a baseline"
    assert feeds.not_modified("/a.xml") >= 1, "the second poll is a conditional GET"

    feeds.set(
        "/a.xml",
        rss(
            [
                entry(4, "Acme crashes when I open the dashboard"),
                entry(5, "I love acme, it replaced three tools"),
                entry(6, "irrelevant: my sourdough recipe"),
                *OLD,
            ]
        ),
    )
    feeds.set(
        "/b.xml",
        atom([entry(11, "How do I export data from acme?"), entry(10, "Old atom entry", 40)]),
    )
    slack.wait_for(3, timeout=20)
    wait_until(lambda: items(db)["irrelevant: my sourdough recipe"]["status"] == "skipped")
    time.sleep(2.5)  # two more polls: nothing may be posted again
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0

    texts = slack.texts()
    assert len(texts) == 3, texts
    by_title = {
        t: next(x for x in texts if t in x)
        for t in ("crashes when I open", "I love acme", "How do I export")
    }
    assert "https://forum.example/t/4" in by_title["crashes when I open"]
    assert "https://forum.example/t/11" in by_title["How do I export"]
    assert "Draft reply" in by_title["crashes when I open"]
    assert "Draft reply" in by_title["How do I export"]
    assert "Draft reply" not in by_title["I love acme"], "praise is not in the draft labels"
    assert not any("sourdough" in t for t in texts)
    # LLM calls: three classifications of admitted items... four with the irrelevant one, two drafts.
    assert anthropic_fake.calls("classify") == 4
    assert anthropic_fake.calls("text") == 2
    for title, row in items(db).items():
        if "Old" in title:
            assert row["status"] == "seen"
    log = proc.stderr_text()
    assert "stage=classify" in log and "stage=notify sent" in log


def test_kill_9_between_stages_resumes_without_paying_twice(
    slack, anthropic_fake, feeds, make_config, start_cli, tmp_path
):
    titles = [f"Acme crash report {i}" for i in range(6)]
    feeds.set("/a.xml", rss([entry(i, t) for i, t in enumerate(titles)]))
    config = make_config(
        config_text(rss_source("forum", f"{feeds.url}/a.xml", extra="backfill = 10"))
    )
    anthropic_fake.script([("delay", 3)] * 6, kind="text")  # drafts are slow
    proc = start_cli("run", config=config)
    db = tmp_path / "aw.db"
    wait_until(
        lambda: sum(r["stage"] == "draft" for r in items(db).values()) == 6,
        what="all six items classified and waiting in the draft stage",
    )
    anthropic_fake.wait_for(lambda: any(r["kind"] == "text" for r in anthropic_fake.requests))
    proc.kill(signal.SIGKILL)
    proc.wait()
    assert len(slack.posts()) == 0

    proc = start_cli("run", config=config)
    slack.wait_for(6, timeout=30)
    time.sleep(1.5)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0

    classify_prompts = [
        json.dumps(r["json"]) for r in anthropic_fake.requests if r["kind"] == "classify"
    ]
    for title in titles:
        assert sum(title in p for p in classify_prompts) == 1, f"{title} classified twice"
    assert len(slack.posts()) == 6
    fallbacks = [p["payload"]["text"] for p in slack.posts()]
    for title in titles:
        assert sum(title in t for t in fallbacks) == 1, f"{title} not delivered exactly once"
    assert {r["status"] for r in items(db).values()} == {"done"}


def test_slack_refusing_then_dlq_retry_delivers_without_llm(
    slack, anthropic_fake, feeds, make_config, start_cli, run_cli, tmp_path
):
    slack.set_default(404, "channel_not_found")
    feeds.set("/a.xml", rss([entry(1, "Acme is broken"), entry(2, "Is acme free?")]))
    config = make_config(
        config_text(rss_source("forum", f"{feeds.url}/a.xml", extra="backfill = 5"))
    )
    proc = start_cli("run", config=config)
    db = tmp_path / "aw.db"
    wait_until(lambda: len(rows(db, "SELECT * FROM items WHERE status = 'dead'")) == 2)

    listed = json.loads(run_cli("dlq", "list", "--json", config=config).stdout)
    assert {d["stage"] for d in listed} == {"notify"}
    assert all(d["attempts"] == 1 for d in listed), "a 404 is permanent: no retries"
    assert all("channel_not_found" in d["error"] for d in listed)
    assert {
        "id",
        "source",
        "item_id",
        "title",
        "url",
        "stage",
        "attempts",
        "error",
        "failed_at",
    } <= set(listed[0])
    shown = json.loads(run_cli("dlq", "show", str(listed[0]["id"]), config=config).stdout)
    assert shown["draft"], "the draft made before the failure is kept"

    llm_calls = len(anthropic_fake.requests)
    slack.set_default(200, "ok")
    result = run_cli("dlq", "retry", "--all", config=config)
    assert result.returncode == 0 and "2 item(s)" in result.stdout
    slack.wait_for(2, timeout=15)  # the running process picks them up
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    assert len(anthropic_fake.requests) == llm_calls, "a retry of notify must not call the LLM"
    assert json.loads(run_cli("dlq", "list", "--json", config=config).stdout) == []


def test_llm_failures_are_retried_then_dead_lettered_and_the_process_lives(
    slack, anthropic_fake, feeds, make_config, start_cli, run_cli, tmp_path
):
    feeds.set(
        "/a.xml",
        rss([entry(1, "Acme overloaded"), entry(2, "Acme garbage"), entry(3, "Acme slow")]),
    )
    config = make_config(
        config_text(
            rss_source("forum", f"{feeds.url}/a.xml", extra="backfill = 5"),
            max_attempts=2,
            llm_timeout="1s",
        )
    )
    fast = {"retry-after-ms": "10"}
    anthropic_fake.set_default_fault(("status", 529, "overloaded_error", fast), kind="classify")
    anthropic_fake.script(
        [("status", 429, "rate_limit_error", fast), ("garbage",), ("bad_tool_input",), ("hang",)],
        kind="classify",
    )
    proc = start_cli("run", config=config)
    db = tmp_path / "aw.db"
    wait_until(lambda: len(rows(db, "SELECT * FROM items WHERE status = 'dead'")) == 3, timeout=40)
    assert proc.returncode is None, "the process must survive LLM failures"
    dead = json.loads(run_cli("dlq", "list", "--json", config=config).stdout)
    assert {d["stage"] for d in dead} == {"classify"}
    assert all(d["attempts"] == 2 for d in dead)
    errors = " ".join(d["error"] for d in dead)
    assert "529" in errors or "overloaded" in errors
    # The SDK's own retries happen inside one attempt: more requests than attempts.
    assert anthropic_fake.calls("classify") > 6
    assert slack.posts() == []

    anthropic_fake.set_default_fault(None, kind="classify")
    run_cli("dlq", "retry", "--all", config=config)
    slack.wait_for(3, timeout=20)
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    log = proc.stderr_text()
    assert "retry in" in log and "dead-lettered after 2 attempt(s)" in log


def test_hostile_title_reaches_slack_escaped(slack, feeds, make_config, run_cli):
    hostile = "<!channel> <http://evil.example|click> & more"
    feeds.set("/a.xml", rss([entry(1, hostile)]))
    config = make_config(
        config_text(rss_source("forum", f"{feeds.url}/a.xml", extra="backfill = 1"))
    )
    result = run_cli("run", "--once", config=config, env={"ANTHROPIC_API_KEY": None})
    assert result.returncode == 0, result.stderr
    assert "ANTHROPIC_API_KEY is not set" in result.stderr
    (payload,) = [p["payload"] for p in slack.posts()]
    raw = json.dumps(payload)
    assert "<!channel>" not in raw and "<http://evil.example" not in raw
    assert "&lt;!channel&gt; &lt;http://evil.example|click&gt; &amp; more" in payload["text"]
    assert "&lt;!channel&gt;" in payload["blocks"][0]["text"]["text"]


def test_dry_run_prints_then_a_real_run_sends_without_llm(
    slack, anthropic_fake, feeds, make_config, run_cli, tmp_path
):
    feeds.set("/a.xml", rss([entry(1, "Acme crashes on login")]))
    config = make_config(
        config_text(rss_source("forum", f"{feeds.url}/a.xml", extra="backfill = 1"))
    )
    dry = run_cli("run", "--once", "--dry-run", config=config)
    assert dry.returncode == 0, dry.stderr
    assert "dry-run: would post" in dry.stdout and "Acme crashes on login" in dry.stdout
    assert slack.requests == []
    calls = len(anthropic_fake.requests)
    assert calls == 2  # classify and draft

    real = run_cli("run", "--once", config=config)
    assert real.returncode == 0, real.stderr
    assert len(slack.posts()) == 1
    assert len(anthropic_fake.requests) == calls


def test_burst_is_grouped_and_paced(slack, feeds, make_config, run_cli):
    feeds.set("/a.xml", rss([entry(i, f"Mention number {i}") for i in range(23)]))
    config = make_config(
        config_text(rss_source("forum", f"{feeds.url}/a.xml", extra="backfill = 30")).replace(
            "[llm]", '[llm]\nprovider = "none"'
        )
    )
    result = run_cli("run", "--once", config=config)
    assert result.returncode == 0, result.stderr
    posts = slack.posts()
    assert len(posts) == 3, [p["payload"]["text"][:60] for p in posts]
    delivered = slack.text()
    for i in range(23):
        assert f"Mention number {i}" in delivered
        assert f"https://forum.example/t/{i}" in delivered
    times = slack.times()
    assert all(b - a >= 0.95 for a, b in itertools.pairwise(times)), times


def test_slack_429_and_500_are_waited_out(slack, feeds, make_config, run_cli, tmp_path):
    slack.script([(429, "rate_limited", {"Retry-After": "1"}), (500, "internal_error")])
    feeds.set("/a.xml", rss([entry(1, "A mention of acme")]))
    config = make_config(
        config_text(rss_source("forum", f"{feeds.url}/a.xml", extra="backfill = 1")).replace(
            "[llm]", '[llm]\nprovider = "none"'
        )
    )
    first = run_cli("run", "--once", config=config)
    assert first.returncode == 0, first.stderr
    assert [r["status"] for r in slack.requests] == [429, 500]
    row = rows(tmp_path / "aw.db", "SELECT * FROM items")[0]
    assert row["attempts"] == 1, "the 429 wait is not an attempt; the 500 is"
    time.sleep(1.2)  # the retry's backoff
    second = run_cli("run", "--once", config=config)
    assert second.returncode == 0, second.stderr
    assert len(slack.posts()) == 1
