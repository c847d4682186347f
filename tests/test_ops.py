"""Operations, the way a VPS lives: agentwatch and watchdog.sh as subprocesses,
/health and /metrics over real sockets, signals, logrotate, one instance per db.

Two drop-in sources are written into a test's `sources/` folder, the way a user
adds one: `stall` blocks the event loop with time.sleep once a flag file exists
(the bug /health exists to catch), and `leaky` logs and raises with secrets in
the text (the careless plugin the log redaction exists for).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from textwrap import dedent

import pytest
from conftest import agentwatch_executable
from fakes import FakeSlack, rss

import agentwatch

WATCHDOG = Path(__file__).resolve().parent.parent / "watchdog.sh"

STALL_PLUGIN = '''
"""Test drop-in: a poll that blocks the event loop while a flag file exists."""
import os
import time
from dataclasses import dataclass

from agentwatch import Source, source


@source("stall")
class Stall(Source):
    @dataclass(frozen=True)
    class Options:
        flag: str
        seconds: float = 30.0

    async def poll(self):
        if os.path.exists(self.options.flag):
            time.sleep(self.options.seconds)  # the bug: blocking the loop
        return []
'''

LEAKY_PLUGIN = '''
"""Test drop-in: a careless source that logs and raises with secrets in the text."""
import os
from dataclasses import dataclass

from agentwatch import Source, source


@source("leaky")
class Leaky(Source):
    @dataclass(frozen=True)
    class Options:
        pass

    async def poll(self):
        key, hook = os.environ["ANTHROPIC_API_KEY"], os.environ["SLACK_WEBHOOK_URL"]
        self.log.warning("debugging: key=%s webhook=%s", key, hook)
        raise RuntimeError(f"could not use {key} with {hook}")
'''


# -- helpers -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, port: int, *, settings: str = "", rest: str = "") -> Path:
    """A config in tmp_path with /health on `port` and the log in agentwatch.log."""
    text = (
        "[agentwatch]\n"
        f'health = "127.0.0.1:{port}"\n'
        'log_file = "agentwatch.log"\n'
        'retry_base = "1s"\n' + dedent(settings).strip() + "\n\n" + dedent(rest).strip() + "\n"
    )
    path = tmp_path / "agentwatch.toml"
    path.write_text(text, encoding="utf-8")
    return path


def drop_in(tmp_path: Path, name: str, code: str) -> None:
    folder = tmp_path / "sources"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(code, encoding="utf-8")


def get(port: int, path: str = "/health", method: str = "GET", timeout: float = 5.0):
    """(status, headers, body) of one request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def wait_health(port: int, status: int = 200, timeout: float = 15, proc=None) -> dict:
    """Poll /health until it answers `status`; returns the JSON body."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            code, _, body = get(port, timeout=2)
            last = (code, body[:300])
            if code == status:
                return json.loads(body)
        except OSError as e:
            last = e
        if proc is not None and proc.returncode is not None:
            pytest.fail(f"agentwatch exited ({proc.returncode}) while waiting for /health")
        if time.monotonic() > deadline:
            pytest.fail(f"/health did not answer {status} within {timeout}s; last: {last!r}")
        time.sleep(0.1)


def wait_until(condition, timeout: float = 15, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout}s")
        time.sleep(0.05)
    return result


def log_text(tmp_path: Path, name: str = "agentwatch.log") -> str:
    path = tmp_path / name
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def live(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def agentwatch_runs(config: Path) -> list[int]:
    """Live `agentwatch ... run ... --config CONFIG` processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"run" in argv and str(config).encode() in argv and live(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


@pytest.fixture
def reap():
    """reap(config): at the end of the test, kill what watchdog.sh started for it."""
    configs: list[Path] = []
    yield configs.append
    for config in configs:
        for pid in agentwatch_runs(config):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)


def watchdog_env(tmp_path: Path, config: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "AGENTWATCH_HEALTH_URL": f"http://127.0.0.1:{port}/health",
        "AGENTWATCH_PIDFILE": str(tmp_path / "agentwatch.pid"),
        "AGENTWATCH_CONFIG": str(config),
        "AGENTWATCH_LOG": str(tmp_path / "watchdog.log"),
        "AGENTWATCH_CMD": f"{agentwatch_executable()} run",
        "AGENTWATCH_START_TIMEOUT": "20",
        **extra,
    }


def run_watchdog(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(WATCHDOG)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90
    )


def pidfile_pid(tmp_path: Path) -> int:
    return int((tmp_path / "agentwatch.pid").read_text().strip())


# -- a strict reader of the Prometheus text format ---------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
_SAMPLE = re.compile(
    rf"^(?P<name>{_NAME})(?:\{{(?P<labels>(?:{_LABEL})(?:,{_LABEL})*)?\}})?"
    r" (?P<value>\S+)(?: (?P<timestamp>-?\d+))?$"
)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_prometheus(text: str) -> dict[str, dict]:
    """{family: {"type", "help", "samples": {frozenset(labels): value}}}. Fails
    on anything the exposition format (0.0.4) does not allow, as Prometheus would."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, dict] = {}
    current = None
    for n, line in enumerate(text.split("\n")[:-1], 1):
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                assert re.fullmatch(_NAME, name), f"line {n}: bad metric name {name!r}"
                family = families.setdefault(name, {"samples": {}})
                key = parts[1].lower()
                assert key not in family, f"line {n}: second {parts[1]} for {name}"
                assert not family["samples"], f"line {n}: {parts[1]} after samples of {name}"
                value = parts[3] if len(parts) > 3 else ""
                if key == "type":
                    assert value in ("counter", "gauge", "summary", "histogram", "untyped")
                family[key] = value
                current = name
            continue
        assert line, f"line {n}: empty line"
        m = _SAMPLE.match(line)
        assert m, f"line {n}: not a sample: {line!r}"
        name, value = m.group("name"), m.group("value")
        assert name == current, f"line {n}: sample {name} outside its family ({current})"
        pairs = re.findall(_LABEL, m.group("labels") or "")
        labels = frozenset((k, _unescape(v)) for k, v in pairs)
        assert len({k for k, _ in pairs}) == len(pairs), f"line {n}: repeated label"
        number = float(value)  # accepts NaN, +Inf, -Inf, as the format does
        assert labels not in families[name]["samples"], f"line {n}: duplicate series"
        if families[name].get("type") == "counter":
            assert number >= 0 or math.isnan(number), f"line {n}: negative counter"
        families[name]["samples"][labels] = number
    for name, family in families.items():
        assert "type" in family, f"{name} has no TYPE"
    return families


def sample(families: dict, name: str, **labels: str) -> float:
    return families[name]["samples"][frozenset(labels.items())]


def test_the_prometheus_reader_is_strict():
    good = '# HELP a_total A.\n# TYPE a_total counter\na_total{x="q\\"\\n"} 1\n'
    assert sample(parse_prometheus(good), "a_total", x='q"\n') == 1
    for bad in (
        "a_total 1",  # no final newline
        "# TYPE a counter\na{x=1} 1\n",  # unquoted label value
        "# TYPE a counter\na 1\na 2\n",  # duplicate series
        "# TYPE a counter\nb 1\n",  # sample outside its family
        "# TYPE a counter\na -1\n",  # negative counter
        "a 1\n",  # no TYPE
        "# TYPE a counter\na one\n",  # not a number
    ):
        with pytest.raises((AssertionError, ValueError)):
            parse_prometheus(bad)


# -- /health and /metrics ----------------------------------------------------


def test_health_reports_every_field_then_503_when_the_loop_stalls(tmp_path, feeds, start_cli):
    feeds.set("/feed.xml", rss([{"title": "hello", "link": "https://x/1"}]))
    drop_in(tmp_path, "stall", STALL_PLUGIN)
    flag = tmp_path / "stall-now"
    port = free_port()
    config = write_config(
        tmp_path, port,
        settings='stale_after = "2s"',
        rest=f"""
            [llm]
            provider = "none"

            [[sources]]
            name = "blog"
            type = "rss"
            url = "{feeds.url}/feed.xml"
            every = "1s"

            [[sources]]
            name = "gone"
            type = "rss"
            url = "{feeds.url}/missing.xml"
            every = "1s"

            [[sources]]
            name = "staller"
            type = "stall"
            flag = "{flag}"
            every = "1s"
        """,
    )  # fmt: skip
    proc = start_cli("run", config=config)
    health = wait_health(port, proc=proc)

    def polled() -> dict | None:
        body = json.loads(get(port)[2])
        sources = body["sources"]
        both = sources["blog"]["last_ok_at"] and sources["gone"]["consecutive_failures"]
        return body if both else None

    body = wait_until(polled, what="both sources polled")
    for key in ("status", "pid", "version", "uptime_s", "last_tick_at", "last_event_at",
                "dlq_depth", "sources"):  # fmt: skip
        assert key in health and key in body, key
    assert body["status"] == "ok"
    assert body["pid"] == proc.pid
    assert body["version"] == agentwatch.__version__
    assert isinstance(body["uptime_s"], int | float) and body["uptime_s"] >= 0
    assert datetime.fromisoformat(body["last_tick_at"].replace("Z", "+00:00")).tzinfo
    assert body["dlq_depth"] == 0
    assert set(body["sources"]) == {"blog", "gone", "staller"}
    for entry in body["sources"].values():
        assert {"last_ok_at", "consecutive_failures", "next_poll_at", "last_error"} <= set(entry)
    blog, gone = body["sources"]["blog"], body["sources"]["gone"]
    assert blog["consecutive_failures"] == 0 and blog["last_error"] == ""
    datetime.fromisoformat(blog["last_ok_at"].replace("Z", "+00:00"))
    datetime.fromisoformat(blog["next_poll_at"].replace("Z", "+00:00"))
    assert gone["last_ok_at"] is None and gone["consecutive_failures"] >= 1
    assert "404" in gone["last_error"]

    flag.touch()  # the next poll of "staller" blocks the event loop for 30 s
    stale = wait_health(port, status=503, timeout=10, proc=proc)
    assert stale["status"] == "stale"
    assert stale["tick_age_s"] >= 2
    assert stale["pid"] == proc.pid


def test_health_answers_404_405_and_head(tmp_path, start_cli):
    port = free_port()
    config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"')
    proc = start_cli("run", config=config)
    wait_health(port, proc=proc)
    assert get(port, "/")[0] == 404
    assert get(port, "/healthz")[0] == 404
    status, headers, _ = get(port, "/health", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, body = get(port, "/health", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, headers, _ = get(port, "/metrics?x=1")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")


def test_metrics_parse_as_prometheus_text(tmp_path, feeds, slack, anthropic_fake, start_cli):
    feeds.set("/feed.xml", rss([
        {"title": "the app crashes on start", "link": "https://x/1"},
        {"title": "how do I export?", "link": "https://x/2"},
    ]))  # fmt: skip
    port = free_port()
    config = write_config(
        tmp_path, port,
        rest=f"""
            [slack]
            webhook_url = "${{SLACK_WEBHOOK_URL}}"

            [[sources]]
            name = "blog"
            type = "rss"
            url = "{feeds.url}/feed.xml"
            every = "1s"
            backfill = 2
            notify = "all"
        """,
    )  # fmt: skip
    proc = start_cli("run", config=config)
    wait_health(port, proc=proc)
    slack.wait_for(2)

    def settled() -> dict | None:
        families = parse_prometheus(get(port, "/metrics")[2].decode())
        done = families["agentwatch_items"]["samples"].get(
            frozenset({("stage", "done"), ("status", "done")})
        )
        notified = families["agentwatch_stage_runs_total"]["samples"].get(
            frozenset({("stage", "notify"), ("outcome", "ok")})
        )
        return families if done == notified == 2 else None

    # The database and the counters are read one after the other: wait for both.
    families = wait_until(settled, what="both items done in /metrics")
    types = {name: f["type"] for name, f in families.items()}
    assert types["agentwatch_polls_total"] == "counter"
    assert types["agentwatch_dlq_depth"] == "gauge"
    assert sample(families, "agentwatch_polls_total", source="blog") >= 1
    assert sample(families, "agentwatch_poll_errors_total", source="blog") == 0
    assert sample(families, "agentwatch_stage_runs_total", stage="classify", outcome="ok") == 2
    assert sample(families, "agentwatch_stage_runs_total", stage="notify", outcome="ok") == 2
    assert sample(families, "agentwatch_slack_posts_total", status="200") == 2
    assert sample(families, "agentwatch_dlq_depth") == 0
    tokens = families["agentwatch_llm_tokens_total"]["samples"]
    assert {dict(k)["direction"] for k in tokens} == {"input", "output"}
    assert all(v > 0 for v in tokens.values())
    assert sum(families["agentwatch_llm_cost_usd_total"]["samples"].values()) > 0
    assert sum(families["agentwatch_llm_calls_total"]["samples"].values()) >= 2
    assert abs(sample(families, "agentwatch_last_tick_timestamp_seconds") - time.time()) < 5
    assert sample(families, "agentwatch_source_consecutive_failures", source="blog") == 0


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_garbage_slow_clients_and_a_1mb_request_line_do_not_stop_the_loop(tmp_path, start_cli):
    port = free_port()
    config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"')
    proc = start_cli("run", config=config)
    wait_health(port, proc=proc)

    # A crowd of idle connections, more than the server serves at once.
    crowd = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    assert get(port, timeout=3)[0] == 200, "/health must answer past a crowd of idle sockets"
    for s in crowd:
        s.close()

    # A slow client: half a request line, then nothing.
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"GET /hea")
    slow_since = time.monotonic()

    with socket.create_connection(("127.0.0.1", port), timeout=5) as garbage:
        garbage.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n")
        assert _read_all(garbage).startswith(b"HTTP/1.1 400 ")

    with socket.create_connection(("127.0.0.1", port), timeout=5) as huge:
        # Cut off before the end is fine: the server stopped reading, as it should.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            huge.sendall(b"GET /" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _read_all(huge)  # the server closes: EOF or reset, never a hang
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:100]

    slow.settimeout(15)
    assert _read_all(slow) == b"", "the slow client gets no answer, only a closed socket"
    assert 3 < time.monotonic() - slow_since < 10, "the slow client was not cut off by the deadline"

    first = wait_health(port, proc=proc)
    time.sleep(1.5)
    second = wait_health(port, proc=proc)
    assert second["last_tick_at"] != first["last_tick_at"], "the scheduler stopped ticking"
    assert second["tick_age_s"] < 2
    assert "Traceback" not in log_text(tmp_path)


def test_health_binds_loopback_unless_an_address_is_written(tmp_path, run_cli, start_cli):
    config = write_config(tmp_path, 0, rest='[llm]\nprovider = "none"')
    text = config.read_text()
    config.write_text(text.replace('"127.0.0.1:0"', '"health.example.com:8787"'))
    result = run_cli("check", config=config)
    assert result.returncode == 2
    assert "agentwatch.health" in result.stderr and "not an IP address" in result.stderr

    port = free_port()
    config.write_text(text.replace('"127.0.0.1:0"', f'":{port}"'))
    proc = start_cli("run", config=config)
    wait_health(port, proc=proc)
    assert f"http://127.0.0.1:{port}/health" in log_text(tmp_path)
    assert "beyond this machine" not in log_text(tmp_path)
    proc.kill()
    assert proc.wait() == 0

    port = free_port()
    config.write_text(text.replace('"127.0.0.1:0"', f'"0.0.0.0:{port}"'))
    proc = start_cli("run", config=config)
    wait_health(port, proc=proc)
    assert "listening beyond this machine on 0.0.0.0" in log_text(tmp_path)


def test_a_taken_health_port_is_a_clear_failure(tmp_path, run_cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"')
        result = run_cli("run", config=config, timeout=20)
    assert result.returncode == 1
    assert f"cannot serve /health on 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "agentwatch.pid").exists(), "the pidfile must go with the process"


# -- one instance, signals ---------------------------------------------------


def test_a_second_run_exits_1_naming_the_pid(tmp_path, start_cli, run_cli):
    port = free_port()
    config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"')
    proc = start_cli("run", config=config)
    wait_health(port, proc=proc)
    assert pidfile_pid(tmp_path) == proc.pid
    started = time.monotonic()
    second = run_cli("run", config=config, timeout=20)
    assert second.returncode == 1
    assert f"pid {proc.pid}" in second.stderr
    assert time.monotonic() - started < 10
    assert proc.returncode is None and wait_health(port)["pid"] == proc.pid
    assert pidfile_pid(tmp_path) == proc.pid, "the loser must not touch the pidfile"


def test_sigterm_during_work_loses_nothing(tmp_path, feeds, slack, anthropic_fake, start_cli):
    feeds.set("/feed.xml", rss([{"title": "the app crashes", "link": "https://x/1"}]))
    anthropic_fake.script([("delay", 2.0)], kind="classify")
    port = free_port()
    config = write_config(
        tmp_path, port,
        rest=f"""
            [slack]
            webhook_url = "${{SLACK_WEBHOOK_URL}}"

            [[sources]]
            name = "blog"
            type = "rss"
            url = "{feeds.url}/feed.xml"
            every = "1s"
            backfill = 1
        """,
    )  # fmt: skip
    proc = start_cli("run", config=config)
    anthropic_fake.wait_for(1, kind="classify")  # the classify call is in flight
    proc.kill(signal.SIGTERM)
    assert proc.wait(20) == 0
    slack.wait_for(1, timeout=1)  # already there: the item finished before the exit
    assert "the app crashes" in slack.text()
    import sqlite3

    with sqlite3.connect(tmp_path / "agentwatch.db") as db:
        rows = db.execute("SELECT status, stage, notified_at FROM items").fetchall()
    assert len(rows) == 1 and rows[0][0] == "done" and rows[0][2] is not None
    log = log_text(tmp_path)
    assert "received SIGTERM: stopping" in log
    assert "letting 1 in-flight item(s) finish" in log
    assert re.search(rf"agentwatch stopped \(pid {proc.pid}, up \d+s\)", log)
    assert not (tmp_path / "agentwatch.pid").exists()


def test_sighup_adds_changes_removes_sources_and_refuses_a_broken_config(
    tmp_path, feeds, start_cli
):
    feeds.set("/a.xml", rss([{"title": "a1", "link": "https://x/a1"}]))
    feeds.set("/b.xml", rss([{"title": "b1", "link": "https://x/b1"}]))
    port = free_port()

    def source(name: str, extra: str = "") -> str:
        return (f'[[sources]]\nname = "{name}"\ntype = "rss"\nurl = "{feeds.url}/{name}.xml"\n'
                f'every = "1s"\n{extra}\n')  # fmt: skip

    llm = '[llm]\nprovider = "none"\n'
    config = write_config(tmp_path, port, rest=llm + source("a"))
    proc = start_cli("run", config=config)
    wait_health(port, proc=proc)
    feeds.wait_for(lambda: feeds.not_modified("/a.xml") >= 1)  # a's validators are stored

    write_config(tmp_path, port, rest=llm + source("a") + source("b"))
    proc.kill(signal.SIGHUP)
    wait_until(lambda: "added: b; removed: none; changed: none" in log_text(tmp_path),
               what="reload with b")  # fmt: skip
    feeds.wait_for(lambda: feeds.hits("/b.xml") >= 2)
    assert set(wait_health(port)["sources"]) == {"a", "b"}

    config.write_text(config.read_text() + '[[sources]]\nname = "c"\ntype = "nope"\n')
    proc.kill(signal.SIGHUP)
    wait_until(lambda: "config reload refused" in log_text(tmp_path), what="refusal")
    assert "sources[2].type" in log_text(tmp_path)
    a_hits, b_hits = feeds.hits("/a.xml"), feeds.hits("/b.xml")
    feeds.wait_for(lambda: feeds.hits("/a.xml") > a_hits and feeds.hits("/b.xml") > b_hits)
    assert set(wait_health(port)["sources"]) == {"a", "b"}
    assert proc.returncode is None

    not_modified = feeds.not_modified("/a.xml")
    write_config(tmp_path, port, rest=llm + source("a", 'include = ["a1"]'))
    proc.kill(signal.SIGHUP)
    wait_until(lambda: "added: none; removed: b; changed: a" in log_text(tmp_path),
               what="reload without b")  # fmt: skip
    b_hits = feeds.hits("/b.xml")
    # a restarted with its stored validators: its next polls are still conditional.
    feeds.wait_for(lambda: feeds.not_modified("/a.xml") >= not_modified + 2)
    assert feeds.hits("/b.xml") == b_hits, "a removed source is still polled"
    assert set(wait_health(port)["sources"]) == {"a"}
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0


def test_a_changed_feed_url_is_baselined_not_flooded(tmp_path, feeds, slack, start_cli):
    feeds.set("/old.xml", rss([{"title": "old", "link": "https://x/old"}]))
    feeds.set("/new.xml", rss([{"title": f"new {i}", "link": f"https://x/n{i}"} for i in range(5)]))
    port = free_port()

    def config_for(path: str) -> Path:
        return write_config(tmp_path, port, rest=f"""
            [llm]
            provider = "none"

            [slack]
            webhook_url = "${{SLACK_WEBHOOK_URL}}"

            [[sources]]
            name = "blog"
            type = "rss"
            url = "{feeds.url}{path}"
            every = "1s"
            notify = "all"
        """)  # fmt: skip

    proc = start_cli("run", config=config_for("/old.xml"))
    wait_health(port, proc=proc)
    feeds.wait_for(lambda: feeds.hits("/old.xml") >= 2)
    config_for("/new.xml")
    proc.kill(signal.SIGHUP)
    feeds.wait_for(lambda: feeds.hits("/new.xml") >= 2)
    feeds.set("/new.xml", rss([{"title": "fresh", "link": "https://x/fresh"}]))
    slack.wait_for(1)
    time.sleep(1.5)
    assert [t for t in slack.texts() if "new " in t] == [], "the new feed's history was posted"
    assert "fresh" in slack.text()


# -- logs ----------------------------------------------------------------------


def test_logrotate_rename_then_new_lines_land_in_the_new_file(tmp_path, feeds, start_cli):
    feeds.set("/feed.xml", rss([{"title": "first", "link": "https://x/1"}]))
    port = free_port()
    config = write_config(
        tmp_path, port,
        rest=f"""
            [llm]
            provider = "none"

            [[sources]]
            name = "blog"
            type = "rss"
            url = "{feeds.url}/feed.xml"
            every = "1s"
        """,
    )  # fmt: skip
    proc = start_cli("run", config=config)
    wait_health(port, proc=proc)
    wait_until(lambda: "poll blog: 0 new item(s), 1 recorded as seen" in log_text(tmp_path))
    os.rename(tmp_path / "agentwatch.log", tmp_path / "agentwatch.log.1")  # what logrotate does
    feeds.set("/feed.xml", rss([
        {"title": "first", "link": "https://x/1"}, {"title": "second", "link": "https://x/2"},
    ]))  # fmt: skip
    wait_until(lambda: "poll blog: 1 new item(s)" in log_text(tmp_path), what="line in new file")
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 0
    new, old = log_text(tmp_path), log_text(tmp_path, "agentwatch.log.1")
    assert "agentwatch stopped" in new and "agentwatch stopped" not in old
    assert "1 new item(s)" not in old
    assert "starting (pid" in old and "starting (pid" not in new


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_never_reach_the_log(tmp_path, feeds, anthropic_fake, start_cli, log_format):
    api_key = "sk-ant-api03-SECRET-Zq8v3N1xk0pT"
    drop_in(tmp_path, "leaky", LEAKY_PLUGIN)
    feeds.set("/feed.xml", rss([{"title": "it crashes", "link": "https://x/1"},
                                {"title": "love it", "link": "https://x/2"}]))  # fmt: skip
    with FakeSlack() as slack:
        hook = slack.url + "/services/T0000/B0000/XXXXglobalsecretXXXX"
        per_source = slack.url + "/services/T1111/B1111/XXXXsourcesecretXXXX"
        slack.script([(404, "no_service")], path="/services/T1111/B1111/XXXXsourcesecretXXXX")
        port = free_port()
        config = write_config(
            tmp_path, port,
            settings=f'log_format = "{log_format}"\nmax_attempts = 1',
            rest=f"""
                [slack]
                webhook_url = "${{SLACK_WEBHOOK_URL}}"

                [[sources]]
                name = "blog"
                type = "rss"
                url = "{feeds.url}/feed.xml"
                every = "1s"
                backfill = 2
                notify = "all"
                slack_webhook_url = "{per_source}"

                [[sources]]
                name = "careless"
                type = "leaky"
                every = "1s"
            """,
        )  # fmt: skip
        env = {"ANTHROPIC_API_KEY": api_key, "SLACK_WEBHOOK_URL": hook}
        proc = start_cli("run", config=config, env=env)
        wait_until(lambda: "dead-lettered" in log_text(tmp_path), what="the refused post")
        wait_until(lambda: "could not use" in log_text(tmp_path), what="the leaky poll")
        health = get(port)[2].decode()
        proc.kill(signal.SIGTERM)
        assert proc.wait() == 0
    log = log_text(tmp_path) + proc.stderr_text() + proc.stdout_text()
    assert "stage=classify" in log or '"stage": "classify"' in log  # the pipeline ran
    assert "debugging: key=*** webhook=***" in log  # the leaky lines are there, masked
    assert "Traceback" in log  # the plugin's bug kept its traceback, masked too
    for secret in (api_key, hook, per_source, "XXXXglobalsecretXXXX", "XXXXsourcesecretXXXX"):
        assert secret not in log, f"{secret} is in the log"
        assert secret not in health, f"{secret} is in /health"
    if log_format == "json":
        for line in log_text(tmp_path).splitlines():
            json.loads(line)


# -- watchdog.sh -------------------------------------------------------------


def test_watchdog_replaces_a_sigstopped_process(tmp_path, reap):
    port = free_port()
    config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"')
    reap(config)
    env = watchdog_env(tmp_path, config, port, AGENTWATCH_HEALTH_TIMEOUT="2")
    first = run_watchdog(tmp_path, env)
    assert first.returncode == 0, log_text(tmp_path, "watchdog.log")
    frozen = pidfile_pid(tmp_path)
    assert wait_health(port)["pid"] == frozen
    assert run_watchdog(tmp_path, env).returncode == 0  # healthy: nothing to do
    assert agentwatch_runs(config) == [frozen]

    os.kill(frozen, signal.SIGSTOP)
    second = run_watchdog(tmp_path, env)
    assert second.returncode == 0, log_text(tmp_path, "watchdog.log")
    replacement = pidfile_pid(tmp_path)
    assert replacement != frozen
    assert not live(frozen), "the frozen process is still there"
    assert wait_health(port)["pid"] == replacement
    assert agentwatch_runs(config) == [replacement]
    log = log_text(tmp_path, "watchdog.log")
    assert re.search(r"/health no answer: .*2s", log)
    assert f"stopping pid {frozen} (TERM)" in log and f"pid {frozen} is gone" in log
    assert f"pid {replacement} is healthy" in log
    # Woken by SIGCONT, the frozen process handled TERM and stopped cleanly.
    assert f"agentwatch stopped (pid {frozen}," in log_text(tmp_path)


def test_watchdog_kills_a_stale_process_that_ignores_term(tmp_path, reap):
    drop_in(tmp_path, "stall", STALL_PLUGIN)
    flag = tmp_path / "stall-now"
    port = free_port()
    config = write_config(
        tmp_path, port,
        settings='stale_after = "2s"',
        rest=f"""
            [llm]
            provider = "none"

            [[sources]]
            name = "staller"
            type = "stall"
            flag = "{flag}"
            every = "1s"
        """,
    )  # fmt: skip
    reap(config)
    env = watchdog_env(tmp_path, config, port, AGENTWATCH_STOP_TIMEOUT="2")
    assert run_watchdog(tmp_path, env).returncode == 0
    stuck = pidfile_pid(tmp_path)
    flag.touch()
    assert wait_health(port, status=503, timeout=10)["status"] == "stale"
    flag.unlink()  # the stuck process sleeps on; a new one will not
    assert run_watchdog(tmp_path, env).returncode == 0, log_text(tmp_path, "watchdog.log")
    log = log_text(tmp_path, "watchdog.log")
    assert "answered 503 (stale)" in log
    assert f"pid {stuck} still running after 2s: KILL" in log
    assert not live(stuck)
    replacement = pidfile_pid(tmp_path)
    assert wait_health(port)["pid"] == replacement != stuck
    assert agentwatch_runs(config) == [replacement]


def test_two_concurrent_watchdogs_start_one_process(tmp_path, reap):
    port = free_port()
    config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"')
    reap(config)
    env = watchdog_env(tmp_path, config, port)
    runs = [
        subprocess.Popen(["sh", str(WATCHDOG)], env=env, cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]  # fmt: skip
    assert [r.wait(60) for r in runs] == [0, 0]
    pid = pidfile_pid(tmp_path)
    assert agentwatch_runs(config) == [pid]
    assert wait_health(port)["pid"] == pid
    log = log_text(tmp_path, "watchdog.log")
    assert log.count("started pid") == 1, log
    # A later cron run can take the lock: the started process did not inherit it.
    assert run_watchdog(tmp_path, env).returncode == 0
    assert log_text(tmp_path, "watchdog.log") == log
    assert agentwatch_runs(config) == [pid]


def test_watchdog_never_starts_a_second_agentwatch_while_one_holds_the_lock(
    tmp_path, start_cli, reap
):
    port = free_port()
    config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"')
    reap(config)
    proc = start_cli("run", config=config)
    wait_health(port, proc=proc)
    # A lost pidfile, the wrong database and a wrong health URL: the watchdog
    # believes nothing runs.
    env = watchdog_env(
        tmp_path, config, free_port(), AGENTWATCH_PIDFILE=str(tmp_path / "lost.pid"),
        AGENTWATCH_DB=str(tmp_path / "lost.db"),
    )  # fmt: skip
    result = run_watchdog(tmp_path, env)
    assert result.returncode == 1
    log = log_text(tmp_path, "watchdog.log")
    assert f"another agentwatch (pid {proc.pid}) is already running" in log
    assert "exited with status 1 before it was healthy" in log
    assert agentwatch_runs(config) == [proc.pid]
    assert wait_health(port)["pid"] == proc.pid


def test_watchdog_leaves_a_reused_pid_alone(tmp_path, reap):
    port = free_port()
    config = write_config(tmp_path, port, rest='[llm]\nprovider = "none"')
    reap(config)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "agentwatch.pid").write_text(f"{bystander.pid}\n")  # left by a kill -9
        result = run_watchdog(tmp_path, watchdog_env(tmp_path, config, port))
        assert result.returncode == 0, log_text(tmp_path, "watchdog.log")
        assert bystander.poll() is None, "the watchdog signalled a process that is not agentwatch"
        assert f"pid {bystander.pid} (from" in log_text(tmp_path, "watchdog.log")
        assert wait_health(port)["pid"] == pidfile_pid(tmp_path) != bystander.pid
    finally:
        bystander.kill()
        bystander.wait()


def test_watchdog_sh_is_posix_sh():
    # dash, where /bin/sh is dash, parses it; shellcheck runs in development.
    result = subprocess.run(["sh", "-n", str(WATCHDOG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert WATCHDOG.read_text().startswith("#!/bin/sh\n")
    assert os.access(WATCHDOG, os.X_OK)
