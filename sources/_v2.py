"""The Source API v2 names for the sources of this folder while the engine on main is
still version 1. TEMPORARY: once "Engine v2" is on main, every source imports these
names from `agentwatch` and this file is deleted (a mechanical change).

On an engine that already has them, this module only re-exports them."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import math
import re
import time
from typing import Any

import agentwatch
from agentwatch import Source, TransientError

if hasattr(agentwatch, "RateBudget"):  # Engine v2: the real thing
    from agentwatch import (
        RateBudget,
        Secret,
        TokenCache,
        host_of,
        human_duration,
        iso,
        parse_retry_after,
    )

    APISource = Source

    def html_to_text(markup: str) -> str:
        text = re.sub(r"(?i)<br\s*/?>|</p>", "\n", markup[:200_000])
        text = re.sub(r"(?s)<[^>]*>", "", text)
        text = html.unescape(text)
        return re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n\n", text)).strip()
else:
    from agentwatch import iso, parse_retry_after  # noqa: F401

    Secret = str  # v1 masks options named token/password/client_secret only

    def host_of(url: str) -> str:
        m = re.match(r"^[a-z][a-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#]+)", url, re.I)
        return m.group(1) if m else url

    def html_to_text(markup: str) -> str:
        text = re.sub(r"(?i)<br\s*/?>|</p>", "\n", markup[:200_000])
        text = re.sub(r"(?s)<[^>]*>", "", text)
        text = html.unescape(text)
        return re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n\n", text)).strip()

    def human_duration(seconds: float) -> str:
        s = max(0, round(seconds)) if math.isfinite(seconds) else 0
        units = ((86400, "d", 3600, "h"), (3600, "h", 60, "m"), (60, "m", 1, "s"))
        for size, unit, sub_size, sub_unit in units:
            if s >= size:
                rest = (s % size) // sub_size
                return f"{s // size}{unit}" + (f" {rest}{sub_unit}" if rest else "")
        return f"{s}s"

    def _header_float(headers: Any, name: str) -> float | None:
        try:
            value = float(headers.get(name))
        except (TypeError, ValueError, AttributeError):
            return None
        return value if math.isfinite(value) else None

    class RateBudget:
        """As in Engine v2 (see API-v2.md)."""

        def __init__(self, who: str, low_water: float = 0.1):
            self.who, self.low_water = who, low_water
            self.remaining: float | None = None
            self.used = 0.0
            self.reset_at = 0.0
            self.penalty_until = 0.0
            self.min_interval = 0.0
            self.last_sent = -math.inf
            self.in_flight = 0
            self.sent = 0

        def pace(self, seconds: float) -> None:
            if seconds > 0 and (not self.min_interval or seconds < self.min_interval):
                self.min_interval = seconds

        def delay(self, now: float) -> float:
            paced = max(0.0, self.last_sent + self.min_interval - now)
            if now < self.penalty_until:
                return max(paced, self.penalty_until - now)
            if self.remaining is None or now >= self.reset_at:
                return paced
            left = self.remaining - self.in_flight
            if left < 1:
                return self.reset_at - now
            if left >= (self.remaining + self.used) * self.low_water:
                return paced
            return max(paced, self.last_sent + (self.reset_at - now) / left - now)

        async def acquire(self, until: float = math.inf) -> None:
            while (wait := self.delay(time.monotonic())) > 0:
                if time.monotonic() + wait > until:
                    raise TransientError(
                        f"requests of {self.who} must wait; {math.ceil(wait)}s to go",
                        retry_after=wait,
                        kind="rate_limited",
                    )
                await asyncio.sleep(wait)
            self.last_sent = time.monotonic()
            self.in_flight += 1
            self.sent += 1

        def settle(self, headers: Any) -> None:
            self.in_flight = max(0, self.in_flight - 1)
            if headers is None:
                return
            retry_after = parse_retry_after(headers.get("retry-after"))
            if retry_after:
                self.penalize(min(retry_after, 86400.0))
            remaining = _header_float(headers, "x-ratelimit-remaining")
            reset = _header_float(headers, "x-ratelimit-reset")
            if remaining is None or reset is None:
                return
            now = time.monotonic()
            if reset > 1e9:
                reset = reset - time.time()
            reset_at = now + min(max(0.0, reset), 86400.0)
            used = _header_float(headers, "x-ratelimit-used") or 0.0
            if self.remaining is None or now >= self.reset_at or reset_at > self.reset_at + 1.5:
                self.remaining, self.used = remaining, used
            else:
                self.remaining, self.used = min(self.remaining, remaining), max(self.used, used)
            self.reset_at = reset_at

        def penalize(self, seconds: float) -> None:
            self.penalty_until = max(self.penalty_until, time.monotonic() + seconds)

    class TokenCache:
        """As in Engine v2 (see API-v2.md)."""

        def __init__(self) -> None:
            self.value = ""
            self.expires_at = 0.0
            self.refreshed = 0
            self.lock = asyncio.Lock()

        async def get(self, refresh: Any, stale: str | None = None) -> str:
            async with self.lock:
                if self.value and self.value != stale and time.monotonic() < self.expires_at:
                    return self.value
                value, lifetime = await refresh()
                lifetime = 3600.0 if lifetime is None else float(lifetime)
                self.value = value
                self.expires_at = time.monotonic() + max(1.0, lifetime - min(60.0, lifetime / 10))
                self.refreshed += 1
                return value

        def clear(self) -> None:
            self.value, self.expires_at = "", 0.0

    class _Bound:
        def __init__(self, budget: RateBudget, src: APISource):
            self._budget, self._src = budget, src

        def __getattr__(self, name: str) -> Any:
            return getattr(self._budget, name)

        async def acquire(self) -> None:
            until = self._src.deadline - min(self._src.settings.fetch_timeout, 5.0)
            await self._budget.acquire(until)

    class _Fetched(agentwatch.Fetched):
        def json(self) -> Any:
            try:
                return json.loads(self.body)
            except ValueError:
                preview = self.body[:80].decode("utf-8", "replace")
                raise TransientError(
                    f"{host_of(self.url)} answered {self.status} with something that is not "
                    f"JSON ({len(self.body)} bytes: {preview!r}); agentwatch retries",
                    kind="bad_response",
                ) from None

    class APISource(Source):
        """v1 Source plus the v2 names these sources use."""

        _deadline: float | None = None

        @property
        def deadline(self) -> float:
            # v1 keeps one Source per source across polls: a passed deadline was the
            # last poll's (the scheduler's own timeout still bounds each poll).
            if self._deadline is None or time.monotonic() > self._deadline:
                self._deadline = time.monotonic() + self.settings.fetch_timeout * 4 + 10
            return self._deadline

        def rate_budget(self, key: str, *, what: str = "", low_water: float = 0.1) -> _Bound:
            budgets = self.shared.setdefault(RateBudget, {})
            if key not in budgets:
                budgets[key] = RateBudget(what or key, low_water)
            return _Bound(budgets[key], self)

        def token_cache(self, key: str) -> TokenCache:
            return self.shared.setdefault(TokenCache, {}).setdefault(key, TokenCache())

        def raise_for_status(self, fetched: Any, what: str) -> None:
            agentwatch.raise_for_status(fetched, what)

        async def fetch(self, url: str, **kwargs: Any) -> _Fetched:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TransientError(
                    f"this poll ran out of time before asking {host_of(url)}", kind="timeout"
                )
            kwargs.pop("follow_redirects", None)
            with contextlib.suppress(KeyError):
                kwargs["deadline"] = min(kwargs["deadline"], left)
            kwargs.setdefault("deadline", min(self.settings.fetch_timeout, left))
            f = await super().fetch(url, **kwargs)
            return _Fetched(f.status, f.headers, f.body, f.url, f.elapsed)
