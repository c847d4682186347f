"""A loopback fake of Reddit's API, serving the real recorded answers of
../shared/corpus/reddit and listings built in the same shape.

    with FakeReddit() as reddit:
        reddit.add_client("cid", "secret")                    # a 'script' app
        reddit.listing("/r/acme/new").load("subreddit_new.json")   # a recorded listing
        reddit.listing("/r/acme/comments").add(comment(body="it crashes"))   # newest on top
        # point base_url and oauth_base_url of a reddit source at reddit.url

One server plays both hosts, as the real ones behave:

- `POST /api/v1/access_token`: HTTP Basic client id/secret and the form
  `grant_type=client_credentials` → `{"access_token", "token_type": "bearer",
  "expires_in", "scope"}` (the recorded shape); bad credentials → 401 JSON;
  another grant → 200 `{"error": "unsupported_grant_type"}`.
- With `Authorization: bearer TOKEN` (oauth.reddit.com): listings, with or without
  `.json`; an unknown or expired token → 401 JSON with `WWW-Authenticate`.
- Without it (www.reddit.com): listings only with `.json` (else an HTML page,
  as Reddit serves its website there); `block_public = True` answers every
  one with Reddit's 403 "blocked by network security" HTML page.

Without a token, Reddit's RSS/Atom listings too (`/r/X/new/.rss`,
`/r/X/comments/.rss`, `/search.rss`, `/r/X/search.rss`): the same things in the
Atom that Reddit writes (`atom_feed`), with an ETag and a 304 for a repeated
one; `block_rss = True` blocks them as `block_public` blocks `.json`. A
private feed (`?feed=TOKEN&user=NAME`, `add_feed_token`) also reads the
listings made with `private_listing`; a wrong pair is a 403.

Listings page like Reddit's: `limit` (25 by default, at most 100), `after`,
`before`, and `after`/`before` cursors in the answer. Search (`/search`,
`/r/X/search`) serves its own listing when one was set, else finds posts of
the `/new` listings whose title or text contains every word of `q`, newest
first. An unknown path is a 404 JSON.

Rate limit: `rate_limit(limit, window)` counts requests per client id (per
peer address without a token) in fixed windows, sends `X-Ratelimit-Used`,
`-Remaining` (a float string, "997.0") and `-Reset` (whole seconds), and
answers 429 once a window's budget is spent.

Faults, queued with `script([...], path=None)` (one per matching request,
token requests included when path is None or "/api/v1/access_token"):

    ("status", 503)                      Reddit's JSON error {"message", "error"}
    ("status", 403, {"reason": "private"})   extra fields merged into that JSON
    ("blocked",)                         403 HTML "blocked by network security" page
    ("html", 200)                        an HTML page with that status
    ("429", "2")                         429 HTML "Too Many Requests", Retry-After "2" (None: no header)
    ("invalid_json",)                    200 application/json, a cut-off body
    ("ratelimit", "0.0", "300")          answer normally, with these Remaining/Reset headers
    ("expired",)                         401 invalid_token, as for a token Reddit dropped
    ("recorded", "file.json")            a corpus file's status, headers and body verbatim
    ("delay", seconds) / ("drop",)       answer late / close the connection unanswered

Each record: {method, path, query, headers, auth, client, status, fault, time}.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import hashlib
import html
import itertools
import json
import math
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fakes import DEFAULT_TIMEOUT, DROP, Request, Response, _FakeServer, _predicate

CORPUS = (
    Path(
        os.environ.get("AGENTWATCH_CORPUS")
        or Path(__file__).resolve().parents[2] / "shared" / "corpus"
    )
    / "reddit"
)

BLOCKED_PAGE = b"""<!doctype html><html><head><title>Blocked</title></head><body>
<h1>whoa there, pardner!</h1>
<p>You've been blocked by network security.</p>
<p>To continue, log in to your Reddit account or use your developer token</p>
<p>If you think you've been blocked by mistake, file a ticket below and we'll look into it.</p>
</body></html>"""
TOO_MANY_PAGE = b"""<!doctype html><html><head><title>Too Many Requests</title></head><body>
<h1>whoa there, pardner!</h1><p>we're sorry, but you appear to be a bot and we've seen too
many requests from you lately.</p></body></html>"""
HTML_PAGE = b"<!doctype html><html><head><title>reddit</title></head><body>reddit</body></html>"
_HTML = {"Content-Type": "text/html; charset=UTF-8"}
_JSON = {"Content-Type": "application/json; charset=UTF-8"}
TOKEN_PATH = "/api/v1/access_token"


@functools.cache
def _load(name: str) -> dict:
    path = CORPUS / name
    if not path.exists():
        raise FileNotFoundError(
            f"Reddit corpus file {path} is missing (set AGENTWATCH_CORPUS to the corpus folder)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def corpus(name: str) -> dict:
    """One recorded answer: {request, status, headers, body}, a copy to change freely."""
    return copy.deepcopy(_load(name))


def corpus_children(name: str) -> list[dict]:
    return copy.deepcopy(_load(name)["body"]["data"]["children"])


# -- things in the recorded shape ------------------------------------------

_ids = itertools.count(36**6)


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


def new_id() -> str:
    return _base36(next(_ids))


def _template(name: str, kind: str) -> dict:
    for child in _load(name)["body"]["data"]["children"]:
        if child["kind"] == kind:
            return copy.deepcopy(child["data"])
    raise LookupError(f"no {kind} in {name}")


def post(
    title: str = "A post",
    selftext: str = "",
    author: str = "someone",
    subreddit: str = "acme",
    created: float | None = None,
    id: str | None = None,
    url: str | None = None,
) -> dict:
    """A t3 thing shaped like the recorded ones (a real post's fields, replaced)."""
    data = _template("redditor_overview_new_with_ratelimit_headers.json", "t3")
    pid = id or new_id()
    slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:40]  # as Reddit makes them
    permalink = f"/r/{subreddit}/comments/{pid}/{slug}/"
    data.update(
        id=pid, name=f"t3_{pid}", title=title, selftext=selftext, selftext_html=None,
        author=author, subreddit=subreddit, subreddit_name_prefixed=f"r/{subreddit}",
        permalink=permalink, url=url or f"https://www.reddit.com{permalink}",
        is_self=url is None, created_utc=created or time.time(), created=created or time.time(),
        crosspost_parent_list=[], num_comments=0,
    )  # fmt: skip
    data.pop("crosspost_parent", None)
    return {"kind": "t3", "data": data}


def comment(
    body: str = "A comment",
    author: str = "someone",
    subreddit: str = "acme",
    post_id: str = "abc123",
    post_title: str = "A post",
    created: float | None = None,
    id: str | None = None,
) -> dict:
    """A t1 thing shaped like the recorded ones."""
    data = _template("comments_stream_with_ratelimit_headers.json", "t1")
    cid = id or new_id()
    data.update(
        id=cid, name=f"t1_{cid}", body=body, body_html=None, author=author,
        subreddit=subreddit, subreddit_name_prefixed=f"r/{subreddit}", link_id=f"t3_{post_id}",
        parent_id=f"t3_{post_id}", link_title=post_title,
        permalink=f"/r/{subreddit}/comments/{post_id}/a_post/{cid}/",
        link_permalink=f"https://www.reddit.com/r/{subreddit}/comments/{post_id}/a_post/",
        created_utc=created or time.time(), created=created or time.time(),
    )  # fmt: skip
    return {"kind": "t1", "data": data}


def _atom_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ts))


def atom_entry(thing: dict) -> str:
    """One post or comment as an <entry> of Reddit's Atom listings: the author as
    "/u/name", the HTML of the text between SC_OFF/SC_ON markers, Reddit's
    "submitted by ... [link] [comments]" footer on posts, comments titled
    "/u/name on <post title>" and dated by <updated> only."""
    data = thing["data"]
    author = data.get("author") or "[deleted]"
    sub = data.get("subreddit", "")
    # 2016 comments carry no permalink; Reddit resolves any slug.
    permalink = data.get("permalink") or (
        f"/r/{sub}/comments/{data.get('link_id', 't3_')[3:]}/_/{data['id']}/"
    )
    link = "https://www.reddit.com" + permalink.split("?", 1)[0]
    user = f"https://www.reddit.com/user/{author}"
    if thing["kind"] == "t3":
        text, title = data.get("selftext") or "", data.get("title", "")
    else:
        text, title = data.get("body") or "", f"/u/{author} on {data.get('link_title', '')}"
    content = ""
    if text:
        content = f'<!-- SC_OFF --><div class="md"><p>{html.escape(text)}</p></div><!-- SC_ON -->'
    if thing["kind"] == "t3":
        target = data.get("url") or link
        content += (
            f' &#32; submitted by &#32; <a href="{user}"> /u/{author} </a> &#32; to &#32; '
            f'<a href="https://www.reddit.com/r/{sub}/"> r/{sub} </a> <br/> '
            f'<span><a href="{html.escape(target)}">[link]</a></span> &#32; '
            f'<span><a href="{link}">[comments]</a></span>'
        )
    stamp = _atom_time(data["created_utc"])
    published = f"<published>{stamp}</published>" if thing["kind"] == "t3" else ""
    return (
        f"<entry><author><name>/u/{html.escape(author)}</name><uri>{user}</uri></author>"
        f'<category term="{html.escape(sub)}" label="r/{html.escape(sub)}"/>'
        f'<content type="html">{html.escape(content)}</content>'
        f'<id>{data["name"]}</id><link href="{html.escape(link)}" />'
        f"<updated>{stamp}</updated>{published}<title>{html.escape(title)}</title></entry>"
    )


def atom_feed(things: list[dict], path: str) -> bytes:
    """Things (newest first) as one of Reddit's Atom listings."""
    updated = _atom_time(max((t["data"]["created_utc"] for t in things), default=0))
    return (
        '<?xml version="1.0" encoding="UTF-8"?><feed xmlns="http://www.w3.org/2005/Atom" '
        'xmlns:media="http://search.yahoo.com/mrss/">'
        f"<updated>{updated}</updated><id>{path}.rss</id>"
        f'<link rel="self" href="https://www.reddit.com{path}/.rss" type="application/atom+xml" />'
        f"<title>{html.escape(path)}</title>" + "".join(atom_entry(t) for t in things) + "</feed>"
    ).encode()


def listing_body(children: list[dict], after: str | None, before: str | None) -> dict:
    return {
        "kind": "Listing",
        "data": {
            "after": after,
            "dist": len(children),
            "modhash": "",
            "geo_filter": "",
            "children": children,
            "before": before,
        },
    }


class Listing:
    """Things newest first, as Reddit keeps /new, /comments and search by new."""

    def __init__(self, fake: FakeReddit):
        self._fake = fake
        self.things: list[dict] = []

    def add(self, *things: dict) -> Listing:
        """New things arrive on top; pass them oldest first, as they were made."""
        with self._fake._cond:
            for thing in things:
                self.things.insert(0, thing)
        return self

    def load(self, name: str) -> Listing:
        """Append a recorded listing's children (already newest first) at the bottom."""
        with self._fake._cond:
            self.things.extend(corpus_children(name))
        return self

    def page(self, query: dict[str, str]) -> dict:
        limit = max(1, min(100, int(query.get("limit") or 25)))
        names = [t["data"]["name"] for t in self.things]
        if after := query.get("after"):
            start = names.index(after) + 1 if after in names else len(names)
            chosen = self.things[start : start + limit]
            more_older = start + limit < len(names)
            more_newer = start > 0
        elif before := query.get("before"):
            end = names.index(before) if before in names else 0
            start = max(0, end - limit)
            chosen = self.things[start:end]
            more_older, more_newer = True, start > 0
        else:
            chosen = self.things[:limit]
            more_older, more_newer = limit < len(names), False
        first = chosen[0]["data"]["name"] if chosen else None
        last = chosen[-1]["data"]["name"] if chosen else None
        return listing_body(
            copy.deepcopy(chosen), last if more_older else None, first if more_newer else None
        )


class FakeReddit(_FakeServer):
    """See the module docstring."""

    def __init__(self, token_ttl: float = 3600) -> None:
        super().__init__()
        self.token_ttl = token_ttl
        self.block_public = False
        self.block_rss = False
        self._feed_tokens: dict[str, str] = {}  # user → private feed token
        self._private: dict[str, Listing] = {}
        self._clients: dict[str, str] = {}
        self._tokens: dict[str, tuple[str, float]] = {}  # token → (client id, expires, monotonic)
        self._listings: dict[str, Listing] = {}
        self._requests: list[dict] = []
        self._scripts: dict[str | None, deque] = {}
        self._rate: tuple[int, float] | None = None
        self._windows: dict[str, tuple[float, int]] = {}  # client key → (window start, used)

    def start(self):
        super().start()
        # socketserver listens with a backlog of 5: ten sources connecting at
        # once would see SYNs dropped and retried a second later.
        self._server.socket.listen(128)
        return self

    # -- programming -------------------------------------------------------

    def add_client(self, client_id: str, secret: str) -> None:
        with self._cond:
            self._clients[client_id] = secret

    def add_feed_token(self, user: str, token: str) -> None:
        """A user's private RSS feed token (reddit.com/prefs/feeds)."""
        with self._cond:
            self._feed_tokens[user] = token

    def private_listing(self, path: str) -> Listing:
        """A listing only a private feed (`?feed=&user=`) may read, as a private subreddit."""
        with self._cond:
            return self._private.setdefault(path.rstrip("/"), Listing(self))

    def listing(self, path: str) -> Listing:
        """The listing served at `path` ("/r/acme/new", "/r/acme/comments", "/search"...),
        created empty (a quiet subreddit) on first use."""
        with self._cond:
            return self._listings.setdefault(path.rstrip("/"), Listing(self))

    def script(self, faults: Iterable[tuple], path: str | None = None) -> None:
        with self._cond:
            self._scripts.setdefault(path, deque()).extend(tuple(f) for f in faults)

    def rate_limit(self, limit: int | None, window: float = 600) -> None:
        """Reddit's per-client budget: `limit` requests per fixed `window` seconds; None: off."""
        with self._cond:
            self._rate = (limit, window) if limit is not None else None
            self._windows.clear()

    def revoke_tokens(self) -> None:
        """Drop every issued token, as Reddit does when one expires."""
        with self._cond:
            self._tokens.clear()

    # -- reading -----------------------------------------------------------

    def requests(self, path: str | None = None) -> list[dict]:
        with self._cond:
            return [dict(r) for r in self._requests if path in (None, r["path"])]

    def hits(self, path: str | None = None, status: int | None = None) -> int:
        return sum(1 for r in self.requests(path) if status in (None, r["status"]))

    def token_requests(self) -> int:
        return self.hits(TOKEN_PATH)

    def wait_for(self, n_or_predicate: int | Callable, timeout: float = DEFAULT_TIMEOUT,
                 path: str | None = None):  # fmt: skip
        """Block until `n` requests (to `path`) were answered, or the predicate holds."""
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

    # -- serving -----------------------------------------------------------

    def _handle(self, request: Request) -> Response | object:
        split = urlsplit(request.target)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        auth = request.headers.get("authorization", "")
        entry = self._record(
            self._requests,
            {
                "method": request.method, "path": request.path, "query": query,
                "headers": request.headers, "auth": auth.split(" ", 1)[0].lower() or None,
                "client": None, "status": None, "fault": None, "time": time.time(),
            },
        )  # fmt: skip
        with self._cond:
            queue = self._scripts.get(request.path) or self._scripts.get(None)
            fault = queue.popleft() if queue else None
        response = self._answer(request, query, auth, entry, fault)
        self._update(entry, status=None if response is DROP else response.status, fault=fault)
        return response

    def _answer(self, request: Request, query: dict, auth: str, entry: dict,
                fault: tuple | None) -> Response | object:  # fmt: skip
        name = fault[0] if fault else None
        if name == "delay":
            self._sleep(fault[1])
        elif name == "drop":
            return DROP
        elif name == "status":
            extra = fault[2] if len(fault) > 2 else {}
            return _error(fault[1], extra)
        elif name == "blocked":
            return Response(403, BLOCKED_PAGE, dict(_HTML))
        elif name == "html":
            return Response(fault[1], HTML_PAGE, dict(_HTML))
        elif name == "429":
            headers = dict(_HTML)
            if fault[1] is not None:
                headers["Retry-After"] = fault[1]
            return Response(429, TOO_MANY_PAGE, headers)
        elif name == "invalid_json":
            return Response(200, b'{"kind": "Listing", "data": {"children": [{"ki', dict(_JSON))
        elif name == "expired":
            return _unauthorized()
        elif name == "recorded":
            recorded = _load(fault[1])
            headers = {"Content-Type": "application/json; charset=UTF-8"}
            headers.update({k: v for k, v in recorded["headers"].items() if k != "content-type"})
            return Response(recorded["status"], json.dumps(recorded["body"]).encode(), headers)

        if request.path == TOKEN_PATH:
            return self._token(request, auth)

        # A listing: who is asking decides the host's rules and the rate budget.
        if auth.lower().startswith("bearer "):
            with self._cond:
                client, expires = self._tokens.get(auth[7:].strip(), (None, 0.0))
            if client is None or time.monotonic() >= expires:
                return _unauthorized()
            key = client
            self._update(entry, client=client)
            path = request.path.removesuffix(".json")
        elif request.path.endswith(".rss"):
            return self._feed(request, query)
        else:
            if self.block_public:
                return Response(403, BLOCKED_PAGE, dict(_HTML))
            if not request.path.endswith(".json"):
                return Response(200, HTML_PAGE, dict(_HTML))  # the website, not the API
            key = f"address {request.peer[0]}"
            path = request.path.removesuffix(".json")
        if request.method != "GET":
            return _error(405)

        headers = dict(_JSON)
        limited = self._count(key, headers)
        if name == "ratelimit":
            headers.update({"x-ratelimit-remaining": fault[1], "x-ratelimit-reset": fault[2]})
        if limited:
            return Response(429, TOO_MANY_PAGE, {**_HTML, **headers})
        body = self._listing_answer(path.rstrip("/"), query)
        if body is None:
            return _error(404)
        return Response(200, json.dumps(body).encode(), headers)

    def _count(self, key: str, headers: dict) -> bool:
        """Count one request against `key`'s window; True when over the budget."""
        with self._cond:
            if self._rate is None:
                return False
            limit, window = self._rate
            now = time.time()
            start = math.floor(now / window) * window
            was, used = self._windows.get(key, (start, 0))
            used = used + 1 if was == start else 1
            self._windows[key] = (start, used)
        headers["x-ratelimit-used"] = str(used)
        headers["x-ratelimit-remaining"] = f"{max(0, limit - used):.1f}"
        headers["x-ratelimit-reset"] = str(max(1, math.ceil(start + window - now)))
        return used > limit

    def _feed(self, request: Request, query: dict) -> Response:
        """An RSS/Atom listing, public or private, with an ETag."""
        if self.block_rss:
            return Response(403, BLOCKED_PAGE, dict(_HTML))
        private = False
        if "feed" in query or "user" in query:
            with self._cond:
                known = self._feed_tokens.get(query.get("user", ""))
            if known is None or known != query.get("feed"):
                return Response(403, BLOCKED_PAGE, dict(_HTML))
            private = True
        headers = {"Content-Type": "application/atom+xml; charset=UTF-8"}
        if self._count(f"address {request.peer[0]}", headers):
            return Response(429, TOO_MANY_PAGE, {**_HTML, **headers})
        path = request.path.removesuffix(".rss").rstrip("/")
        with self._cond:
            listing = self._private.get(path) if private else None
        if listing is not None:
            with self._cond:
                body = listing.page(query)
        else:
            body = self._listing_answer(path, query)
        if body is None:
            return _error(404)
        feed = atom_feed(body["data"]["children"], path)
        headers["ETag"] = '"' + hashlib.sha1(feed).hexdigest()[:16] + '"'
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(304, b"", headers)
        return Response(200, feed, headers)

    def _listing_answer(self, path: str, query: dict) -> dict | None:
        with self._cond:
            listing = self._listings.get(path)
            if listing is not None:
                return listing.page(query)
            if path.endswith("/search"):
                return self._search(path, query)
        return None

    def _search(self, path: str, query: dict) -> dict:
        words = (query.get("q") or "").lower().split()
        sub = path.removesuffix("/search")
        restrict = query.get("restrict_sr") in ("1", "true", "on") and sub
        found = []
        for where, listing in self._listings.items():
            if not where.endswith("/new") or (restrict and where != f"{sub}/new"):
                continue
            for thing in listing.things:
                text = f"{thing['data'].get('title', '')} {thing['data'].get('selftext', '')}"
                if thing["kind"] == "t3" and all(w in text.lower() for w in words):
                    found.append(thing)
        found.sort(key=lambda t: -t["data"]["created_utc"])
        results = Listing(self)
        results.things = found
        return results.page(query)

    def _token(self, request: Request, auth: str) -> Response:
        if request.method != "POST":
            return _error(405)
        client_id = secret = None
        if auth.lower().startswith("basic "):
            with contextlib.suppress(ValueError):  # UnicodeDecodeError is one
                client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        with self._cond:
            known = client_id is not None and self._clients.get(client_id) == secret
        if not known:
            return _error(401)
        form = {k: v[-1] for k, v in parse_qs(request.body.decode()).items()}
        if form.get("grant_type") != "client_credentials":
            return Response(200, json.dumps({"error": "unsupported_grant_type"}).encode(), _JSON)
        token = "tok-" + secrets.token_hex(8)
        with self._cond:
            self._tokens[token] = (client_id, time.monotonic() + self.token_ttl)
        body = dict(_load("access_token.json")["body"])
        body.update(access_token=token, expires_in=self.token_ttl)
        return Response(200, json.dumps(body).encode(), dict(_JSON))


def _error(status: int, extra: dict | None = None) -> Response:
    from http import HTTPStatus

    message = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    body = {"message": message, "error": status, **(extra or {})}
    return Response(status, json.dumps(body).encode(), dict(_JSON))


def _unauthorized() -> Response:
    headers = {**_JSON, "WWW-Authenticate": 'Bearer realm="reddit", error="invalid_token"'}
    return Response(401, json.dumps({"message": "Unauthorized", "error": 401}).encode(), headers)
