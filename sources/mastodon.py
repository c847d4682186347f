"""Mastodon statuses: a public hashtag timeline (`/api/v1/timelines/tag/:tag`), or a
full-text search with a token (`/api/v2/search?type=statuses`).

One request per poll: `since_id` (search: `min_id`) the newest status seen, paged
back with `max_id` when a burst fills more than a page. Mastodon allows 300
requests per 5 minutes per account and per address; `X-RateLimit-*` is read
after every answer (its reset is an ISO time, not seconds).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from agentwatch import (
    Item,
    PermanentError,
    Secret,
    Source,
    StageError,
    TransientError,
    host_of,
    html_to_text,
    human_duration,
    source,
)

MASTODON_PAGE = 40  # the largest page Mastodon serves
MASTODON_MAX_PAGES = 10
MASTODON_OVERLAP = 600.0  # seconds: statuses arrive from other servers a little late
MASTODON_PENALTY = 60.0
BODY_LIMIT = 20_000


def _epoch(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)).timestamp()


_INLINE = re.compile(r"</?span\b[^>]*>", re.I)


def status_text(content: str) -> str:
    """A status's HTML as text. Mastodon wraps the parts of mentions, hashtags and
    links in spans ("#<span>tag</span>", "<span class="invisible">https://</span>"):
    they are joined as written, so "#tag" and full URLs stay whole."""
    return html_to_text(_INLINE.sub("", content))


def id_key(status_id: str) -> tuple[int, str]:
    """Mastodon ids are decimal strings too big for a float: longer is newer."""
    return len(status_id), status_id


def mastodon_item(status: dict) -> Item | None:
    """One status as an Item; None without an id, and for reblogs (the original
    status is what was written)."""
    sid = status.get("id")
    if isinstance(sid, int) and not isinstance(sid, bool):
        sid = str(sid)
    if not isinstance(sid, str) or not sid.strip() or status.get("reblog"):
        return None
    account = status.get("account") if isinstance(status.get("account"), dict) else {}
    text = status_text(str(status.get("content") or ""))
    warning = status_text(str(status.get("spoiler_text") or ""))
    extra: dict[str, Any] = {}
    if isinstance(account.get("url"), str):
        extra["account_url"] = account["url"]
    tags = [t.get("name") for t in status.get("tags") or [] if isinstance(t, dict)]
    if tags:
        extra["tags"] = [str(t) for t in tags if t]
    if warning:
        extra["content_warning"] = warning
    if isinstance(status.get("edited_at"), str):
        extra["edited_at"] = status["edited_at"]
    return Item(
        item_id=sid,
        title=(f"CW: {warning}" if warning else text[:120]),
        url=str(status.get("url") or status.get("uri") or ""),
        author=str(account.get("acct") or account.get("username") or ""),
        published_at=_epoch(status.get("created_at")),
        body=text[:BODY_LIMIT],
        kind="reply" if status.get("in_reply_to_id") else "status",
        extra=extra,
    )


def mastodon_items(answer: Any) -> list[Item]:
    """The statuses of a timeline page (a bare array) or of a search answer
    (`{"statuses": [...]}`), newest first. Pure: tested on recorded data."""
    statuses = answer.get("statuses") if isinstance(answer, dict) else answer
    if not isinstance(statuses, list):
        raise TransientError(
            f"Mastodon answered JSON that is not a list of statuses ({str(answer)[:120]}); "
            "agentwatch retries",
            kind="bad_response",
        )
    items, seen = [], set()
    for status in statuses:
        item = mastodon_item(status) if isinstance(status, dict) else None
        if item is not None and item.item_id not in seen:
            seen.add(item.item_id)
            items.append(item)
    return items


def next_max_id(link: str | None) -> str | None:
    """`max_id` of rel="next" in a Link header (the next, older page)."""
    for part in (link or "").split(","):
        if re.search(r'rel="?next"?', part):
            m = re.search(r"[?&]max_id=(\d+)", part)
            return m.group(1) if m else None
    return None


def reset_seconds(headers: Any) -> float | None:
    """Mastodon's X-RateLimit-Reset is an ISO 8601 time."""
    when = _epoch(headers.get("x-ratelimit-reset")) if headers is not None else None
    return None if when is None else max(0.0, when - time.time())


def limit_headers(headers: Any) -> dict:
    """The headers with the reset handed over as seconds from now, as the budget reads it."""
    found = dict(headers)
    if (seconds := reset_seconds(headers)) is not None:
        found["x-ratelimit-reset"] = str(seconds)
    return found


def _resumes(seconds: float) -> str:
    at = time.strftime("%H:%M", time.gmtime(time.time() + seconds))
    return f"resumes in {human_duration(seconds)} (at {at} UTC)"


@source("mastodon")
class Mastodon(Source):
    """Statuses with a hashtag, or matching a search, on one Mastodon server."""

    @dataclass(frozen=True)
    class Options:
        instance: str
        hashtag: str = ""
        query: str = ""
        token: Secret = Secret("")

        def __post_init__(self):
            instance = self.instance.rstrip("/")
            if not re.match(r"^https?://[^/]+$", instance):
                raise ValueError(
                    f"instance must be a server's address such as 'https://mastodon.social', got {self.instance!r}"
                )
            object.__setattr__(self, "instance", instance)
            object.__setattr__(self, "hashtag", self.hashtag.strip().lstrip("#"))
            if bool(self.hashtag) == bool(self.query.strip()):
                raise ValueError("a mastodon source needs one of hashtag or query (not both)")
            if self.hashtag and not re.match(r"^\w+$", self.hashtag):
                raise ValueError(
                    f"hashtag must be a word such as 'selfhosted', got {self.hashtag!r}"
                )
            if self.query and not self.token:
                raise ValueError(
                    "query (search) needs token: an access token with read:search from "
                    f"{instance}/settings/applications"
                )

    def describe(self) -> str:
        o = self.options
        what = f"#{o.hashtag}" if o.hashtag else f"statuses matching {o.query!r}"
        return f"{what} on {host_of(o.instance)}" + (" (with a token)" if o.token else "")

    @staticmethod
    def describe_state(state: dict) -> str:
        if "polled" not in state:
            return "not polled yet"
        found = state.get("newest")
        newest = (
            f"newest status {time.strftime('%Y-%m-%d %H:%M', time.gmtime(found))} UTC"
            if found
            else "no status found yet"
        )
        return f"{newest}; {state.get('requests', 0)} request(s) last poll"

    @property
    def budget(self):
        token = self.options.token
        key = hashlib.sha256(token.encode()).hexdigest()[:16] if token else "anonymous"
        host = host_of(self.options.instance)
        who = f"{host} (this token)" if token else f"{host} (this server's address)"
        return self.rate_budget(f"mastodon:{host}:{key}", what=who, limits=limit_headers)

    async def poll(self) -> list[Item]:
        o = self.options
        polled = self.state.get("polled")  # absent: never polled, so one page is the baseline
        since_id = self.state.get("since_id")
        now = time.time()
        self.requests = 0
        if o.hashtag:
            url = f"{o.instance}/api/v1/timelines/tag/{quote(o.hashtag)}"
            params: dict = {"limit": MASTODON_PAGE}
            if since_id:
                params["since_id"] = since_id
        else:
            url = f"{o.instance}/api/v2/search"
            params = {"q": o.query, "type": "statuses", "limit": MASTODON_PAGE}
            if since_id:
                params["min_id"] = since_id
        items: list[Item] = []
        for _ in range(MASTODON_MAX_PAGES):
            fetched = await self._get(url, params)
            found = mastodon_items(fetched.json())
            items += found
            if polled is None or len(found) < MASTODON_PAGE:
                break
            stamps = [i.published_at for i in found if i.published_at is not None]
            if not since_id and stamps and min(stamps) < polled - MASTODON_OVERLAP:
                break  # reached what came before the last (empty) poll
            older = next_max_id(fetched.headers.get("link")) or min(
                (i.item_id for i in found), key=id_key
            )
            params = {**params, "max_id": older}
        else:
            self.log.warning("%s: more than %d new statuses since the last poll; older ones "
                             "were skipped", self.name, len(items))  # fmt: skip
        ids = [i.item_id for i in items] + ([since_id] if since_id else [])
        stamps = [i.published_at for i in items if i.published_at is not None]
        self.state.update(
            since_id=max(ids, key=id_key) if ids else None,
            newest=max([*stamps, self.state.get("newest") or 0.0]) or None,
            polled=now,
            requests=self.requests,
        )
        return items

    async def _get(self, url: str, params: dict) -> Any:
        o = self.options
        headers = {"Accept": "application/json"}
        if o.token:
            headers["Authorization"] = f"Bearer {o.token}"
        budget = self.budget
        fetched = await budget.fetch(url, what="Mastodon", params=params, headers=headers)
        self.requests += 1
        self._check(fetched, budget)
        return fetched

    def _check(self, fetched: Any, budget: Any) -> None:
        o, status = self.options, fetched.status
        if status < 400:
            return
        host = host_of(o.instance)
        message = _message(fetched)
        apps = f"{o.instance}/settings/applications"
        scope = "read:statuses" if o.hashtag else "read:search"
        if status == 401 and o.token:
            raise PermanentError(
                f"{host} refused `token` (401 {message}): create an access token with "
                f"{scope} at {apps} and set `token`",
                kind="auth_failed",
            )
        if status in (401, 403, 422) and not o.token:
            raise PermanentError(
                f"{host} does not show #{o.hashtag} without a token ({status} {message}): this "
                f"server has closed its public timelines; create an access token with {scope} "
                f"at {apps} and set `token`",
                kind="auth_failed",
            )
        if status == 429:
            wait = reset_seconds(fetched.headers) or MASTODON_PENALTY
            wait = min(wait, 3600.0)
            budget.penalize(wait)
            raise TransientError(
                f"{host} rate-limited {budget.who} (429); {_resumes(wait)}. Mastodon allows "
                "300 requests per 5 minutes: poll less often (`every`)",
                retry_after=wait,
                kind="rate_limited",
            )
        if status == 403:
            raise PermanentError(
                f"{host} refuses this request (403 {message}): the token may lack {scope}, or "
                "the server blocks this one",
                kind="blocked",
            )
        if status == 404:
            raise PermanentError(
                f"{host} has no Mastodon API here (404 for {host_of(fetched.url)}): check `instance`",
                kind="bad_response",
            )
        self.raise_for_status(fetched, f"Mastodon ({host})")


def _message(fetched: Any) -> str:
    try:
        return str(fetched.json().get("error") or "")[:200]
    except (StageError, AttributeError):
        return fetched.body[:200].decode("utf-8", "replace")
