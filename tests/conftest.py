"""Shared fixtures: a hermetic environment, the fakes, and agentwatch as a subprocess.

def test_something(slack, anthropic_fake, feeds, make_config, run_cli):
    feeds.set("/feed.xml", rss([{"title": "it crashes", "link": "https://x/1"}]))
    config = make_config(f'''
        [[sources]]
        name = "blog"
        type = "rss"
        url = "{feeds.url}/feed.xml"
    ''')
    result = run_cli("run", "--once", config=config)
    assert result.returncode == 0, result.stderr
    slack.wait_for(1)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fakes
import pytest
from fakes import FakeAnthropic, FakeFeeds, FakeSlack

_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def closed_port() -> int:
    """A loopback port nothing listens on: bound, noted, released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory) -> str:
    """Point every outside URL at a closed loopback port, for every test, so a
    forgotten fake fails fast instead of reaching the internet. Returns that URL.

    Also: ANTHROPIC_API_KEY=test-key, every other ANTHROPIC_* and AGENTWATCH_*
    variable removed, proxies removed, NO_PROXY=*, and HOME set to an empty
    folder so the SDK cannot find a real credentials profile. cwd is untouched.
    """
    closed = f"http://127.0.0.1:{closed_port()}"
    for name in list(os.environ):
        if name.startswith(("ANTHROPIC_", "AGENTWATCH_")) or name.lower() in _PROXY_VARS:
            monkeypatch.delenv(name)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", closed)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("SLACK_WEBHOOK_URL", closed + "/hooks/closed")
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    return closed


# -- the fakes ---------------------------------------------------------------
# Each depends on `offline` so its environment variable is set after the
# closed-port one, never overwritten by it.


@pytest.fixture
def slack(offline, monkeypatch):
    """A started FakeSlack; $SLACK_WEBHOOK_URL points at its /hooks/env."""
    with FakeSlack() as fake:
        monkeypatch.setenv("SLACK_WEBHOOK_URL", fake.url + "/hooks/env")
        yield fake


@pytest.fixture
def anthropic_fake(offline, monkeypatch):
    """A started FakeAnthropic; $ANTHROPIC_BASE_URL points at it."""
    with FakeAnthropic() as fake:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        yield fake


@pytest.fixture
def feeds():
    """A started FakeFeeds (documents at feeds.url + path)."""
    with FakeFeeds() as fake:
        yield fake


@pytest.fixture
def make_config(tmp_path):
    """make_config(text, name="agentwatch.toml") -> Path: write a dedented config in tmp_path."""

    def make(text: str, name: str = "agentwatch.toml") -> Path:
        return fakes.write_config(tmp_path, text, name)

    return make


# -- agentwatch as a subprocess ----------------------------------------------


def agentwatch_executable() -> str:
    """The console script installed beside this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "agentwatch"
    if beside.exists():
        return str(beside)
    found = shutil.which("agentwatch")
    if found is None:
        pytest.fail("the agentwatch console script is not installed (pip install -e .)")
    return found


class CLIProcess:
    """A running `agentwatch` (from start_cli). Output goes to files, so it never blocks."""

    def __init__(self, proc: subprocess.Popen, stdout: Path, stderr: Path):
        self.proc = proc
        self.stdout_path = stdout
        self.stderr_path = stderr

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` (SIGTERM by default) if still running."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        """Wait for exit; returns the exit status. Fails the test, showing the
        output, if it is still running after `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"agentwatch still running after {timeout}s\n{self._tail()}")

    def wait_for_output(
        self, pattern: str, stream: str = "stderr", timeout: float = 15
    ) -> re.Match:
        """Wait until the regex `pattern` appears in "stderr", "stdout" or "both".
        Fails at once, showing the output, if the process exits first."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            exited = self.proc.poll() is not None  # read after polling: no lost last lines
            text = {
                "stderr": self.stderr_text,
                "stdout": self.stdout_text,
                "both": lambda: self.stdout_text() + self.stderr_text(),
            }[stream]()
            if match := regex.search(text):
                return match
            if exited:
                pytest.fail(
                    f"agentwatch exited ({self.proc.returncode}) before printing "
                    f"{pattern!r}\n{self._tail()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"{pattern!r} not printed within {timeout}s\n{self._tail()}")
            time.sleep(0.05)  # output lands in files; polling them is the simple way

    def _tail(self, chars: int = 4000) -> str:
        return (
            f"--- stdout ---\n{self.stdout_text()[-chars:]}\n"
            f"--- stderr ---\n{self.stderr_text()[-chars:]}"
        )


class CLI:
    """Runs agentwatch as users do: the console script, in a subprocess.

    Defaults: cwd is the test's tmp_path (stray files land there), the
    environment is this (isolated) process's plus PYTHONUNBUFFERED=1,
    NO_COLOR=1 and COLUMNS=200 (so rich neither colours nor wraps); `env`
    adds to it, a None value removes a variable. `config=` appends
    `--config PATH` after the other arguments.
    `command` can be replaced (tests of these helpers run a stand-in script).
    """

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.command: list[str] = [agentwatch_executable()]
        self.started: list[CLIProcess] = []

    def _argv(self, args, config) -> list[str]:
        argv = [*self.command, *map(str, args)]
        if config is not None:
            argv += ["--config", str(config)]
        return argv

    def _env(self, env: dict[str, str | None] | None) -> dict[str, str]:
        merged = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "200"}
        for name, value in (env or {}).items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = str(value)
        return merged

    def run(
        self,
        *args,
        config: Path | str | None = None,
        env: dict[str, str | None] | None = None,
        timeout: float = 60,
        input: str | None = None,
        cwd: Path | str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run to completion; returns CompletedProcess with text stdout/stderr."""
        return subprocess.run(
            self._argv(args, config),
            env=self._env(env),
            cwd=cwd or self.tmp_path,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    def start(
        self,
        *args,
        config: Path | str | None = None,
        env: dict[str, str | None] | None = None,
        cwd: Path | str | None = None,
    ) -> CLIProcess:
        """Start in the background (e.g. `run`); killed at the end of the test if still alive."""
        n = len(self.started)
        stdout = self.tmp_path / f"agentwatch-{n}.stdout"
        stderr = self.tmp_path / f"agentwatch-{n}.stderr"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(
                self._argv(args, config),
                env=self._env(env),
                cwd=cwd or self.tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                # Its own session: a Ctrl-C meant for pytest does not reach it, so
                # tests control exactly which signals it gets.
                start_new_session=True,
            )
        process = CLIProcess(proc, stdout, stderr)
        self.started.append(process)
        return process

    def cleanup(self) -> None:
        for process in self.started:
            if process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait(10)


@pytest.fixture
def agentwatch(tmp_path, offline):
    """A CLI object: agentwatch.run(...), agentwatch.start(...)."""
    cli = CLI(tmp_path)
    yield cli
    cli.cleanup()


@pytest.fixture
def run_cli(agentwatch):
    """run_cli(*args, config=None, env=None, timeout=60, input=None, cwd=None) -> CompletedProcess"""
    return agentwatch.run


@pytest.fixture
def start_cli(agentwatch):
    """start_cli(*args, config=None, env=None, cwd=None) -> CLIProcess"""
    return agentwatch.start
