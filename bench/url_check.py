"""What one URL check costs: HTTP requests, connections and CPU time.

    python bench/url_check.py [--checks 300]

A loopback target runs in a child process, so its CPU is not counted. This
process runs the url source's poll() N times per scenario the way the scheduler
does (state read from SQLite before each poll, written back after it) and prints,
per check: HTTP requests and TCP connections seen by the target, and CPU seconds
(user + system, getrusage of this process, all threads). The certificate read
(TLS handshake and DER parse, at most once a day per https URL) is measured
alone. Figures, not pass/fail; needs `cryptography` (the test extra) for https.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import resource
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import agentwatch_sources.url as url_source  # noqa: E402

import agentwatch  # noqa: E402

SMALL = b"<html><head><title>Acme</title></head><body><h1>Acme</h1><p>Sign up</p></body></html>"
# A landing page of about 60 KB: markup, an inline script and style, 400 paragraphs.
BIG = (
    b"<html><head><title>Acme</title><style>"
    + b"p { margin: 0 } " * 200
    + b"</style><script>"
    + b"var x = 1; " * 500
    + b"</script></head><body><h1>Acme</h1>"
    + b"".join(
        b'<div class="row"><p>Feature %d: fast, <b>private</b> analytics &amp; more.</p></div>' % i
        for i in range(400)
    )
    + b"<p>Sign up</p><p>Updated 12:00:00</p></body></html>"
)


# -- the target, in a child process ------------------------------------------------


def serve(tls: list[str] | None) -> None:
    counts = {"requests": 0, "connections": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
        wbufsize = 1 << 16  # head and body in one write: no Nagle/delayed-ACK stall

        def do_GET(self):
            if self.path == "/__count":
                with lock:
                    body = json.dumps(counts).encode()
            else:
                with lock:
                    counts["requests"] += 1
                body = {"/small": SMALL, "/big": BIG, "/fail": b"down"}.get(self.path, SMALL)
            self.send_response(503 if self.path == "/fail" else 200)
            if self.path == "/close":  # as servers do with connections idle for minutes
                self.send_header("Connection", "close")
                self.close_connection = True
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self):
            sock, address = super().get_request()
            with lock:
                counts["connections"] += 1
            if tls:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(*tls)
                sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            return sock, address

    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


class Target:
    def __init__(self, tls: tuple[Path, Path] | None = None):
        argv = [sys.executable, __file__, "--serve", *(map(str, tls) if tls else [])]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.tls = tls

    def counts(self) -> dict:
        import http.client

        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls[0]))
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port)
        conn.request("GET", "/__count")
        counts = json.loads(conn.getresponse().read())
        conn.close()
        counts["connections"] -= 1  # this one
        return counts

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


# -- the measurement -----------------------------------------------------------------

NAMES = itertools.count()


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(
    label: str, target: Target, options: dict, n: int, store: agentwatch.Store, verify=None
) -> None:
    name = f"s{next(NAMES)}"
    table = {"name": name, "type": "url", "every": "1m", **options}
    config = agentwatch.build_source_config(table, "bench")
    settings = agentwatch.Settings()
    http = agentwatch.make_http_client(settings)
    if verify is not None:  # the same client, trusting the bench's own certificate
        import httpx2

        await http.aclose()
        http = httpx2.AsyncClient(
            headers={"User-Agent": agentwatch.USER_AGENT}, follow_redirects=True, verify=verify,
            timeout=settings.fetch_timeout, trust_env=False,
        )  # fmt: skip
    src = agentwatch.make_source(config, settings, http, {})
    store.source_row(name, "url")

    async def check() -> None:
        row = store.source_row(name, "url")
        src.state = json.loads(row["state"] or "{}")
        await src.poll()
        store.record_poll(name, [], state=src.state, validators={},
                          next_poll_at=time.time() + 60)  # fmt: skip

    for _ in range(5):  # warm: imports, the first connection, the first verdict
        await check()
    before, started, seen = cpu(), time.perf_counter(), target.counts()
    for _ in range(n):
        await check()
    spent, wall, after = cpu() - before, time.perf_counter() - started, target.counts()
    await http.aclose()
    requests = (after["requests"] - seen["requests"]) / n
    connections = (after["connections"] - seen["connections"]) / n
    state_kb = len(json.dumps(src.state)) / 1000
    print(
        f"{label:<50} {requests:5.2f} req  {connections:5.2f} conn  "
        f"{spent / n * 1000:6.2f} ms CPU  {wall / n * 1000:6.2f} ms wall  state {state_kb:5.1f} KB"
    )


async def measure_cert_read(target: Target, n: int) -> None:
    for _ in range(3):
        await url_source.read_certificate("127.0.0.1", target.port, 10)
    before, started, seen = cpu(), time.perf_counter(), target.counts()
    for _ in range(n):
        await url_source.read_certificate("127.0.0.1", target.port, 10)
    spent, wall, after = cpu() - before, time.perf_counter() - started, target.counts()
    connections = (after["connections"] - seen["connections"]) / n
    print(
        f"{'certificate read (https, at most daily)':<50} {0:5.2f} req  {connections:5.2f} conn  "
        f"{spent / n * 1000:6.2f} ms CPU  {wall / n * 1000:6.2f} ms wall"
    )


async def main(n: int) -> None:
    from fake_targets import make_certificate

    logging.disable(logging.WARNING)  # "is down" is the point of one scenario, not news
    folder = Path(tempfile.mkdtemp(prefix="agentwatch-bench-"))
    store = agentwatch.Store(folder / "bench.db")
    tls = make_certificate(folder, days=60)
    plain, secure = Target(), Target((tls.cert, tls.key))
    verify = ssl.create_default_context(cafile=str(tls.cert))
    print(f"{n} checks per scenario, Python {sys.version.split()[0]}, after 5 warm-up checks\n")
    try:
        await measure(
            "http GET, 200, 90 B page, kept-alive connection",
            plain,
            {"url": plain.url + "/small"},
            n,
            store,
        )
        await measure("http HEAD, 200", plain, {"url": plain.url + "/small", "method": "HEAD"}, n, store)  # fmt: skip
        await measure(
            "http GET, 503 (the URL is down)", plain, {"url": plain.url + "/fail"}, n, store
        )
        await measure(
            "http GET 60 KB page, contains, watch_content",
            plain,
            {"url": plain.url + "/big", "contains": "Sign up", "watch_content": True,
             "ignore": [r"Updated \d\d:\d\d:\d\d"]},
            n, store,
        )  # fmt: skip
        await measure("https GET, 200, kept-alive connection", secure, {"url": secure.url + "/small"}, n, store, verify)  # fmt: skip
        await measure("http GET, new connection each check", plain, {"url": plain.url + "/close"}, n, store)  # fmt: skip
        await measure("https GET, new TLS connection each check", secure, {"url": secure.url + "/close"}, n, store, verify)  # fmt: skip
        await measure_cert_read(secure, n)
    finally:
        plain.stop()
        secure.stop()
        store.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2:] or None)
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--checks", type=int, default=300, help="checks per scenario")
        asyncio.run(main(parser.parse_args().checks))
