"""Slack app mode and the other destinations (issue 14), and Slack text that
Slack cannot refuse (issue 9, item 7)."""

from __future__ import annotations

import json
import re

from fakes import slack_payload_problem

import agentwatch

# -- mrkdwn that Slack accepts as we meant it ---------------------------------

_ENTITY = re.compile(r"&(?!(?:amp|lt|gt);)")
_ANGLE = re.compile(r"<([^<>]*)>")


def mrkdwn_problem(text: str) -> str | None:
    """What is malformed in `text` as Slack mrkdwn: a bare or cut entity, or a
    `<...>` that is cut, nested or not a link we made."""
    if _ENTITY.search(text):
        return f"an '&' that does not start an entity: {_ENTITY.search(text).start()}"
    rest = _ANGLE.sub("", text)
    if "<" in rest or ">" in rest:
        return "a '<' or '>' outside a whole <url|label>"
    for inside in _ANGLE.findall(text):
        if not re.fullmatch(r"https?://[^\s|]+\|[^|]*", inside):
            return f"<{inside[:40]}…> is not a <url|label> link"
    return None


def mrkdwn_objects(obj) -> list[dict]:
    found = []
    if isinstance(obj, dict):
        if obj.get("type") == "mrkdwn":
            found.append(obj)
        for value in obj.values():
            found.extend(mrkdwn_objects(value))
    elif isinstance(obj, list):
        for value in obj:
            found.extend(mrkdwn_objects(value))
    return found


def row(**kw) -> dict:
    base = {"id": 1, "source": "s", "item_id": "1", "kind": "", "title": "t",
            "url": "https://x/1", "author": "", "body": "", "classification": None,
            "draft": None, "summary": None}  # fmt: skip
    return {**base, **kw}


def test_mrkdwn_is_verbatim_and_never_cut_inside_a_link_or_an_entity():
    # A URL of query parameters: escaped, every '&' becomes five characters, so
    # the link alone is longer than a section may be.
    url = "https://x.example/search?" + "&".join(f"q{i}=a" for i in range(700))
    classification = json.dumps({"relevant": True, "sentiment": "negative",
                                 "intent": "complaint", "urgency": "high",
                                 "summary": "&<>" * 300})  # fmt: skip
    rows = [
        row(title="<b>&amp; " * 80, url=url, author="&" * 300, classification=classification,
            draft="&lt;" * 2000),
        row(title="short", url=url, body="a & b\n" * 900),
        row(title="x & y", url="https://x/" + "&" * 1990, draft="<!channel> & " * 500),
    ]  # fmt: skip
    payloads = [agentwatch.render_message([r]) for r in rows] + [agentwatch.render_message(rows)]
    for payload in payloads:
        assert slack_payload_problem(payload) is None
        objects = mrkdwn_objects(payload["blocks"])
        assert objects
        for obj in objects:
            assert obj.get("verbatim") is True, obj
            assert mrkdwn_problem(obj["text"]) is None, mrkdwn_problem(obj["text"])
            assert len(obj["text"]) <= agentwatch.SECTION_LIMIT
        assert mrkdwn_problem(payload["text"]) is None


def test_cut_counts_escaped_characters_and_keeps_entities_whole():
    for text in ("&" * 100, "a<b>c&" * 40, "<https://x|y>" * 20):
        for limit in (1, 2, 5, 6, 17, 60):
            out = agentwatch.cut(text, limit)
            assert len(out) <= limit
            assert mrkdwn_problem(out) is None, (text, limit, out)
