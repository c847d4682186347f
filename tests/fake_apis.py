"""Loopback fakes of the APIs the sources in sources/ read, serving the shapes of the
recorded answers in ../shared/corpus/{hackernews,github,mastodon,bluesky,stackexchange}
(templates are real recorded items with fields replaced), with each API's
rate-limit headers and error bodies.

    with FakeHN() as hn:
        hn.add(hn_story(title="Acme is great"))          # newest on top
        # point base_url of a hackernews source at hn.url

Every fake records each request as {method, path, query, headers, status, fault,
time}, has `requests(path)`, `hits(path, status)`, `wait_for(n_or_predicate)`,
and takes faults with `script([...], path=None)`, one per matching request:

    ("status", 503)            the API's own error body with that status
    ("html", 502)              an HTML error page (a proxy in front of the API)
    ("invalid_json",)          200 application/json, a cut-off body
    ("delay", seconds) / ("drop",)   answer late / close the connection unanswered

plus each API's own, described on its class. Rate limits are counted per
credential (per peer address without one) in fixed windows, as the real APIs do.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import itertools
import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fakes import DEFAULT_TIMEOUT, DROP, Request, Response, _FakeServer, _predicate

CORPUS = Path(
    os.environ.get("AGENTWATCH_CORPUS") or Path(__file__).resolve().parents[2] / "shared" / "corpus"
)
_JSON = {"Content-Type": "application/json; charset=utf-8"}
_HTML = {"Content-Type": "text/html; charset=utf-8"}
ERROR_PAGE = b"<!doctype html><html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


@functools.cache
def _load(name: str) -> dict:
    path = CORPUS / name
    if not path.exists():
        raise FileNotFoundError(f"corpus file {path} is missing (set AGENTWATCH_CORPUS)")
    return json.loads(path.read_text(encoding="utf-8"))


def corpus(name: str) -> dict:
    """One recorded answer ("github/search_….json"): {request, status, headers, body}, a copy."""
    return copy.deepcopy(_load(name))


_ids = itertools.count(40_000_000)


def new_id() -> int:
    return next(_ids)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class _API(_FakeServer):
    """Recording, scripted faults and fixed-window rate limits, shared by the fakes."""

    def __init__(self) -> None:
        super().__init__()
        self._requests: list[dict] = []
        self._scripts: dict[str | None, deque] = {}
        self._rate: tuple[int, float] | None = None
        self._windows: dict[str, tuple[float, int]] = {}

    def script(self, faults: Iterable[tuple], path: str | None = None) -> None:
        with self._cond:
            self._scripts.setdefault(path, deque()).extend(tuple(f) for f in faults)

    def rate_limit(self, limit: int | None, window: float = 60) -> None:
        """`limit` requests per fixed `window` seconds per credential; None: off."""
        with self._cond:
            self._rate = (limit, window) if limit is not None else None
            self._windows.clear()

    def requests(self, path: str | None = None) -> list[dict]:
        with self._cond:
            return [dict(r) for r in self._requests if path in (None, r["path"])]

    def hits(self, path: str | None = None, status: int | None = None) -> int:
        return sum(1 for r in self.requests(path) if status in (None, r["status"]))

    def wait_for(self, n_or_predicate: int | Callable, timeout: float = DEFAULT_TIMEOUT,
                 path: str | None = None):  # fmt: skip
        if callable(n_or_predicate):
            condition = _predicate(self, n_or_predicate)
        else:

            def condition():
                done = [r for r in self.requests(path) if r["status"] is not None]
                return done if len(done) >= n_or_predicate else None

        return self._wait(condition, timeout, self._describe)

    def _describe(self) -> str:
        seen = [(r["method"], r["path"], r["status"]) for r in self.requests()]
        return f"requests so far: {seen[-20:]}"

    def count(self, key: str) -> tuple[int, int, float] | None:
        """Count one request against `key`: (limit, used, window end epoch), None when off."""
        with self._cond:
            if self._rate is None:
                return None
            limit, window = self._rate
            # A window opens with a credential's first request (as GitHub's does), not on
            # the clock's round numbers: a test started a minute before the hour would
            # otherwise see its window reset under it.
            now = time.time()
            start, used = self._windows.get(key, (now, 0))
            if now >= start + window:
                start, used = now, 0
            self._windows[key] = (start, used + 1)
            return limit, used + 1, start + window

    def _handle(self, request: Request) -> Response | object:
        split = urlsplit(request.target)
        query = {k: (v if len(v) > 1 else v[-1]) for k, v in parse_qs(split.query).items()}
        entry = self._record(
            self._requests,
            {"method": request.method, "path": request.path, "query": query,
             "headers": request.headers, "status": None, "fault": None, "time": time.time()},
        )  # fmt: skip
        with self._cond:
            queue = self._scripts.get(request.path) or self._scripts.get(None)
            fault = queue.popleft() if queue else None
        response = self._common_fault(fault)
        if response is None:
            response = self._answer(request, query, fault)
        self._update(entry, status=None if response is DROP else response.status, fault=fault)
        return response

    def _common_fault(self, fault: tuple | None) -> Response | object | None:
        name = fault[0] if fault else None
        if name == "delay":
            self._sleep(fault[1])
        elif name == "drop":
            return DROP
        elif name == "status":
            return self.error(fault[1], *fault[2:])
        elif name == "html":
            return Response(fault[1], ERROR_PAGE, dict(_HTML))
        elif name == "invalid_json":
            return Response(200, b'{"items": [{"id', dict(_JSON))
        return None

    def error(self, status: int, *more: Any) -> Response:
        from http import HTTPStatus

        return Response(status, json.dumps({"message": HTTPStatus(status).phrase}).encode(),
                        dict(_JSON))  # fmt: skip

    def _answer(self, request: Request, query: dict, fault: tuple | None) -> Response | object:
        raise NotImplementedError


def _words_match(words: list[str], *texts: Any) -> bool:
    text = " ".join(str(t or "") for t in texts).lower()
    return all(w.lower() in text for w in words)


# ###########################################################################
# Hacker News (Algolia)
# ###########################################################################


def _hn_template(name: str) -> dict:
    hit = copy.deepcopy(_load(f"hackernews/{name}")["body"]["hits"][0])
    hit.pop("_highlightResult", None)
    return hit


def hn_story(title: str = "Show HN: Acme", text: str = "", author: str = "someone",
             points: int = 1, url: str = "https://acme.example/", created: float | None = None,
             id: int | None = None) -> dict:  # fmt: skip
    """A story hit shaped like the recorded ones."""
    hit = _hn_template("algolia_search_story_query_2014.json")
    oid, created = id or new_id(), created or time.time()
    hit.update(
        title=title, url=url, author=author, points=points, story_text=text, num_comments=0,
        created_at=_iso(created).replace("Z", ".000Z"), created_at_i=int(created),
        objectID=str(oid), _tags=["story", f"author_{author}", f"story_{oid}"],
    )  # fmt: skip
    return hit


def hn_comment(text: str = "A comment", author: str = "someone", story_id: int = 1,
               story_title: str = "Show HN: Acme", created: float | None = None,
               id: int | None = None) -> dict:  # fmt: skip
    """A comment hit shaped like the recorded ones (HTML text with entities)."""
    hit = _hn_template("algolia_search_by_date_comment_2014.json")
    oid, created = id or new_id(), created or time.time()
    hit.update(
        comment_text=text, author=author, story_id=story_id, parent_id=story_id,
        story_title=story_title, created_at=_iso(created).replace("Z", ".000Z"),
        created_at_i=int(created), objectID=str(oid),
        _tags=["comment", f"author_{author}", f"story_{story_id}"],
    )  # fmt: skip
    return hit


class FakeHN(_API):
    """`GET /api/v1/search_by_date`: `query` (every word in the title or text),
    `tags` (comma = AND, "(a,b)" = OR), `numericFilters` (created_at_i and
    points with > >= < <= =, comma = AND), `page`, `hitsPerPage`; newest first.
    Over the rate limit: 429 with Algolia's JSON message (no Retry-After)."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[dict] = []

    def add(self, *hits: dict) -> None:
        with self._cond:
            for hit in hits:
                self.items.insert(0, hit)

    def error(self, status: int, *more: Any) -> Response:
        body = {"message": more[0] if more else f"error {status}", "status": status}
        return Response(status, json.dumps(body).encode(), dict(_JSON))

    def _answer(self, request: Request, query: dict, fault: tuple | None) -> Response:
        if request.path != "/api/v1/search_by_date":
            return self.error(404, "Not Found")
        counted = self.count(f"address {request.peer[0]}")
        if counted and counted[1] > counted[0]:
            return self.error(429, "Too many requests")
        try:
            tags = _hn_tags(str(query.get("tags", "")))
            numeric = _hn_numeric(str(query.get("numericFilters", "")))
            per_page = int(query.get("hitsPerPage", 20))
            page = int(query.get("page", 0))
        except ValueError as e:
            return self.error(400, f"invalid parameters: {e}")
        words = str(query.get("query", "")).split()
        with self._cond:
            found = [
                h for h in sorted(self.items, key=lambda h: -h["created_at_i"])
                if all(any(t in h["_tags"] for t in group) for group in tags)
                and all(test(h) for test in numeric)
                and _words_match(words, h.get("title"), h.get("story_text"), h.get("comment_text"),
                                 h.get("url"))
            ]  # fmt: skip
        pages = max(1, math.ceil(len(found) / per_page)) if found else 0
        body = {
            "hits": copy.deepcopy(found[page * per_page : (page + 1) * per_page]),
            "nbHits": len(found), "page": page, "nbPages": pages, "hitsPerPage": per_page,
            "processingTimeMS": 1, "query": query.get("query", ""), "params": urlsplit(request.target).query,
        }  # fmt: skip
        return Response(200, json.dumps(body).encode(), dict(_JSON))


def _hn_tags(text: str) -> list[list[str]]:
    groups, depth, current = [], 0, ""
    for ch in text + ",":
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            if current:
                groups.append([t for t in current.strip("()").split(",") if t])
            current = ""
        else:
            current += ch
    return groups


_OPS = {
    ">": float.__gt__,
    ">=": float.__ge__,
    "<": float.__lt__,
    "<=": float.__le__,
    "=": float.__eq__,
}


def _hn_numeric(text: str) -> list[Callable[[dict], bool]]:
    tests = []
    for part in filter(None, text.split(",")):
        m = re.fullmatch(r"(created_at_i|points|num_comments)(>=|<=|>|<|=)(\d+)", part.strip())
        if not m:
            raise ValueError(f"bad numeric filter {part!r}")
        name, op, value = m.group(1), _OPS[m.group(2)], float(m.group(3))
        tests.append(lambda h, n=name, op=op, v=value: h.get(n) is not None and op(float(h[n]), v))
    return tests


# ###########################################################################
# GitHub (search issues)
# ###########################################################################


def gh_issue(title: str = "Acme crashes", body: str | None = "It crashes", login: str | None = "someone",
             repo: str = "acme/acme", pull: bool = False, created: float | None = None,
             id: int | None = None) -> dict:  # fmt: skip
    """An issue (or pull request) shaped like the recorded search results."""
    item = copy.deepcopy(
        _load("github/search_issues_with_ratelimit_headers.json")["body"]["items"][0]
    )
    iid, created = id or new_id(), created or time.time()
    number = iid % 100000
    api = f"https://api.github.com/repos/{repo}"
    word = "pull" if pull else "issues"
    item.update(
        id=iid, number=number, title=title, body=body, created_at=_iso(created),
        updated_at=_iso(created), url=f"{api}/issues/{number}", repository_url=api,
        html_url=f"https://github.com/{repo}/{word}/{number}", node_id=f"I_{iid}",
    )  # fmt: skip
    if login is None:
        item["user"] = None
    else:
        item["user"] = {**item["user"], "login": login, "html_url": f"https://github.com/{login}"}
    if pull:
        item["pull_request"] = {"html_url": item["html_url"], "url": f"{api}/pulls/{number}"}
    return item


class FakeGitHub(_API):
    """`GET /search/issues`: `q` (words in the title or body, and the qualifiers
    `created:>=ISO`, `created:>ISO`, `is:issue`, `is:pr`, `repo:o/r`), `sort=created`,
    `order`, `per_page`, `page`; pages in a `Link` header (rel=next, rel=last), as
    GitHub does. Every answer carries X-RateLimit-Limit/-Remaining/-Used/-Reset
    (epoch seconds)/-Resource: search, counted per token (per address without
    one); over the limit: 403 "API rate limit exceeded" with Remaining 0.
    Tokens: `add_token(t)`; an unknown one is a 401 "Bad credentials".
    Faults: ("secondary", status, retry_after) is GitHub's secondary rate
    limit (403 or 429, Retry-After, no X-RateLimit-*); ("recorded", file) a
    corpus file's status, headers and body verbatim."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[dict] = []
        self._tokens: set[str] = set()

    def add(self, *issues: dict) -> None:
        with self._cond:
            self.items.extend(issues)

    def add_token(self, token: str) -> None:
        with self._cond:
            self._tokens.add(token)

    def error(self, status: int, *more: Any) -> Response:
        from http import HTTPStatus

        body = {"message": more[0] if more else HTTPStatus(status).phrase,
                "documentation_url": "https://docs.github.com/rest"}  # fmt: skip
        return Response(status, json.dumps(body).encode(), dict(_JSON))

    def _answer(self, request: Request, query: dict, fault: tuple | None) -> Response:
        name = fault[0] if fault else None
        if name == "secondary":
            headers = {**_JSON, "Retry-After": str(fault[2])}
            return Response(fault[1], json.dumps({
                "message": "You have exceeded a secondary rate limit. Please wait a few minutes "
                "before you try again.", "documentation_url": "https://docs.github.com/rest"}).encode(),
                headers)  # fmt: skip
        if name == "recorded":
            recorded = _load(f"github/{fault[1]}")
            return Response(recorded["status"], json.dumps(recorded["body"]).encode(),
                            {**_JSON, **recorded["headers"]})  # fmt: skip
        auth = request.headers.get("authorization", "")
        token = auth.split(" ", 1)[1].strip() if " " in auth else ""
        if auth and token not in self._tokens:
            return self.error(401, "Bad credentials")
        if request.path != "/search/issues":
            return self.error(404, "Not Found")
        headers = dict(_JSON)
        counted = self.count(f"token {token}" if token else f"address {request.peer[0]}")
        if counted:
            limit, used, reset = counted
            headers.update({
                "X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(max(0, limit - used)),
                "X-RateLimit-Used": str(min(used, limit)), "X-RateLimit-Reset": str(math.ceil(reset)),
                "X-RateLimit-Resource": "search",
            })  # fmt: skip
            if used > limit:
                response = self.error(403, "API rate limit exceeded for this client.")
                response.headers.update(headers)
                return response
        q = str(query.get("q", ""))
        words, tests = [], []
        for part in q.split():
            if m := re.fullmatch(r"created:(>=|>)(\S+)", part):
                bound, op = _parse_iso(m.group(2)), m.group(1)
                tests.append(lambda i, b=bound, op=op: (_parse_iso(i["created_at"]) >= b) if op == ">="
                             else (_parse_iso(i["created_at"]) > b))  # fmt: skip
            elif part in ("is:issue", "is:pr"):
                tests.append(lambda i, pr=part == "is:pr": ("pull_request" in i) == pr)
            elif part.startswith("repo:"):
                tests.append(lambda i, r=part[5:]: i["repository_url"].endswith("/repos/" + r))
            elif ":" in part:
                return self.error(422, "Validation Failed")
            else:
                words.append(part)
        per_page = min(100, int(query.get("per_page", 30)))
        page = int(query.get("page", 1))
        with self._cond:
            found = [i for i in self.items if all(t(i) for t in tests)
                     and _words_match(words, i["title"], i["body"])]  # fmt: skip
        reverse = query.get("order", "desc") == "desc"
        found.sort(key=lambda i: _parse_iso(i["created_at"]), reverse=reverse)
        pages = max(1, math.ceil(len(found) / per_page))
        links = []
        base = f"http://127.0.0.1:{self.port}/search/issues?"
        if page < pages:
            links.append(f'<{base}{urlencode({**query, "page": page + 1})}>; rel="next"')
            links.append(f'<{base}{urlencode({**query, "page": pages})}>; rel="last"')
        if links:
            headers["Link"] = ", ".join(links)
        body = {"total_count": len(found), "incomplete_results": False,
                "items": copy.deepcopy(found[(page - 1) * per_page : page * per_page])}  # fmt: skip
        return Response(200, json.dumps(body).encode(), headers)


# ###########################################################################
# Mastodon (tag timeline, search)
# ###########################################################################

_status_ids = itertools.count(117_100_000_000_000_000)


def md_status(text: str = "Acme is neat", tag: str = "acme", acct: str = "someone@example.social",
              spoiler: str = "", reply_to: str | None = None, created: float | None = None,
              id: str | None = None) -> dict:  # fmt: skip
    """A status shaped like the recorded tag timeline's (HTML content, string ids)."""
    status = copy.deepcopy(_load("mastodon/timeline_tag_page1_link_header.json")["body"][0])
    sid = id or str(next(_status_ids))
    created = created or time.time()
    user = acct.split("@")[0]
    status.update(
        id=sid, created_at=_iso(created).replace("Z", ".000Z"), spoiler_text=spoiler,
        in_reply_to_id=reply_to, uri=f"https://example.social/users/{user}/statuses/{sid}",
        url=f"https://example.social/@{user}/{sid}",
        content=f'<p>{text} <a href="https://example.social/tags/{tag}" class="mention hashtag" '
        f'rel="tag">#<span>{tag}</span></a></p>',
        tags=[{"name": tag, "url": f"https://example.social/tags/{tag}"}],
    )  # fmt: skip
    status["account"] = {**status["account"], "acct": acct, "username": user,
                         "url": f"https://example.social/@{user}"}  # fmt: skip
    return status


class FakeMastodon(_API):
    """`GET /api/v1/timelines/tag/:tag` and `GET /api/v2/search?type=statuses` (needs a
    token): `since_id`, `min_id`, `max_id`, `limit` (at most 40), newest first; a
    `Link` header with rel=next (max_id) and rel=prev (min_id). Tokens:
    `add_token(t)`; an unknown one is 401 {"error": "The access token is invalid"}.
    `public_tags = False` closes tag timelines to requests without a token (401),
    as servers with `timelines_access` set do. Every answer carries
    X-RateLimit-Limit/-Remaining and -Reset as an ISO time; over the limit: 429."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[dict] = []
        self._tokens: set[str] = set()
        self.public_tags = True

    def add(self, *statuses: dict) -> None:
        with self._cond:
            for status in statuses:
                self.statuses.insert(0, status)

    def add_token(self, token: str) -> None:
        with self._cond:
            self._tokens.add(token)

    def error(self, status: int, *more: Any) -> Response:
        from http import HTTPStatus

        body = {"error": more[0] if more else HTTPStatus(status).phrase}
        return Response(status, json.dumps(body).encode(), dict(_JSON))

    def _answer(self, request: Request, query: dict, fault: tuple | None) -> Response:
        auth = request.headers.get("authorization", "")
        token = auth.split(" ", 1)[1].strip() if " " in auth else ""
        if auth and token not in self._tokens:
            return self.error(401, "The access token is invalid")
        headers = dict(_JSON)
        counted = self.count(f"token {token}" if token else f"address {request.peer[0]}")
        if counted:
            limit, used, reset = counted
            stamp = dt.datetime.fromtimestamp(reset, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            headers.update({"X-RateLimit-Limit": str(limit),
                            "X-RateLimit-Remaining": str(max(0, limit - used)),
                            "X-RateLimit-Reset": stamp})  # fmt: skip
            if used > limit:
                response = self.error(429, "Too many requests")
                response.headers.update(headers)
                return response
        key = lambda s: (len(s["id"]), s["id"])  # noqa: E731
        if m := re.fullmatch(r"/api/v1/timelines/tag/(\w+)", request.path):
            if not token and not self.public_tags:
                return self.error(401, "This method requires an authenticated user")
            with self._cond:
                found = [s for s in self.statuses
                         if any(t["name"].lower() == m.group(1).lower() for t in s["tags"])]  # fmt: skip
            search = False
        elif request.path == "/api/v2/search":
            if not token:
                return self.error(401, "This method requires an authenticated user")
            words = str(query.get("q", "")).split()
            with self._cond:
                found = [s for s in self.statuses if _words_match(words, s["content"])]
            search = True
        else:
            return self.error(404, "Record not found")
        found.sort(key=key, reverse=True)
        for name, keep in (("since_id", lambda s, v: key(s) > v), ("min_id", lambda s, v: key(s) > v),
                           ("max_id", lambda s, v: key(s) < v)):  # fmt: skip
            if value := query.get(name):
                found = [s for s in found if keep(s, (len(value), value))]
        limit = min(40, int(query.get("limit", 20)))
        # min_id on a timeline: the oldest ones right after it; else the newest.
        page = found[-limit:] if query.get("min_id") and not search else found[:limit]
        if page:
            base = f"http://127.0.0.1:{self.port}{request.path}?"
            plain = {k: v for k, v in query.items() if k not in ("since_id", "min_id", "max_id")}
            headers["Link"] = (
                f'<{base}{urlencode({**plain, "max_id": page[-1]["id"]})}>; rel="next", '
                f'<{base}{urlencode({**plain, "min_id": page[0]["id"]})}>; rel="prev"'
            )
        body: Any = copy.deepcopy(page)
        if search:
            body = {"accounts": [], "statuses": body, "hashtags": [], "collections": []}
        return Response(200, json.dumps(body).encode(), headers)


# ###########################################################################
# Stack Exchange (search/advanced)
# ###########################################################################


def se_question(title: str = "How do I use Acme?", body: str = "<p>It fails &amp; I don&#39;t know why</p>",
                name: str | None = "Andr&#233; Caron", tags: list[str] | None = None,
                created: float | None = None, id: int | None = None) -> dict:  # fmt: skip
    """A question shaped like the recorded ones (HTML-encoded title and name)."""
    question = copy.deepcopy(
        _load("stackexchange/questions_tagged_openshift_has_more.json")["body"]["items"][0]
    )
    qid, created = id or new_id(), created or time.time()
    question.update(
        question_id=qid, title=title, body=body, tags=tags or ["acme"],
        creation_date=int(created), last_activity_date=int(created),
        link=f"https://stackoverflow.com/questions/{qid}/q",
    )  # fmt: skip
    if name is None:
        question.pop("owner")
    else:
        question["owner"] = {**question["owner"], "display_name": name}
    return question


class FakeStackExchange(_API):
    """`GET /2.3/search/advanced`: `site`, `q` (words in title or body), `tagged`
    (";" = all of them), `fromdate`, `sort=creation`, `order`, `pagesize`, `page`;
    the wrapper has `items`, `has_more`, `quota_max`, `quota_remaining` (counted
    per key, per address without one; `quota` sets the daily amount) and, when
    `backoff` is set, `backoff` (a request sooner than that many seconds after it
    is answered with the recorded "Violation of backoff parameter" error).
    Errors are HTTP 400 with `error_id`/`error_name`/`error_message`, as the
    real API answers. Keys: `add_key(k)`; an unknown one is a 400 bad_parameter
    "key". `gzip_always = True` sends every answer gzipped without a
    Content-Encoding header (the API documents both). Faults: ("error", id,
    name, message) an error wrapper; ("backoff", seconds) a backoff on this answer."""

    def __init__(self, quota: int = 300) -> None:
        super().__init__()
        self.questions: list[dict] = []
        self._keys: set[str] = set()
        self.quota = quota
        self._used: dict[str, int] = {}
        self.backoff: int | None = None
        self._backoff_until: dict[str, float] = {}
        self.gzip_always = False

    def add(self, *questions: dict) -> None:
        with self._cond:
            self.questions.extend(questions)

    def add_key(self, key: str) -> None:
        with self._cond:
            self._keys.add(key)

    def _wrap(self, status: int, body: dict) -> Response:
        data = json.dumps(body).encode()
        if self.gzip_always:
            import gzip

            data = gzip.compress(data)
        return Response(status, data, dict(_JSON))

    def error(self, status: int, *more: Any) -> Response:
        names = {400: "bad_parameter", 404: "no_method", 500: "internal_error",
                 502: "throttle_violation", 503: "temporarily_unavailable"}  # fmt: skip
        return self._wrap(400 if status < 500 or status == 502 else status,
                          {"error_id": status, "error_name": names.get(status, "error"),
                           "error_message": more[0] if more else names.get(status, "error")})  # fmt: skip

    def _answer(self, request: Request, query: dict, fault: tuple | None) -> Response:
        name = fault[0] if fault else None
        if name == "error":
            return self._wrap(400, {"error_id": fault[1], "error_name": fault[2],
                                    "error_message": fault[3]})  # fmt: skip
        if request.path != "/2.3/search/advanced":
            return self.error(404, "no method found with this name")
        key = str(query.get("key", ""))
        if key and key not in self._keys:
            return self.error(400, "key")
        who = f"key {key}" if key else f"address {request.peer[0]}"
        now = time.monotonic()
        with self._cond:
            if now < self._backoff_until.get(who, 0.0):
                return self._wrap(
                    400, corpus("stackexchange/error_502_throttle_violation_backoff.json")["body"]
                )
            used = self._used.get(who, 0) + 1
            self._used[who] = used
            quota_max = 10000 if key else self.quota
            if used > quota_max:
                return self._wrap(400, {"error_id": 502, "error_name": "throttle_violation",
                                        "error_message": "too many requests from this IP"})  # fmt: skip
        words = str(query.get("q", "")).split()
        tags = [t for t in str(query.get("tagged", "")).split(";") if t]
        since = int(query.get("fromdate", 0))
        with self._cond:
            found = [q for q in self.questions if q["creation_date"] >= since
                     and all(t in q["tags"] for t in tags) and _words_match(words, q["title"], q.get("body"))]  # fmt: skip
        found.sort(key=lambda q: q["creation_date"], reverse=query.get("order", "desc") == "desc")
        size, page = min(100, int(query.get("pagesize", 30))), int(query.get("page", 1))
        chosen = copy.deepcopy(found[(page - 1) * size : page * size])
        if query.get("filter") != "withbody":
            for q in chosen:
                q.pop("body", None)
        body = {"items": chosen, "has_more": page * size < len(found), "quota_max": quota_max,
                "quota_remaining": max(0, quota_max - used)}  # fmt: skip
        backoff = fault[1] if name == "backoff" else self.backoff
        if backoff:
            body["backoff"] = backoff
            with self._cond:
                self._backoff_until[who] = time.monotonic() + backoff
        return self._wrap(200, body)

    def quota_used(self, who: str) -> int:
        with self._cond:
            return self._used.get(who, 0)


# ###########################################################################
# Bluesky (a PDS: createSession, refreshSession, searchPosts)
# ###########################################################################

_rkeys = itertools.count(10**12)


def bs_post(text: str = "acme is neat", handle: str = "someone.bsky.social",
            reply: bool = False, indexed: float | None = None, naive: bool = False) -> dict:  # fmt: skip
    """A postView shaped like the recorded searchPosts ones."""
    post = copy.deepcopy(_load("bluesky/searchPosts_q_redistricting.json")["body"]["posts"][0])
    indexed = indexed or time.time()
    did = f"did:plc:{handle.split('.')[0]}"
    rkey = f"3l{next(_rkeys):x}"
    created = dt.datetime.fromtimestamp(indexed - 0.2, dt.UTC)
    post.update(uri=f"at://{did}/app.bsky.feed.post/{rkey}", cid=f"bafy{rkey}",
                indexedAt=_iso(indexed).replace("Z", f".{int(indexed * 1000) % 1000:03d}Z"))  # fmt: skip
    post["author"] = {**post["author"], "did": did, "handle": handle, "labels": []}
    post["record"] = {"$type": "app.bsky.feed.post", "text": text, "langs": ["en"],
                      "createdAt": created.strftime("%Y-%m-%dT%H:%M:%S.%f") + ("" if naive else "Z")}  # fmt: skip
    if reply:
        parent = {"uri": f"at://{did}/app.bsky.feed.post/parent", "cid": "bafyparent"}
        post["record"]["reply"] = {"root": parent, "parent": parent}
    return post


def _jwt(claims: dict) -> str:
    import base64

    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'typ': 'at+jwt', 'alg': 'ES256K'})}.{part(claims)}.c2lnbmF0dXJl"


class FakeBluesky(_API):
    """A PDS: `POST /xrpc/com.atproto.server.createSession` ({identifier, password} →
    {accessJwt, refreshJwt, handle, did}; a wrong pair is 401 AuthenticationRequired),
    `POST /xrpc/com.atproto.server.refreshSession` (Bearer refreshJwt → a new
    pair; an unknown one is 400 ExpiredToken), and `GET
    /xrpc/app.bsky.feed.searchPosts` (Bearer accessJwt; `q` words in the text,
    `sort=latest`, `since` ISO, `limit`, `cursor` an offset string): an expired
    access token is 400 {"error": "ExpiredToken"}, a request without one 403, as
    Bluesky's AppView now answers. JWTs carry a real `exp` (`access_ttl`).
    Answers carry RateLimit-Limit/-Remaining/-Reset (epoch)/-Policy; over the
    limit: 429 RateLimitExceeded. `expire_tokens()` ends every access token."""

    def __init__(self, access_ttl: float = 7200) -> None:
        super().__init__()
        self.posts: list[dict] = []
        self.access_ttl = access_ttl
        self._accounts: dict[str, str] = {}
        self._access: dict[str, float] = {}  # token → expires (time.time())
        self._refresh: set[str] = set()
        self.sessions_created = 0
        self.sessions_refreshed = 0

    def add(self, *posts: dict) -> None:
        with self._cond:
            for post in posts:
                self.posts.insert(0, post)

    def add_account(self, handle: str, password: str) -> None:
        with self._cond:
            self._accounts[handle] = password

    def expire_tokens(self) -> None:
        with self._cond:
            self._access = dict.fromkeys(self._access, 0.0)

    def error(self, status: int, *more: Any) -> Response:
        code = more[0] if more else {400: "InvalidRequest", 401: "AuthenticationRequired",
                                     429: "RateLimitExceeded"}.get(status, "InternalServerError")  # fmt: skip
        message = more[1] if len(more) > 1 else code
        return Response(
            status, json.dumps({"error": code, "message": message}).encode(), dict(_JSON)
        )

    def _session(self, handle: str) -> dict:
        now = time.time()
        access = _jwt({"scope": "com.atproto.appPass", "sub": f"did:plc:{handle}", "iat": int(now),
                       "exp": int(now + self.access_ttl), "jti": os.urandom(6).hex()})  # fmt: skip
        refresh = _jwt({"scope": "com.atproto.refresh", "sub": f"did:plc:{handle}",
                        "exp": int(now + 90 * 86400), "jti": os.urandom(6).hex()})  # fmt: skip
        with self._cond:
            self._access[access] = now + self.access_ttl
            self._refresh.add(refresh)
        return {"accessJwt": access, "refreshJwt": refresh, "handle": handle,
                "did": f"did:plc:{handle}", "active": True}  # fmt: skip

    def _answer(self, request: Request, query: dict, fault: tuple | None) -> Response:
        headers = dict(_JSON)
        counted = self.count(f"address {request.peer[0]}")
        if counted:
            limit, used, reset = counted
            headers.update({"RateLimit-Limit": str(limit), "RateLimit-Remaining": str(max(0, limit - used)),
                            "RateLimit-Reset": str(math.ceil(reset)), "RateLimit-Policy": f"{limit};w=300"})  # fmt: skip
            if used > limit:
                response = self.error(429, "RateLimitExceeded", "Rate Limit Exceeded")
                response.headers.update(headers)
                return response
        auth = request.headers.get("authorization", "")
        token = auth.split(" ", 1)[1].strip() if " " in auth else ""
        if request.path == "/xrpc/com.atproto.server.createSession" and request.method == "POST":
            try:
                body = request.json()
            except ValueError:
                return self.error(400, "InvalidRequest", "Request body must be JSON")
            handle, password = body.get("identifier"), body.get("password")
            with self._cond:
                known = self._accounts.get(handle) == password and password is not None
                self.sessions_created += known
            if not known:
                return self.error(401, "AuthenticationRequired", "Invalid identifier or password")
            return Response(200, json.dumps(self._session(handle)).encode(), headers)
        if request.path == "/xrpc/com.atproto.server.refreshSession" and request.method == "POST":
            with self._cond:
                known = token in self._refresh
                self._refresh.discard(token)  # a refresh token is used once
                self.sessions_refreshed += known
            if not known:
                return self.error(400, "ExpiredToken", "Token has expired")
            handle = next(iter(self._accounts), "someone")
            return Response(200, json.dumps(self._session(handle)).encode(), headers)
        if request.path != "/xrpc/app.bsky.feed.searchPosts":
            return self.error(501, "MethodNotImplemented", "Method Not Implemented")
        if not token:
            return Response(
                403, b"Request forbidden by administrative rules", {"Content-Type": "text/plain"}
            )
        with self._cond:
            expires = self._access.get(token)
        if expires is None:
            return self.error(401, "AuthenticationRequired", "Invalid token")
        if time.time() >= expires:
            return self.error(400, "ExpiredToken", "Token has expired")
        words = str(query.get("q", "")).split()
        since = _parse_iso(query["since"]) if query.get("since") else 0.0
        with self._cond:
            found = [p for p in self.posts if _words_match(words, p["record"]["text"])
                     and _parse_iso(p["indexedAt"]) >= since]  # fmt: skip
        found.sort(key=lambda p: p["indexedAt"], reverse=True)
        limit = min(100, int(query.get("limit", 25)))
        start = int(query.get("cursor", 0))
        page = copy.deepcopy(found[start : start + limit])
        body: dict = {"posts": page}
        if start + limit < len(found):
            body["cursor"] = str(start + limit)
        return Response(200, json.dumps(body).encode(), headers)


__all__ = [
    "CORPUS",
    "FakeBluesky",
    "FakeGitHub",
    "FakeHN",
    "FakeMastodon",
    "FakeStackExchange",
    "bs_post",
    "corpus",
    "gh_issue",
    "hn_comment",
    "hn_story",
    "md_status",
    "new_id",
    "se_question",
]
