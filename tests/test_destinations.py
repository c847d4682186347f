"""Discord and the signed webhook as further destinations, each its own stage (issue 14)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from fakes import FakeReceiver, discord_pings, rss
from helpers import items, recent, rows, wait_until

import agentwatch

CONFIG = """
[agentwatch]
db = "aw.db"
health = ""
retry_base = "1s"
retry_max = "1s"
max_attempts = {max_attempts}

[llm]
about = "Acme, a self-hosted analytics tool"

[slack]
webhook_url = "${{SLACK_WEBHOOK_URL}}"

[discord]
webhook_url = "{discord}/api/webhooks/123/discord-token-abc"

[webhook]
url = "{hook}/agentwatch"
secret = "${{HOOK_SECRET}}"

[[sources]]
name = "forum"
type = "rss"
url = "{feed}"
every = "1s"
backfill = 5
destinations = {destinations}
"""

SECRET = "s3cret-for-signing"


@pytest.fixture
def discord():
    with FakeReceiver(discord=True) as fake:
        yield fake


@pytest.fixture
def hook():
    with FakeReceiver() as fake:
        yield fake


def config_for(make_config, feeds, discord, hook, destinations, max_attempts=3):
    return make_config(
        CONFIG.format(
            discord=discord.url, hook=hook.url, feed=f"{feeds.url}/a.xml",
            destinations=json.dumps(destinations), max_attempts=max_attempts,
        )
    )  # fmt: skip


TITLE = "@everyone Acme crashes on start <@123456> @here"


def feed(feeds):
    feeds.set("/a.xml", rss([{"title": TITLE, "link": "https://forum.example/t/1",
                              "guid": "urn:1", "description": "It is broken.",
                              "pub_date": recent(1)}]))  # fmt: skip


def test_discord_down_holds_back_neither_slack_nor_is_resent_to_slack(
    slack, anthropic_fake, feeds, discord, hook, make_config, start_cli, tmp_path
):
    feed(feeds)
    discord.script([(500, "{}"), (502, "bad gateway")])
    config = config_for(make_config, feeds, discord, hook, ["slack", "discord", "webhook"])
    proc = start_cli("run", config=config, env={"HOOK_SECRET": SECRET})
    slack.wait_for(1)
    (message,) = discord.wait_for(1, timeout=20)
    (delivery,) = hook.wait_for(1, timeout=20)
    wait_until(lambda: {r["status"] for r in items(tmp_path / "aw.db").values()} == {"done"},
               what="the item done")  # fmt: skip
    proc.kill()
    assert proc.wait() == 0
    assert len(slack.posts()) == 1, "Slack got it once, before Discord and unaffected by it"
    assert [r["status"] for r in discord.requests] == [500, 502, 204]
    # Discord: an embed, no content, and nobody pinged.
    payload = message["payload"]
    assert payload["allowed_mentions"] == {"parse": []}
    assert discord_pings({**payload, "content": TITLE}) == []
    assert discord_pings({"content": TITLE}) == ["everyone", "123456", "here"]  # the check can fail
    (embed,) = payload["embeds"]
    assert embed["title"] == TITLE and embed["url"] == "https://forum.example/t/1"
    assert "Draft reply" in [f["name"] for f in embed["fields"]]
    # The webhook: the item, labels and draft as JSON, signed with the secret.
    body = delivery["body"]
    signature = delivery["headers"]["x-agentwatch-signature"]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signature, expected)
    sent = json.loads(body)
    assert sent["title"] == TITLE and sent["source"] == "forum" and sent["item_id"] == "urn:1"
    assert "negative" in sent["labels"] and sent["draft"]
    assert delivery["headers"]["x-agentwatch-delivery"] == "forum/urn:1"
    log = proc.stderr_text()
    assert "discord-token-abc" not in log and SECRET not in log
    assert "stage=notify_discord retry" in log


def test_discord_429_waits_its_retry_after_and_is_not_an_attempt(
    slack, feeds, discord, hook, make_config, run_cli, tmp_path
):
    feed(feeds)
    limited = json.dumps({"message": "You are being rate limited.", "retry_after": 0.4,
                          "global": False})  # fmt: skip
    discord.script([(429, limited, {"Retry-After": "1"})])
    config = config_for(make_config, feeds, discord, hook, ["discord"], max_attempts=1)
    text = config.read_text().replace(
        'about = "Acme, a self-hosted analytics tool"', 'provider = "none"'
    )
    config.write_text(text)
    result = run_cli("run", "--once", config=config, env={"HOOK_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in discord.requests] == [429, 204]
    assert discord.requests[1]["time"] - discord.requests[0]["time"] >= 0.35
    (row,) = rows(tmp_path / "aw.db", "SELECT * FROM items")
    assert row["status"] == "done" and row["stages"] == "classify draft notify_discord"
    assert not slack.posts() and not hook.requests, "only the destinations the source names"


def test_a_refused_webhook_dead_letters_at_its_own_stage(
    slack, feeds, discord, hook, make_config, run_cli, tmp_path
):
    feed(feeds)
    hook.default = (410, "gone", {})
    config = config_for(make_config, feeds, discord, hook, ["slack", "webhook"])
    text = config.read_text().replace(
        'about = "Acme, a self-hosted analytics tool"', 'provider = "none"'
    )
    config.write_text(text)
    assert run_cli("run", "--once", config=config, env={"HOOK_SECRET": SECRET}).returncode == 0
    (row,) = rows(tmp_path / "aw.db", "SELECT * FROM items")
    assert row["status"] == "dead" and row["stage"] == "notify_webhook"
    assert "410" in row["last_error"] and len(slack.posts()) == 1
    hook.default = None
    run_cli("dlq", "retry", "--all", config=config, env={"HOOK_SECRET": SECRET})
    assert run_cli("run", "--once", config=config, env={"HOOK_SECRET": SECRET}).returncode == 0
    assert len(hook.received()) == 1 and len(slack.posts()) == 1, "Slack is not sent again"


def test_destination_config_is_checked(make_config, run_cli, feeds, discord, hook):
    config = config_for(make_config, feeds, discord, hook, ["slack", "pager"])
    result = run_cli("check", config=config, env={"HOOK_SECRET": SECRET})
    assert result.returncode == 2 and "unknown destination 'pager'" in result.stderr
    text = (
        config.read_text().replace('secret = "${HOOK_SECRET}"', "").replace('"pager"', '"webhook"')
    )
    config.write_text(text)
    result = run_cli("check", config=config)
    assert result.returncode == 2 and "webhook.secret" in result.stderr


def test_destinations_replace_the_notify_stage_in_order():
    config = agentwatch.SourceConfig(name="s", type="rss", destinations=["discord", "slack"])
    stages = agentwatch.with_destinations(("classify", "draft", "notify"), config)
    assert stages == ("classify", "draft", "notify_discord", "notify")
    default = agentwatch.SourceConfig(name="s", type="rss")
    assert agentwatch.with_destinations(("notify",), default) == ("notify",)
