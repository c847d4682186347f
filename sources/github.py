"""GitHub issues and pull requests matching a search, newest first
(`GET /search/issues`, sorted by creation).

One request per poll: the query plus `created:>=` the newest item seen (less a
few minutes, as the search index lags), paged through (`Link: rel=next`) when a
burst fills more than a page. Search has its own rate limit: 10 requests a
minute without a token, 30 with one; X-RateLimit-* is read after every answer,
and the secondary limits (403/429 with Retry-After) hold every source sharing
the token back until they end.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

from agentwatch import (
    Item,
    PermanentError,
    Secret,
    Source,
    StageError,
    TransientError,
    host_of,
    human_duration,
    parse_retry_after,
    source,
)

GITHUB_TOKENS = "https://github.com/settings/tokens"
GITHUB_PAGE = 100  # the largest page search serves
GITHUB_MAX_PAGES = 10  # search serves no result past 1,000
GITHUB_OVERLAP = 300.0  # seconds re-read each poll: the search index lags behind
GITHUB_PENALTY = 60.0  # after a limit answer that says nothing about how long
BODY_LIMIT = 20_000


def _epoch(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _stamp(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def github_item(issue: dict) -> Item | None:
    """One search result (an issue or a pull request) as an Item; None without an id."""
    iid = issue.get("id")
    if isinstance(iid, bool) or not isinstance(iid, int | str) or not str(iid).strip():
        return None
    user = issue.get("user") if isinstance(issue.get("user"), dict) else {}
    # 2014 answers have no repository_url; html_url is github.com/<owner>/<repo>/issues/<n>.
    m = re.search(r"/repos/([^/]+/[^/]+)$", str(issue.get("repository_url") or "")) or re.search(
        r"^https?://[^/]+/([^/]+/[^/]+)/(?:issues|pull)/", str(issue.get("html_url") or "")
    )
    repo = m.group(1) if m else ""
    extra: dict[str, Any] = {"repo": repo} if repo else {}
    for key in ("number", "state", "comments"):
        if isinstance(issue.get(key), int | str) and not isinstance(issue.get(key), bool):
            extra[key] = issue[key]
    return Item(
        item_id=str(iid),
        title=str(issue.get("title") or ""),
        url=str(issue.get("html_url") or ""),
        author=str(user.get("login") or ""),  # a deleted account: no user at all
        published_at=_epoch(issue.get("created_at")),
        body=str(issue.get("body") or "")[:BODY_LIMIT],  # often null
        kind="pull_request" if _is_pull(issue) else "issue",
        extra=extra,
    )


def _is_pull(issue: dict) -> bool:
    # 2014 answers give plain issues a pull_request object whose URLs are all null.
    pull = issue.get("pull_request")
    return isinstance(pull, dict) and any(pull.get(k) for k in ("html_url", "url", "diff_url"))


def github_items(answer: Any) -> tuple[list[Item], bool]:
    """The items of one search answer, and whether GitHub says it is incomplete
    (a search that timed out). Pure: tested on recorded data."""
    found = answer.get("items") if isinstance(answer, dict) else None
    if not isinstance(found, list):
        raise TransientError(
            f"GitHub search answered JSON without items ({str(answer)[:120]}); agentwatch retries",
            kind="bad_response",
        )
    items, seen = [], set()
    for issue in found:
        item = github_item(issue) if isinstance(issue, dict) else None
        if item is not None and item.item_id not in seen:
            seen.add(item.item_id)
            items.append(item)
    return items, answer.get("incomplete_results") is True


def next_page(link: str | None) -> int | None:
    """The page number of rel="next" in a Link header; None on the last page."""
    for part in (link or "").split(","):
        if re.search(r'rel="?next"?', part):
            m = re.search(r"[?&]page=(\d+)", part)
            return int(m.group(1)) if m else None
    return None


def _resumes(seconds: float) -> str:
    at = time.strftime("%H:%M", time.gmtime(time.time() + seconds))
    return f"resumes in {human_duration(seconds)} (at {at} UTC)"


@source("github")
class GitHub(Source):
    """Issues and pull requests matching a GitHub search."""

    @dataclass(frozen=True)
    class Options:
        query: str
        token: Secret = Secret("")
        base_url: str = "https://api.github.com"  # tests point this at 127.0.0.1

        def __post_init__(self):
            if not self.query.strip():
                raise ValueError(
                    "query must not be empty (GitHub search syntax, e.g. 'acme in:title')"
                )
            if re.search(r"(^|\s)created:", self.query):
                raise ValueError("query must not contain created: (agentwatch adds it)")
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(
                    f"base_url must start with http:// or https://, got {self.base_url!r}"
                )
            object.__setattr__(self, "base_url", self.base_url.rstrip("/"))

    def describe(self) -> str:
        how = "with a token" if self.options.token else "without a token: 10 searches a minute"
        return f"GitHub issues and pull requests matching {self.options.query!r} ({how})"

    @staticmethod
    def describe_state(state: dict) -> str:
        if "since" not in state:
            return "not polled yet"
        found = state.get("newest")
        newest = (
            f"newest item {time.strftime('%Y-%m-%d %H:%M', time.gmtime(found))} UTC"
            if found
            else "nothing found yet"
        )
        return f"{newest}; {state.get('requests', 0)} request(s) last poll"

    @property
    def budget(self):
        token = self.options.token
        who = "this token" if token else "this server's address (no token)"
        key = hashlib.sha256(token.encode()).hexdigest()[:16] if token else "anonymous"
        return self.rate_budget(f"github:search:{host_of(self.options.base_url)}:{key}", what=who)

    async def poll(self) -> list[Item]:
        since = self.state.get("since")  # absent: never polled, so one page is the baseline
        now = time.time()
        self.requests = 0
        query = self.options.query
        if since is not None:
            query += f" created:>={_stamp(since - GITHUB_OVERLAP)}"
        items: list[Item] = []
        complete, page = True, 1
        for _ in range(GITHUB_MAX_PAGES):
            params = {"q": query, "sort": "created", "order": "desc", "per_page": GITHUB_PAGE,
                      "page": page}  # fmt: skip
            fetched = await self._get(params)
            found, incomplete = github_items(fetched.json())
            items += found
            complete = complete and not incomplete
            page = next_page(fetched.headers.get("link"))
            if since is None or page is None or not found:
                break
        else:
            self.log.warning("%s: more than %d new items since the last poll; older ones were "
                             "skipped", self.name, len(items))  # fmt: skip
        stamps = [i.published_at for i in items if i.published_at is not None]
        newest = max([*stamps, self.state.get("newest") or 0.0]) or None
        if complete:
            self.state["since"] = max(newest or 0.0, since or now)
        else:  # GitHub's search timed out: read the same span again next time
            self.log.info("%s: GitHub says this search is incomplete; it is read again next poll",
                          self.name)  # fmt: skip
            self.state["since"] = since if since is not None else now - GITHUB_OVERLAP
        self.state.update(newest=newest, requests=self.requests)
        return items

    async def _get(self, params: dict) -> Any:
        o = self.options
        url = o.base_url + "/search/issues"
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
        if o.token:
            headers["Authorization"] = f"Bearer {o.token}"
        budget = self.budget
        fetched = await budget.fetch(url, what="GitHub", params=params, headers=headers)
        self.requests += 1
        self._check(fetched, budget)
        return fetched

    def _check(self, fetched: Any, budget: Any) -> None:
        status, headers = fetched.status, fetched.headers
        if status < 400:
            return
        message = _message(fetched)
        if status == 401:
            raise PermanentError(
                f"GitHub refused `token` (401 {message}): it is wrong, expired or revoked. "
                f"Create a new one at {GITHUB_TOKENS} (no scope is needed for public "
                "repositories) and set `token`",
                kind="auth_failed",
            )
        retry_after = parse_retry_after(headers.get("retry-after"))
        exhausted = headers.get("x-ratelimit-remaining") == "0"
        if status in (403, 429) and (retry_after is not None or exhausted or status == 429
                                     or "rate limit" in message.lower()):  # fmt: skip
            if exhausted and retry_after is None:
                try:
                    wait = max(1.0, float(headers.get("x-ratelimit-reset")) - time.time())
                except (TypeError, ValueError):
                    wait = GITHUB_PENALTY
                what = (f"GitHub's search limit for {budget.who} is used up "
                        f"({headers.get('x-ratelimit-limit', '?')} a minute)")  # fmt: skip
            else:
                wait = GITHUB_PENALTY if retry_after is None else retry_after
                what = f"GitHub's secondary rate limit holds back {budget.who} ({status})"
            wait = min(wait, 3600.0)
            budget.penalize(wait)
            hint = (
                ""
                if self.options.token
                else f"; a `token` (from {GITHUB_TOKENS}) allows 30 a minute"
            )
            raise TransientError(
                f"{what}; {_resumes(wait)}. Poll less often (`every`) or use fewer github "
                f"sources{hint}",
                retry_after=wait,
                kind="rate_limited",
            )
        if status == 403:
            raise PermanentError(
                f"GitHub refuses this search (403 {message}): the token may lack access, or "
                "GitHub blocks this server",
                kind="blocked",
            )
        if status == 422:
            raise PermanentError(
                f"GitHub rejected the search (422 {message}): check `query` (GitHub's search "
                "syntax, e.g. 'acme in:title,body is:issue')",
                kind="bad_response",
            )
        self.raise_for_status(fetched, f"GitHub ({host_of(fetched.url)})")


def _message(fetched: Any) -> str:
    try:
        return str(fetched.json().get("message") or "")[:200]
    except (StageError, AttributeError):
        return fetched.body[:200].decode("utf-8", "replace")
