"""The config contract: TOML, ${ENV}, durations, unknown keys and bad values named, exit 2."""

from __future__ import annotations

import pytest

import agentwatch
from agentwatch import ConfigError, load_config

GOOD = """
[agentwatch]
db = "data/aw.db"
retry_base = "10s"
max_bytes = "2MB"

[llm]
provider = "none"
prices = { "claude-haiku-5-5" = { input = 1.0, output = 5.0 } }

[slack]
webhook_url = "${HOOK}"

[[sources]]
name = "feed-1"
type = "rss"
url = "https://example.com/feed.xml"
every = "5m"
include = ["acme", "/ac+me/"]
notify = ["negative", "question"]
"""


def test_a_good_config_loads_with_units_env_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK", "https://hooks.slack.com/services/T/B/X")
    path = tmp_path / "agentwatch.toml"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.agentwatch.retry_base == 10
    assert config.agentwatch.max_bytes == 2_000_000
    assert config.agentwatch.fetch_timeout == 30
    assert config.slack.webhook_url == "https://hooks.slack.com/services/T/B/X"
    assert config.db_path == tmp_path / "data" / "aw.db"
    assert config.pidfile_path == tmp_path / "data" / "agentwatch.pid"
    (source,) = config.sources
    assert source.every == 300 and source.options.url == "https://example.com/feed.xml"
    assert config.llm.prices["claude-haiku-5-5"].output == 5.0
    assert config.slack.webhook_url in config.secrets()


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (("[agentwatch]", "[agentwatch]\nretry_bse = 1"), "agentwatch.retry_bse", "unknown key"),
        (('retry_base = "10s"', 'retry_base = "10 parsecs"'), "agentwatch.retry_base", "duration"),
        (('max_bytes = "2MB"', "max_bytes = true"), "agentwatch.max_bytes", "size"),
        (('provider = "none"', 'provider = "openai"'), "llm.provider", "one of"),
        (('every = "5m"', 'every = "0s"'), "sources[0].every", "at least 1s"),
        (('name = "feed-1"', 'name = "Feed 1"'), "sources[0].name", "[a-z0-9_-]+"),
        (('type = "rss"', 'type = "gopher"'), "sources[0].type", "unknown source type"),
        (('url = "https://example.com/feed.xml"', 'url = "ftp://x"'), "sources[0]", "http"),
        (
            ('url = "https://example.com/feed.xml"', "colour = 1"),
            "sources[0].colour",
            "unknown key",
        ),
        (
            ('notify = ["negative", "question"]', 'notify = ["angry"]'),
            "sources[0].notify",
            "unknown label",
        ),
        (
            ('include = ["acme", "/ac+me/"]', 'include = ["/ac(me/"]'),
            "sources[0].include[0]",
            "bad regex",
        ),
        (
            ('webhook_url = "${HOOK}"', 'webhook_url = "${NOT_SET_ANYWHERE}"'),
            "slack.webhook_url",
            "NOT_SET_ANYWHERE",
        ),
        (("[slack]", "[slak]"), "slak", "unknown table"),
    ],
)
def test_config_errors_name_their_key(tmp_path, monkeypatch, change, key, words):
    monkeypatch.setenv("HOOK", "https://hooks.slack.com/services/T/B/X")
    path = tmp_path / "agentwatch.toml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key
    assert words in str(caught.value)


def test_duplicate_source_names_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK", "x")
    path = tmp_path / "agentwatch.toml"
    path.write_text(GOOD + GOOD[GOOD.index("[[sources]]") :])
    with pytest.raises(ConfigError, match=r"sources\[1\].name: 'feed-1' is used twice"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), (45, 45), (1.5, 1.5), ("250ms", 0.25)],
)
def test_durations(text, seconds):
    assert agentwatch.parse_duration(text, "k") == seconds


def test_cli_config_error_exits_2_naming_the_key(make_config, run_cli):
    config = make_config('[agentwatch]\nmax_attempts = "three"\n')
    for command in (["check"], ["run", "--once"], ["dlq", "list"], ["status"]):
        result = run_cli(*command, config=config)
        assert result.returncode == 2, (command, result.stderr)
        assert "agentwatch.max_attempts" in result.stderr
        assert "Traceback" not in result.stderr


def test_missing_config_is_a_clear_error(run_cli, tmp_path):
    result = run_cli("check", config=tmp_path / "nope.toml")
    assert result.returncode == 2
    assert "agentwatch init" in result.stderr


def test_init_writes_a_config_that_check_accepts(run_cli, tmp_path):
    assert run_cli("init").returncode == 0
    result = run_cli("check", config=tmp_path / "agentwatch.toml")
    assert result.returncode == 0, result.stderr
    assert "hn-mentions" in result.stdout
    again = run_cli("init")
    assert again.returncode == 1 and "--force" in again.stderr
    assert run_cli("init", "--force").returncode == 0


def test_config_from_environment_variable(run_cli, tmp_path):
    run_cli("init", str(tmp_path / "elsewhere.toml"))
    result = run_cli("check", env={"AGENTWATCH_CONFIG": str(tmp_path / "elsewhere.toml")})
    assert result.returncode == 0, result.stderr


def test_a_broken_drop_in_is_reported_not_fatal(make_config, run_cli, tmp_path):
    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / "broken.py").write_text("raise RuntimeError('oops')\n")
    (tmp_path / "sources" / "echo.py").write_text(
        "from dataclasses import dataclass\n"
        "from agentwatch import Item, Source, source\n\n"
        "@source('echo')\n"
        "class Echo(Source):\n"
        "    @dataclass(frozen=True)\n"
        "    class Options:\n"
        "        words: str\n\n"
        "    async def poll(self):\n"
        "        return [Item(item_id=w, title=w) for w in self.options.words.split()]\n"
    )
    config = make_config('[[sources]]\nname = "e"\ntype = "echo"\nwords = "a b"\n')
    result = run_cli("check", config=config)
    assert result.returncode == 0, result.stderr
    assert "broken.py did not load: RuntimeError: oops" in result.stderr
    preview = run_cli("preview", "e", config=config)
    assert preview.returncode == 0, preview.stderr
    assert "2 item(s)" in preview.stdout
