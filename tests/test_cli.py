"""Command-line behaviour that is not the pipeline: fast commands, status, budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from fakes import rss
from helpers import recent, rows

PROBE = textwrap.dedent(
    """
    import sys
    sys.argv = ["agentwatch", *sys.argv[1:]]
    import agentwatch
    try:
        agentwatch.main()
    except SystemExit:
        pass
    # asyncio is in sys.modules from the start, loaded lazily: base_events shows it ran
    loaded = [m for m in ("anthropic", "httpx2", "feedparser", "asyncio.base_events")
              if m in sys.modules]  # fmt: skip
    print("LOADED:" + ",".join(loaded))
    """
)


def test_fast_commands_import_neither_the_sdk_nor_asyncio(make_config, tmp_path):
    config = make_config('[agentwatch]\ndb = "aw.db"\n')
    for args in (["dlq", "list"], ["dlq", "list", "--json"], ["status"], ["status", "--json"],
                 ["items"], ["items", "--json"], ["check"], ["--help"]):  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", PROBE, *args, *(["-c", str(config)] if args != ["--help"] else [])],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        loaded = out.stdout.rsplit("LOADED:", 1)[1].strip()
        assert "anthropic" not in loaded, (args, loaded)
        assert "asyncio" not in loaded, (args, loaded)  # ~20 ms of start-up


def test_status_reports_items_tokens_and_dlq(
    slack, anthropic_fake, feeds, make_config, run_cli, tmp_path
):
    feeds.set(
        "/a.xml", rss([{"title": "Acme is broken", "link": "https://x/1", "pub_date": recent()}])
    )
    config = make_config(
        f'[agentwatch]\ndb = "aw.db"\nhealth = ""\n[slack]\nwebhook_url = "${{SLACK_WEBHOOK_URL}}"\n'
        f'[[sources]]\nname = "f"\ntype = "rss"\nurl = "{feeds.url}/a.xml"\nbackfill = 1\n'
    )
    assert run_cli("run", "--once", config=config).returncode == 0
    out = run_cli("status", config=config).stdout
    assert "items today: 1 (done 1)" in out
    assert "LLM today: 2 call(s)" in out
    assert "dead-letter queue: 0" in out
    usage = rows(tmp_path / "aw.db", "SELECT * FROM llm_usage")
    assert {u["stage"] for u in usage} == {"classify", "draft"}
    assert all(u["input_tokens"] > 0 and u["cost_usd"] > 0 for u in usage)


def test_daily_budget_makes_items_wait_not_die(
    slack, anthropic_fake, feeds, make_config, run_cli, tmp_path
):
    feeds.set(
        "/a.xml",
        rss(
            [
                {"title": f"Acme question {i}?", "link": f"https://x/{i}", "pub_date": recent()}
                for i in range(3)
            ]
        ),
    )
    config = make_config(
        f'[agentwatch]\ndb = "aw.db"\nhealth = ""\n[llm]\ndaily_budget_usd = 0.0000001\nconcurrency = 1\n'
        f'[slack]\nwebhook_url = "${{SLACK_WEBHOOK_URL}}"\n'
        f'[[sources]]\nname = "f"\ntype = "rss"\nurl = "{feeds.url}/a.xml"\nbackfill = 3\n'
    )
    result = run_cli("run", "--once", config=config)
    assert result.returncode == 0, result.stderr
    assert anthropic_fake.calls() == 1, "the first call spends the budget; no more calls today"
    waiting = rows(tmp_path / "aw.db", "SELECT * FROM items WHERE status = 'pending'")
    assert len(waiting) >= 2 and all("budget" in r["last_error"] for r in waiting)
    assert json.loads(run_cli("dlq", "list", "--json", config=config).stdout) == []


def test_provider_none_still_notifies(slack, anthropic_fake, feeds, make_config, run_cli):
    feeds.set(
        "/a.xml", rss([{"title": "Acme mention", "link": "https://x/1", "pub_date": recent()}])
    )
    config = make_config(
        f'[agentwatch]\ndb = "aw.db"\nhealth = ""\n[llm]\nprovider = "none"\n'
        f'[slack]\nwebhook_url = "${{SLACK_WEBHOOK_URL}}"\n'
        f'[[sources]]\nname = "f"\ntype = "rss"\nurl = "{feeds.url}/a.xml"\nbackfill = 1\n'
    )
    assert run_cli("run", "--once", config=config).returncode == 0
    assert len(slack.posts()) == 1 and anthropic_fake.calls() == 0


def test_no_webhook_prints_to_stdout(feeds, make_config, run_cli):
    feeds.set(
        "/a.xml", rss([{"title": "Acme mention", "link": "https://x/1", "pub_date": recent()}])
    )
    config = make_config(
        f'[agentwatch]\ndb = "aw.db"\nhealth = ""\n[llm]\nprovider = "none"\n'
        f'[[sources]]\nname = "f"\ntype = "rss"\nurl = "{feeds.url}/a.xml"\nbackfill = 1\n'
    )
    result = run_cli("run", "--once", config=config)
    assert "Acme mention https://x/1" in result.stdout
    again = run_cli("run", "--once", config=config)
    assert "Acme mention" not in again.stdout, "printed items count as notified"


def test_dlq_commands_reject_bad_arguments(make_config, run_cli):
    config = make_config('[agentwatch]\ndb = "aw.db"\n')
    assert run_cli("dlq", "retry", config=config).returncode == 2
    assert run_cli("dlq", "drop", "1", "--all", config=config).returncode == 2
    shown = run_cli("dlq", "show", "99", config=config)
    assert shown.returncode == 1 and "no dead-lettered item" in shown.stderr
