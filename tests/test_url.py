"""The url source: uptime, content and certificate checks against pages on 127.0.0.1.

Most tests run `agentwatch run --once` once per check, as cron-like steps: each
run is one poll, and the state machine has to survive between processes.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal

import agentwatch_sources.url as url_source
import pytest
from fake_targets import FakeTarget, make_certificate

import agentwatch


@pytest.fixture
def target():
    with FakeTarget() as fake:
        yield fake


def url_config(make_config, url: str, *, llm: bool = False, **keys) -> object:
    """A config with one url source named "site", polled every second."""
    own = "\n".join(f"{key} = {toml_value(value)}" for key, value in keys.items())
    return make_config(
        "[agentwatch]\n"
        'health = ""\n'
        'retry_base = "1s"\n'
        "[llm]\n"
        f'provider = "{"anthropic" if llm else "none"}"\n'
        "[slack]\n"
        'webhook_url = "${SLACK_WEBHOOK_URL}"\n'
        "[[sources]]\n"
        'name = "site"\n'
        'type = "url"\n'
        f"url = {json.dumps(url)}\n"
        'every = "1s"\n' + own + "\n"
    )


def toml_value(value) -> str:
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    return json.dumps(value)  # strings, numbers, booleans and lists read the same in TOML


def check_once(run_cli, config) -> None:
    result = run_cli("run", "--once", config=config)
    assert result.returncode == 0, result.stderr


def page(*paragraphs: str, extra_head: str = "") -> str:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return f"<html><head><title>Acme</title>{extra_head}</head><body>{body}</body></html>"


# -- up and down ------------------------------------------------------------------


def test_one_failed_check_does_not_alert_two_do_exactly_once(
    target, slack, anthropic_fake, make_config, run_cli
):
    config = url_config(make_config, target.url + "/health", llm=True)
    for status, messages in ((200, 0), (503, 0), (200, 0), (503, 0), (503, 1), (503, 1)):
        target.answer(status=status)
        check_once(run_cli, config)
        assert len(slack.posts()) == messages, (status, slack.texts())
    text = slack.text()
    assert "127.0.0.1" in text and "is down: status 503 (expected 200)" in text
    assert target.hits == 6
    assert anthropic_fake.calls() == 0  # a down alert is a fact: no LLM

    status = run_cli("status", config=config)
    assert status.returncode == 0, status.stderr
    assert re.search(r"down since \d{4}-\d\d-\d\dT", status.stdout), status.stdout
    assert "status 503 (expected 200)" in status.stdout


def test_recovery_alerts_once_with_the_downtime(target, slack, make_config, run_cli):
    config = url_config(make_config, target.url, fail_after=1)
    target.answer(status=500)
    check_once(run_cli, config)  # down from the very first check: that is news
    assert len(slack.posts()) == 1 and "is down: status 500" in slack.text()

    target.answer(status=200)
    check_once(run_cli, config)
    check_once(run_cli, config)
    texts = slack.texts()
    assert len(texts) == 2, texts
    assert re.search(r"is back up after \d+s down \(was: status 500 \(expected 200\)\)", texts[1])
    assert "Down since" in texts[1]

    status = run_cli("status", config=config)
    assert re.search(r"up since \d{4}-.*last latency \d+\.\d\ds", status.stdout), status.stdout


def test_a_timeout_is_a_failure_with_that_reason(target, slack, make_config, run_cli):
    config = url_config(make_config, target.url, fail_after=1, timeout="1s")
    target.answer(delay=3)
    check_once(run_cli, config)
    slack.wait_for(1)
    assert "is down: timeout: no complete answer within 1s" in slack.text()


def test_a_slow_answer_over_max_latency_is_a_failure(target, slack, make_config, run_cli):
    config = url_config(make_config, target.url, fail_after=1, max_latency="200ms")
    target.answer(delay=0.5)
    check_once(run_cli, config)
    assert re.search(r"is down: slow: answered in 0\.\d\ds \(max_latency 0\.2s\)", slack.text())


def test_missing_contains_text_is_a_failure(target, slack, make_config, run_cli):
    config = url_config(make_config, target.url, fail_after=1, contains="Sign up")
    target.answer(body=page("Welcome", "Sign up"))
    check_once(run_cli, config)
    assert slack.posts() == []
    target.answer(body=page("Welcome", "Log in"))
    check_once(run_cli, config)
    assert len(slack.posts()) == 1
    assert "is down: missing text 'Sign up'" in slack.text()


def test_a_check_failure_is_not_a_failed_poll(target, slack, make_config, run_cli):
    closed = f"http://127.0.0.1:{target.port}"
    target.stop()  # nothing listens there any more
    config = url_config(make_config, closed, fail_after=1)
    check_once(run_cli, config)
    assert "is down: cannot connect to 127.0.0.1" in slack.text()
    status = run_cli("status", config=config).stdout
    lines = status.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("site "))
    assert lines[row].split()[-1] == "0"  # 0 consecutive poll failures
    assert "down since" in lines[row + 1]  # the state, on its own line under the row


def test_head_with_headers(target, slack, make_config, run_cli):
    config = url_config(
        make_config, target.url, method="HEAD", headers={"X-Check": "agentwatch"}, fail_after=1
    )
    check_once(run_cli, config)
    (request,) = target.requests
    assert request["method"] == "HEAD" and request["headers"]["x-check"] == "agentwatch"
    assert slack.posts() == []


def test_redirects_are_followed_but_bounded_unless_the_redirect_is_expected(
    target, slack, make_config, run_cli
):
    target.answer(status=302, headers={"Location": "/again"})  # every path redirects
    expected = url_config(make_config, target.url, expect_status=302, fail_after=1)
    check_once(run_cli, expected)
    assert target.hits == 1 and slack.posts() == []

    looping = url_config(make_config, target.url, fail_after=1)
    check_once(run_cli, looping)
    assert target.hits == 1 + 6  # the first request and 5 redirects, then it gives up
    assert "is down: " in slack.text() and "redirects too many times" in slack.text()


# -- content ------------------------------------------------------------------------


def test_a_content_change_produces_one_changed_item_with_a_diff(
    target, slack, make_config, run_cli
):
    config = url_config(make_config, target.url, watch_content=True)
    target.answer(body=page("Acme analytics", "Price: $10 a month", "Sign up"))
    check_once(run_cli, config)
    check_once(run_cli, config)
    assert slack.posts() == []

    target.answer(body=page("Acme analytics", "Price: $12 a month", "Sign up"))
    check_once(run_cli, config)
    check_once(run_cli, config)
    texts = slack.texts()
    assert len(texts) == 1, texts
    assert "changed (+1 −1 line(s))" in texts[0]
    assert "- Price: $10 a month\n+ Price: $12 a month" in texts[0]


def test_a_masked_timestamp_scripts_and_whitespace_are_not_changes(
    target, slack, make_config, run_cli
):
    config = url_config(
        make_config, target.url, watch_content=True, ignore=[r"Updated \d\d:\d\d:\d\d"]
    )
    target.answer(body=page("Status: all good", "Updated 10:00:00"))
    check_once(run_cli, config)
    target.answer(
        body=page(
            "Status:   all\n good",
            "Updated 10:00:17",
            extra_head="<script>var nonce = 'b81f';</script><style>p {}</style>",
        )
    )
    check_once(run_cli, config)
    assert slack.posts() == []

    target.answer(body=page("Status: degraded", "Updated 10:00:34"))
    check_once(run_cli, config)
    assert len(slack.posts()) == 1
    assert "- Status: all good\n+ Status: degraded" in slack.text()


def test_a_change_is_summarized_when_an_llm_is_configured(
    target, slack, anthropic_fake, make_config, run_cli
):
    anthropic_fake.drafter = lambda request: "The monthly price went up from $10 to $12."
    config = url_config(make_config, target.url, llm=True, watch_content=True)
    target.answer(body=page("Price: $10 a month"))
    check_once(run_cli, config)
    target.answer(body=page("Price: $12 a month"))
    check_once(run_cli, config)
    assert anthropic_fake.calls() == 1 and anthropic_fake.calls("text") == 1
    prompt = json.dumps(anthropic_fake.requests[0]["json"]["messages"])
    assert "+ Price: $12 a month" in prompt
    assert "The monthly price went up from $10 to $12." in slack.text()


# -- restarts -----------------------------------------------------------------------


def test_a_process_restarted_while_a_url_is_down_does_not_alert_again(
    target, slack, make_config, start_cli
):
    config = url_config(make_config, target.url)
    target.answer(status=502)
    first = start_cli("run", config=config)
    slack.wait_for(1)
    # Killed once the alert is recorded as sent (a kill between Slack's "ok" and
    # that record resends it: at least once, by design of the pipeline).
    first.wait_for_output(r"stage=notify sent")
    first.kill(signal.SIGKILL)
    first.wait()

    seen = target.hits
    second = start_cli("run", config=config)
    target.wait_for(seen + 3)  # three more failed checks by the new process
    assert len(slack.posts()) == 1, slack.texts()

    target.answer(status=200)
    slack.wait_for(2)
    assert "is back up after" in slack.texts()[1]
    second.kill(signal.SIGTERM)
    assert second.wait() == 0


# -- certificates -------------------------------------------------------------------


def test_a_certificate_close_to_expiry_warns_once(tmp_path, slack, make_config, run_cli):
    tls = make_certificate(tmp_path / "tls", days=5)
    with FakeTarget(tls=tls) as target:
        config = url_config(make_config, target.url, cert_days=14)
        for _ in range(3):
            check_once(run_cli, config)
        texts = slack.texts()
        warnings = [t for t in texts if "certificate expires in" in t]
        assert len(warnings) == 1, texts
        assert re.search(
            rf"certificate expires in (5d|4d 2\dh) \({tls.not_after:%Y-%m-%d}\)", warnings[0]
        )
        assert "fails verification: self-signed certificate" in warnings[0]
        # A self-signed certificate also fails every check: down after two.
        downs = [t for t in texts if "is down" in t]
        assert len(downs) == 1 and "is down: certificate: self-signed certificate" in downs[0]
        # Three page checks, and the expiry read once (at most daily).
        assert target.connections == 4


def test_a_certificate_far_from_expiry_says_nothing(tmp_path, slack, make_config, run_cli):
    tls = make_certificate(tmp_path / "tls", days=60)
    with FakeTarget(tls=tls) as target:
        config = url_config(make_config, target.url, cert_days=14, fail_after=5)
        check_once(run_cli, config)
        assert slack.posts() == []
        assert target.connections == 2  # the (failed) page check and the expiry read


# -- config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"method": "HEAD", "contains": "Sign up"}, "method HEAD gets no page"),
        ({"ignore": ["(unclosed"]}, "ignore[0]: bad regex"),
        ({"fail_after": 0}, "fail_after must be at least 1"),
        ({"method": "POST"}, "sources[0].method: must be one of 'GET', 'HEAD'"),
        ({"expect_status": 2000}, "expect_status must be an HTTP status"),
    ],
)
def test_bad_url_options_are_config_errors(make_config, run_cli, keys, message):
    config = url_config(make_config, "https://example.com/", **keys)
    result = run_cli("check", config=config)
    assert result.returncode == 2
    assert "sources[0]" in result.stderr and message in result.stderr, result.stderr


def test_check_describes_a_url_source(make_config, run_cli):
    config = url_config(make_config, "https://example.com/", contains="Sign up", watch_content=True)
    result = run_cli("check", config=config)
    assert result.returncode == 0, result.stderr
    assert "GET https://example.com/ expects 200, contains 'Sign up'" in result.stdout


# -- pure parts -----------------------------------------------------------------------


def test_visible_text_drops_scripts_styles_tags_and_whitespace():
    html = (
        "<html><head><style>h1 {color: red}</style><script>let x = '<p>no</p>';</script>"
        "</head><body><!-- hidden --><h1>Acme&nbsp;&amp; co</h1>\n\n<p>Fast   <b>and</b>\tcheap"
        "</p><ul><li>One</li><li>Two</li></ul></body></html>"
    )
    assert url_source.visible_text(html) == "Acme & co\nFast and cheap\nOne\nTwo"
    assert url_source.visible_text('{"ok":  true}\n\n', is_html=False) == '{"ok": true}'
    assert url_source.mask("at 10:00:01 by 3", [r"\d\d:\d\d:\d\d"]) == "at … by 3"


def test_text_diff_is_short():
    old = "\n".join(f"line {i}" for i in range(100))
    new = "\n".join(f"line {i}" + ("!" if i % 2 else "") for i in range(100))
    diff, added, removed = url_source.text_diff(old, new)
    assert (added, removed) == (50, 50)
    assert diff.splitlines()[:2] == ["- line 1", "+ line 1!"]
    assert diff.endswith("… and 60 more changed line(s)")
    assert len(diff.splitlines()) == url_source.DIFF_LINES + 1


@pytest.mark.parametrize("days", [5, -3, 365 * 30])  # 30 years: GeneralizedTime
def test_certificate_expiry_is_read_from_der(tmp_path, days):
    import ssl

    tls = make_certificate(tmp_path, days=days)
    der = ssl.PEM_cert_to_DER_cert(tls.cert.read_text())
    assert url_source.certificate_not_after(der) == tls.not_after.timestamp()
    with pytest.raises(ValueError, match="cannot read the certificate's expiry"):
        url_source.certificate_not_after(der[:40])


def test_human_duration():
    assert [agentwatch.human_duration(s) for s in (0, 45, 252, 3600, 7500, 277200)] == [
        "0s", "45s", "4m 12s", "1h", "2h 5m", "3d 5h",
    ]  # fmt: skip


def test_describe_state():
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC).timestamp()
    describe = url_source.URLSource.describe_state
    assert describe({}) == ""
    assert describe({"state": "up", "since": now, "last_latency": 0.123}) == (
        "up since 2026-01-02T03:04:05Z; last latency 0.12s"
    )
    assert (
        describe(
            {
                "state": "down",
                "since": now,
                "reason": "status 503 (expected 200)",
                "last_latency": None,
            }
        )
        == "down since 2026-01-02T03:04:05Z (status 503 (expected 200)); last check: no answer"
    )


def test_preview_shows_the_state_a_first_check_found(target, make_config, run_cli):
    config = url_config(make_config, target.url, fail_after=1)
    target.answer(status=503)
    result = run_cli("preview", "site", config=config)
    assert result.returncode == 0, result.stderr
    assert "state: down since" in result.stdout and "status 503" in result.stdout
    assert target.hits == 1
    assert run_cli("status", config=config).stdout.count("never") >= 1, "preview stored nothing"
