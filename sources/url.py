"""URL checks: uptime, content and certificate of one URL; items are its state changes.

A url source reports state changes, never one item per poll. Its memory is
`self.state`, stored with each poll's items in one transaction:

  state      "up" | "down" (absent until the first verdict)
  since      when the current state began (for down: the first failed check)
  failures   consecutive failed checks; "down" comes at fail_after
  reason     why the last check failed
  content    {basis, hash, text} of the last good page (watch_content)
  cert       {checked_at, not_after, error, warned} (https, at most daily)

A failed check is a successful poll: the source is healthy, the URL is not.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from agentwatch import (
    Duration,
    Item,
    LLMStage,
    Secret,
    Source,
    StageError,
    human_duration,
    iso,
    markup_text,
    source,
)

SUMMARIZE_PROMPT = """\
The item is a change on a web page the maker watches. In one short paragraph,
say what changed and why it may matter to the maker. Answer with the paragraph only."""

CERT_EVERY = 86400.0  # seconds between certificate reads
CERT_RETRY = 3600.0  # after a read that failed
CONTENT_KEEP = 20_000  # characters of page text kept in state for the next diff
DIFF_LINES = 40  # changed lines shown in a changed item

# Tags that start a new line of a page's text.
_BLOCKS = frozenset(
    [
        "address",
        "article",
        "aside",
        "blockquote",
        "br",
        "button",
        "dd",
        "details",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "label",
        "li",
        "main",
        "nav",
        "ol",
        "option",
        "p",
        "pre",
        "section",
        "summary",
        "table",
        "td",
        "th",
        "title",
        "tr",
        "ul",
    ]
)
_HIDDEN = ("script", "style", "noscript", "template")


def visible_text(page: str, is_html: bool = True) -> str:
    """The page as a reader sees it, one block per line: scripts, styles, tags,
    comments and runs of whitespace gone. Pure, and linear in the page (whose
    markup is read up to agentwatch's HTML_INPUT_LIMIT): hostile markup such as
    200 KB of "<" cannot hold the event loop."""
    text = markup_text(page, hidden=_HIDDEN, breaks=_BLOCKS) if is_html else page
    return "\n".join(line for line in (" ".join(raw.split()) for raw in text.splitlines()) if line)


def mask(text: str, patterns: Iterable[str]) -> str:
    """Blank out what changes on every load (dates, counters, nonces)."""
    for pattern in patterns:
        text = re.sub(pattern, "…", text)
    return text


def text_diff(old: str, new: str) -> tuple[str, int, int]:
    """A short unified diff without headers or context: (text, added, removed)."""
    import difflib

    changed = [
        line
        for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    added = sum(line.startswith("+") for line in changed)
    shown = [f"{line[0]} {line[1:][:300]}" for line in changed[:DIFF_LINES]]
    if len(changed) > DIFF_LINES:
        shown.append(f"… and {len(changed) - DIFF_LINES} more changed line(s)")
    return "\n".join(shown), added, len(changed) - added


def certificate_not_after(der: bytes) -> float:
    """notAfter of a DER X.509 certificate, in epoch seconds. The ssl module only
    decodes certificates it has verified, but the expiry of a self-signed or
    otherwise unverifiable one is worth knowing too."""

    def header(i: int) -> tuple[int, int, int]:  # tag, start and end of the content
        tag, length, i = der[i], der[i + 1], i + 2
        if length & 0x80:
            n = length & 0x7F
            length, i = int.from_bytes(der[i : i + n], "big"), i + n
        return tag, i, i + length

    try:
        _, i, _ = header(0)  # Certificate
        _, i, _ = header(i)  # TBSCertificate: fields follow
        tag, _, end = header(i)
        if tag == 0xA0:  # explicit version
            i = end
        for _ in range(3):  # serialNumber, signature, issuer
            i = header(i)[2]
        _, i, _ = header(i)  # validity
        i = header(i)[2]  # notBefore
        tag, start, end = header(i)
        value = der[start:end].decode("ascii")
        if tag == 0x17:  # UTCTime: two-digit years, 50-99 meaning 19xx (RFC 5280)
            value = ("19" if int(value[:2]) >= 50 else "20") + value
        elif tag != 0x18:  # nor GeneralizedTime
            raise ValueError(f"unexpected tag {tag:#x}")
        when = dt.datetime.strptime(value, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
    except (IndexError, ValueError) as e:
        raise ValueError(f"cannot read the certificate's expiry: {e}") from None
    return when.timestamp()


async def read_certificate(host: str, port: int, timeout: float) -> float:
    """The expiry of the certificate host:port presents, verified or not: whether
    it verifies is the page check's business (httpx2 verifies every request)."""
    import asyncio  # not at the top: `dlq list` and `status` import every source
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA store to load: ~15 ms saved
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    async with asyncio.timeout(timeout):
        _, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=host, ssl_handshake_timeout=timeout
        )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1):
                await writer.wait_closed()
    if not der:
        raise ValueError("the server sent no certificate")
    return certificate_not_after(der)


def _texts(value: str | list[str]) -> list[str]:
    return [v for v in ([value] if isinstance(value, str) else value) if v]


@dataclass
class URLCheck:
    """The outcome of one request to the URL."""

    ok: bool
    reason: str = ""  # why it failed: "status 503 (expected 200)", "timeout: ..."
    status: int | None = None
    latency: float | None = None
    text: str = ""  # visible text, when something needs it
    final_url: str = ""


@source("url")
class URLSource(Source):
    """Uptime, content and certificate checks of one URL; items are its state changes."""

    first_poll: ClassVar[str] = "report"  # it decides itself what is new
    llm_stages: ClassVar[dict[str, LLMStage]] = {"summarize": LLMStage(SUMMARIZE_PROMPT)}

    @dataclass(frozen=True)
    class Options:
        url: str
        expect_status: int = 200
        contains: str | list[str] = ""  # all must appear (page source or visible text)
        not_contains: str | list[str] = ""  # none may appear
        timeout: Duration = Duration(10)
        max_latency: Duration = Duration(0)  # 0: no limit
        cert_days: int = 14  # 0: no certificate check
        fail_after: int = 2
        watch_content: bool = False
        ignore: list[str] = field(default_factory=list)
        method: Literal["GET", "HEAD"] = "GET"
        headers: dict[str, Secret] = field(default_factory=dict)  # may carry credentials

        def __post_init__(self):
            if not re.match(r"^https?://[^/?#\s]+", self.url):
                raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
            if not 100 <= self.expect_status <= 599:
                raise ValueError(f"expect_status must be an HTTP status, got {self.expect_status}")
            if self.fail_after < 1:
                raise ValueError("fail_after must be at least 1")
            if self.cert_days < 0:
                raise ValueError("cert_days must not be negative")
            if self.timeout <= 0:
                raise ValueError("timeout must be more than 0s")
            if self.method == "HEAD" and (
                _texts(self.contains) or _texts(self.not_contains) or self.watch_content
            ):
                raise ValueError("method HEAD gets no page: contains, not_contains and "
                                 "watch_content need GET")  # fmt: skip
            for i, pattern in enumerate(self.ignore):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"ignore[{i}]: bad regex {pattern!r}: {e}") from None

    def describe(self) -> str:
        o = self.options
        parts = [f"{o.method} {o.url} expects {o.expect_status}"]
        parts += [f"contains {t!r}" for t in _texts(o.contains)]
        parts += [f"not {t!r}" for t in _texts(o.not_contains)]
        if o.max_latency:
            parts.append(f"within {o.max_latency:g}s")
        if o.watch_content:
            parts.append("content watched")
        if o.cert_days and o.url.startswith("https:"):
            parts.append(f"cert ≥ {o.cert_days}d")
        return ", ".join(parts)

    @staticmethod
    def describe_state(state: dict) -> str:
        latency = state.get("last_latency")
        last = f"last latency {latency:.2f}s" if latency is not None else "last check: no answer"
        if not state.get("state"):
            if state.get("failures"):
                return f"failing ({state['failures']} check(s)): {state.get('reason', '')}; {last}"
            return ""
        phrase = f"{state['state']} since {iso(state.get('since'))}"
        if state["state"] == "down":
            phrase += f" ({state.get('reason', '')})"
        elif state.get("failures"):
            phrase += f", {state['failures']} failed check(s): {state.get('reason', '')}"
        return f"{phrase}; {last}"

    def stages(self, item: Item) -> tuple[str, ...]:
        # Down, recovered and certificate items are facts: the LLM adds nothing.
        return ("summarize", "notify") if item.kind == "changed" else ("notify",)

    @property
    def label(self) -> str:
        """The URL without its scheme, short enough for a title."""
        shown = re.sub(r"^https?://", "", self.options.url).rstrip("/")
        return shown if len(shown) <= 80 else shown[:79] + "…"

    async def poll(self) -> list[Item]:
        o, now = self.options, time.time()
        if self.state.get("url") != o.url:  # a new source, or its URL changed: start afresh
            self.state.clear()
            self.state["url"] = o.url
        check = await self.check()
        items = self.transition(check, now)
        if o.watch_content and check.ok:
            items += self.content(check.text, now)
        if o.cert_days:
            items += await self.certificate(check, now)
        return items

    async def check(self) -> URLCheck:
        import asyncio

        o = self.options
        try:
            fetched = await self.fetch(
                o.url, method=o.method, headers=o.headers, deadline=o.timeout,
                follow_redirects=not 300 <= o.expect_status < 400,  # checking the redirect itself
            )  # fmt: skip
        except StageError as e:
            return URLCheck(False, self._failure(e))
        result = URLCheck(
            True, status=fetched.status, latency=fetched.elapsed, final_url=fetched.url
        )
        if fetched.status != o.expect_status:
            result.ok = False
            result.reason = f"status {fetched.status} (expected {o.expect_status})"
            return result
        wanted, unwanted = _texts(o.contains), _texts(o.not_contains)
        if wanted or unwanted or o.watch_content:
            content_type = fetched.headers.get("content-type", "")
            charset = re.search(r"charset=[\"']?([\w.:-]+)", content_type, re.I)
            try:
                page = fetched.body.decode(charset.group(1) if charset else "utf-8", "replace")
            except LookupError:
                page = fetched.body.decode("utf-8", "replace")
            is_html = "html" in content_type or page.lstrip()[:1] == "<"
            if len(page) < 200_000:
                plain = visible_text(page, is_html)
            else:  # tens of milliseconds of regexes: off the loop
                plain = await asyncio.to_thread(visible_text, page, is_html)
            # Texts are looked for in the source ("id=signup") and as seen ("Sign&nbsp;up").
            for text in wanted:
                if text not in page and text not in plain:
                    result.ok, result.reason = False, f"missing text {text!r}"
                    return result
            for text in unwanted:
                if text in page or text in plain:
                    result.ok, result.reason = False, f"unwanted text {text!r} found"
                    return result
            result.text = mask(plain, o.ignore) if o.watch_content else ""
        if o.max_latency and fetched.elapsed > o.max_latency:
            result.ok = False
            result.reason = (
                f"slow: answered in {fetched.elapsed:.2f}s (max_latency {o.max_latency:g}s)"
            )
        return result

    def _failure(self, error: StageError) -> str:
        message = str(error)
        verify = re.search(r"certificate verify failed: ([^(]+)", message, re.I)
        if verify:
            return f"certificate: {verify.group(1).strip()}"
        if error.kind == "timeout":
            return f"timeout: no complete answer within {self.options.timeout:g}s"
        if "[SSL" in message:
            return f"TLS: {message}"
        return message

    def transition(self, check: URLCheck, now: float) -> list[Item]:
        """The up/down state machine: an item only when the state changes."""
        s, o = self.state, self.options
        s.update(last_check_at=now, last_latency=check.latency, last_status=check.status)
        if not check.ok:
            s["failures"] = s.get("failures", 0) + 1
            s.setdefault("failing_since", now)
            s["reason"] = check.reason
            if s.get("state") == "down" or s["failures"] < o.fail_after:
                self.log.info("check of %s failed (%d in a row): %s", o.url, s["failures"],
                              check.reason)  # fmt: skip
                return []
            s.update(state="down", since=s["failing_since"])
            self.log.warning("%s is down after %d failed check(s): %s", o.url, s["failures"],
                             check.reason)  # fmt: skip
            return [
                self._item(
                    "down", f"down:{int(s['since'])}", now,
                    title=f"{self.label} is down: {check.reason}",
                    body=f"Failing since {iso(s['since'])} ({s['failures']} checks in a row).",
                    reason=check.reason, status=check.status,
                )
            ]  # fmt: skip
        was, since, reason = s.get("state"), s.get("since", now), s.get("reason", "")
        s.update(failures=0, reason="")
        s.pop("failing_since", None)
        if was == "up":
            return []
        s.update(state="up", since=now)
        if was != "down":
            return []  # the first verdict, and a good one: nothing to say
        downtime = human_duration(now - since)
        self.log.info("%s is back up after %s down", o.url, downtime)
        return [
            self._item(
                "recovered", f"recovered:{int(since)}", now,
                title=f"{self.label} is back up after {downtime} down (was: {reason})",
                body=f"Down since {iso(since)}; now status {check.status} in "
                f"{check.latency:.2f}s.",
                downtime_s=round(now - since),
            )
        ]  # fmt: skip

    def content(self, text: str, now: float) -> list[Item]:
        """A changed item when the visible text differs from the last good page's."""
        basis = hashlib.sha256(json.dumps(self.options.ignore).encode()).hexdigest()[:12]
        digest = hashlib.sha256(text.encode()).hexdigest()
        previous = self.state.get("content")
        self.state["content"] = {"basis": basis, "hash": digest, "text": text[:CONTENT_KEEP]}
        # First look, or the masks changed (every hash would differ): a new baseline.
        if not previous or previous.get("basis") != basis or previous["hash"] == digest:
            return []
        diff, added, removed = text_diff(previous["text"], text[:CONTENT_KEEP])
        if not diff:
            diff = f"(the change is past the first {CONTENT_KEEP} characters of text)"
        counts = f"+{added} −{removed} line(s)" if added or removed else "text changed"
        item_id = f"changed:{int(now)}:{digest[:12]}"
        title = f"{self.label} changed ({counts})"
        return [self._item("changed", item_id, now, title, diff, added=added, removed=removed)]

    async def certificate(self, check: URLCheck, now: float) -> list[Item]:
        """At most daily for https: one warning per certificate that expires within cert_days."""
        import urllib.parse

        o = self.options
        target = next((u for u in (o.url, check.final_url) if u.startswith("https:")), None)
        cert = self.state.setdefault("cert", {})
        wait = CERT_RETRY if cert.get("error") else CERT_EVERY
        if target is None or now < cert.get("checked_at", 0) + wait:
            return []
        parts = urllib.parse.urlsplit(target)
        host, port = parts.hostname or "", parts.port or 443
        cert["checked_at"] = now
        try:
            not_after = await read_certificate(host, port, o.timeout)
        except (OSError, TimeoutError, ValueError) as e:
            cert["error"] = f"{type(e).__name__}: {e}"[:300]
            self.log.info("cannot read the certificate of %s:%d: %s", host, port, cert["error"])
            return []
        cert.update(not_after=not_after, error="")
        left = not_after - now
        if left >= o.cert_days * 86400 or cert.get("warned") == not_after:
            return []
        cert["warned"] = not_after
        date = iso(not_after)[:10]
        when = f"expires in {human_duration(left)}" if left > 0 else "has expired"
        body = (
            f"The TLS certificate of {host}:{port} {when}: it is valid until {iso(not_after)} "
            f"(cert_days = {o.cert_days})."
        )
        if check.reason.startswith("certificate"):
            body += f" It also fails verification: {check.reason.removeprefix('certificate: ')}."
        title = f"{self.label}: certificate {when} ({date})"
        return [self._item("cert", f"cert:{date}", now, title, body, not_after=iso(not_after))]

    def _item(
        self, kind: str, item_id: str, now: float, title: str, body: str, **extra: Any
    ) -> Item:
        extra = {k: v for k, v in extra.items() if v is not None}
        return Item(item_id, title, self.options.url, "", now, body, kind, extra)
