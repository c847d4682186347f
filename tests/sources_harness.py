"""Polling sources in-process the way the scheduler does, for the tests of sources/,
and the config of an end-to-end run."""

from __future__ import annotations

import asyncio
import contextlib
import json

import agentwatch
from agentwatch import Settings


class Harness:
    """Sources of one process (one shared dict, one HTTP client), polled the way
    the scheduler polls: state round-trips through JSON and is kept only when
    the poll succeeds."""

    def __init__(self, fetch_timeout: float = 5):
        self.settings = Settings(fetch_timeout=fetch_timeout)
        self.shared: dict = {}
        self.http = None

    def source(self, type: str, name: str = "s", **opts):
        config = agentwatch.build_source_config({"name": name, "type": type, **opts}, "sources[0]")
        return agentwatch.make_source(config, self.settings, self.http, self.shared)

    async def poll(self, src) -> list[agentwatch.Item]:
        before = json.loads(json.dumps(src.state))
        src._deadline = None  # a new poll: a new deadline, as the scheduler gives
        try:
            return await src.poll()
        except BaseException:
            src.state = before
            raise
        finally:
            src.state = json.loads(json.dumps(src.state))


@contextlib.asynccontextmanager
async def harness(fetch_timeout: float = 5):
    h = Harness(fetch_timeout)
    h.http = agentwatch.make_http_client(h.settings)
    try:
        yield h
    finally:
        await h.http.aclose()


def run(coro):
    return asyncio.run(coro)


def ids(items) -> list[str]:
    return [i.item_id for i in items]


def e2e_config(make_config, type: str, llm: str = 'about = "Acme is an analytics tool."',
               every: str = "1s", name: str = "src", **keys) -> object:  # fmt: skip
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    return make_config(f"""
        [agentwatch]
        db = "aw.db"
        health = ""
        retry_base = "1s"
        retry_max = "2s"

        [llm]
        {llm}

        [slack]
        webhook_url = "${{SLACK_WEBHOOK_URL}}"

        [[sources]]
        name = "{name}"
        type = "{type}"
        every = "{every}"
        notify = "all"
        {lines}
    """)
