"""Reddit: new posts and comments of a subreddit, and searches sorted by new.

Reddit answers trouble in many shapes: a 403 JSON for a private subreddit, a
403 HTML page when it blocks a server, a 429 HTML page, a 200 HTML page where
JSON was expected, a redirect to a search when a subreddit does not exist.
Every failed poll lands on one rung of the access ladder (the StageError's
kind: blocked, rate_limited, auth_failed, unreachable, server_error,
bad_response) with a message saying what the user can do, so a silent Reddit
source always has a reason in the log, in `status` and in /health.

The rungs, best first: OAuth (client_id/client_secret); the public JSON
endpoints; Reddit's RSS/Atom listings, which a source without OAuth falls back
to when Reddit blocks its JSON (since May 2026 it does, for unauthenticated
requests) and keeps for a day before trying JSON again; a user's private feed
(feed_token/feed_user), read as RSS from the start. Every rung gives the same
item ids (fullnames), so moving between them posts nothing twice. All requests
of the process without OAuth share one pace (`anonymous_pace`); a listing the
pace has no room for in this poll is read first in the next one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from agentwatch import (
    Duration,
    Fetched,
    Item,
    PermanentError,
    Secret,
    Source,
    TransientError,
    __version__,
    entry_time,
    feed_entries,
    html_to_text,
    parse_retry_after,
    source,
)

REDDIT_WEB = "https://www.reddit.com"  # permalinks point here, whatever base_url says
REDDIT_APPS = "https://www.reddit.com/prefs/apps"
REDDIT_USER_AGENT = f"python:agentwatch:v{__version__} (by /u/agentwatch)"
REDDIT_PAGE = 100  # the largest page Reddit serves
REDDIT_MAX_PAGES = 10  # Reddit serves no listing past about 1,000 items anyway
REDDIT_LOW_WATER = 0.1  # pace requests once less than this share of the window is left
REDDIT_PENALTY = 60.0  # seconds to hold off after a 429 that says nothing about how long
REDDIT_FEEDS = "https://www.reddit.com/prefs/feeds"
REDDIT_REPROBE = 86400.0  # seconds on RSS after the public JSON was blocked, before trying it again
RUNGS = {"oauth": "OAuth", "public": "public JSON", "rss": "RSS", "private": "private RSS feed"}
_SUBREDDIT = re.compile(r"^[A-Za-z0-9_]{2,21}(\+[A-Za-z0-9_]{2,21})*$")
_REDDIT_UA = re.compile(r"^[^\s:]+:[^\s:]+:[^\s:]+ \(by /u/[A-Za-z0-9_-]{3,20}\)$")


def _reddit_url(permalink: str) -> str:
    path = permalink.split("?", 1)[0]  # search results carry ?ref=search_posts
    return path if path.startswith("http") else REDDIT_WEB + "/" + path.lstrip("/")


def reddit_item(kind: str, data: dict) -> Item | None:
    """One post (t3) or comment (t1) of a listing; None for anything else."""
    name = data.get("name") or (f"{kind}_{data['id']}" if data.get("id") else "")
    if not isinstance(name, str) or not name.startswith(kind + "_"):
        return None
    subreddit = str(data.get("subreddit") or "")
    created = data.get("created_utc")
    published = float(created) if isinstance(created, int | float) else None
    author = str(data.get("author") or "")  # "[deleted]" stays: the text is still there
    if kind == "t3":
        permalink = data.get("permalink") or f"/r/{subreddit}/comments/{name[3:]}/"
        extra = {"subreddit": subreddit}
        link = data.get("url")
        if not data.get("is_self") and isinstance(link, str) and link:
            extra["link"] = link if link.startswith("http") else _reddit_url(link)
        title, body, word = data.get("title"), data.get("selftext"), "post"
    else:
        post = str(data.get("link_id") or "")
        # Older listings carry no permalink; Reddit resolves any slug, "_" included.
        permalink = data.get("permalink") or f"/r/{subreddit}/comments/{post[3:]}/_/{name[3:]}/"
        extra = {"subreddit": subreddit, "post": post}
        title, body, word = data.get("link_title"), data.get("body"), "comment"
    return Item(
        item_id=name,
        title=str(title or ""),
        url=_reddit_url(str(permalink)),
        author=author,
        published_at=published,
        body=str(body or ""),
        kind=word,
        extra=extra,
    )


def reddit_items(listing: Any) -> tuple[list[Item], str | None]:
    """The posts and comments of one Listing, newest first, and its `after`
    cursor. Pure: tested on recorded answers."""
    data = listing.get("data") if isinstance(listing, dict) else None
    if (
        not isinstance(listing, dict)
        or listing.get("kind") != "Listing"
        or not isinstance(data, dict)
        or not isinstance(data.get("children"), list)
    ):
        raise TransientError(
            f"Reddit answered JSON that is not a listing ({json.dumps(listing)[:120]}): "
            "usually a passing glitch; agentwatch retries",
            kind="bad_response",
        )
    items, seen = [], set()
    for child in data["children"]:
        if not isinstance(child, dict) or not isinstance(child.get("data"), dict):
            continue
        if child.get("kind") not in ("t3", "t1"):
            continue  # "more" stubs, subreddits (t5) ...
        item = reddit_item(child["kind"], child["data"])
        if item is not None and item.item_id not in seen:
            seen.add(item.item_id)
            items.append(item)
    after = data.get("after")
    return items, after if isinstance(after, str) and after else None


# In Reddit's Atom listings: the text between these markers, the [link] of a post.
_TEXT_MARKERS = re.compile(r"<!-- SC_OFF -->(.*?)<!-- SC_ON -->", re.DOTALL)
_LINK_ANCHOR = re.compile(r'<a href="([^"]+)">\[link\]</a>')
_POST_OF_COMMENT = re.compile(r"/comments/([a-z0-9]+)/", re.IGNORECASE)


def reddit_feed_item(entry: Any) -> Item | None:
    """One entry of an RSS/Atom listing, as the JSON rungs would give it: the same
    fullname, permalink, author and subreddit; a comment's title is its post's
    title. None for an entry that is not a post or a comment."""
    name = str(entry.get("id") or "")
    kind = name[:3]
    if kind not in ("t3_", "t1_") or len(name) < 4:
        return None
    author = str(entry.get("author") or "").strip().removeprefix("/u/")
    tags = entry.get("tags") or [{}]
    subreddit = str(tags[0].get("term") or "")
    content = entry.get("content") or [{}]
    html = str(content[0].get("value") or entry.get("summary") or "")
    marked = _TEXT_MARKERS.search(html)
    body = html_to_text(marked.group(1)) if marked else ""
    url = _reddit_url(str(entry.get("link") or ""))
    title = str(entry.get("title") or "")
    extra = {"subreddit": subreddit}
    if kind == "t3_":
        anchor = _LINK_ANCHOR.search(html)
        link = html_to_text(anchor.group(1)) if anchor else ""
        link = link if link.startswith("http") or not link else _reddit_url(link)
        if link and link != url:
            extra["link"] = link
        word = "post"
    else:
        title = title.removeprefix(f"/u/{author} on ")
        post = _POST_OF_COMMENT.search(url)
        extra["post"] = f"t3_{post.group(1)}" if post else ""
        word = "comment"
    return Item(
        item_id=name, title=title, url=url, author=author, published_at=entry_time(entry),
        body=body, kind=word, extra=extra,
    )  # fmt: skip


def reddit_feed_items(body: bytes, headers: Any = None, where: str = "") -> list[Item]:
    """The posts and comments of one RSS/Atom listing, newest first. Pure: tested on
    listings rendered from recorded answers."""
    items, seen = [], set()
    for entry in feed_entries(body, dict(headers or {}), where):
        item = reddit_feed_item(entry)
        if item is not None and item.item_id not in seen:
            seen.add(item.item_id)
            items.append(item)
    return items


class _PublicBlocked(PermanentError):
    """Reddit blocks the public JSON endpoints here: time for the RSS rung."""

    def __init__(self, detail: str):
        super().__init__(
            f"Reddit blocks unauthenticated requests from this server ({detail})", kind="blocked"
        )
        self.detail = detail


def _header_float(headers: Any, name: str) -> float | None:
    try:
        return float(headers.get(name))  # "997.0": Reddit sends floats as strings
    except (TypeError, ValueError):
        return None


@source("reddit")
class RedditSource(Source):
    """New posts and comments of a subreddit, and a search sorted by new, through
    app-only OAuth (client_id/client_secret), else the public JSON endpoints or
    Reddit's RSS listings, or a user's private feed (feed_token/feed_user)."""

    @dataclass(frozen=True)
    class Options:
        subreddit: str = ""
        comments: bool = False
        query: str = ""
        client_id: str = ""
        client_secret: str = ""
        user_agent: str = REDDIT_USER_AGENT
        base_url: str = "https://www.reddit.com"
        oauth_base_url: str = "https://oauth.reddit.com"
        feed_token: Secret = Secret("")
        feed_user: str = ""
        anonymous_pace: Duration = Duration(60)

        def __post_init__(self):
            subreddit = re.sub(r"^/?r/", "", self.subreddit.strip()).strip("/")
            object.__setattr__(self, "subreddit", subreddit)
            if subreddit and not _SUBREDDIT.match(subreddit):
                raise ValueError(
                    f"subreddit must be a name such as 'selfhosted' (or 'a+b'), got {subreddit!r}"
                )
            if not subreddit and not self.query:
                raise ValueError("a reddit source needs a subreddit, a query, or both")
            if self.comments and not subreddit:
                raise ValueError("comments = true needs a subreddit")
            if bool(self.client_id) != bool(self.client_secret):
                raise ValueError(
                    "client_id and client_secret go together: both from the 'script' app "
                    f"at {REDDIT_APPS}, or neither"
                )
            if bool(self.feed_token) != bool(self.feed_user):
                raise ValueError(
                    f"feed_token and feed_user go together: both from {REDDIT_FEEDS} "
                    "(the feed= and user= of any private feed's link), or neither"
                )
            if self.feed_token and self.client_id:
                raise ValueError(
                    "feed_token/feed_user and client_id/client_secret are two ways into "
                    "Reddit: set one pair (OAuth, when you have an approved app)"
                )
            object.__setattr__(self, "feed_user", self.feed_user.strip().removeprefix("u/"))
            if self.anonymous_pace < 1:
                raise ValueError(
                    f'anonymous_pace must be at least "1s", got {self.anonymous_pace:g}s'
                )
            if not _REDDIT_UA.match(self.user_agent):
                raise ValueError(
                    "user_agent must have Reddit's form '<platform>:<app id>:<version> "
                    f"(by /u/<username>)', got {self.user_agent!r}"
                )
            for key in ("base_url", "oauth_base_url"):
                url = getattr(self, key).rstrip("/")
                if not re.match(r"^https?://[^/]+", url):
                    raise ValueError(f"{key} must start with http:// or https://, got {url!r}")
                object.__setattr__(self, key, url)

    @property
    def oauth(self) -> bool:
        return bool(self.options.client_id)

    def rung(self) -> str:
        """Which way into Reddit this poll takes (a key of RUNGS)."""
        if self.oauth:
            return "oauth"
        if self.options.feed_token:
            return "private"
        blocked_at = self.state.get("json_blocked_at") or 0
        return "rss" if time.time() - blocked_at < REDDIT_REPROBE else "public"

    def listings(self) -> list[tuple[str, str, dict]]:
        """(state key, path, parameters) of each listing one poll reads. A query
        replaces the new-posts listing: restricted to the subreddit, it is that
        listing filtered by Reddit's search. Reddit's search finds posts only."""
        o = self.options
        sub = f"/r/{o.subreddit}" if o.subreddit else ""
        found = []
        if o.query:
            params = {"q": o.query, "sort": "new", "t": "all", "type": "link"}
            if sub:
                params["restrict_sr"] = "1"
            found.append(("search", f"{sub}/search", params))
        else:
            found.append(("posts", f"{sub}/new", {}))
        if o.comments:
            found.append(("comments", f"{sub}/comments", {}))
        return found

    def describe(self) -> str:
        o = self.options
        watched = []
        if o.query:
            where = f"in r/{o.subreddit}" if o.subreddit else "site-wide"
            watched.append(f"search {o.query!r} {where}")
        else:
            watched.append(f"r/{o.subreddit} new posts")
        if o.comments:
            watched.append(f"r/{o.subreddit} new comments")
        if self.oauth:
            access = f"OAuth as client id {o.client_id}"
        elif o.feed_token:
            access = f"the private RSS feed of u/{o.feed_user}"
        else:
            access = "public JSON, else RSS; no OAuth"
        return f"{' + '.join(watched)} ({access})"

    @staticmethod
    def describe_state(state: dict) -> str:
        parts = []
        if mode := RUNGS.get(state.get("mode", "")):
            parts.append(mode + (f" ({why})" if (why := _why(state)) else ""))
        for key, word in (("posts", "post"), ("search", "search hit"), ("comments", "comment")):
            newest = (state.get(key) or {}).get("newest")
            if newest:
                parts.append(f"newest {word} {_age(time.time() - newest)} ago")
            elif key in state:
                parts.append(f"no {word} yet")
        if "requests" in state:
            parts.append(f"{state['requests']} request(s) last poll")
        if state.get("deferred"):
            parts.append(f"{state['deferred']} listing(s) left for the next poll by anonymous_pace")
        return "; ".join(parts)

    # --- polling -------------------------------------------------------------

    async def poll(self) -> list[Item]:
        self.requests = 0
        rung = self.rung()
        try:
            items = await self._read_listings(rung)
        except _PublicBlocked as e:
            self.state["json_blocked_at"] = time.time()
            self.state["json_blocked"] = e.detail
            rung = "rss"
            self.log.warning(
                "%s: Reddit blocks its public JSON here (%s); reading its RSS listings "
                "instead, and trying JSON again in a day", self.name, e.detail,
            )  # fmt: skip
            items = await self._read_listings(rung)
        if rung == "public" and self.state.pop("json_blocked_at", None):
            self.log.info("%s: Reddit's public JSON answers again; reading it", self.name)
            self.state.pop("json_blocked", None)
        if self.state.get("mode") != rung:
            self.log.info("%s: reading Reddit through %s: %s", self.name, RUNGS[rung],
                          self.describe())  # fmt: skip
        self.state["mode"] = rung
        self.state["requests"] = self.requests
        return items

    async def _read_listings(self, rung: str) -> list[Item]:
        """Each listing once. Without OAuth the listings are read least recently
        read first, and one the shared pace has no room for before this poll's
        deadline is left for the next poll rather than failing this one.

        The engine's baseline is the source's first poll: a listing the pace left
        out of it is first read later, and what it holds then is a baseline of
        its own, kept out of this and every later poll by its creation time."""
        listings = self.listings()
        first_poll = not any(key in self.state for key, _, _ in listings)
        if rung != "oauth":
            listings.sort(key=lambda listing: (self.state.get(listing[0]) or {}).get("read_at", 0))
        items: list[Item] = []
        deferred = 0
        for key, path, params in listings:
            late_first_read = not first_poll and key not in self.state
            try:
                if rung in ("rss", "private"):
                    found = await self._read_feed(key, path, params, rung)
                else:
                    found = await self._read(key, path, params)
            except TransientError as e:
                if rung == "oauth" or e.kind != "rate_limited" or self._penalized():
                    raise
                deferred += 1
                continue
            if late_first_read and found:
                self.state[key]["baseline_until"] = self.state[key]["newest"]
            if cutoff := self.state[key].get("baseline_until"):
                found = [i for i in found if i.published_at and i.published_at > cutoff]
            items += found
        self.state["deferred"] = deferred
        return items

    def _penalized(self) -> bool:
        """Whether Reddit itself asked this server to wait (a 429), not just the pace."""
        return time.monotonic() < self.budget.penalty_until

    async def _read(self, key: str, path: str, params: dict) -> list[Item]:
        """Everything newer than what the last poll saw: pages back (`after`) until
        a page reaches it, at most REDDIT_MAX_PAGES. Only the very first poll of a
        listing reads one page (the baseline); a listing that was empty last time
        is paged through like any other, so a burst into it is not cut to a page.
        Comparing creation times rather than ids keeps working when the newest
        item seen is deleted."""
        polled_before = key in self.state
        newest_seen = (self.state.get(key) or {}).get("newest") or 0.0
        items: list[Item] = []
        after = None
        for _ in range(REDDIT_MAX_PAGES):
            query = {**params, "limit": REDDIT_PAGE, "raw_json": 1}
            if after:
                query.update(after=after, count=len(items))
            found, after = reddit_items(await self._get(path, query))
            items += found
            if not polled_before or not after or not found:
                break
            if any(i.published_at is None or i.published_at <= newest_seen for i in found):
                break
        else:
            self.log.warning(
                "%s: more than %d new items in %s since the last poll; older ones were skipped",
                self.name, len(items), path,
            )  # fmt: skip
        self._remember(key, items, newest_seen)
        return items

    def _remember(self, key: str, items: list[Item], newest_seen: float) -> None:
        stamps = [i.published_at for i in items if i.published_at is not None]
        newest = max([*stamps, newest_seen]) or None
        self.state[key] = {**(self.state.get(key) or {}), "newest": newest, "read_at": time.time()}

    async def _read_feed(self, key: str, path: str, params: dict, rung: str) -> list[Item]:
        """A listing's RSS/Atom form: one request of the newest REDDIT_PAGE
        entries (the feeds have no cursor to page back with), conditional."""
        o = self.options
        polled_before = key in self.state
        newest_seen = (self.state.get(key) or {}).get("newest") or 0.0
        url = o.base_url + (path + ".rss" if path.endswith("/search") else path + "/.rss")
        query = {**params, "limit": REDDIT_PAGE}
        if rung == "private":
            query.update(feed=o.feed_token, user=o.feed_user)
        fetched = await self.budget.fetch(
            url, what="Reddit", params=query, conditional=f"rss:{key}",
            headers={"User-Agent": o.user_agent, "Accept": "application/atom+xml"},
        )  # fmt: skip
        self.requests += 1
        if fetched.status == 304:
            self._remember(key, [], newest_seen)
            return []
        items = self._decode_feed(fetched, path, rung)
        if (
            polled_before
            and len(items) >= REDDIT_PAGE
            and all(i.published_at and i.published_at > newest_seen for i in items)
        ):
            self.log.warning(
                "%s: more than %d new items in %s since the last poll and RSS cannot page "
                "back: older ones may be missed (poll more often, or set up OAuth)",
                self.name, len(items), path,
            )  # fmt: skip
        self._remember(key, items, newest_seen)
        return items

    @property
    def budget(self):
        key = self.options.client_id  # "" without OAuth: Reddit then counts per address
        who = f"client id {key}" if key else "this server (no client_id)"
        budget = self.rate_budget(f"reddit:{key}", what=who, low_water=REDDIT_LOW_WATER)
        if not key:
            budget.pace(self.options.anonymous_pace)
        return budget

    @property
    def token(self):
        o = self.options
        secret = hashlib.sha256(o.client_secret.encode()).hexdigest()
        return self.token_cache(f"reddit:{o.base_url}:{o.client_id}:{secret}")

    async def _get(self, path: str, params: dict) -> Any:
        """One listing through the access ladder: parsed JSON, or a StageError
        that says what went wrong and what to do. A 401 gets one fresh token."""
        o = self.options
        stale = None
        for attempt in range(2):
            headers = {"User-Agent": o.user_agent, "Accept": "application/json"}
            if self.oauth:
                stale = await self.token.get(self._new_token, stale)
                headers["Authorization"] = f"bearer {stale}"
                url = o.oauth_base_url + path
            else:
                url = o.base_url + path + ".json"
            fetched = await self.budget.fetch(url, what="Reddit", params=params, headers=headers)
            self.requests += 1
            if fetched.status != 401 or not self.oauth:
                return self._decode(fetched, path)
            if attempt:
                break
            self.log.info("%s: Reddit refused the access token (401); getting a new one",
                          self.name)  # fmt: skip
        raise PermanentError(
            "Reddit refused a freshly issued access token (401): the app may have been "
            f"deleted or suspended; check it at {REDDIT_APPS}",
            kind="auth_failed",
        )

    async def _new_token(self) -> tuple[str, float | None]:
        """An app-only token (client credentials), for the token cache."""
        o = self.options
        url = o.base_url + "/api/v1/access_token"
        fetched = await self.budget.fetch(
            url, what="Reddit", method="POST", auth=(o.client_id, o.client_secret),
            data={"grant_type": "client_credentials"},
            headers={"User-Agent": o.user_agent, "Accept": "application/json"},
        )  # fmt: skip
        self.requests += 1
        if fetched.status in (400, 401):
            raise PermanentError(
                f"Reddit refused client_id/client_secret ({fetched.status}): copy both "
                f"again from {REDDIT_APPS} (the client id is the string under the app's "
                "name; the app must be a 'script' app)",
                kind="auth_failed",
            )
        answer = self._decode(fetched, "/api/v1/access_token")
        if not isinstance(answer, dict) or answer.get("error"):
            error = answer.get("error") if isinstance(answer, dict) else answer
            raise PermanentError(
                f"Reddit refused an app-only token ({error}): the app at {REDDIT_APPS} "
                "must be a 'script' (or 'web') app, not an 'installed app'",
                kind="auth_failed",
            )
        value = answer.get("access_token")
        if not isinstance(value, str) or not value:
            raise TransientError(
                "Reddit's token answer carries no access_token; agentwatch retries",
                kind="bad_response",
            )
        lifetime = answer.get("expires_in")
        return value, float(lifetime) if isinstance(lifetime, int | float) else None

    def _blocked(self, detail: str, rung: str = "") -> PermanentError:
        if rung == "private":
            return PermanentError(
                f"Reddit refused the private feed of u/{self.options.feed_user} ({detail}): "
                f"copy feed_token and feed_user again from a feed link at {REDDIT_FEEDS} "
                "(feed= and user= of the URL)",
                kind="auth_failed",
            )
        if rung == "rss":
            return PermanentError(
                f"Reddit blocks both its public JSON and its RSS listings for this server "
                f"({detail}): create a 'script' app at {REDDIT_APPS} and set client_id and "
                f"client_secret, or set feed_token and feed_user from {REDDIT_FEEDS}",
                kind="blocked",
            )
        if not self.oauth:
            return _PublicBlocked(detail)
        return PermanentError(
            f"Reddit blocked this server's requests although they carry an OAuth token "
            f"({detail}): make user_agent unique ('<platform>:<app id>:<version> "
            "(by /u/<your username>)'); if it persists, Reddit blocks this server's "
            "network and agentwatch must run elsewhere",
            kind="blocked",
        )

    def _decode(self, fetched: Fetched, path: str) -> Any:
        """The JSON of a 200 answer, or the access ladder's error for anything else."""
        body = fetched.body
        html = "html" in fetched.headers.get("content-type", "").lower() or (
            body.lstrip()[:1] == b"<"
        )
        try:
            data = None if html else json.loads(body)
        except ValueError:
            data = None
        reason = data.get("reason") if isinstance(data, dict) else None
        self._check(fetched, path, html, reason)
        if html:
            raise self._blocked("200 with an HTML page where JSON was expected")
        if data is None:
            preview = body[:60].decode("utf-8", "replace")
            raise TransientError(
                f"Reddit's answer to {path} is not valid JSON ({len(body)} bytes: {preview!r}): "
                "usually a passing glitch; agentwatch retries",
                kind="bad_response",
            )
        return data

    def _decode_feed(self, fetched: Fetched, path: str, rung: str) -> list[Item]:
        """The items of a 200 RSS/Atom answer, or the ladder's error for anything else."""
        html = "html" in fetched.headers.get("content-type", "").lower()
        self._check(fetched, path, html, None, rung)
        if html:
            raise self._blocked("200 with an HTML page where a feed was expected", rung)
        return reddit_feed_items(fetched.body, fetched.headers, f"Reddit's feed of {path}")

    def _check(self, fetched: Fetched, path: str, html: bool, reason: Any, rung: str = "") -> None:
        """The access ladder's error for an answer that is not a 200."""
        status = fetched.status
        sub = f"r/{self.options.subreddit}"
        if status == 429:
            retry_after = parse_retry_after(fetched.headers.get("retry-after"))
            if retry_after is None:
                retry_after = _header_float(fetched.headers, "x-ratelimit-reset")
            retry_after = REDDIT_PENALTY if retry_after is None else retry_after
            self.budget.penalize(retry_after)
            raise TransientError(
                f"Reddit rate-limited {self.budget.who} (429) and asked to wait "
                f"{retry_after:.0f}s. If it recurs, poll less often (`every`) or watch "
                "fewer subreddits with this client id",
                retry_after=retry_after,
                kind="rate_limited",
            )
        if status == 401:  # with OAuth, _get and _token deal with it first
            raise self._blocked("401, it asks for authentication", rung)
        if status == 403 and reason:
            raise PermanentError(
                f"Reddit refuses to show {sub}: it is {reason} (403). A private, quarantined "
                "or banned subreddit cannot be watched with an app-only token",
                kind="blocked",
            )
        if status == 403:
            raise self._blocked("403" + (", an HTML page" if html else ""), rung)
        if status == 404 or "/subreddits/search" in fetched.url:
            if reason == "banned":
                raise PermanentError(f"{sub} is banned on Reddit (404)", kind="blocked")
            raise PermanentError(
                f"Reddit has no {sub} (404 for {path}): check `subreddit`", kind="bad_response"
            )
        if status >= 500:
            raise TransientError(
                f"Reddit answered {status} (server error): Reddit is having trouble; "
                "agentwatch retries with backoff",
                kind="server_error",
            )
        if status != 200:
            raise TransientError(
                f"Reddit answered {status} to {path}: unexpected; agentwatch retries",
                kind="bad_response",
            )


def _why(state: dict) -> str:
    """Why a source is on its rung, for `status`."""
    if state.get("mode") == "rss" and state.get("json_blocked_at"):
        return (
            f"Reddit blocked the public JSON {_age(time.time() - state['json_blocked_at'])} ago "
            f"({state.get('json_blocked', 'blocked')}); tried again daily"
        )
    return "no client_id/client_secret" if state.get("mode") == "public" else ""


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
