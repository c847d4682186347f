"""The HTTP client's network backend: agentwatch's own, on asyncio transports
(an unchanged poll's CPU was a third anyio's; see AsyncioBackend)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import httpx2
import pytest
from fakes import rss

import agentwatch
from agentwatch import AsyncioBackend, Settings, make_http_client


def test_the_client_pool_uses_the_asyncio_backend():
    # httpx2 takes no backend argument: this notices a release that moves the pool.
    client = make_http_client(Settings())
    assert isinstance(client._transport._pool._network_backend, AsyncioBackend)


def test_requests_304_and_reuse_through_the_backend(feeds):
    url = feeds.url + "/feed.xml"
    feeds.set("/feed.xml", rss([{"title": "a", "link": "https://e.com/a", "guid": "a"}]))

    async def go():
        async with make_http_client(Settings()) as client:
            first = await client.get(url)
            again = await client.get(url, headers={"If-None-Match": first.headers["etag"]})
            pool = client._transport._pool
            return first, again, len(pool.connections)

    first, again, connections = asyncio.run(go())
    assert first.status_code == 200 and b"<rss" in first.content
    assert again.status_code == 304 and again.content == b""
    assert connections == 1  # kept alive and reused


def test_a_connection_the_server_closed_is_not_reused():
    """An idle connection the server closed reads as readable (its end of file
    arrived), so the pool drops it instead of sending on it."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    answered = []

    async def serve():
        loop = asyncio.get_running_loop()
        server.setblocking(False)
        for _ in range(2):
            conn, _ = await loop.sock_accept(server)
            await loop.sock_recv(conn, 65536)
            answered.append(1)
            await loop.sock_sendall(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await asyncio.sleep(0.05)
            conn.close()  # the server ends the keep-alive connection

    async def go():
        task = asyncio.create_task(serve())
        async with make_http_client(Settings()) as client:
            one = await client.get(f"http://127.0.0.1:{port}/")
            await asyncio.sleep(0.2)  # the server's FIN arrives while idle
            two = await client.get(f"http://127.0.0.1:{port}/")
        await task
        return one, two

    one, two = asyncio.run(go())
    server.close()
    assert one.text == two.text == "ok" and len(answered) == 2


def test_connect_errors_and_timeouts_map_as_before():
    async def refused():
        async with make_http_client(Settings()) as client:
            await client.get("http://127.0.0.1:9/")

    with pytest.raises(httpx2.ConnectError):
        asyncio.run(refused())

    server = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    port = server.getsockname()[1]

    async def silent():
        async with make_http_client(Settings()) as client:
            await client.get(f"http://127.0.0.1:{port}/", timeout=0.3)

    with pytest.raises(httpx2.ReadTimeout):
        asyncio.run(silent())
    server.close()
    assert agentwatch.READ_AHEAD > 65536  # a read of httpcore2's size never pauses for nothing


def test_freed_heap_memory_goes_back_to_the_system():
    # A burst leaves glibc's heap full of freed chunks under a few live ones; its own
    # trimming returns only the top. Measured in a fresh process: this one's heap is
    # whatever earlier tests left.
    script = """
import agentwatch
def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
chunks = [b"x" * (600 + i % 3000) for i in range(40000)]
kept = chunks[15::16]  # one live chunk in sixteen pins the heap's top
del chunks
before = rss_kb()
agentwatch.release_freed_memory()
print(before, rss_kb())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before - after > 20_000, (before, after)  # about 60 MB were freed
