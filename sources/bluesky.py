"""Bluesky posts matching a search, newest first (`app.bsky.feed.searchPosts`,
`sort=latest`), read through the account's PDS with an app-password session:
Bluesky closed unauthenticated search in 2025.

One request per poll: `since` the newest post seen (less a few minutes), paged
with `cursor` through a burst. The session is made once per process
(`com.atproto.server.createSession` allows only 30 per 5 minutes and 300 a day
per account), shared by every source of that account, and refreshed
(`refreshSession`) when the access token expires.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from agentwatch import (
    Item,
    PermanentError,
    Secret,
    Source,
    TransientError,
    host_of,
    human_duration,
    source,
)

BSKY_APP_PASSWORDS = "https://bsky.app/settings/app-passwords"
BSKY_WEB = "https://bsky.app"
BSKY_PAGE = 100  # the largest page searchPosts serves
BSKY_MAX_PAGES = 10
BSKY_OVERLAP = 300.0  # seconds re-read each poll: the search index lags
BSKY_PENALTY = 60.0
BODY_LIMIT = 20_000
_EXPIRED = ("ExpiredToken", "InvalidToken")

# The refresh token of each session, by token-cache key: process-wide, never stored.
_REFRESH: dict[str, str] = {}


def _epoch(text: Any) -> float | None:
    """Bluesky times are client-written: "Z", "+00:00", micro- or milliseconds, or
    no zone at all (taken as UTC)."""
    if not isinstance(text, str):
        return None
    try:
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)).timestamp()


def post_link(uri: str, handle: str) -> str:
    """at://did/app.bsky.feed.post/rkey → https://bsky.app/profile/<handle>/post/<rkey>."""
    m = re.match(r"^at://([^/]+)/app\.bsky\.feed\.post/([^/?#]+)$", uri)
    if not m:
        return ""
    who = handle if handle and handle != "handle.invalid" else m.group(1)
    return f"{BSKY_WEB}/profile/{who}/post/{m.group(2)}"


def bluesky_item(post: dict) -> Item | None:
    """One postView as an Item; None without an at:// URI."""
    uri = post.get("uri")
    if not isinstance(uri, str) or not uri.startswith("at://"):
        return None
    author = post.get("author") if isinstance(post.get("author"), dict) else {}
    record = post.get("record") if isinstance(post.get("record"), dict) else {}
    handle = str(author.get("handle") or "")
    text = str(record.get("text") or "").strip()
    extra: dict[str, Any] = {}
    if isinstance(author.get("did"), str):
        extra["did"] = author["did"]
    labels = [label.get("val") for label in author.get("labels") or [] if isinstance(label, dict)]
    if labels:
        extra["author_labels"] = [str(v) for v in labels if v]
    reply = record.get("reply") if isinstance(record.get("reply"), dict) else None
    if reply and isinstance(reply.get("parent"), dict):
        extra["reply_to"] = str(reply["parent"].get("uri") or "")
    embed = post.get("embed") if isinstance(post.get("embed"), dict) else None
    if embed:
        extra["embed"] = str(embed.get("$type") or "")
    title = text.splitlines()[0][:120] if text else ("(a post with an embed)" if embed else "")
    return Item(
        item_id=uri,
        title=title,
        url=post_link(uri, handle),
        author=handle,
        # indexedAt is the server's time; createdAt is whatever the client wrote.
        published_at=_epoch(post.get("indexedAt")) or _epoch(record.get("createdAt")),
        body=text[:BODY_LIMIT],
        kind="reply" if reply else "post",
        extra=extra,
    )


def bluesky_items(answer: Any) -> tuple[list[Item], str | None]:
    """The posts of one searchPosts answer and its cursor. Pure: tested on recorded data."""
    posts = answer.get("posts") if isinstance(answer, dict) else None
    if not isinstance(posts, list):
        raise TransientError(
            f"Bluesky answered JSON without posts ({str(answer)[:120]}); agentwatch retries",
            kind="bad_response",
        )
    items, seen = [], set()
    for post in posts:
        item = bluesky_item(post) if isinstance(post, dict) else None
        if item is not None and item.item_id not in seen:
            seen.add(item.item_id)
            items.append(item)
    cursor = answer.get("cursor")
    return items, cursor if isinstance(cursor, str) and cursor else None


def jwt_lifetime(token: str) -> float | None:
    """Seconds until a JWT's `exp`, read without checking it (the server does)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return max(0.0, float(claims["exp"]) - time.time())
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def limit_headers(headers: Any) -> dict:
    """Bluesky's IETF-draft RateLimit-* headers, named as the rate budget reads them."""
    found = {"retry-after": headers.get("retry-after")} if headers.get("retry-after") else {}
    for name in ("remaining", "reset"):
        if (value := headers.get(f"ratelimit-{name}")) is not None:
            found[f"x-ratelimit-{name}"] = value
    return found


def _resumes(seconds: float) -> str:
    at = time.strftime("%H:%M", time.gmtime(time.time() + seconds))
    return f"resumes in {human_duration(seconds)} (at {at} UTC)"


def _stamp(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@source("bluesky")
class Bluesky(Source):
    """Posts on Bluesky matching a search, read with an app password."""

    @dataclass(frozen=True)
    class Options:
        query: str
        handle: str
        app_password: Secret
        service: str = "https://bsky.social"  # the account's PDS; tests point this at 127.0.0.1

        def __post_init__(self):
            if not self.query.strip():
                raise ValueError("query must not be empty")
            handle = self.handle.strip().lstrip("@")
            object.__setattr__(self, "handle", handle)
            if not re.match(r"^([a-z0-9-]+\.)+[a-z0-9-]+$|^did:[a-z]+:\S+$", handle, re.I):
                raise ValueError(
                    f"handle must be a Bluesky handle such as 'acme.bsky.social', got {handle!r}"
                )
            if not self.app_password:
                raise ValueError(
                    f"app_password must not be empty: create one at {BSKY_APP_PASSWORDS}"
                )
            if not self.service.startswith(("http://", "https://")):
                raise ValueError(
                    f"service must start with http:// or https://, got {self.service!r}"
                )
            object.__setattr__(self, "service", self.service.rstrip("/"))

    def describe(self) -> str:
        return f"Bluesky posts matching {self.options.query!r} (as {self.options.handle})"

    @staticmethod
    def describe_state(state: dict) -> str:
        if "since" not in state:
            return "not polled yet"
        found = state.get("newest")
        newest = (
            f"newest post {time.strftime('%Y-%m-%d %H:%M', time.gmtime(found))} UTC"
            if found
            else "nothing found yet"
        )
        return f"{newest}; {state.get('requests', 0)} request(s) last poll"

    @property
    def session_key(self) -> str:
        o = self.options
        secret = hashlib.sha256(o.app_password.encode()).hexdigest()[:16]
        return f"bluesky:{o.service}:{o.handle.lower()}:{secret}"

    @property
    def budget(self):
        host = host_of(self.options.service)
        return self.rate_budget(
            f"bluesky:{host}", what=f"{host} (this server's address)", limits=limit_headers
        )

    async def poll(self) -> list[Item]:
        o = self.options
        since = self.state.get("since")  # absent: never polled, so one page is the baseline
        now = time.time()
        self.requests = 0
        params: dict = {"q": o.query, "sort": "latest", "limit": BSKY_PAGE}
        if since is not None:
            params["since"] = _stamp(since - BSKY_OVERLAP)
        items: list[Item] = []
        for _ in range(BSKY_MAX_PAGES):
            found, cursor = bluesky_items(await self._search(params))
            items += found
            if since is None or not cursor or not found:
                break
            params = {**params, "cursor": cursor}
        else:
            self.log.warning("%s: more than %d new posts since the last poll; older ones were "
                             "skipped", self.name, len(items))  # fmt: skip
        stamps = [i.published_at for i in items if i.published_at is not None]
        newest = max([*stamps, self.state.get("newest") or 0.0]) or None
        self.state.update(since=max(newest or 0.0, since or now), newest=newest,
                          requests=self.requests)  # fmt: skip
        return items

    # --- requests -------------------------------------------------------------

    async def _search(self, params: dict) -> Any:
        url = self.options.service + "/xrpc/app.bsky.feed.searchPosts"
        cache = self.token_cache(self.session_key)
        stale = None
        for attempt in range(2):
            access = await cache.get(self._new_session, stale=stale)
            fetched = await self._request("GET", url, params=params,
                                       headers={"Authorization": f"Bearer {access}"})  # fmt: skip
            error = _error_of(fetched)
            if fetched.status in (400, 401) and error[0] in (*_EXPIRED, "AuthenticationRequired"):
                if attempt == 0:
                    self.log.info("%s: Bluesky says the session expired (%s); refreshing it",
                                  self.name, error[0])  # fmt: skip
                    stale = access
                    continue
                raise PermanentError(
                    f"Bluesky refused a fresh session ({fetched.status} {error[0]}: {error[1]}): "
                    f"the app password may have been revoked; create a new one at "
                    f"{BSKY_APP_PASSWORDS} and set `app_password`",
                    kind="auth_failed",
                )
            self._check(fetched, "search")
            return fetched.json()
        raise AssertionError("unreachable")

    async def _new_session(self) -> tuple[str, float | None]:
        """A refreshed session when there is a refresh token, else a new one."""
        o, key = self.options, self.session_key
        if refresh := _REFRESH.get(key):
            fetched = await self._request("POST", o.service + "/xrpc/com.atproto.server.refreshSession",
                                       headers={"Authorization": f"Bearer {refresh}"})  # fmt: skip
            if fetched.status == 200:
                return self._keep(fetched.json())
            if fetched.status not in (400, 401):
                self._check(fetched, "session refresh")
            _REFRESH.pop(key, None)  # expired or revoked: log in again
        fetched = await self._request(
            "POST", o.service + "/xrpc/com.atproto.server.createSession",
            json={"identifier": o.handle, "password": o.app_password},
        )  # fmt: skip
        if fetched.status in (400, 401):
            code, message = _error_of(fetched)
            if code in ("AccountTakedown", "AccountDeactivated"):
                raise PermanentError(f"Bluesky refuses the account {o.handle} ({code}: {message})",
                                     kind="blocked")  # fmt: skip
            raise PermanentError(
                f"Bluesky refused `handle`/`app_password` ({fetched.status} {code or 'error'}: "
                f"{message}): check `handle` ({o.handle}) and create an app password at "
                f"{BSKY_APP_PASSWORDS} for `app_password` (not the account's own password)",
                kind="auth_failed",
            )
        self._check(fetched, "login (createSession: 30 per 5 minutes, 300 a day)")
        return self._keep(fetched.json())

    def _keep(self, session: Any) -> tuple[str, float | None]:
        access = session.get("accessJwt") if isinstance(session, dict) else None
        refresh = session.get("refreshJwt") if isinstance(session, dict) else None
        if not isinstance(access, str) or not access:
            raise TransientError("Bluesky's session answer carries no accessJwt; agentwatch retries",
                                 kind="bad_response")  # fmt: skip
        if isinstance(refresh, str) and refresh:
            _REFRESH[self.session_key] = refresh
        return access, jwt_lifetime(access)

    async def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        fetched = await self.budget.fetch(url, what="Bluesky", method=method, **kwargs)
        self.requests += 1
        return fetched

    def _check(self, fetched: Any, what: str) -> None:
        status = fetched.status
        if status < 400:
            return
        code, message = _error_of(fetched)
        host = host_of(self.options.service)
        if status == 429:
            try:
                wait = max(1.0, float(fetched.headers.get("ratelimit-reset")) - time.time())
            except (TypeError, ValueError):
                wait = BSKY_PENALTY
            wait = min(wait, 86400.0)
            self.budget.penalize(wait)
            raise TransientError(
                f"Bluesky ({host}) rate-limited the {what} (429 {code}); {_resumes(wait)}. "
                "Poll less often (`every`)",
                retry_after=wait,
                kind="rate_limited",
            )
        if status == 403:
            raise PermanentError(
                f"Bluesky ({host}) refuses the {what} (403 {code}: {message}): `service` must be "
                "the account's PDS (https://bsky.social for most accounts), not the public AppView",
                kind="blocked",
            )
        if status == 400:
            raise PermanentError(f"Bluesky refused the {what} (400 {code}: {message}): check `query`",
                                 kind="bad_response")  # fmt: skip
        self.raise_for_status(fetched, f"Bluesky ({host}) {what}")


def _error_of(fetched: Any) -> tuple[str, str]:
    """XRPC errors are {"error": "ExpiredToken", "message": "..."}."""
    if fetched.status < 400:
        return "", ""
    try:
        body = json.loads(fetched.body)
    except ValueError:
        return "", fetched.body[:120].decode("utf-8", "replace")
    if not isinstance(body, dict):
        return "", str(body)[:120]
    return str(body.get("error") or ""), str(body.get("message") or "")[:200]
