"""The command line for people (issue 15), and what it prints of outside text (issue 9,
items 9 and 10): -c anywhere, --version, status at any width, items, read-only
commands without secrets, escaping and redaction of everything printed."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import subprocess
import time

import pytest
from conftest import agentwatch_executable
from fakes import rss
from helpers import recent

import agentwatch

NAMES = ["q-widgetron-mentions-blog", "status-page-of-acme-prod", "hn-search-acme-analytics"]
assert all(len(n) >= 24 for n in NAMES)
LONG_ERROR = (
    "feed.example.com answered 503 (server error); it has been down since the morning "
    "and the operator says it will be back after the migration of the whole cluster ends"
)


def _config(make_config, webhook: str = "${SLACK_WEBHOOK_URL}") -> object:
    sources = "".join(
        f'[[sources]]\nname = "{n}"\ntype = "rss"\nurl = "https://feed.example.com/{n}.xml"\n'
        for n in NAMES
    )
    return make_config(
        f'[agentwatch]\ndb = "aw.db"\nhealth = ""\n[slack]\nwebhook_url = "{webhook}"\n{sources}'
    )


def _store(tmp_path) -> agentwatch.Store:
    return agentwatch.Store(tmp_path / "aw.db")


def _polled(store: agentwatch.Store, *, failing: str = "", error: str = LONG_ERROR) -> None:
    """Every source polled a minute ago; `failing` has failed three times since."""
    now = time.time()
    for name in NAMES:
        store.source_row(name, "rss")
        store.record_poll(name, [], state={}, validators={}, next_poll_at=now + 40)
    with store.transaction() as db:
        db.execute("UPDATE sources SET last_poll_at = ?, last_ok_at = ?", (now - 120, now - 120))
    if failing:
        for n in range(1, 4):
            store.record_poll_failure(failing, error, "server_error", now + 300, n)


def _add_item(store: agentwatch.Store, source: str, item_id: str, **fields) -> int:
    now = time.time()
    row = {"title": "", "url": "", "stages": "classify draft notify", "stage": "done",
           "status": "done", "created_at": now, "updated_at": now, **fields}  # fmt: skip
    with store.transaction() as db:
        cur = db.execute(
            f"INSERT INTO items (source, item_id, {', '.join(row)}) VALUES (?, ?, "
            + ", ".join("?" * len(row)) + ")",
            (source, item_id, *row.values()),
        )  # fmt: skip
        return cur.lastrowid


# -- -c anywhere, --version ---------------------------------------------------


def test_config_option_before_or_after_the_subcommand(make_config, run_cli, tmp_path):
    config = _config(make_config)
    for args in (["status"], ["dlq", "list"], ["items"], ["check"]):
        before = run_cli("-c", config, *args, cwd=tmp_path.parent)
        after = run_cli(*args, "-c", config, cwd=tmp_path.parent)
        assert before.returncode == 0, (args, before.stderr)
        assert after.returncode == 0, (args, after.stderr)
        assert before.stdout == after.stdout
    # Without it, the default path is used: there is none in the parent folder.
    assert run_cli("status", cwd=tmp_path.parent).returncode == 2


def test_version(run_cli):
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"agentwatch {agentwatch.__version__}"


def test_every_command_has_an_example_in_its_help(run_cli):
    import typer.main

    group = typer.main.get_command(agentwatch.app)
    names = []
    for name, command in group.commands.items():
        subs = getattr(command, "commands", None)
        names += [[name, sub] for sub in subs] if subs else [[name]]
    for args in names:
        result = run_cli(*args, "--help")
        assert result.returncode == 0, args
        assert re.search(r"Example: .*agentwatch ", result.stdout), (args, result.stdout)
        assert not set("╭│╰─") & set(result.stdout), "a pipe gets no box drawing"


# -- status ---------------------------------------------------------------------


@pytest.mark.parametrize("columns", [60, 80, 200])
def test_status_never_wraps_a_source_name(columns, make_config, run_cli, tmp_path):
    config = _config(make_config)
    store = _store(tmp_path)
    _polled(store, failing=NAMES[1])
    store.close()
    result = run_cli("status", config=config, env={"COLUMNS": str(columns)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in NAMES:
        (row,) = [line for line in lines if name in line]
        assert len(row) <= columns, (columns, row)
        assert "2m ago" in row or "2m ago" in lines[lines.index(row) + 1]
    # The error keeps its own line, whole in a pipe, never inside the table.
    assert f"  error: {LONG_ERROR}" in lines
    assert "in 4m" in result.stdout and re.search(r"in (39|40)s", result.stdout)
    if columns >= 80:
        assert lines[0].split() == ["SOURCE", "TYPE", "LAST", "POLL", "LAST", "OK", "NEXT",
                                    "POLL", "FAILS"]  # fmt: skip
    for line in lines:  # every line but the uncut error fits
        assert len(line) <= columns or line.startswith("  error: "), line
    assert "dead-letter queue: 0 item(s)" in result.stdout


def test_status_in_a_terminal_uses_rich_and_cuts_long_text(make_config, tmp_path):
    config = _config(make_config)
    store = _store(tmp_path)
    _polled(store, failing=NAMES[2])
    store.close()
    parent, child = pty.openpty()
    env = {**os.environ, "COLUMNS": "80", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [agentwatch_executable(), "status", "-c", str(config)],
        stdout=child, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path,
    )  # fmt: skip
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # EIO once the child is gone
            break
        if not chunk:
            break
        out += chunk
    os.close(parent)
    assert proc.wait(30) == 0, proc.stderr.read()
    text = out.decode()
    assert "\x1b[" in text, "a terminal gets colour"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text).replace("\r", "")
    for name in NAMES:
        assert name in plain
    error_line = next(line for line in plain.splitlines() if "error:" in line)
    assert error_line.endswith("…") and len(error_line) <= 80


def test_status_json(make_config, run_cli, tmp_path):
    config = _config(make_config)
    store = _store(tmp_path)
    _polled(store, failing=NAMES[0])
    _add_item(store, NAMES[0], "a")
    _add_item(store, NAMES[0], "b", status="dead", stage="notify")
    store.close()
    report = json.loads(run_cli("status", "--json", config=config).stdout)
    assert set(report["sources"]) == set(NAMES)
    failing = report["sources"][NAMES[0]]
    assert failing["consecutive_failures"] == 3 and failing["last_error"] == LONG_ERROR
    assert set(failing) >= {"type", "last_ok_at", "consecutive_failures", "next_poll_at"}
    assert report["today"]["items"] == 2
    assert report["today"]["items_by_status"] == {"done": 1, "dead": 1}
    assert report["today"]["llm"]["calls"] == 0
    assert report["dlq_depth"] == 1


def test_relative_times():
    now = 1_000_000.0
    assert agentwatch.relative(now - 125, now) == "2m ago"
    assert agentwatch.relative(now + 40, now) == "in 40s"
    assert agentwatch.relative(now + 3 * 86400, now) == "in 3d"
    assert agentwatch.relative(now, now) == "now"
    assert agentwatch.relative(None, now) == "never"
    assert agentwatch.relative(float("inf"), now) == "?"


# -- read-only commands without secrets ------------------------------------------


def test_read_only_commands_work_with_secrets_unset(make_config, run_cli, tmp_path):
    config = _config(make_config, webhook="${AW_TEST_HOOK}")
    store = _store(tmp_path)
    _polled(store)
    dead = _add_item(store, NAMES[0], "x", status="dead", stage="notify", title="t")
    store.close()
    unset = {"AW_TEST_HOOK": None, "ANTHROPIC_API_KEY": None}
    for args in (["status"], ["status", "--json"], ["items"], ["items", "--json"],
                 ["dlq", "list"], ["dlq", "list", "--json"], ["dlq", "show", dead]):  # fmt: skip
        result = run_cli(*args, config=config, env=unset)
        assert result.returncode == 0, (args, result.stderr)
    checked = run_cli("check", config=config, env=unset)
    assert checked.returncode == 0, checked.stderr
    assert "${AW_TEST_HOOK}" in checked.stderr and "`run` will need it" in checked.stderr
    # What sends still needs them: run says which one is missing.
    ran = run_cli("run", "--once", config=config, env=unset)
    assert ran.returncode == 2 and "AW_TEST_HOOK is not set" in ran.stderr


# -- items ----------------------------------------------------------------------


def _classified(sentiment: str, intent: str, summary: str, relevant: bool = True) -> str:
    return json.dumps({"relevant": relevant, "sentiment": sentiment, "intent": intent,
                       "urgency": "normal", "summary": summary})  # fmt: skip


def test_items_lists_newest_first_with_filters(make_config, run_cli, tmp_path):
    config = _config(make_config)
    store = _store(tmp_path)
    now = time.time()
    old = _add_item(store, NAMES[0], "old", title="Pricing is too high", created_at=now - 3 * 86400,
                    classification=_classified("negative", "complaint", "Finds the price high."),
                    url="https://x/old", notified_at=now)  # fmt: skip
    question = _add_item(store, NAMES[1], "q", title="How do I export?", created_at=now - 600,
                         classification=_classified("neutral", "question", "Asks about export."),
                         url="https://x/q", notified_at=now)  # fmt: skip
    seen = _add_item(store, NAMES[1], "s", title="Old news", status="seen", stage="done",
                     note="first poll: baseline", created_at=now - 60)  # fmt: skip
    pending = _add_item(store, NAMES[2], "p", title="100%_off sale", status="pending",
                        stage="draft", attempts=1, last_error="LLM API answered 529",
                        created_at=now - 5)  # fmt: skip
    store.close()

    def ids(*args) -> list[int]:
        result = run_cli("items", "--json", *args, config=config)
        assert result.returncode == 0, result.stderr
        return [i["id"] for i in json.loads(result.stdout)]

    assert ids() == [pending, seen, question, old]
    assert ids("--limit", "2") == [pending, seen]
    assert ids("--source", NAMES[1]) == [seen, question]
    assert ids("--label", "question") == [question]
    assert ids("--label", "negative") == [old]
    assert ids("--label", "relevant") == [question, old]
    assert ids("--since", "1d") == [pending, seen, question]
    assert ids("--search", "EXPORT") == [question], "title and summary, any case"
    assert ids("--search", "%_") == [pending], "LIKE wildcards are literal"
    first = json.loads(run_cli("items", "--json", "--label", "question", config=config).stdout)[0]
    assert first["labels"] == ["neutral", "question", "relevant"]
    assert first["summary"] == "Asks about export." and first["url"] == "https://x/q"

    text = run_cli("items", config=config).stdout
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith(f"{question} "))
    assert "10m ago" in head and NAMES[1] in head and "notified" in head
    assert "neutral · question" in head
    assert any("How do I export?" in line for line in lines)
    assert "https://x/q" in text and "Asks about export." in text
    assert "pending draft (after 1 failed)" in text and "error: LLM API answered 529" in text
    assert "first poll: baseline" in text

    for bad in (["--label", "cheerful"], ["--since", "yesterday"], ["--source", "nope"]):
        result = run_cli("items", *bad, config=config)
        assert result.returncode == 2, bad
    assert "no items match" in run_cli("items", "--search", "zzz", config=config).stdout


def test_items_shows_what_a_run_brought_in(
    slack, anthropic_fake, feeds, make_config, run_cli, tmp_path
):
    feeds.set("/a.xml", rss([{"title": "Acme is broken", "link": "https://x/1",
                              "pub_date": recent()}]))  # fmt: skip
    config = make_config(
        f'[agentwatch]\ndb = "aw.db"\nhealth = ""\n[slack]\nwebhook_url = "${{SLACK_WEBHOOK_URL}}"\n'
        f'[[sources]]\nname = "f"\ntype = "rss"\nurl = "{feeds.url}/a.xml"\nbackfill = 1\n'
    )
    assert run_cli("run", "--once", config=config).returncode == 0
    (item,) = json.loads(run_cli("items", "--json", config=config).stdout)
    assert item["title"] == "Acme is broken" and item["status"] == "done"
    assert item["labels"] and item["summary"] and item["notified_at"]
    assert f"{item['id']} " in run_cli("items", config=config).stdout


# -- issue 9, item 9: outside text reaches the terminal and the log escaped ---------

HOSTILE_TITLE = "Fine \x1b]0;owned\x07title \x1b[2J[/x] [bold]b\u202eok\x9b31m"


def test_dlq_list_and_status_escape_control_characters(make_config, run_cli, tmp_path):
    config = _config(make_config)
    store = _store(tmp_path)
    _polled(store, failing=NAMES[0], error="boom \x1b[31mred\x1b[0m\nforged line")
    _add_item(store, NAMES[0], "id\nwith newline", status="dead", stage="notify",
              title=HOSTILE_TITLE, last_error="Slack said \x1b[5m no")  # fmt: skip
    store.close()
    for args in (["dlq", "list"], ["status"], ["items"], ["dlq", "show", "1"]):
        out = run_cli(*args, config=config).stdout
        assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", out), (args, out)
    listed = run_cli("dlq", "list", config=config).stdout
    assert "\\x1b]0;owned\\x07title" in listed and "[/x]" in listed
    assert "id\\nwith newline" in listed
    shown = json.loads(run_cli("dlq", "show", "1", config=config).stdout)
    assert shown["title"] == HOSTILE_TITLE, "JSON stays exact, only escaped"
    status = run_cli("status", config=config).stdout
    assert "boom \\x1b[31mred\\x1b[0m\\nforged line" in status


def test_preview_shows_rich_markup_in_titles_as_text(feeds, make_config, run_cli):
    feeds.set("/a.xml", rss([{"title": "[/x] closes [bold]nothing", "link": "https://x/1"}]))
    config = make_config(
        f'[agentwatch]\ndb = "aw.db"\n[[sources]]\nname = "f"\ntype = "rss"\n'
        f'url = "{feeds.url}/a.xml"\n'
    )
    result = run_cli("preview", "f", config=config)
    assert result.returncode == 0, result.stderr
    assert "[/x] closes [bold]nothing" in result.stdout


def test_log_lines_cannot_be_forged_by_an_item_id(slack, feeds, make_config, run_cli):
    forged = "x\n2026-01-01T00:00:00.000Z ERROR forged line"
    feeds.set("/a.xml", rss([{"title": "Acme", "link": "https://x/1", "guid": forged,
                              "pub_date": recent()}]))  # fmt: skip
    config = make_config(
        f'[agentwatch]\ndb = "aw.db"\nhealth = ""\n[llm]\nprovider = "none"\n'
        f'[slack]\nwebhook_url = "${{SLACK_WEBHOOK_URL}}"\n'
        f'[[sources]]\nname = "f"\ntype = "rss"\nurl = "{feeds.url}/a.xml"\nbackfill = 1\n'
    )
    result = run_cli("run", "--once", config=config)
    assert result.returncode == 0, result.stderr
    assert "stage=notify" in result.stderr
    assert not any(line.startswith("2026-01-01") for line in result.stderr.splitlines())
    assert "x\\n2026-01-01T00:00:00.000Z ERROR forged line" in result.stderr


def test_log_formatter_escapes_messages_but_keeps_tracebacks():
    formatter = agentwatch.RedactingFormatter("text", [])
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = logging.LogRecord("agentwatch", logging.ERROR, __file__, 1,
                                   "item %s failed", ("a\nb\x1b[31m",), sys.exc_info())  # fmt: skip
    line = formatter.format(record)
    first, *rest = line.splitlines()
    assert first.endswith("item a\\nb\\x1b[31m failed")
    assert rest[0].startswith("Traceback") and "ValueError: bad" in rest[-1]


# -- issue 9, item 10: no secret in what the commands print -------------------------


def test_status_and_dlq_redact_secrets(slack, make_config, run_cli, tmp_path):
    hook = os.environ["SLACK_WEBHOOK_URL"]  # the fake's, a credential
    config = _config(make_config)
    error = f"cannot connect to {hook}: refused"
    store = _store(tmp_path)
    _polled(store, failing=NAMES[0], error=error)
    _add_item(store, NAMES[0], "d", status="dead", stage="notify", title="t",
              last_error=f"Slack refused the message at {hook}")  # fmt: skip
    store.close()
    for args in (["status"], ["status", "--json"], ["dlq", "list"], ["dlq", "list", "--json"],
                 ["dlq", "show", "1"], ["items"], ["items", "--json"]):  # fmt: skip
        out = run_cli(*args, config=config).stdout
        assert hook not in out, args
        assert "***" in out, args
