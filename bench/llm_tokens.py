"""Input tokens per classification and per draft, with and without knowledge,
and the dollars per 1,000 items at list prices, with and without prompt caching.

Each case runs the real `agentwatch run --once` against the fake Messages API
(the real SDK talks to it) over the same 50 real Reddit posts from the corpus,
and reads the product's own accounting (the `llm_usage` table). Each draft
request is also counted with the SDK's `messages.count_tokens`. The fake counts
about four characters a token, so the figures are estimates of that precision;
the knowledge cases are the first 5 KB and the first 84 KB of this README (fixed sizes, so
the figures do not drift as the README grows).

    python bench/llm_tokens.py [--items 50]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import tempfile
from pathlib import Path

from common import ROOT, FakeAnthropic, FakeFeeds, agentwatch_command, rss

import agentwatch

CORPUS = ROOT.parent / "shared" / "corpus" / "reddit" / "subreddit_new.json"


def reddit_posts(n: int) -> list[dict]:
    children = json.loads(CORPUS.read_text())["body"]["data"]["children"]
    posts = []
    for i in range(n):
        post = children[i % len(children)]["data"]
        posts.append({
            "title": post["title"],
            "link": f"https://www.reddit.com{post['permalink']}?copy={i}",
            "guid": f"{post['name']}-{i}",
            "description": post.get("selftext") or post["title"],
            "pub_date": agentwatch.dt.datetime.now(agentwatch.dt.UTC),
        })  # fmt: skip
    return posts


def run_case(folder: Path, feeds_url: str, llm: FakeAnthropic, knowledge: str) -> dict:
    llm.reset()
    (folder / "aw.db").unlink(missing_ok=True)
    knowledge_key = ""
    if knowledge:
        (folder / "docs.md").write_text(knowledge)
        knowledge_key = 'knowledge = ["docs.md"]'
    config = folder / "agentwatch.toml"
    config.write_text(
        '[agentwatch]\ndb = "aw.db"\nhealth = ""\nmax_age = "3650d"\n'
        f'[llm]\nabout = "Acme, a self-hosted analytics tool"\nconcurrency = 4\n{knowledge_key}\n'
        f'[[sources]]\nname = "reddit"\ntype = "rss"\nurl = "{feeds_url}/r.xml"\n'
        'backfill = 1000\nnotify = "all"\ndraft = ["negative", "neutral", "positive"]\n'
    )
    done = subprocess.run(
        [*agentwatch_command(), "run", "--once", "--config", str(config)],
        capture_output=True, text=True,
        env={"ANTHROPIC_BASE_URL": llm.url, "ANTHROPIC_API_KEY": "bench", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"run --once failed:\n{done.stderr[-2000:]}")
    db = sqlite3.connect(folder / "aw.db")
    stages = {}
    for stage, calls, model, inp, out, read, write in db.execute(
        """SELECT stage, COUNT(*), MAX(model), SUM(input_tokens), SUM(output_tokens),
                  SUM(cache_read_tokens), SUM(cache_write_tokens)
           FROM llm_usage GROUP BY stage"""
    ):
        stages[stage] = {"calls": calls, "model": model, "input": inp / calls,
                         "output": out / calls, "cache_read": read / calls,
                         "cache_write": write / calls}  # fmt: skip
    db.close()
    for stage, kind in (("classify", "classify"), ("draft", "text")):
        sent = [r["json"] for r in llm.requests if r["kind"] == kind]
        stages[stage]["counted"] = count_tokens(llm.url, sent)
    return stages


def count_tokens(base_url: str, requests: list[dict]) -> float:
    """The SDK's token counting of the requests as sent (all input, cached or not)."""
    import anthropic

    client = anthropic.Anthropic(base_url=base_url, api_key="bench")
    counts = []
    for request in requests:
        fields = {k: v for k, v in request.items() if k != "max_tokens"}
        counts.append(client.messages.count_tokens(**fields).input_tokens)
    return sum(counts) / len(counts)


def dollars(settings: agentwatch.LLMSettings, stage: dict, *, cached: bool) -> float:
    """USD for one call; uncached means every input token at the input price."""
    price = agentwatch.price_of(settings, stage["model"])
    if cached:
        return (stage["input"] * price.input + stage["cache_read"] * price.cache_read
                + stage["cache_write"] * price.input * 1.25 + stage["output"] * price.output) / 1e6  # fmt: skip
    full_input = stage["input"] + stage["cache_read"] + stage["cache_write"]
    return (full_input * price.input + stage["output"] * price.output) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=50)
    args = parser.parse_args()
    readme = (ROOT / "README.md").read_text()
    cases = {
        "no knowledge": "",
        "5 KB knowledge": readme[:5000],
        "84 KB knowledge": readme[:84_000],
    }
    settings = agentwatch.LLMSettings()
    with FakeFeeds() as feeds, FakeAnthropic() as llm, tempfile.TemporaryDirectory() as tmp:
        feeds.set("/r.xml", rss(reddit_posts(args.items)), conditional=False)
        print(f"{args.items} real Reddit posts, default models "
              f"({settings.model} classifies, {settings.draft_model} drafts), list prices\n")  # fmt: skip
        for name, knowledge in cases.items():
            stages = run_case(Path(tmp), feeds.url, llm, knowledge)
            classify, draft = stages["classify"], stages["draft"]
            draft_input = draft["input"] + draft["cache_read"] + draft["cache_write"]
            per_item = {c: dollars(settings, classify, cached=c) + dollars(settings, draft, cached=c)
                        for c in (True, False)}  # fmt: skip
            print(f"{name}:")
            print(
                f"  classification: {classify['input']:,.0f} input tokens (SDK count_tokens: "
                f"{classify['counted']:,.0f}), "
                f"{classify['output']:,.0f} output ({classify['calls']} calls)"
            )
            print(
                f"  draft: {draft_input:,.0f} input tokens (SDK count_tokens: "
                f"{draft['counted']:,.0f}), of them {draft['cache_read']:,.0f} read from and "
                f"{draft['cache_write']:,.0f} written to the cache on average; "
                f"{draft['output']:,.0f} output ({draft['calls']} calls)"
            )
            print(f"  USD per 1,000 items classified and drafted: {per_item[True] * 1000:.2f} "
                  f"as run (caching where it applies), {per_item[False] * 1000:.2f} without caching\n")  # fmt: skip


if __name__ == "__main__":
    main()
