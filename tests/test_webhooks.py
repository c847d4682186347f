"""Webhook sources: POST /hooks/<name> on a running agentwatch, over real sockets.

The signature code is checked against GitHub's and octokit's published test
vectors (raw bytes from the corpus); the item builder against GitHub's payloads
of each event. End-to-end tests sign deliveries themselves, the way GitHub,
Stripe and Slack do, and post them to `agentwatch run` as a subprocess.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import rows, wait_until

import agentwatch

CORPUS = (
    Path(
        os.environ.get("AGENTWATCH_CORPUS")
        or Path(__file__).resolve().parents[2] / "shared" / "corpus"
    )
    / "github_webhooks"
)

SECRET = "s3cret-for-tests"


def corpus(name: str) -> dict:
    return json.loads((CORPUS / name).read_text(encoding="utf-8"))


def payload_bytes(name: str) -> bytes:
    """A corpus payload as compact JSON, the way GitHub sends it (no spaces, no newline)."""
    return json.dumps(corpus(name)["body"], separators=(",", ":")).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sign_github(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def sign_stripe(body: bytes, ts: int, secret: str = SECRET) -> str:
    digest = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def sign_slack(body: bytes, ts: int, secret: str = SECRET) -> str:
    base = f"v0:{ts}:".encode() + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def post(port: int, path: str, body: bytes, headers: dict | None = None, method: str = "POST"):
    """(status, parsed JSON or raw bytes) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json",
                                                       **(headers or {})})  # fmt: skip
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


def github_post(port, name, event, body, delivery, secret=SECRET, path=None):
    headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
               "X-Hub-Signature-256": sign_github(body, secret)}  # fmt: skip
    return post(port, path or f"/hooks/{name}", body, headers)


def items_of(db: Path, source: str) -> list[dict]:
    return rows(db, "SELECT * FROM items WHERE source = ? ORDER BY id", source)


def start(
    start_cli, tmp_path: Path, sources: str, *, settings: str = "", llm: str = "",
    max_age: str = "100000d",
):  # fmt: skip
    """`agentwatch run` with /health (and the hooks) on a free port; returns (proc, port, db)."""
    port = free_port()
    llm = llm or 'provider = "none"'
    config = tmp_path / "agentwatch.toml"
    config.write_text(
        f'[agentwatch]\nhealth = "127.0.0.1:{port}"\nlog_file = "agentwatch.log"\n'
        f'retry_base = "1s"\nmax_age = "{max_age}"\n{settings}\n'
        f"[llm]\n{llm}\n\n"
        '[slack]\nwebhook_url = "${SLACK_WEBHOOK_URL}"\n\n' + sources,
        encoding="utf-8",
    )
    proc = start_cli("run", config=config)
    wait_for_log(tmp_path, "hooks: POST", proc)
    return proc, port, tmp_path / "agentwatch.db"


def wait_for_log(tmp_path: Path, text: str, proc, after: int = 0) -> None:
    """Until `text` is in agentwatch.log (past its first `after` characters)."""
    log = tmp_path / "agentwatch.log"

    def found() -> bool:
        if proc.returncode is not None:
            pytest.fail(f"agentwatch exited ({proc.returncode}): {proc.stderr_text()[-2000:]}")
        return log.exists() and text in log.read_text(errors="replace")[after:]

    wait_until(found, what=repr(text))


def webhook_source(name: str, signature: str, extra: str = "") -> str:
    return (
        f'[[sources]]\nname = "{name}"\ntype = "webhook"\nsecret = "{SECRET}"\n'
        f'signature = "{signature}"\nnotify = "all"\n{extra}\n\n'
    )


# -- signatures, on the published test vectors -----------------------------


@pytest.mark.parametrize("vector", sorted(p.name for p in CORPUS.glob("signature_vector_*.json")))
def test_github_signature_vectors(vector):
    data = corpus(vector)
    body = (CORPUS / data["raw_body_file"]).read_bytes()
    options = SimpleNamespace(secret=data["secret"], signature="github", tolerance=300)
    headers = {"x-hub-signature-256": data["headers"]["x-hub-signature-256"]}
    assert agentwatch.verify_signature(options, headers, body, time.time()) == ""
    # One byte more, another secret, or the body parsed and dumped again: refused.
    assert agentwatch.verify_signature(options, headers, body + b"\n", time.time())
    wrong = SimpleNamespace(secret=data["secret"] + "x", signature="github", tolerance=300)
    assert agentwatch.verify_signature(wrong, headers, body, time.time())


def test_stripe_several_v1_pass_when_any_matches_and_stale_ones_do_not():
    options = SimpleNamespace(secret=SECRET, signature="stripe", tolerance=300)
    body, now = b'{"id":"evt_1"}', int(time.time())
    good = sign_stripe(body, now).split("v1=")[1]
    header = f"t={now},v1={'0' * 64},v1={good},v0=deadbeef"
    assert agentwatch.verify_signature(options, {"stripe-signature": header}, body, now) == ""
    header = f"t={now},v1={'0' * 64}"
    assert "wrong" in agentwatch.verify_signature(options, {"stripe-signature": header}, body, now)
    old = sign_stripe(body, now - 301)
    assert "old" in agentwatch.verify_signature(options, {"stripe-signature": old}, body, now)


def test_parse_published_takes_epoch_and_iso_8601():
    assert agentwatch.parse_published("2019-05-15T15:20:21Z") == 1557933621.0
    assert agentwatch.parse_published("2019-05-15T17:20:21+02:00") == 1557933621.0
    assert agentwatch.parse_published(1557933621) == 1557933621.0
    assert agentwatch.parse_published("1557933621") == 1557933621.0
    assert agentwatch.parse_published(1557933621000) == 1557933621.0  # milliseconds
    assert agentwatch.parse_published("yesterday") is None
    assert agentwatch.parse_published(float("nan")) is None
    assert agentwatch.parse_published(True) is None


def test_github_payloads_become_items_without_configuration():
    issue = agentwatch.github_item("issues", corpus("issues_opened.json")["body"])
    assert issue.title == "Codertocat/Hello-World#1 issue opened: Spelling error in the README file"
    assert issue.url == "https://github.com/Codertocat/Hello-World/issues/1"
    assert issue.author == "Codertocat" and "commit" in issue.body
    assert issue.published_at == agentwatch.parse_published("2019-05-15T15:20:18Z")

    comment = agentwatch.github_item("issue_comment", corpus("issue_comment_created.json")["body"])
    assert (
        comment.url == "https://github.com/Codertocat/Hello-World/issues/1#issuecomment-492700400"
    )
    assert comment.kind == "comment" and comment.body.startswith("You are totally right")

    pull = agentwatch.github_item(
        "pull_request", corpus("pull_request_opened_null_body.json")["body"]
    )
    assert pull.body == "" and pull.url.endswith("/pull/2")  # a null body is no body

    discussion = corpus("discussion_created.json")["body"]
    item = agentwatch.github_item("discussion", discussion)
    assert item.url == "https://github.com/Codertocat/Hello-World/discussions/4"
    reply = dict(discussion, comment={
        "id": 1, "body": "Same here", "user": {"login": "monalisa"},
        "html_url": "https://github.com/Codertocat/Hello-World/discussions/4#discussioncomment-1",
        "created_at": "2021-03-30T21:00:00Z", "updated_at": "2021-03-30T21:00:00Z",
    })  # fmt: skip
    item = agentwatch.github_item("discussion_comment", reply)
    assert item.url.endswith("#discussioncomment-1") and item.author == "monalisa"

    release = agentwatch.github_item("release", corpus("release_published.json")["body"])
    assert release.title == "Codertocat/Hello-World release published: 0.0.1"
    assert release.url.endswith("/releases/tag/0.0.1")

    assert agentwatch.github_item("star", corpus("star_created.json")["body"]) is None


# -- end to end ----------------------------------------------------------------


def test_github_events_post_once_each_and_redelivery_is_a_200(start_cli, tmp_path, slack):
    proc, port, db = start(start_cli, tmp_path, webhook_source("gh", "github"))
    sent = {
        "issues": "issues_opened.json",
        "issue_comment": "issue_comment_created.json",
        "pull_request": "pull_request_opened_null_body.json",
        "discussion": "discussion_created.json",
        "release": "release_published.json",
    }
    for n, (event, name) in enumerate(sent.items()):
        status, answer = github_post(port, "gh", event, payload_bytes(name), f"guid-{n}")
        assert status == 202, answer
        assert answer["result"] == "accepted"
    slack.wait_for(5)
    # GitHub's "Redeliver" button sends the same X-GitHub-Delivery again.
    status, answer = github_post(
        port, "gh", "issues", payload_bytes("issues_opened.json"), "guid-0"
    )
    assert (status, answer["result"]) == (200, "duplicate")
    time.sleep(1.5)
    assert len(slack.posts()) == 5
    text = slack.text()
    assert "https://github.com/Codertocat/Hello-World/issues/1#issuecomment-492700400" in text
    assert "Update the README with new information." in text
    stored = items_of(db, "gh")
    assert sorted(r["item_id"] for r in stored) == [f"guid-{n}" for n in range(5)]
    assert {r["status"] for r in stored} == {"done"}
    proc.kill()
    assert proc.wait() == 0


def test_ping_and_filtered_events_answer_200_and_store_nothing(start_cli, tmp_path, slack):
    source = webhook_source("gh", "github", 'events = ["issues.opened", "issue_comment"]')
    _proc, port, db = start(start_cli, tmp_path, source)
    status, answer = github_post(port, "gh", "ping", payload_bytes("ping.json"), "p1")
    assert (status, answer["result"]) == (200, "pong")
    status, answer = github_post(port, "gh", "star", payload_bytes("star_created.json"), "s1")
    assert (status, answer["result"]) == (200, "ignored")
    closed = json.loads(payload_bytes("issues_opened.json"))
    closed["action"] = "closed"
    body = json.dumps(closed).encode()
    status, answer = github_post(port, "gh", "issues", body, "c1")
    assert (status, answer["result"]) == (200, "ignored")
    assert items_of(db, "gh") == []
    body = payload_bytes("issue_comment_created.json")
    assert github_post(port, "gh", "issue_comment", body, "ok1")[0] == 202
    slack.wait_for(1)
    assert [r["item_id"] for r in items_of(db, "gh")] == ["ok1"]


def test_github_refuses_wrong_missing_and_foreign_signatures(start_cli, tmp_path, slack):
    sources = webhook_source("gh", "github") + (
        '[[sources]]\nname = "feed"\ntype = "rss"\nurl = "http://127.0.0.1:9/feed"\nevery = "1h"\n'
    )
    _proc, port, db = start(start_cli, tmp_path, sources)
    body = payload_bytes("issues_opened.json")
    assert github_post(port, "gh", "issues", body, "d1", secret="another-secret")[0] == 401
    headers = {"X-GitHub-Event": "issues", "X-GitHub-Delivery": "d2"}
    assert post(port, "/hooks/gh", body, headers)[0] == 401  # unsigned
    tampered = body.replace(b"Spelling", b"Spilling")
    headers["X-Hub-Signature-256"] = sign_github(body)
    assert post(port, "/hooks/gh", tampered, headers)[0] == 401
    # The names that are not webhook sources, and the methods that are not POST.
    assert github_post(port, "nope", "issues", body, "d3")[0] == 404
    assert github_post(port, "feed", "issues", body, "d4")[0] == 404
    status, _ = post(port, "/hooks/gh", b"", method="GET")
    assert status == 405
    assert items_of(db, "gh") == []
    log = (tmp_path / "agentwatch.log").read_text()
    assert "wrong x-hub-signature-256" in log and SECRET not in log


def test_stripe_good_wrong_missing_stale_and_redelivered(start_cli, tmp_path, slack):
    _proc, port, db = start(start_cli, tmp_path, webhook_source("pay", "stripe"))
    event = {"id": "evt_1", "type": "payment_intent.succeeded", "created": int(time.time()),
             "data": {"object": {"amount": 2000, "currency": "usd"}}}  # fmt: skip
    body = json.dumps(event).encode()
    now = int(time.time())
    assert (
        post(port, "/hooks/pay", body, {"Stripe-Signature": sign_stripe(body, now, "x" * 8)})[0]
        == 401
    )
    assert post(port, "/hooks/pay", body)[0] == 401
    stale = sign_stripe(body, now - 600)
    assert post(port, "/hooks/pay", body, {"Stripe-Signature": stale})[0] == 401
    rotating = f"t={now},v1={'0' * 64},v1={sign_stripe(body, now).split('v1=')[1]}"
    assert post(port, "/hooks/pay", body, {"Stripe-Signature": rotating})[0] == 202
    # Stripe retries with a new signature and timestamp, but the same event id.
    again = sign_stripe(body, now + 1)
    status, answer = post(port, "/hooks/pay", body, {"Stripe-Signature": again})
    assert (status, answer["result"]) == (200, "duplicate")
    slack.wait_for(1)
    (item,) = items_of(db, "pay")
    assert item["item_id"] == "evt_1" and item["title"] == "payment_intent.succeeded"
    assert '"amount": 2000' in item["body"]


def test_slack_good_wrong_missing_stale_and_url_verification(start_cli, tmp_path, slack):
    _proc, port, db = start(start_cli, tmp_path, webhook_source("sl", "slack"))
    now = int(time.time())

    def signed(body: bytes, ts: int = now, secret: str = SECRET) -> dict:
        return {"X-Slack-Request-Timestamp": str(ts),
                "X-Slack-Signature": sign_slack(body, ts, secret)}  # fmt: skip

    challenge = json.dumps({"type": "url_verification", "challenge": "3eZbrw1aB"}).encode()
    assert post(port, "/hooks/sl", challenge, signed(challenge)) == (
        200,
        {"challenge": "3eZbrw1aB"},
    )
    assert post(port, "/hooks/sl", challenge)[0] == 401  # Slack signs this one too
    event = {"type": "event_callback", "event_id": "Ev01", "event_time": now,
             "event": {"type": "app_mention", "text": "is acme down?", "user": "U1"}}  # fmt: skip
    body = json.dumps(event).encode()
    assert post(port, "/hooks/sl", body, signed(body, secret="wrong-secret"))[0] == 401
    assert post(port, "/hooks/sl", body, signed(body, now - 301))[0] == 401
    assert post(port, "/hooks/sl", body, signed(body))[0] == 202
    headers = {**signed(body), "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    assert post(port, "/hooks/sl", body, headers)[0] == 200
    slack.wait_for(1)
    (item,) = items_of(db, "sl")
    assert (item["item_id"], item["body"], item["author"]) == ("Ev01", "is acme down?", "U1")


def test_hmac_with_fields_and_sha256_dedup(start_cli, tmp_path, slack):
    extra = (
        'header = "X-Acme-Signature"\nprefix = ""\n'
        'fields = { title = "subject", body = "text", url = "link", author = "user.name", '
        'published = "created_at" }'
    )
    _proc, port, db = start(start_cli, tmp_path, webhook_source("acme", "hmac", extra))
    body = json.dumps({"subject": "Checkout broken", "text": "500 on pay", "link": "https://a/1",
                       "user": {"name": "ann"}, "created_at": "2030-01-01T00:00:00Z"}).encode()  # fmt: skip
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert post(port, "/hooks/acme", body, {"X-Acme-Signature": "0" * 64})[0] == 401
    assert post(port, "/hooks/acme", body)[0] == 401
    assert post(port, "/hooks/acme", body, {"X-Acme-Signature": digest.upper()})[0] == 202
    assert post(port, "/hooks/acme", body, {"X-Acme-Signature": digest})[0] == 200  # same bytes
    slack.wait_for(1)
    (item,) = items_of(db, "acme")
    assert item["item_id"] == "sha256:" + hashlib.sha256(body).hexdigest()
    assert (item["title"], item["url"], item["author"]) == ("Checkout broken", "https://a/1", "ann")
    assert "Checkout broken" in slack.text()


def test_oversize_and_non_json_bodies(start_cli, tmp_path, slack):
    _proc, port, db = start(
        start_cli, tmp_path, webhook_source("gh", "github", 'max_body = "10KB"')
    )
    big = b'{"pad":"' + b"x" * 20_000 + b'"}'
    assert github_post(port, "gh", "issues", big, "big1")[0] == 413
    # A sender that asks first (Expect: 100-continue) is answered before it sends the body.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /hooks/gh HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n"
                  b"Expect: 100-continue\r\n\r\n")  # fmt: skip
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    # Chunked, without a length: cut at the cap all the same.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        chunk = b"x" * 4000
        s.sendall(b"POST /hooks/gh HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + (b"fa0\r\n" + chunk + b"\r\n") * 3 + b"0\r\n\r\n")  # fmt: skip
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    status, answer = github_post(port, "gh", "issues", b"Hello, World!", "nj1")
    assert status == 400 and "not JSON" in answer["error"]
    assert github_post(port, "gh", "issues", b"[1, 2]", "nj2")[0] == 400
    assert items_of(db, "gh") == []
    # An unsigned non-JSON body is a 401, not a 400: the signature comes first.
    assert post(port, "/hooks/gh", b"not json", {"X-GitHub-Event": "issues"})[0] == 401


def test_202_comes_fast_while_the_llm_hangs_and_a_kill_9_loses_nothing(
    start_cli, tmp_path, slack, anthropic_fake
):
    anthropic_fake.set_default_fault(("hang",))
    sources = webhook_source("gh", "github")
    proc, port, db = start(start_cli, tmp_path, sources, llm='model = "m"')
    body = payload_bytes("issues_opened.json")
    github_post(port, "gh", "issues", body, "warm-up")  # the first one pays for imports
    started = time.monotonic()
    status, _ = github_post(port, "gh", "issues", body, "k1")
    assert status == 202
    assert time.monotonic() - started < 1.0
    proc.kill(signal.SIGKILL)
    proc.wait()
    assert len(slack.posts()) == 0
    anthropic_fake.set_default_fault(None)
    proc2 = start_cli("run", config=tmp_path / "agentwatch.toml")
    slack.wait_for(2)
    time.sleep(1.5)
    assert len(slack.posts()) == 2  # "warm-up" and "k1", once each
    assert {r["item_id"]: r["status"] for r in items_of(db, "gh")} == {
        "warm-up": "done", "k1": "done"}  # fmt: skip
    proc2.kill()
    assert proc2.wait() == 0


def test_max_age_applies_to_the_payloads_own_time(start_cli, tmp_path, slack):
    _proc, port, db = start(start_cli, tmp_path, webhook_source("gh", "github"), max_age="2d")
    status, _ = github_post(port, "gh", "issues", payload_bytes("issues_opened.json"), "old1")
    assert status == 202  # stored, so a redelivery is still recognised ...
    wait_until(lambda: items_of(db, "gh"), what="the item")
    (item,) = items_of(db, "gh")
    assert (item["status"], item["note"]) == ("seen", "older than max_age")  # ... but not run
    assert github_post(port, "gh", "issues", payload_bytes("issues_opened.json"), "old1")[0] == 200
    time.sleep(1.5)
    assert slack.posts() == []


def test_hooks_on_their_own_listener(start_cli, tmp_path, slack):
    hooks_port = free_port()
    settings = f'hooks = "127.0.0.1:{hooks_port}"'
    _proc, port, _db = start(start_cli, tmp_path, webhook_source("gh", "github"), settings=settings)
    body = payload_bytes("issues_opened.json")
    assert github_post(hooks_port, "gh", "issues", body, "h1")[0] == 202
    assert github_post(port, "gh", "issues", body, "h2")[0] == 404  # not on /health's port
    assert post(hooks_port, "/health", b"", method="GET")[0] == 404
    assert post(hooks_port, "/metrics", b"", method="GET")[0] == 404
    assert post(port, "/health", b"", method="GET")[0] in (200, 503)
    slack.wait_for(1)
    _, metrics = post(port, "/metrics", b"", method="GET")
    assert b'agentwatch_webhook_deliveries_total{source="gh",status="202"} 1' in metrics


def test_a_webhook_source_needs_a_listener_and_a_secret(run_cli, make_config):
    config = make_config('[agentwatch]\nhealth = ""\n\n' + webhook_source("gh", "github"))
    result = run_cli("check", config=config)
    assert result.returncode == 2 and "agentwatch.hooks" in result.stderr
    config = make_config('[[sources]]\nname = "gh"\ntype = "webhook"\nsecret = ""\n')
    result = run_cli("check", config=config)
    assert result.returncode == 2 and "secret" in result.stderr
    config = make_config(webhook_source("gh", "github", 'fields = { titel = "x" }'))
    result = run_cli("check", config=config)
    assert result.returncode == 2 and "titel" in result.stderr


def test_the_secret_is_redacted_from_the_log(start_cli, tmp_path, slack):
    """A careless drop-in that logs the webhook's secret: the log shows *** instead."""
    folder = tmp_path / "sources"
    folder.mkdir()
    (folder / "blabber.py").write_text(
        "from dataclasses import dataclass\n"
        "from agentwatch import Source, source\n\n"
        '@source("blabber")\nclass Blabber(Source):\n'
        "    @dataclass(frozen=True)\n    class Options:\n        said: str\n\n"
        "    async def poll(self):\n"
        '        self.log.warning("the secret is %s", self.options.said)\n'
        "        return []\n"
    )
    sources = webhook_source("gh", "github") + (
        f'[[sources]]\nname = "b"\ntype = "blabber"\nsaid = "{SECRET}"\n'
    )
    _proc, port, _db = start(start_cli, tmp_path, sources)
    wait_until(lambda: "the secret is" in (tmp_path / "agentwatch.log").read_text())
    log = (tmp_path / "agentwatch.log").read_text()
    assert SECRET not in log and "the secret is ***" in log
    _, health = post(port, "/health", b"", method="GET")
    assert SECRET.encode() not in json.dumps(health).encode()
