"""A loopback web page for URL checks, over HTTP or HTTPS, whose answer a test controls.

    with FakeTarget() as target:                      # http://127.0.0.1:PORT/
        target.answer(status=503)                     # every request from now on
        target.script({"status": 500}, {"delay": 3})  # the next two requests, then the lasting answer
        target.wait_for(3)                            # three requests answered

    tls = make_certificate(tmp_path, days=5)          # self-signed, expires in 5 days
    with FakeTarget(tls=tls) as target:               # https://127.0.0.1:PORT/
        ...

The server is the plumbing of fakes.py (a threaded HTTP/1.1 server on a daemon
thread); the HTTPS variant wraps each accepted connection in TLS with a
certificate made in the test by `cryptography`, so certificates of any expiry
can be served.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakes
from fakes import DEFAULT_TIMEOUT, Request, Response


@dataclass
class TLSFiles:
    cert: Path
    key: Path
    not_after: dt.datetime


def make_certificate(folder: Path, days: float = 90, host: str = "127.0.0.1") -> TLSFiles:
    """A self-signed certificate for `host` (an IP address or a name) that
    expires `days` from now (negative: already expired)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_after = now + dt.timedelta(days=days)
    try:
        alt_name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt_name = x509.DNSName(host)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now, not_after) - dt.timedelta(days=30))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([alt_name]), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"cert-{uuid.uuid4().hex[:8]}"
    files = TLSFiles(folder / f"{stem}.pem", folder / f"{stem}.key", not_after)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


class _TLSServer(fakes._Server):
    def __init__(self, fake: FakeTarget, context: ssl.SSLContext):
        self.context = context
        super().__init__(fake)

    def get_request(self):
        sock, address = super().get_request()
        self.fake._note_connection()
        # The handshake happens on the first read, in the handler's thread: a client
        # that rejects the certificate must not stall the accepting loop.
        return self.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), address


class FakeTarget(fakes._FakeServer):
    """One page, served at every path. The lasting answer is 200 with a small
    HTML page; `answer()` changes it, `script()` queues one-off answers.

    Each record: {method, path, headers, status, time}; status is None while
    the answer is delayed.
    """

    DEFAULT_BODY = (
        "<html><head><title>Acme</title></head><body><h1>Acme</h1><p>Sign up</p></body></html>"
    )

    def __init__(self, tls: TLSFiles | None = None) -> None:
        super().__init__()
        self.tls = tls
        self._answer = {"status": 200, "body": self.DEFAULT_BODY, "delay": 0.0, "headers": {}}
        self._script: list[dict] = []
        self._requests: list[dict] = []
        self._connections = 0

    # -- lifecycle: the TLS variant needs its own server class --------------

    def _make_server(self):
        if self.tls is None:
            return fakes._Server(self)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls.cert, self.tls.key)
        return _TLSServer(self, context)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    # -- programming -------------------------------------------------------

    def answer(
        self,
        *,
        status: int | None = None,
        body: str | bytes | None = None,
        delay: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Change the lasting answer; only the given fields change."""
        given = {"status": status, "body": body, "delay": delay, "headers": headers}
        with self._cond:
            self._answer.update({k: v for k, v in given.items() if v is not None})

    def script(self, *answers: dict[str, Any]) -> None:
        """Queue one-off answers (dicts of status, body, delay, headers over the
        lasting answer), one per request."""
        for answer in answers:
            if unknown := set(answer) - {"status", "body", "delay", "headers"}:
                raise TypeError(f"unknown answer keys {sorted(unknown)}")
        with self._cond:
            self._script.extend(dict(a) for a in answers)

    # -- reading -----------------------------------------------------------

    @property
    def requests(self) -> list[dict]:
        with self._cond:
            return [dict(r) for r in self._requests]

    @property
    def hits(self) -> int:
        """Requests answered so far."""
        with self._cond:
            return sum(1 for r in self._requests if r["status"] is not None)

    @property
    def connections(self) -> int:
        """TCP connections accepted (TLS variant only): page checks and certificate reads."""
        with self._cond:
            return self._connections

    def wait_for(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
        """Block until `n` requests in all have been answered."""
        return self._wait(
            lambda: self.requests if self.hits >= n else None,
            timeout,
            lambda: f"{self.hits} request(s) answered: {self.requests}",
        )

    # -- serving -----------------------------------------------------------

    def _note_connection(self) -> None:
        with self._cond:
            self._connections += 1
            self._cond.notify_all()

    def _handle(self, request: Request) -> Response:
        with self._cond:
            answer = {**self._answer, **(self._script.pop(0) if self._script else {})}
        entry = self._record(
            self._requests,
            {
                "method": request.method,
                "path": request.path,
                "headers": request.headers,
                "status": None,
                "time": request.time,
            },
        )
        if answer["delay"]:
            self._sleep(answer["delay"])
        body = answer["body"]
        data = body.encode() if isinstance(body, str) else bytes(body)
        headers = {"Content-Type": "text/html; charset=utf-8", **answer["headers"]}
        self._update(entry, status=answer["status"])
        return Response(answer["status"], data, headers)
