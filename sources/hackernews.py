"""Hacker News stories and comments matching a query, newest first, through
Algolia's HN search API (`/api/v1/search_by_date`; no key, about 10,000
requests an hour per address).

One request per poll: everything created since the last poll
(`numericFilters=created_at_i>…`), paged through when a burst fills more than a
page. With `min_points`, stories are asked for separately (`points>=N` over the
last two days) so a story is reported once it reaches the bar, not when it is
new with one point.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass, field
from typing import Any

from agentwatch import (
    Item,
    PermanentError,
    Source,
    StageError,
    TransientError,
    host_of,
    html_to_text,
    human_duration,
    source,
)

HN_ITEM = "https://news.ycombinator.com/item?id="
HN_PAGE = 100  # hits per request
HN_MAX_PAGES = 10  # Algolia serves no result past about 1,000 hits anyway
HN_OVERLAP = 600.0  # seconds re-read each poll: Algolia indexes a new item within minutes
HN_POINTS_WINDOW = 2 * 86400.0  # a story gathers its points in its first day or two
HN_PENALTY = 60.0  # seconds to hold off after a 429 that says nothing about how long
HN_TAGS = ("story", "comment", "poll", "pollopt", "show_hn", "ask_hn", "front_page")
BODY_LIMIT = 20_000


def _epoch(hit: dict) -> float | None:
    stamp = hit.get("created_at_i")
    if isinstance(stamp, int | float) and not isinstance(stamp, bool) and math.isfinite(stamp):
        return float(stamp)
    text = hit.get("created_at")
    if isinstance(text, str):
        try:
            return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def hackernews_item(hit: dict) -> Item | None:
    """One Algolia hit as an Item; None without an objectID."""
    object_id = hit.get("objectID")
    if isinstance(object_id, int) and not isinstance(object_id, bool):
        object_id = str(object_id)
    if not isinstance(object_id, str) or not object_id.strip():
        return None
    tags = hit.get("_tags") if isinstance(hit.get("_tags"), list) else []
    is_comment = "comment" in tags or (
        hit.get("comment_text") is not None and hit.get("title") is None
    )
    extra: dict[str, Any] = {}
    for key in ("points", "num_comments", "story_id", "parent_id"):
        if isinstance(hit.get(key), int) and not isinstance(hit.get(key), bool):
            extra[key] = hit[key]
    if is_comment:
        story = str(hit.get("story_title") or "").strip()
        title = f"Comment on: {story}" if story else f"Comment on story {hit.get('story_id', '?')}"
        body = html_to_text(str(hit.get("comment_text") or ""))
        if isinstance(hit.get("story_url"), str) and hit["story_url"]:
            extra["story_url"] = hit["story_url"]
    else:
        title = str(hit.get("title") or "").strip()
        # 2014 answers carry literal "\n" and "\t" in story_text: kept as written.
        body = html_to_text(str(hit.get("story_text") or ""))
        if isinstance(hit.get("url"), str) and hit["url"]:
            extra["link"] = hit["url"]
    return Item(
        item_id=object_id,
        title=title or body[:120],
        url=HN_ITEM + object_id,
        author=str(hit.get("author") or ""),  # a deleted account has none
        published_at=_epoch(hit),
        body=body[:BODY_LIMIT],
        kind="comment" if is_comment else "story",
        extra=extra,
    )


def hackernews_items(answer: Any) -> tuple[list[Item], int]:
    """The items of one search answer and its page count. Pure: tested on recorded data."""
    hits = answer.get("hits") if isinstance(answer, dict) else None
    if not isinstance(hits, list):
        preview = str(answer)[:120]
        raise TransientError(
            f"Hacker News search answered JSON without hits ({preview}); agentwatch retries",
            kind="bad_response",
        )
    items, seen = [], set()
    for hit in hits:
        item = hackernews_item(hit) if isinstance(hit, dict) else None
        if item is not None and item.item_id not in seen:
            seen.add(item.item_id)
            items.append(item)
    pages = answer.get("nbPages")
    return items, pages if isinstance(pages, int) and not isinstance(pages, bool) else 1


def _resumes(seconds: float) -> str:
    at = time.strftime("%H:%M", time.gmtime(time.time() + seconds))
    return f"resumes in {human_duration(seconds)} (at {at} UTC)"


@source("hackernews")
class HackerNews(Source):
    """Stories and comments on Hacker News that match `query`."""

    @dataclass(frozen=True)
    class Options:
        query: str
        tags: list[str] = field(default_factory=lambda: ["story", "comment"])
        min_points: int = 0
        base_url: str = "https://hn.algolia.com"  # tests point this at 127.0.0.1

        def __post_init__(self):
            if not self.query.strip():
                raise ValueError("query must not be empty")
            if not self.tags:
                raise ValueError(f"tags must name at least one of {', '.join(HN_TAGS)}")
            for tag in self.tags:
                if tag not in HN_TAGS and not tag.startswith(("author_", "story_")):
                    raise ValueError(
                        f"unknown tag {tag!r} (known: {', '.join(HN_TAGS)}, author_NAME, story_ID)"
                    )
            if self.min_points < 0:
                raise ValueError("min_points must not be negative")
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(
                    f"base_url must start with http:// or https://, got {self.base_url!r}"
                )
            object.__setattr__(self, "base_url", self.base_url.rstrip("/"))

    def describe(self) -> str:
        o = self.options
        bar = f", stories with {o.min_points}+ points" if o.min_points else ""
        return f"Hacker News {'/'.join(o.tags)} matching {o.query!r}{bar}"

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

    def searches(self, since: float | None, now: float) -> list[tuple[str, str]]:
        """(tags, numericFilters) of each search this poll makes."""
        o = self.options
        after = f"created_at_i>{int(since - HN_OVERLAP)}" if since is not None else ""
        others = [t for t in o.tags if t != "story"] if o.min_points else list(o.tags)
        found = []
        if o.min_points and "story" in o.tags:
            window = f"created_at_i>{int(now - HN_POINTS_WINDOW)}"
            found.append(("story", f"points>={o.min_points},{window}"))
        if others:
            found.append((f"({','.join(others)})", after))
        return found

    async def poll(self) -> list[Item]:
        since = self.state.get("since")  # absent: never polled, so one page is the baseline
        now = time.time()
        self.requests = 0
        items: list[Item] = []
        for tags, numeric in self.searches(since, now):
            items += await self._search(tags, numeric, page_on=since is not None)
        stamps = [i.published_at for i in items if i.published_at is not None]
        newest = max([*stamps, self.state.get("newest") or 0.0]) or None
        # "Polled and found nothing" keeps the time of this poll, so that a burst
        # before the next one is paged through rather than taken for a baseline.
        self.state.update(since=max(newest or 0.0, since or now), newest=newest,
                          requests=self.requests)  # fmt: skip
        return items

    async def _search(self, tags: str, numeric: str, page_on: bool) -> list[Item]:
        o = self.options
        items: list[Item] = []
        for page in range(HN_MAX_PAGES):
            params = {"query": o.query, "tags": tags, "hitsPerPage": HN_PAGE, "page": page}
            if numeric:
                params["numericFilters"] = numeric
            found, pages = hackernews_items(await self._get(params))
            items += [i for i in found if i.kind != "story" or not o.min_points
                      or i.extra.get("points", 0) >= o.min_points]  # fmt: skip
            if not page_on or page + 1 >= pages or len(found) < HN_PAGE:
                return items
        self.log.warning(
            "%s: more than %d new items since the last poll; older ones were skipped",
            self.name, len(items),
        )  # fmt: skip
        return items

    async def _get(self, params: dict) -> Any:
        url = self.options.base_url + "/api/v1/search_by_date"
        host = host_of(url)
        budget = self.rate_budget(f"hackernews:{host}", what=f"{host} (this server's address)")
        fetched = await budget.fetch(
            url, what="Hacker News search", params=params, headers={"Accept": "application/json"}
        )
        self.requests += 1
        status = fetched.status
        if status == 429:
            wait = budget.penalty_until - time.monotonic()
            if wait <= 0:
                budget.penalize(HN_PENALTY)
                wait = HN_PENALTY
            raise TransientError(
                f"Hacker News search ({host}) rate-limited this server (429); {_resumes(wait)}. "
                "Algolia allows about 10,000 requests an hour per address: poll less often "
                "(`every`) or use fewer hackernews sources",
                retry_after=wait,
                kind="rate_limited",
            )
        if status == 403:
            raise PermanentError(
                f"Hacker News search ({host}) refuses this server (403): it blocks this "
                "address; agentwatch must run elsewhere",
                kind="blocked",
            )
        if status == 400:
            message = _message(fetched)
            raise PermanentError(
                f"Hacker News search refused the query (400: {message}): check `query` and `tags`",
                kind="bad_response",
            )
        self.raise_for_status(fetched, f"Hacker News search ({host})")
        return fetched.json()


def _message(fetched: Any) -> str:
    try:
        return str(fetched.json().get("message") or "")[:200]
    except (StageError, AttributeError):
        return fetched.body[:200].decode("utf-8", "replace")
