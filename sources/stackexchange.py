"""Stack Exchange questions (Stack Overflow or any other site) matching a query and/or
tags, newest first (`/2.3/search/advanced`, sorted by creation).

One request per poll: `fromdate` the newest question seen (less a minute),
paged (`page`, `has_more`) through a burst. Stack Exchange puts its limits in
the body: `backoff` (seconds before the next request to that method) and
`quota_remaining` (requests left today: 300 per address without a `key`,
10,000 with one); both are obeyed, and a spent quota waits for midnight UTC.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import html
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

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

SE_APPS = "https://stackapps.com/apps/oauth/register"
SE_PAGE = 100  # the largest page Stack Exchange serves
SE_MAX_PAGES = 5  # each page costs a request of a small daily quota
SE_OVERLAP = 60.0
SE_THROTTLED = 600.0  # "too many requests from this IP": bans last minutes to hours
SE_LOW_QUOTA = 20
BODY_LIMIT = 20_000


def _text(value: Any) -> str:
    # Stack Exchange HTML-encodes even its plain fields (titles, names): decoded once.
    return html.unescape(str(value or ""))


def stackexchange_item(question: dict, site: str = "") -> Item | None:
    """One question as an Item; None without a question_id."""
    qid = question.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, int | str) or not str(qid).strip():
        return None
    owner = question.get("owner") if isinstance(question.get("owner"), dict) else {}
    created = question.get("creation_date")
    extra: dict[str, Any] = {"site": site} if site else {}
    if isinstance(question.get("tags"), list):
        extra["tags"] = [str(t) for t in question["tags"]]
    for key in ("score", "answer_count", "is_answered"):
        if isinstance(question.get(key), int | bool):
            extra[key] = question[key]
    if owner.get("user_type") == "does_not_exist":
        extra["owner_deleted"] = True
    title = _text(question.get("title"))
    body = html_to_text(str(question.get("body") or ""))
    return Item(
        item_id=str(qid),
        title=title or body[:120],
        url=str(question.get("link") or ""),
        author=_text(owner.get("display_name")),
        published_at=float(created)
        if isinstance(created, int | float) and not isinstance(created, bool)
        else None,
        body=body[:BODY_LIMIT],
        kind="question",
        extra=extra,
    )


def decode(body: bytes) -> Any:
    """The wrapper object of an answer. Stack Exchange compresses every answer, and
    sometimes says so in no header: a gzip body is unpacked here."""
    if body[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError):  # a cut-off gzip: reported as not JSON
            body = gzip.decompress(body)
    try:
        return json.loads(body)
    except ValueError:
        preview = body[:80].decode("utf-8", "replace")
        raise TransientError(
            f"Stack Exchange answered something that is not JSON ({len(body)} bytes: {preview!r}); "
            "agentwatch retries",
            kind="bad_response",
        ) from None


def stackexchange_items(answer: Any, site: str = "") -> tuple[list[Item], bool]:
    """The questions of one answer and its `has_more`. Pure: tested on recorded data."""
    found = answer.get("items") if isinstance(answer, dict) else None
    if not isinstance(found, list):
        raise TransientError(
            f"Stack Exchange answered JSON without items ({str(answer)[:120]}); agentwatch retries",
            kind="bad_response",
        )
    items, seen = [], set()
    for question in found:
        item = stackexchange_item(question, site) if isinstance(question, dict) else None
        if item is not None and item.item_id not in seen:
            seen.add(item.item_id)
            items.append(item)
    return items, answer.get("has_more") is True


def _until_midnight() -> float:
    now = dt.datetime.now(dt.UTC)
    tomorrow = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return (tomorrow - now).total_seconds()


def _resumes(seconds: float) -> str:
    at = time.strftime("%H:%M", time.gmtime(time.time() + seconds))
    return f"resumes in {human_duration(seconds)} (at {at} UTC)"


@source("stackexchange")
class StackExchange(Source):
    """Questions on a Stack Exchange site matching a query and/or tags."""

    @dataclass(frozen=True)
    class Options:
        site: str = "stackoverflow"
        query: str = ""
        tagged: list[str] = field(default_factory=list)
        key: Secret = Secret("")
        base_url: str = "https://api.stackexchange.com"  # tests point this at 127.0.0.1

        def __post_init__(self):
            if not re.match(r"^[a-z0-9.-]+$", self.site):
                raise ValueError(
                    f"site must be a site's API name such as 'stackoverflow' or 'superuser', got {self.site!r}"
                )
            tags = [t.strip().lower() for t in self.tagged if t.strip()]
            object.__setattr__(self, "tagged", tags)
            if not self.query.strip() and not tags:
                raise ValueError("a stackexchange source needs a query, tagged, or both")
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(
                    f"base_url must start with http:// or https://, got {self.base_url!r}"
                )
            object.__setattr__(self, "base_url", self.base_url.rstrip("/"))

    def describe(self) -> str:
        o = self.options
        what = [f"matching {o.query!r}"] if o.query else []
        if o.tagged:
            what.append(f"tagged {';'.join(o.tagged)}")
        quota = "with a key: 10,000 requests a day" if o.key else "no key: 300 requests a day"
        return f"{o.site} questions {' and '.join(what)} ({quota})"

    @staticmethod
    def describe_state(state: dict) -> str:
        if "since" not in state:
            return "not polled yet"
        found = state.get("newest")
        newest = (
            f"newest question {time.strftime('%Y-%m-%d %H:%M', time.gmtime(found))} UTC"
            if found
            else "nothing found yet"
        )
        quota = (
            f"; quota left today {state['quota_remaining']}" if "quota_remaining" in state else ""
        )
        return f"{newest}; {state.get('requests', 0)} request(s) last poll{quota}"

    @property
    def budget(self):
        key = self.options.key
        who = "this key" if key else "this server's address (no key)"
        tag = hashlib.sha256(key.encode()).hexdigest()[:16] if key else "anonymous"
        # `backoff` is per method, and this source calls one: one budget per key.
        return self.rate_budget(f"stackexchange:{host_of(self.options.base_url)}:{tag}", what=who)

    async def poll(self) -> list[Item]:
        o = self.options
        since = self.state.get("since")  # absent: never polled, so one page is the baseline
        now = time.time()
        self.requests = 0
        params: dict = {"site": o.site, "order": "desc", "sort": "creation", "pagesize": SE_PAGE,
                        "filter": "withbody"}  # fmt: skip
        if o.query:
            params["q"] = o.query
        if o.tagged:
            params["tagged"] = ";".join(o.tagged)
        if since is not None:
            params["fromdate"] = int(since - SE_OVERLAP)
        if o.key:
            params["key"] = o.key
        items: list[Item] = []
        for page in range(1, SE_MAX_PAGES + 1):
            found, more = stackexchange_items(await self._get({**params, "page": page}), o.site)
            items += found
            if since is None or not more:
                break
        else:
            self.log.warning("%s: more than %d new questions since the last poll; older ones "
                             "were skipped", self.name, len(items))  # fmt: skip
        stamps = [i.published_at for i in items if i.published_at is not None]
        newest = max([*stamps, self.state.get("newest") or 0.0]) or None
        self.state.update(since=max(newest or 0.0, since or now), newest=newest,
                          requests=self.requests)  # fmt: skip
        return items

    async def _get(self, params: dict) -> Any:
        url = self.options.base_url + "/2.3/search/advanced"
        budget = self.budget
        fetched = await budget.fetch(
            url, what="Stack Exchange", params=params, headers={"Accept-Encoding": "gzip"}
        )
        self.requests += 1
        answer = None
        if fetched.status < 500 or fetched.body[:1] in (b"{", b"\x1f"):
            try:
                answer = decode(fetched.body)
            except TransientError:
                if fetched.status < 400:
                    raise
        if isinstance(answer, dict):
            self._obey(answer, budget)
            if "error_id" in answer:
                raise self._error(answer, budget)
        self.raise_for_status(fetched, f"Stack Exchange ({host_of(url)})")
        if answer is None:
            decode(fetched.body)  # raises bad_response with a preview
        return answer

    def _obey(self, answer: dict, budget: Any) -> None:
        """The limits Stack Exchange puts in the body of every answer."""
        backoff = answer.get("backoff")
        if isinstance(backoff, int | float) and not isinstance(backoff, bool) and backoff > 0:
            self.log.info("%s: Stack Exchange asks for %ss between requests", self.name, backoff)
            budget.penalize(min(float(backoff), 3600.0))
        quota = answer.get("quota_remaining")
        if isinstance(quota, int) and not isinstance(quota, bool):
            self.state["quota_remaining"] = quota
            if quota <= 0:
                budget.penalize(_until_midnight())
            elif quota < SE_LOW_QUOTA:
                self.log.warning("%s: only %d Stack Exchange requests left today for %s",
                                 self.name, quota, budget.who)  # fmt: skip

    def _error(self, answer: dict, budget: Any) -> StageError:
        code, name = answer.get("error_id"), str(answer.get("error_name") or "")
        message = _text(answer.get("error_message"))[:200]
        if code == 502 or name == "throttle_violation":
            wait = SE_THROTTLED
            if m := re.search(r"available in (\d+) seconds", message):
                wait = float(m.group(1))
            elif answer.get("quota_remaining") == 0 or "quota" in message.lower():
                wait = _until_midnight()
            budget.penalize(wait)
            hint = (
                ""
                if self.options.key
                else f"; a `key` (from {SE_APPS}) raises the quota to 10,000 a day"
            )
            return TransientError(
                f"Stack Exchange throttles {budget.who} (502 throttle_violation: {message}); "
                f"{_resumes(wait)}. Poll less often (`every`){hint}",
                retry_after=wait,
                kind="rate_limited",
            )
        if code in (401, 402, 403, 405, 406) or (code == 400 and "key" in message.lower()):
            return PermanentError(
                f"Stack Exchange refused the request ({code} {name}: {message}): set `key` to the "
                f"key of an app registered at {SE_APPS}, or remove it",
                kind="auth_failed",
            )
        if code in (500, 503):
            return TransientError(
                f"Stack Exchange answered {code} {name} ({message}): it is having trouble; "
                "agentwatch retries with backoff",
                kind="server_error",
            )
        return PermanentError(
            f"Stack Exchange refused the search ({code} {name}: {message}): check `site`, "
            "`query` and `tagged`",
            kind="bad_response",
        )
