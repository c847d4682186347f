"""Loopback fakes of the services agentwatch talks to: Slack, Anthropic and web feeds.

Each fake is a real HTTP/1.1 server (standard library only) on 127.0.0.1, port 0,
served from daemon threads inside the pytest process, so agentwatch can run as a
subprocess and reach it over the network exactly as it reaches the real thing.

    with FakeSlack() as slack:                       # or the `slack` fixture
        post(slack.url + "/hooks/A", json={"text": "hi"})
        slack.wait_for(1, path="/hooks/A")           # block until delivered, no blind sleeps
        assert "hi" in slack.text()

Everything a fake records is guarded by one lock per fake; every accessor returns
copies, so tests can read while the server writes. `wait_for(n_or_predicate)`
wakes on each new request instead of polling.

Table of contents: grep -n '^# .*###' tests/fakes.py
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import inspect
import json
import re
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from textwrap import dedent
from typing import Any
from xml.sax.saxutils import escape, quoteattr

__all__ = [
    "ATOM_TYPE",
    "GARBAGE_FEED_BODY",
    "RSS_TYPE",
    "FakeAnthropic",
    "FakeFeeds",
    "FakeReceiver",
    "FakeSlack",
    "FakeSlackAPI",
    "atom",
    "default_classifier",
    "default_drafter",
    "last_user_text",
    "rss",
    "slack_payload_problem",
    "write_config",
]

DEFAULT_TIMEOUT = 10.0  # seconds a wait_for() waits; a subprocess needs ~1 s just to start


# ###########################################################################
# Plumbing: one threaded HTTP/1.1 server, shared by every fake
# ###########################################################################


@dataclass
class Request:
    """One request as the handler read it. `headers` keys are lower-case."""

    method: str
    target: str  # path with query string, as sent
    path: str  # path without query string
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int]
    time: float = field(default_factory=time.time)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # for codes http.server has no phrase for (529)


DROP = object()  # a handler returns this to close the connection without answering

# Codes that never carry a body; no Content-Length is sent for them either.
_NO_BODY = {204, 304}
_TEXT = {"Content-Type": "text/plain; charset=utf-8"}


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so clients keep connections alive (agentwatch's httpx2 pools do),
    # which is only safe because every response carries a Content-Length.
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection is closed after this long
    server: _Server

    def _dispatch(self) -> None:
        fake = self.server.fake
        try:
            request = Request(
                method=self.command,
                target=self.path,
                path=self.path.split("?", 1)[0],
                headers={k.lower(): v for k, v in self.headers.items()},
                body=self._read_body(),
                peer=self.client_address,
            )
        except ValueError as e:
            self._send(Response(400, str(e).encode(), {"Content-Type": "text/plain"}))
            return
        try:
            response = fake._handle(request)
        except Exception:
            # A bug in the fake or in a test's classifier/drafter: answer 500 so the
            # client fails visibly, and keep the traceback for the test to show.
            tb = traceback.format_exc()
            fake._note_error(tb)
            response = Response(500, tb.encode(), {"Content-Type": "text/plain"})
        if response is DROP:
            self.close_connection = True
            return
        self._send(response)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, response: Response) -> None:
        try:
            self.send_response(response.status, response.reason)
            for name, value in response.headers.items():
                self.send_header(name, value)
            has_body = response.status not in _NO_BODY and response.status >= 200
            if has_body:
                self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if has_body and self.command != "HEAD":
                self.wfile.write(response.body)
            self.wfile.flush()
        except OSError:
            # The client gave up (timeout, reset): nothing to answer to.
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded by the fakes; stderr noise helps nobody


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Do not join handler threads on close: one may be sleeping in a "hang" fault.
    block_on_close = False
    # socketserver's default backlog of 5 drops connections when hundreds of
    # sources connect at once (the client then retries a SYN after a second).
    request_queue_size = 128

    def __init__(self, fake: _FakeServer):
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):
        with self._conn_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down open keep-alive connections so their threads end with the test."""
        with self._conn_lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address):
        pass  # clients hanging up mid-answer is expected here; fake bugs become 500s


class _FakeServer:
    """Start/stop, a context manager, a recording lock and wait_for()."""

    def __init__(self) -> None:
        # An RLock so predicates given to wait_for() may call the locked accessors.
        self._cond = threading.Condition(threading.RLock())
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._errors: list[str] = []

    # -- lifecycle ---------------------------------------------------------

    def _make_server(self) -> _Server:
        """The listening server; a fake that speaks TLS overrides this."""
        return _Server(self)

    def start(self):
        if self._server is None:
            self._stopping.clear()
            self._server = self._make_server()
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"{type(self).__name__}-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in delay/hang faults
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. http://127.0.0.1:40123."""
        return f"http://127.0.0.1:{self.port}"

    # -- recording ---------------------------------------------------------

    @property
    def errors(self) -> list[str]:
        """Tracebacks of exceptions raised inside the fake (answered as 500)."""
        with self._cond:
            return list(self._errors)

    def _note_error(self, tb: str) -> None:
        with self._cond:
            self._errors.append(tb)
            self._cond.notify_all()

    def _record(self, records: list, entry: dict) -> dict:
        with self._cond:
            records.append(entry)
            self._cond.notify_all()
        return entry

    def _update(self, entry: dict, **changes: Any) -> None:
        with self._cond:
            entry.update(changes)
            self._cond.notify_all()

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the fake stops."""
        self._stopping.wait(seconds)

    def _wait(self, condition: Callable[[], Any], timeout: float, describe: Callable[[], str]):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = condition()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{type(self).__name__}.wait_for timed out after {timeout}s; {describe()}"
                    )
                self._cond.wait(remaining)

    def _handle(self, request: Request) -> Response | object:
        raise NotImplementedError


def _predicate(fake: Any, predicate: Callable) -> Callable[[], Any]:
    """wait_for() accepts `lambda: ...` as well as `lambda fake: ...`."""
    try:
        params = inspect.signature(predicate).parameters.values()
        wants_arg = any(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            and p.default is p.empty
            for p in params
        )
    except (TypeError, ValueError):
        wants_arg = True
    return (lambda: predicate(fake)) if wants_arg else predicate


# ###########################################################################
# Slack incoming webhooks
# ###########################################################################


def slack_payload_problem(payload: Any) -> str | None:
    """The error Slack would answer (with a 400) for this payload, or None if it is fine.

    Only limits Slack documents and enforces are checked, so a pass here is not a
    promise, but a failure is a real bug: invalid_payload, no_text, invalid_blocks.
    """
    if not isinstance(payload, dict):
        return "invalid_payload"
    blocks = payload.get("blocks")
    if not payload.get("text") and not blocks and not payload.get("attachments"):
        return "no_text"
    if blocks is None:
        return None
    if not isinstance(blocks, list) or len(blocks) > 50:
        return "invalid_blocks"

    def text_ok(obj: Any, limit: int, plain_only: bool = False) -> bool:
        return (
            isinstance(obj, dict)
            and obj.get("type") in (("plain_text",) if plain_only else ("plain_text", "mrkdwn"))
            and isinstance(obj.get("text"), str)
            and 0 < len(obj["text"]) <= limit
        )

    for block in blocks:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            return "invalid_blocks"
        if len(str(block.get("block_id", ""))) > 255:
            return "invalid_blocks"
        kind = block["type"]
        if kind == "section":
            fields = block.get("fields")
            if "text" not in block and not fields:
                return "invalid_blocks"
            if "text" in block and not text_ok(block["text"], 3000):
                return "invalid_blocks"
            if fields is not None and (
                not isinstance(fields, list)
                or len(fields) > 10
                or not all(text_ok(f, 2000) for f in fields)
            ):
                return "invalid_blocks"
        elif kind == "header":
            if not text_ok(block.get("text"), 150, plain_only=True):
                return "invalid_blocks"
        elif kind == "context":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= 10:
                return "invalid_blocks"
            for el in elements:
                if el.get("type") in ("plain_text", "mrkdwn") and not text_ok(el, 3000):
                    return "invalid_blocks"
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= 25:
                return "invalid_blocks"
            for el in elements:
                if el.get("type") == "button" and not text_ok(el.get("text"), 75, True):
                    return "invalid_blocks"
    return None


def _texts_in(obj: Any) -> list[str]:
    """Every string under a "text" key, at any depth (text fallback and Block Kit)."""
    found: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "text" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_texts_in(value))
    elif isinstance(obj, list):
        for value in obj:
            found.extend(_texts_in(value))
    return found


class FakeSlack(_FakeServer):
    """Slack incoming webhooks: every path is one webhook.

    Answers 200 `ok` (text/plain) to a valid JSON payload. Programmable:

        slack.script([(429, "rate_limited", {"Retry-After": "1"}), (500, "internal_error")],
                     path="/hooks/A")    # consumed one per request, then the default
        slack.set_default(404, "channel_not_found")      # every request, until...
        slack.set_default(200, "ok")

    A request the script does not cover is checked like Slack does
    (`slack_payload_problem`): not JSON → 400 invalid_payload, no text → 400
    no_text, Block Kit limits broken → 400 invalid_blocks. Pass validate=False
    to turn that off.

    Each record: {path, payload (parsed JSON or None), body (str), headers,
    time, status, answer (the body answered)}.
    """

    def __init__(self, validate: bool = True) -> None:
        super().__init__()
        self.validate = validate
        self._requests: list[dict] = []
        self._scripts: dict[str | None, deque] = {}
        self._defaults: dict[str | None, tuple[int, str, dict]] = {None: (200, "ok", {})}

    # -- programming -------------------------------------------------------

    def script(self, responses: Iterable[tuple], path: str | None = None) -> None:
        """Queue responses `(status, body[, headers])`, one per request, for `path`
        (None: any path). A path's own queue is used before the shared one."""
        with self._cond:
            queue = self._scripts.setdefault(path, deque())
            for entry in responses:
                status, body, *rest = entry
                queue.append((int(status), str(body), dict(rest[0]) if rest else {}))

    def set_default(
        self,
        status: int = 200,
        body: str = "ok",
        headers: dict | None = None,
        path: str | None = None,
    ) -> None:
        """The answer once the script is used up; per path, or for all paths."""
        with self._cond:
            self._defaults[path] = (int(status), str(body), dict(headers or {}))

    def reset(self) -> None:
        """Forget scripts, defaults and records."""
        with self._cond:
            self._requests.clear()
            self._scripts.clear()
            self._defaults = {None: (200, "ok", {})}

    # -- reading -----------------------------------------------------------

    @property
    def requests(self) -> list[dict]:
        """Every request, failed attempts included, in arrival order."""
        with self._cond:
            return [dict(r) for r in self._requests]

    def posts(self, path: str | None = None) -> list[dict]:
        """The requests answered 200 `ok` (delivered messages), optionally for one path."""
        with self._cond:
            return [
                dict(r)
                for r in self._requests
                if r["status"] == 200 and r["answer"] == "ok" and path in (None, r["path"])
            ]

    def payloads(self, path: str | None = None) -> list[Any]:
        """The JSON payloads of delivered messages."""
        return [p["payload"] for p in self.posts(path)]

    def texts(self, path: str | None = None) -> list[str]:
        """One string per delivered message: its "text" and every text in its
        blocks (recursively), joined by newlines."""
        return ["\n".join(_texts_in(p)) for p in self.payloads(path)]

    def text(self, path: str | None = None) -> str:
        """All text of all delivered messages as one string, for `in` assertions."""
        return "\n".join(self.texts(path))

    def times(self, path: str | None = None) -> list[float]:
        """Arrival times (time.time()) of every request to `path`, failed ones included,
        e.g. to check the pace of one post a second per webhook."""
        with self._cond:
            return [r["time"] for r in self._requests if path in (None, r["path"])]

    def wait_for(
        self,
        n_or_predicate: int | Callable,
        timeout: float = DEFAULT_TIMEOUT,
        path: str | None = None,
    ):
        """Block until `n` messages are delivered (to `path`), or until
        `predicate()` / `predicate(slack)` is truthy. Returns the posts or the
        predicate's value; raises AssertionError on timeout."""
        if callable(n_or_predicate):
            condition = _predicate(self, n_or_predicate)
        else:

            def condition():
                posts = self.posts(path)
                return posts if len(posts) >= n_or_predicate else None

        return self._wait(condition, timeout, self._describe)

    def _describe(self) -> str:
        with self._cond:
            seen = [(r["path"], r["status"], r["answer"]) for r in self._requests]
        return f"requests so far (path, status, answer): {seen}"

    # -- serving -----------------------------------------------------------

    def _handle(self, request: Request) -> Response:
        text = request.body.decode("utf-8", "replace")
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None
        entry = self._record(
            self._requests,
            {
                "path": request.path,
                "payload": payload,
                "body": text,
                "headers": request.headers,
                "time": request.time,
                "status": None,
                "answer": None,
            },
        )
        with self._cond:
            queue = self._scripts.get(request.path) or self._scripts.get(None)
            scripted = queue.popleft() if queue else None
            default = self._defaults.get(request.path, self._defaults[None])
        if scripted is not None:
            status, body, headers = scripted
        elif request.method != "POST":
            status, body, headers = 405, "invalid_method", {}
        elif self.validate and (problem := slack_payload_problem(payload)):
            status, body, headers = 400, problem, {}
        else:
            status, body, headers = default
        self._update(entry, status=status, answer=body)
        return Response(status, body.encode(), {**_TEXT, **headers})


# ###########################################################################
# Slack Web API (a bot token: chat.postMessage, chat.update, history, reactions)
# ###########################################################################

# Which scope each method needs (a channel's history needs channels:history, a
# private channel's groups:history).
_SLACK_SCOPES = {
    "chat.postMessage": "chat:write",
    "chat.update": "chat:write",
    "conversations.history": "channels:history",
    "conversations.replies": "channels:history",
    "reactions.get": "reactions:read",
    "auth.test": "",
}
BOT_SCOPES = ("chat:write", "channels:history", "groups:history", "reactions:read")


class FakeSlackAPI(_FakeServer):
    """The Slack Web API at `url` + "/api/<method>", as a bot token meets it.

        api = FakeSlackAPI(token="xoxb-test")     # channel C0TEST123 exists, the bot is in it
        api.fail("chat.postMessage", "not_in_channel")          # the next call answers ok:false
        api.fail("chat.postMessage", "ratelimited", status=429, headers={"Retry-After": "1"})
        api.slow("chat.postMessage", 5.0)   # the message is posted at once, answered 5 s later
        api.messages("C0TEST123")              # top-level messages, oldest first (threads: replies())
        api.react("C0TEST123", ts, "-1")       # a user reacts

    Like Slack: every answer is HTTP 200 with {"ok": false, "error": ...} on
    failure (except 429 with Retry-After); the token comes in `Authorization:
    Bearer`; JSON bodies for writes, form or query fields for reads; metadata
    is returned by conversations.history only with include_all_metadata; thread
    replies are not in conversations.history, only in conversations.replies;
    history is newest first, bounded by oldest/latest (exclusive), paged by
    `cursor`. Block Kit is checked as for webhooks (invalid_blocks, no_text).
    """

    BOT_USER = "U0BOT"
    BOT_ID = "B0BOT"

    def __init__(self, token: str = "xoxb-test", channels: Iterable[str] = ("C0TEST123",)) -> None:
        super().__init__()
        self.token = token
        self.scopes = set(BOT_SCOPES)
        self.channels: dict[str, dict] = {c: {"member": True, "archived": False} for c in channels}
        self._messages: dict[str, list[dict]] = {c: [] for c in channels}
        self._calls: list[dict] = []
        self._faults: dict[str, deque] = {}
        self._slow: dict[str, float] = {}
        self._clock = 0

    # -- programming -------------------------------------------------------

    def fail(self, method: str, error: str, *, times: int = 1, status: int = 200,
             headers: dict | None = None, **extra: Any) -> None:  # fmt: skip
        """The next `times` calls of `method` answer ok:false `error` (HTTP `status`)."""
        with self._cond:
            queue = self._faults.setdefault(method, deque())
            for _ in range(times):
                queue.append((status, error, dict(headers or {}), extra))

    def slow(self, method: str, seconds: float) -> None:
        """Answer `method` `seconds` late; what the call does is done first."""
        with self._cond:
            self._slow[method] = seconds

    def react(self, channel: str, ts: str, name: str, user: str = "U0HUMAN") -> None:
        with self._cond:
            message = self._find(channel, ts)
            for reaction in message.setdefault("reactions", []):
                if reaction["name"] == name:
                    if user not in reaction["users"]:
                        reaction["users"].append(user)
                        reaction["count"] += 1
                    break
            else:
                message["reactions"].append({"name": name, "users": [user], "count": 1})
            self._cond.notify_all()

    # -- reading -----------------------------------------------------------

    @property
    def calls(self) -> list[dict]:
        """Every call: {method, args, time, ok, error, status}."""
        with self._cond:
            return [dict(c) for c in self._calls]

    def calls_of(self, method: str) -> list[dict]:
        return [c for c in self.calls if c["method"] == method]

    def messages(self, channel: str = "C0TEST123", *, replies: bool = False) -> list[dict]:
        """Posted messages, oldest first: top-level ones, or with replies=True all of them."""
        with self._cond:
            return [
                json.loads(json.dumps(m))
                for m in self._messages.get(channel, [])
                if replies or m.get("thread_ts") in (None, m["ts"])
            ]

    def replies(self, channel: str, thread_ts: str) -> list[dict]:
        """A thread's replies (not its first message), oldest first."""
        return [
            m for m in self.messages(channel, replies=True)
            if m.get("thread_ts") == thread_ts and m["ts"] != thread_ts
        ]  # fmt: skip

    def wait_for(self, predicate: Callable, timeout: float = DEFAULT_TIMEOUT):
        """Block until `predicate()` / `predicate(api)` is truthy; returns its value."""
        return self._wait(_predicate(self, predicate), timeout, self._describe)

    def _describe(self) -> str:
        with self._cond:
            calls = [(c["method"], c["ok"], c["error"]) for c in self._calls]
        return f"calls so far (method, ok, error): {calls[-30:]}"

    # -- serving -----------------------------------------------------------

    def _find(self, channel: str, ts: str) -> dict:
        for message in self._messages.get(channel, []):
            if message["ts"] == ts:
                return message
        raise KeyError(ts)

    def _args(self, request: Request) -> dict:
        from urllib.parse import parse_qsl

        args = dict(parse_qsl(request.target.partition("?")[2]))
        kind = request.headers.get("content-type", "")
        if request.body and kind.startswith("application/json"):
            args.update(json.loads(request.body))
        elif request.body:
            args.update(parse_qsl(request.body.decode()))
        for key in ("blocks", "metadata"):  # form fields carry these as JSON strings
            if isinstance(args.get(key), str):
                with contextlib.suppress(ValueError):
                    args[key] = json.loads(args[key])
        return args

    def _handle(self, request: Request) -> Response:
        method = request.path.removeprefix("/api/")
        try:
            args = self._args(request)
        except ValueError:
            args = None
        with self._cond:
            call = {"method": method, "args": args, "time": request.time, "ok": None,
                    "error": None, "status": 200}  # fmt: skip
            self._calls.append(call)
            status, answer, headers = self._answer(method, request, args)
            call.update(ok=answer.get("ok"), error=answer.get("error"), status=status)
            self._cond.notify_all()
            delay = self._slow.get(method, 0.0)
        if delay:
            self._sleep(delay)
        body = json.dumps(answer).encode()
        return Response(
            status, body, {"Content-Type": "application/json; charset=utf-8", **headers}
        )

    def _answer(self, method: str, request: Request, args: dict | None) -> tuple[int, dict, dict]:
        def error(code: str, **extra: Any) -> tuple[int, dict, dict]:
            return 200, {"ok": False, "error": code, **extra}, {}

        if method not in _SLACK_SCOPES:
            return 404, {"ok": False, "error": "unknown_method"}, {}
        if args is None:
            return error("invalid_json")
        if request.headers.get("authorization", "") != f"Bearer {self.token}":
            return error("not_authed" if "authorization" not in request.headers else "invalid_auth")
        queue = self._faults.get(method)
        if queue:
            status, code, headers, extra = queue.popleft()
            return status, {"ok": False, "error": code, **extra}, headers
        needed = _SLACK_SCOPES[method]
        if needed and needed not in self.scopes:
            return error("missing_scope", needed=needed, provided=",".join(sorted(self.scopes)))
        if method == "auth.test":
            return 200, {"ok": True, "user_id": self.BOT_USER, "bot_id": self.BOT_ID}, {}
        channel = args.get("channel", "")
        if channel not in self.channels:
            return error("channel_not_found")
        if not self.channels[channel]["member"]:
            return error("not_in_channel")
        if method == "chat.postMessage":
            return self._post(channel, args)
        if method == "chat.update":
            return self._update_message(channel, args)
        if method == "conversations.history":
            return self._history(channel, args, thread=None)
        if method == "conversations.replies":
            return self._history(channel, args, thread=str(args.get("ts", "")))
        if method == "reactions.get":
            try:
                message = self._find(channel, str(args.get("timestamp", "")))
            except KeyError:
                return error("message_not_found")
            return 200, {"ok": True, "type": "message", "channel": channel,
                         "message": json.loads(json.dumps(message))}, {}  # fmt: skip
        return error("unknown_method")

    def _problem(self, args: dict) -> str | None:
        if not args.get("text") and not args.get("blocks"):
            return "no_text"
        if len(str(args.get("text", ""))) > 40_000:
            return "msg_too_long"
        if "blocks" in args and slack_payload_problem({"text": "x", **args}):
            return "invalid_blocks"
        metadata = args.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and isinstance(metadata.get("event_type"), str)
            and isinstance(metadata.get("event_payload"), dict)
        ):
            return "invalid_metadata_format"
        return None

    def _post(self, channel: str, args: dict) -> tuple[int, dict, dict]:
        if self.channels[channel]["archived"]:
            return 200, {"ok": False, "error": "is_archived"}, {}
        if problem := self._problem(args):
            return 200, {"ok": False, "error": problem}, {}
        thread_ts = args.get("thread_ts")
        if thread_ts is not None:
            try:
                parent = self._find(channel, str(thread_ts))
            except KeyError:
                return 200, {"ok": False, "error": "thread_not_found"}, {}
        # ts: seconds.microseconds, unique and increasing within the channel.
        self._clock = max(self._clock + 1, int(time.time() * 1_000_000))
        ts = f"{self._clock // 1_000_000}.{self._clock % 1_000_000:06d}"
        message = {"type": "message", "user": self.BOT_USER, "bot_id": self.BOT_ID, "ts": ts,
                   "text": args.get("text", ""), "blocks": args.get("blocks", [])}  # fmt: skip
        if args.get("metadata"):
            message["metadata"] = args["metadata"]
        if thread_ts is not None:
            message["thread_ts"] = parent.get("thread_ts", parent["ts"])
            parent["thread_ts"] = parent["ts"]
            parent["reply_count"] = parent.get("reply_count", 0) + 1
        self._messages[channel].append(message)
        answer = {k: v for k, v in message.items() if k != "metadata"}
        return 200, {"ok": True, "channel": channel, "ts": ts, "message": answer}, {}

    def _update_message(self, channel: str, args: dict) -> tuple[int, dict, dict]:
        try:
            message = self._find(channel, str(args.get("ts", "")))
        except KeyError:
            return 200, {"ok": False, "error": "message_not_found"}, {}
        if message.get("user") != self.BOT_USER:
            return 200, {"ok": False, "error": "cant_update_message"}, {}
        if problem := self._problem(args):
            return 200, {"ok": False, "error": problem}, {}
        message.update(text=args.get("text", ""), blocks=args.get("blocks", []))
        if args.get("metadata"):
            message["metadata"] = args["metadata"]
        message["edited"] = {"user": self.BOT_USER, "ts": message["ts"]}
        return 200, {"ok": True, "channel": channel, "ts": message["ts"],
                     "text": message["text"]}, {}  # fmt: skip

    def _history(self, channel: str, args: dict, thread: str | None) -> tuple[int, dict, dict]:
        def stamp(key: str, default: float) -> float:
            try:
                return float(args.get(key) or default)
            except ValueError:
                return default

        oldest, latest = stamp("oldest", 0.0), stamp("latest", float("inf"))
        inclusive = str(args.get("inclusive", "")).lower() in ("1", "true")
        limit = max(1, min(int(args.get("limit") or 100), 999))
        with_metadata = str(args.get("include_all_metadata", "")).lower() in ("1", "true")
        if thread is None:
            found = [m for m in self._messages[channel] if m.get("thread_ts") in (None, m["ts"])]
            found.reverse()  # newest first
        else:
            found = [m for m in self._messages[channel]
                     if m["ts"] == thread or m.get("thread_ts") == thread]  # fmt: skip
            if not found:
                return 200, {"ok": False, "error": "thread_not_found"}, {}

        def within(ts: float) -> bool:
            return oldest <= ts <= latest if inclusive else oldest < ts < latest

        found = [m for m in found if within(float(m["ts"]))]
        start = int(args.get("cursor") or 0)
        page = found[start : start + limit]
        more = start + limit < len(found)
        messages = []
        for m in page:
            m = json.loads(json.dumps(m))
            if not with_metadata:
                m.pop("metadata", None)
            messages.append(m)
        return 200, {"ok": True, "messages": messages, "has_more": more,
                     "response_metadata": {"next_cursor": str(start + limit) if more else ""}}, {}  # fmt: skip


# ###########################################################################
# Discord webhooks, and a receiver of signed webhooks
# ###########################################################################


def discord_pings(payload: dict) -> list[str]:
    """Who a Discord webhook message would ping: mentions in `content` (embeds never
    ping) that `allowed_mentions` does not switch off, as Discord resolves them."""
    content = payload.get("content") or ""
    found = re.findall(r"@(everyone|here)|<@!?&?(\d+)>", content)
    allowed = payload.get("allowed_mentions")
    if allowed is None:
        return [a or b for a, b in found]
    parse = allowed.get("parse") or []
    pings = []
    for everyone, user in found:
        if everyone and "everyone" in parse:
            pings.append(everyone)
        elif user and ("users" in parse or user in (allowed.get("users") or [])):
            pings.append(user)
    return pings


def discord_payload_problem(payload: Any) -> str | None:
    """Discord's 400 "Invalid Form Body" for what breaks its documented limits."""
    if not isinstance(payload, dict):
        return "not JSON"
    embeds = payload.get("embeds") or []
    if not payload.get("content") and not embeds:
        return "Cannot send an empty message"
    if len(payload.get("content") or "") > 2000 or len(embeds) > 10:
        return "content or embeds too long"
    for embed in embeds:
        total = len(embed.get("title", "")) + len(embed.get("description", ""))
        total += len((embed.get("footer") or {}).get("text", ""))
        if len(embed.get("title", "")) > 256 or len(embed.get("description", "")) > 4096:
            return "embed title or description too long"
        fields = embed.get("fields") or []
        if len(fields) > 25:
            return "too many fields"
        for f in fields:
            if (
                not f.get("name")
                or not f.get("value")
                or len(f["name"]) > 256
                or len(f["value"]) > 1024
            ):
                return "embed field empty or too long"
            total += len(f["name"]) + len(f["value"])
        if total > 6000:
            return "embed longer than 6000 characters"
    return None


class FakeReceiver(_FakeServer):
    """A JSON POST receiver: Discord webhooks (answers 204 to a valid message, 400
    with Discord's error body otherwise) or, with `discord=False`, any webhook
    (answers 200). `script([(status, body, headers), ...])` answers in order first.

        hook = FakeReceiver(discord=True)
        hook.script([(429, '{"message": "You are being rate limited.", "retry_after": 0.4, "global": false}')])
        hook.received()      # [{"payload", "headers", "body", "status"}], accepted ones
    """

    def __init__(self, discord: bool = False) -> None:
        super().__init__()
        self.discord = discord
        self._requests: list[dict] = []
        self._script: deque = deque()
        self.default: tuple[int, str, dict] | None = None

    def script(self, responses: Iterable[tuple]) -> None:
        with self._cond:
            for status, body, *rest in responses:
                self._script.append((int(status), str(body), dict(rest[0]) if rest else {}))

    @property
    def requests(self) -> list[dict]:
        with self._cond:
            return [dict(r) for r in self._requests]

    def received(self) -> list[dict]:
        return [r for r in self.requests if 200 <= r["status"] < 300]

    def wait_for(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
        return self._wait(lambda: len(self.received()) >= n and self.received(), timeout,
                          lambda: f"requests so far: {[r['status'] for r in self.requests]}")  # fmt: skip

    def _handle(self, request: Request) -> Response:
        try:
            payload = json.loads(request.body)
        except ValueError:
            payload = None
        with self._cond:
            scripted = self._script.popleft() if self._script else self.default
        if scripted is not None:
            status, body, headers = scripted
        elif self.discord and (problem := discord_payload_problem(payload)):
            status, body, headers = 400, json.dumps({"code": 50035, "message": problem}), {}
        elif self.discord:
            status, body, headers = 204, "", {}
        else:
            status, body, headers = 200, "ok", {}
        self._record(self._requests, {"path": request.path, "payload": payload,
                                      "body": request.body, "headers": request.headers,
                                      "status": status, "time": request.time})  # fmt: skip
        return Response(status, body.encode(), {"Content-Type": "application/json", **headers})


# ###########################################################################
# Anthropic Messages API
# ###########################################################################

SENTIMENTS = ("positive", "neutral", "negative")
INTENTS = (
    "question",
    "complaint",
    "bug_report",
    "feature_request",
    "praise",
    "comparison",
    "other",
)
URGENCIES = ("low", "normal", "high")

_ITEM_RE = re.compile(r"<item\b[^>]*>(.*?)</item>", re.S | re.I)
_TITLE_RES = (
    re.compile(r"<title>(.*?)</title>", re.S | re.I),
    re.compile(r"^\s*title\s*:\s*(.+)$", re.M | re.I),
    re.compile(r'"title"\s*:\s*"((?:[^"\\]|\\.)*)"', re.I),
)
_NEGATIVE_RE = re.compile(r"\b(broken|crash|bug|hate)", re.I)
_POSITIVE_RE = re.compile(r"\b(love|great)", re.I)


def _message_text(message: dict) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    return "\n".join(
        block.get("text", "")
        for block in content
        if isinstance(block, dict) and block.get("type") == "text"
    )


def last_user_text(request_json: dict) -> str:
    """The text of the last user message of a Messages API request."""
    for message in reversed(request_json.get("messages") or []):
        if message.get("role") == "user":
            return _message_text(message)
    return ""


def default_classifier(request_json: dict) -> dict:
    """Classify by keywords in the last user message.

    When the message wraps the item in `<item ...>…</item>` only that part is
    read, so words in the instructions ("bug_report", "relevant?") do not
    count. Rules, first match wins (words are matched at their start, so
    "crashes" counts and "whatever" is not "hate"):

        "irrelevant"                     → not relevant, neutral, other, low
        broken / crash / bug / hate      → negative, bug_report, high
        love / great                     → positive, praise, low
        "?"                              → neutral, question, normal
        anything else                    → neutral, other, low

    summary: "Summary of: " + the first 40 characters of the item's title
    (`<title>…</title>`, a `Title: …` line or a JSON "title"), else of the text.
    """
    message = last_user_text(request_json)
    match = _ITEM_RE.search(message)
    item = match.group(1) if match else message
    text = item.lower()
    if "irrelevant" in text:
        relevant, sentiment, intent, urgency = False, "neutral", "other", "low"
    elif _NEGATIVE_RE.search(text):
        relevant, sentiment, intent, urgency = True, "negative", "bug_report", "high"
    elif _POSITIVE_RE.search(text):
        relevant, sentiment, intent, urgency = True, "positive", "praise", "low"
    elif "?" in text:
        relevant, sentiment, intent, urgency = True, "neutral", "question", "normal"
    else:
        relevant, sentiment, intent, urgency = True, "neutral", "other", "low"
    title = None
    for pattern in _TITLE_RES:
        if found := (pattern.search(item) or pattern.search(message)):
            title = found.group(1).strip()
            break
    subject = title if title else " ".join(item.split())
    return {
        "relevant": relevant,
        "sentiment": sentiment,
        "intent": intent,
        "urgency": urgency,
        "summary": "Summary of: " + subject[:40],
    }


def default_drafter(request_json: dict) -> str:
    return "Thanks for the report — we're on it. (draft)"


def default_briefer(request_json: dict) -> list[str]:
    """The digest's three points; the first says how many items the facts count."""
    facts = re.search(r"<facts>\n(.*?)\n</facts>", last_user_text(request_json), re.S)
    total = json.loads(facts.group(1))["items"]["total"] if facts else "?"
    return [f"{total} new items: read the urgent ones first.", "Reply to the questions.",
            "Nothing else needs you today."]  # fmt: skip


def default_grounding(request_json: dict) -> tuple[str, str]:
    """(file, heading) a structured draft says it relied on; ("", "") = not covered."""
    return "", ""


def _prompt_tokens(parts: list) -> int:
    # Plausible counts: about four characters a token.
    return max(1, len(json.dumps(parts)) // 4)


def _cached_prefix(body: dict) -> list | None:
    """The request up to and including its last `cache_control` block, in the
    API's order (tools, system, messages); None when nothing is marked."""
    parts: list = []
    marked = None
    for tool in body.get("tools") or []:
        parts.append(tool)
        if isinstance(tool, dict) and tool.get("cache_control"):
            marked = len(parts)
    system = body.get("system")
    for block in system if isinstance(system, list) else [system] if system else []:
        parts.append(block)
        if isinstance(block, dict) and block.get("cache_control"):
            marked = len(parts)
    for message in body.get("messages") or []:
        content = message.get("content")
        for block in content if isinstance(content, list) else [content]:
            parts.append([message.get("role"), block])
            if isinstance(block, dict) and block.get("cache_control"):
                marked = len(parts)
    return parts[:marked] if marked else None


# Models that answer a forced tool_choice with 400 (Anthropic's migration guides).
FORCED_TOOL_REFUSED = ("claude-sonnet-5-5", "claude-opus-5-5", "claude-fable-5-1")


def _anthropic_error(status: int, kind: str, message: str, headers: dict | None = None) -> Response:
    body = {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": "req_" + uuid.uuid4().hex[:24],
    }
    reason = {529: "Overloaded"}.get(status)
    return Response(
        status,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", **(headers or {})},
        reason,
    )


class FakeAnthropic(_FakeServer):
    """The Anthropic Messages API (`POST /v1/messages`), enough for the real SDK:

        client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="test-key")

    Requests need a key (`x-api-key` or `Authorization: Bearer`), else 401 in
    Anthropic's error shape; with `api_key=` set, only that key is accepted.

    - forced tool use (`tool_choice` {"type": "tool", "name": X}, or "any"):
      one tool_use block whose input is `fake.classifier(request_json)`;
      stop_reason "tool_use". Kind "classify".
    - structured output (`output_config.format.type == "json_schema"`): a text
      block with the classifier's result as JSON; stop_reason "end_turn". Kind "classify".
      A schema with a "reply" property is a draft: {"reply": fake.drafter(...),
      "file": ..., "heading": ...} from `fake.grounding(request_json)`. Kind "text".
      A schema with a "point_1" property is the digest's briefing: its three points
      from `fake.briefer(request_json)`. Kind "brief".
    - anything else: a text block `fake.drafter(request_json)`. Kind "text".
    - forced tool use on a model in FORCED_TOOL_REFUSED: 400, as the real API answers.

    Prompt caching: the request up to its last `cache_control` block is the cached
    prefix. When it is at least `cache_min_tokens` long, the first request with it
    reports `cache_creation_input_tokens`, later ones `cache_read_input_tokens`
    (and `input_tokens` counts only the rest). `POST /v1/messages/count_tokens`
    answers {"input_tokens": N}, counted the same way, for the SDK's token counting.

    Faults, queued with `script([...], kind=None)` (one per request, a kind's own
    queue before the shared one) or for every request with `set_default_fault`:

        ("status", 529, "overloaded_error")                   Anthropic error JSON
        ("status", 429, "rate_limit_error", {"retry-after": "0"})
        ("garbage",)          200, application/json, body `this is not json`
        ("bad_tool_input",)   classify requests get {"relevant": "maybe"} (text ones: no effect)
        ("delay", seconds)    then answer normally
        ("hang",)             no answer for 60 s (or until the fake stops)

    Tip: a status fault with {"retry-after-ms": "10"} makes the SDK's own retry quick.

    Each record: {json, headers, kind, fault, time, status}.
    """

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__()
        self.api_key = api_key
        self.classifier: Callable[[dict], dict] = default_classifier
        self.drafter: Callable[[dict], str] = default_drafter
        self.grounding: Callable[[dict], tuple[str, str]] = default_grounding
        self.briefer: Callable[[dict], list[str]] = default_briefer
        self.cache_min_tokens = 512  # claude-haiku-5-5 and claude-sonnet-5-5's minimum
        self._cache: set[str] = set()
        self._requests: list[dict] = []
        self._scripts: dict[str | None, deque] = {}
        self._default_faults: dict[str | None, tuple | None] = {}

    # -- programming -------------------------------------------------------

    def script(self, faults: Iterable[tuple], kind: str | None = None) -> None:
        """Queue faults consumed one per request (of `kind`, or of any kind)."""
        faults = [tuple(f) for f in faults]
        for fault in faults:
            _check_fault(fault)
        with self._cond:
            self._scripts.setdefault(kind, deque()).extend(faults)

    def set_default_fault(self, fault: tuple | None, kind: str | None = None) -> None:
        """Apply `fault` to every request (of `kind`) once scripts are used up; None clears."""
        if fault is not None:
            _check_fault(tuple(fault))
        with self._cond:
            self._default_faults[kind] = tuple(fault) if fault is not None else None

    def reset(self) -> None:
        with self._cond:
            self._requests.clear()
            self._scripts.clear()
            self._default_faults.clear()
            self._cache.clear()
        self.classifier, self.drafter = default_classifier, default_drafter
        self.grounding = default_grounding
        self.briefer = default_briefer

    # -- reading -----------------------------------------------------------

    @property
    def requests(self) -> list[dict]:
        with self._cond:
            return [dict(r) for r in self._requests]

    def calls(self, kind: str | None = None) -> int:
        """How many requests (of `kind`: "classify", "text" or "brief") arrived, failed ones included."""
        with self._cond:
            return sum(1 for r in self._requests if kind in (None, r["kind"]))

    def wait_for(
        self,
        n_or_predicate: int | Callable,
        timeout: float = DEFAULT_TIMEOUT,
        kind: str | None = None,
    ):
        """Block until `n` requests (of `kind`) arrived, or the predicate holds."""
        if callable(n_or_predicate):
            condition = _predicate(self, n_or_predicate)
        else:

            def condition():
                return self.requests if self.calls(kind) >= n_or_predicate else None

        return self._wait(condition, timeout, self._describe)

    def _describe(self) -> str:
        with self._cond:
            seen = [(r["kind"], r["fault"], r["status"]) for r in self._requests]
        return f"requests so far (kind, fault, status): {seen}"

    # -- serving -----------------------------------------------------------

    def _handle(self, request: Request) -> Response:
        counting = request.path == "/v1/messages/count_tokens"
        if request.method != "POST" or (request.path != "/v1/messages" and not counting):
            return _anthropic_error(404, "not_found_error", f"Not found: {request.path}")
        key = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if not key:
            return _anthropic_error(401, "authentication_error", "x-api-key header is required")
        if self.api_key is not None and key != self.api_key:
            return _anthropic_error(401, "authentication_error", "invalid x-api-key")
        try:
            body = request.json()
        except ValueError:
            return _anthropic_error(400, "invalid_request_error", "request body is not JSON")
        if counting:
            if not isinstance(body, dict) or "model" not in body or "messages" not in body:
                return _anthropic_error(
                    400, "invalid_request_error", "model and messages are required"
                )
            tokens = _prompt_tokens(_prompt_parts(body))
            return Response(200, json.dumps({"input_tokens": tokens}).encode(),
                            {"Content-Type": "application/json"})  # fmt: skip
        if problem := _request_problem(body):
            return _anthropic_error(400, "invalid_request_error", problem)

        properties = _json_schema(body).get("properties") or {}
        drafting = "reply" in properties
        kind = "classify" if (_forced_tool(body) or _wants_json(body)) and not drafting else "text"
        if "point_1" in properties:
            kind = "brief"
        with self._cond:
            queue = self._scripts.get(kind) or self._scripts.get(None)
            if queue:
                fault = queue.popleft()
            else:
                fault = self._default_faults.get(kind) or self._default_faults.get(None)
        entry = self._record(
            self._requests,
            {
                "json": body,
                "headers": request.headers,
                "kind": kind,
                "fault": fault,
                "time": request.time,
                "status": None,
            },
        )
        response = self._answer(body, kind, fault)
        self._update(entry, status=response.status)
        return response

    def _answer(self, body: dict, kind: str, fault: tuple | None) -> Response:
        name = fault[0] if fault else None
        if name == "status":
            status, error_type, *rest = fault[1:]
            return _anthropic_error(status, error_type, f"fake: scripted {error_type}", *rest)
        if name == "garbage":
            return Response(200, b"this is not json", {"Content-Type": "application/json"})
        if name == "delay":
            self._sleep(fault[1])
        if name == "hang":
            self._sleep(60)

        tool = _forced_tool(body)
        result = None
        if kind == "brief":
            result = dict(zip(("point_1", "point_2", "point_3"), self.briefer(body), strict=True))
        elif _wants_json(body) and kind == "text":  # a structured draft
            file, heading = self.grounding(body)
            result = {"reply": self.drafter(body), "file": file, "heading": heading}
        elif kind == "classify":
            result = {"relevant": "maybe"} if name == "bad_tool_input" else self.classifier(body)
        if tool:
            content = [
                {
                    "type": "tool_use",
                    "id": "toolu_" + uuid.uuid4().hex[:24],
                    "name": tool,
                    "input": result,
                }
            ]
            stop_reason, output = "tool_use", json.dumps(result)
        else:
            output = json.dumps(result) if result is not None else self.drafter(body)
            content = [{"type": "text", "text": output}]
            stop_reason = "end_turn"
        total = _prompt_tokens(_prompt_parts(body))
        cached = cache_read = cache_write = 0
        if (prefix := _cached_prefix(body)) is not None:
            cached = _prompt_tokens(prefix)
            if cached >= self.cache_min_tokens:
                key = hashlib.sha256(json.dumps([body["model"], prefix]).encode()).hexdigest()
                with self._cond:
                    hit = key in self._cache
                    self._cache.add(key)
                cache_read, cache_write = (cached, 0) if hit else (0, cached)
            else:
                cached = 0  # below the minimum, caching silently does nothing
        message = {
            "id": "msg_" + uuid.uuid4().hex[:24],
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": max(1, total - cached),
                "output_tokens": max(1, len(output) // 4),
                "cache_read_input_tokens": cache_read,
                "cache_creation_input_tokens": cache_write,
            },
        }
        return Response(
            200,
            json.dumps(message).encode(),
            {"Content-Type": "application/json", "request-id": "req_" + uuid.uuid4().hex[:24]},
        )


def _check_fault(fault: tuple) -> None:
    arity = {"status": (3, 4), "garbage": (1,), "bad_tool_input": (1,), "delay": (2,), "hang": (1,)}
    if not fault or fault[0] not in arity or len(fault) not in arity[fault[0]]:
        raise ValueError(f"unknown Anthropic fault {fault!r}; see FakeAnthropic's docstring")


def _forced_tool(body: dict) -> str | None:
    """The tool the request forces the model to call, if any."""
    choice = body.get("tool_choice") or {}
    if choice.get("type") == "tool":
        return choice.get("name")
    if choice.get("type") == "any" and body.get("tools"):
        return body["tools"][0].get("name")
    return None


def _prompt_parts(body: dict) -> list:
    parts = [body.get("system"), body.get("messages"), body.get("tools")]
    return [*parts, body["output_config"]] if body.get("output_config") else parts


def _json_schema(body: dict) -> dict:
    fmt = (body.get("output_config") or {}).get("format") or body.get("output_format") or {}
    return (fmt.get("schema") or {}) if fmt.get("type") == "json_schema" else {}


def _wants_json(body: dict) -> bool:
    # output_config.format is the GA spelling; output_format the older beta one.
    fmt = (body.get("output_config") or {}).get("format") or body.get("output_format") or {}
    return fmt.get("type") == "json_schema"


def _request_problem(body: Any) -> str | None:
    """What the real API would reject with invalid_request_error (the common cases)."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            return f"{key}: Field required"
    if not body["messages"]:
        return "messages: at least one message is required"
    if body.get("stream"):
        return "stream: the fake does not stream; call without stream=True"
    choice = body.get("tool_choice") or {}
    if choice.get("type") in ("tool", "any") and body["model"] in FORCED_TOOL_REFUSED:
        return f"tool_choice: forced tool use is not supported on {body['model']}"
    if choice.get("type") == "tool":
        names = [t.get("name") for t in body.get("tools") or []]
        if choice.get("name") not in names:
            return f"tool_choice: tool {choice.get('name')!r} not found in tools {names}"
    return None


# ###########################################################################
# Feeds and other documents
# ###########################################################################

RSS_TYPE = "application/rss+xml; charset=utf-8"
ATOM_TYPE = "application/atom+xml; charset=utf-8"
GARBAGE_FEED_BODY = b"\x89PNG\r\n\x1a\n\x00\xff this is not a feed <<<>>> \xfe"


@dataclass
class _Doc:
    body: bytes
    content_type: str
    status: int
    headers: dict[str, str]
    conditional: bool
    etag: str
    last_modified: float


class FakeFeeds(_FakeServer):
    """Serves documents by path (GET/HEAD) with a strong ETag and Last-Modified,
    answering If-None-Match / If-Modified-Since with 304.

        feeds.set("/feed.xml", rss([...]))
        feeds.set("/page", "<html>…", content_type="text/html", headers={"X-A": "1"})
        feeds.fault("/feed.xml", ("status", 500))     # or ("delay", s), ("garbage",),
                                                      # ("drop",); None clears
        feeds.fault("/feed.xml", ("drop",), times=2)  # the next 2 requests only

    A path with a query string ("/search.json?q=x") matches that exact target
    first, then the bare path. Unknown paths answer 404. For gzip, pass the
    compressed body and headers={"Content-Encoding": "gzip"}.

    Each record: {method, path, target, headers, status, time}; status is None
    for a dropped connection.
    """

    def __init__(self) -> None:
        super().__init__()
        self._docs: dict[str, _Doc] = {}
        self._faults: dict[str, tuple[tuple, int | None]] = {}
        self._requests: list[dict] = []

    # -- programming -------------------------------------------------------

    def set(
        self,
        path: str,
        body: bytes | str,
        content_type: str = RSS_TYPE,
        status: int = 200,
        headers: dict[str, str] | None = None,
        *,
        conditional: bool = True,
        last_modified: datetime | None = None,
    ) -> str:
        """Serve `body` at `path`; returns the full URL. conditional=False serves
        no validators and never 304 (a server that ignores conditional GET)."""
        data = body.encode() if isinstance(body, str) else bytes(body)
        with self._cond:
            previous = self._docs.get(path)
            if last_modified is not None:
                modified = last_modified.timestamp()
            elif previous is not None and previous.body == data:
                modified = previous.last_modified  # same content: still "not modified"
            else:
                # HTTP dates have one-second resolution: a change within the same
                # second would look unmodified to If-Modified-Since, so step on.
                modified = float(int(time.time()))
                if previous is not None and modified <= previous.last_modified:
                    modified = previous.last_modified + 1
            self._docs[path] = _Doc(
                body=data,
                content_type=content_type,
                status=status,
                headers=dict(headers or {}),
                conditional=conditional,
                etag='"' + hashlib.sha256(data).hexdigest()[:32] + '"',
                last_modified=modified,
            )
        return self.url + path

    def remove(self, path: str) -> None:
        with self._cond:
            self._docs.pop(path, None)

    def fault(self, path: str, fault: tuple | None, times: int | None = None) -> None:
        """Make requests to `path` fail until cleared with None (or for `times` requests)."""
        with self._cond:
            if fault is None:
                self._faults.pop(path, None)
                return
            fault = tuple(fault)
            if fault[0] not in ("status", "delay", "garbage", "drop"):
                raise ValueError(f"unknown feed fault {fault!r}")
            self._faults[path] = (fault, times)

    def etag(self, path: str) -> str:
        with self._cond:
            return self._docs[path].etag

    # -- reading -----------------------------------------------------------

    @property
    def requests(self) -> list[dict]:
        with self._cond:
            return [dict(r) for r in self._requests]

    def _matches(self, record: dict, path: str | None) -> bool:
        if path is None:
            return True
        return record["target"] == path if "?" in path else record["path"] == path

    def hits(self, path: str | None = None) -> int:
        """Requests to `path` (all paths if None), whatever they were answered."""
        with self._cond:
            return sum(1 for r in self._requests if self._matches(r, path))

    def not_modified(self, path: str | None = None) -> int:
        """Requests to `path` answered 304."""
        with self._cond:
            return sum(1 for r in self._requests if self._matches(r, path) and r["status"] == 304)

    def wait_for(
        self,
        n_or_predicate: int | Callable,
        timeout: float = DEFAULT_TIMEOUT,
        path: str | None = None,
    ):
        """Block until `path` (any path if None) had `n` requests, or the predicate holds.
        A request counts once it is answered (or dropped)."""
        if callable(n_or_predicate):
            condition = _predicate(self, n_or_predicate)
        else:

            def condition():
                with self._cond:
                    done = [
                        r
                        for r in self._requests
                        if self._matches(r, path) and r["status"] != "pending"
                    ]
                return done if len(done) >= n_or_predicate else None

        return self._wait(condition, timeout, self._describe)

    def _describe(self) -> str:
        with self._cond:
            seen = [(r["method"], r["target"], r["status"]) for r in self._requests]
        return f"requests so far (method, target, status): {seen}"

    # -- serving -----------------------------------------------------------

    def _handle(self, request: Request) -> Response | object:
        entry = self._record(
            self._requests,
            {
                "method": request.method,
                "path": request.path,
                "target": request.target,
                "headers": request.headers,
                "status": "pending",
                "time": request.time,
            },
        )
        response = self._answer(request)
        self._update(entry, status=None if response is DROP else response.status)
        return response

    def _answer(self, request: Request) -> Response | object:
        with self._cond:
            key = request.target if request.target in self._docs else request.path
            doc = self._docs.get(key)
            fault = None
            for candidate in (request.target, request.path):
                if candidate in self._faults:
                    fault, times = self._faults[candidate]
                    if times is not None:
                        if times <= 1:
                            del self._faults[candidate]
                        else:
                            self._faults[candidate] = (fault, times - 1)
                    break

        if fault is not None:
            if fault[0] == "drop":
                return DROP
            if fault[0] == "status":
                return Response(fault[1], f"fake: status {fault[1]}".encode(), _TEXT)
            if fault[0] == "garbage":
                content_type = doc.content_type if doc else RSS_TYPE
                return Response(200, GARBAGE_FEED_BODY, {"Content-Type": content_type})
            if fault[0] == "delay":
                self._sleep(fault[1])

        if request.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed", {**_TEXT, "Allow": "GET, HEAD"})
        if doc is None:
            return Response(404, b"not found", _TEXT)

        headers = {"Content-Type": doc.content_type, **doc.headers}
        if doc.conditional:
            headers["ETag"] = doc.etag
            headers["Last-Modified"] = email.utils.formatdate(doc.last_modified, usegmt=True)
        if doc.status == 200 and doc.conditional and _not_modified(request.headers, doc):
            return Response(304, b"", {k: v for k, v in headers.items() if k != "Content-Type"})
        return Response(doc.status, doc.body, headers)


def _not_modified(headers: dict[str, str], doc: _Doc) -> bool:
    # RFC 9110 13.2.2: If-None-Match wins; If-Modified-Since only counts without it.
    if (inm := headers.get("if-none-match")) is not None:
        tags = [t.strip() for t in inm.split(",")]
        return "*" in tags or any(t.removeprefix("W/") == doc.etag for t in tags)
    if ims := headers.get("if-modified-since"):
        try:
            since = email.utils.parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError):
            return False
        return doc.last_modified <= since
    return False


# -- feed builders ----------------------------------------------------------

_ITEM_KEYS = {"title", "link", "guid", "description", "pub_date", "author"}


def _items(items: Iterable[dict]) -> list[dict]:
    checked = []
    for item in items:
        if unknown := set(item) - _ITEM_KEYS:
            raise TypeError(f"unknown feed item keys {sorted(unknown)}; use {sorted(_ITEM_KEYS)}")
        checked.append(item)
    return checked


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _element(name: str, value: Any, attrs: str = "") -> str:
    return f"<{name}{attrs}>{escape(str(value))}</{name}>" if value not in (None, "") else ""


def rss(
    items: Iterable[dict],
    title: str = "Feed",
    link: str = "https://example.com/",
    description: str = "A test feed",
) -> bytes:
    """RSS 2.0 bytes. Each item: title, link, guid=None, description="",
    pub_date (datetime; naive means UTC) = None, author=None. Absent values are
    left out, as in the wild: no guid means readers fall back to the link."""
    entries = []
    for item in _items(items):
        pub_date = item.get("pub_date")
        guid = item.get("guid")
        entries.append(
            "<item>"
            + _element("title", item.get("title"))
            + _element("link", item.get("link"))
            + (_element("guid", guid, ' isPermaLink="false"') if guid is not None else "")
            + _element("description", item.get("description"))
            + (_element("pubDate", email.utils.format_datetime(_utc(pub_date))) if pub_date else "")
            + _element("author", item.get("author"))
            + "</item>"
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<rss version="2.0"><channel>'
        + _element("title", title)
        + _element("link", link)
        + _element("description", description)
        + "\n".join(entries)
        + "</channel></rss>\n"
    ).encode()


def atom(
    items: Iterable[dict],
    title: str = "Feed",
    link: str = "https://example.com/",
    feed_id: str = "urn:uuid:00000000-0000-4000-8000-000000000000",
) -> bytes:
    """Atom 1.0 bytes, same item dicts as rss(). Entry id is the guid, else the link.
    An item without pub_date gets no <updated>, like an RSS item without pubDate
    (strictly invalid Atom, but what undated feeds look like to a reader)."""
    entries = []
    dates = []
    for item in _items(items):
        pub_date = item.get("pub_date")
        stamp = _utc(pub_date).isoformat() if pub_date else None
        if pub_date:
            dates.append(_utc(pub_date))
        link_el = f"<link href={quoteattr(item['link'])}/>" if item.get("link") else ""
        author = item.get("author")
        entries.append(
            "<entry>"
            + _element("title", item.get("title"))
            + link_el
            + _element("id", item.get("guid") or item.get("link"))
            + (_element("updated", stamp) + _element("published", stamp) if stamp else "")
            + _element("summary", item.get("description"))
            + (f"<author>{_element('name', author)}</author>" if author else "")
            + "</entry>"
        )
    updated = max(dates) if dates else datetime(2024, 1, 1, tzinfo=UTC)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<feed xmlns="http://www.w3.org/2005/Atom">'
        + _element("title", title)
        + f"<link href={quoteattr(link)}/>"
        + _element("id", feed_id)
        + _element("updated", updated.isoformat())
        + "\n".join(entries)
        + "</feed>\n"
    ).encode()


# ###########################################################################
# Config files
# ###########################################################################


def write_config(folder: Path, text: str, name: str = "agentwatch.toml") -> Path:
    """Write `text` (dedented) as `folder/name` and return its path."""
    path = Path(folder) / name
    path.write_text(dedent(text).lstrip("\n"), encoding="utf-8")
    return path
