"""The floor under an unchanged poll: CPU per conditional GET answered 304 by
the HTTP stack alone (httpx2 and httpcore2, no agentwatch code, no SQLite),
with httpx2's stock network backend and with the one agentwatch installs
(`make_http_client`). The server runs in its own process so its CPU is not
counted; requests go out `--concurrency` at a time over kept-alive connections.

    python bench/http_floor.py [--requests 3000] [--concurrency 1 10 60]

Compare with bench/poll_304.py's CPU per poll: the difference is what
agentwatch itself spends on a poll (scheduling, state, the commit, logging)."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from types import SimpleNamespace

SERVER = """
import http.server, sys

class NotModified(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real feed host
    def do_GET(self):
        self.send_response(304)
        self.send_header("ETag", '"v1"')
        self.end_headers()
    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # 60 connections open at once

server = Server(("127.0.0.1", 0), NotModified)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


async def cpu_per_request(client, url: str, requests: int, concurrency: int) -> float:
    async def worker(count: int) -> None:
        for _ in range(count):
            response = await client.get(url, headers={"If-None-Match": '"v1"'})
            assert response.status_code == 304, response.status_code

    await asyncio.gather(*(worker(3) for _ in range(concurrency)))  # open the connections
    share = requests // concurrency
    cpu0 = time.process_time()
    await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    return (time.process_time() - cpu0) / (share * concurrency)


async def measure(url: str, requests: int, concurrencies: list[int]) -> None:
    import httpx2

    from agentwatch import make_http_client

    def agentwatch_client():
        return make_http_client(SimpleNamespace(fetch_timeout=30.0))

    def stock_client():
        limits = httpx2.Limits(max_connections=100, max_keepalive_connections=50)
        return httpx2.AsyncClient(limits=limits, timeout=30.0, trust_env=False)

    for label, make in (("httpx2, stock backend", stock_client),
                        ("httpx2, agentwatch's AsyncioBackend", agentwatch_client)):  # fmt: skip
        figures = []
        for concurrency in concurrencies:
            async with make() as client:
                ms = await cpu_per_request(client, url, requests, concurrency) * 1000
            figures.append(f"{ms:.2f} ms at {concurrency}")
        print(f"{label}: CPU per 304 request: {', '.join(figures)} at once")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 60])
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        asyncio.run(measure(f"http://127.0.0.1:{port}/feed.xml", args.requests, args.concurrency))
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
