"""The device API's HTTP handler: parsing, authorization, bodies, replies, errors.

What each endpoint does is ``_endpoints``' (its ``ROUTES`` table); this module is
the HTTP around it: one request at a time per connection, every reply JSON (a
log is text), every refusal ``{"error": "<one line>", "kind": ...}`` with the
status ``pvpy.errors.http_status`` gives.

A class over 250 lines: ``BaseHTTPRequestHandler`` is one class whose hooks
(``parse_request``, ``send_error``, ``handle_one_request``, ``do_*``) must all be
overridden on the same object; what is not a hook (endpoints, logs, listeners,
staging) lives elsewhere.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import select
import socket
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import parse_qs, urlsplit

from pvpy.device.api._endpoints import ROUTES
from pvpy.device.api._limits import BIG_BODY, DIGITS
from pvpy.errors import ApiError, PvpyError, http_status, one_line
from pvpy.log import get_logger

if TYPE_CHECKING:
    from pvpy.device.api._endpoints import Api
    from pvpy.device.api._listeners import Listener

log = get_logger("api")


class ClientGone(Exception):
    """The client stopped sending or reading; nothing can be answered.

    Not a PvpyError (there is no one to tell) and not an OSError (the store would
    take that for a disk problem).
    """


class _Body:
    """A request body of known length as a stream: never reads past it, and turns
    a slow or vanished client into ``ClientGone``."""

    def __init__(self, rfile: BinaryIO, length: int) -> None:
        self.rfile = rfile
        self.left = length

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        want = self.left if n is None or n < 0 else min(n, self.left)
        try:
            data = self.rfile.read(want)
        except (OSError, ValueError) as e:
            raise ClientGone(f"client stopped sending ({e})") from e
        if not data:
            raise ClientGone("client closed the connection before the end of its body")
        self.left -= len(data)
        return data


class _Prefixed(io.RawIOBase):
    """A connection's bytes: those read already, then the rest from the socket."""

    def __init__(self, prefix: bytes, raw: socket.SocketIO) -> None:
        self.prefix = memoryview(prefix)
        self.raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        if self.prefix:
            n = min(len(buffer), len(self.prefix))
            buffer[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        return self.raw.readinto(buffer)

    def close(self) -> None:
        self.raw.close()
        super().close()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "pvpy"  # not the Python version: no help to an attacker

    # -- plumbing

    @property
    def listener(self) -> Listener:
        return cast("Listener", self.server)

    @property
    def api(self) -> Api:
        return self.listener.api

    def setup(self) -> None:
        super().setup()
        prefix = self.listener.take_prefix(self.connection)
        if prefix:  # the gate read the first request head (to check its token): read it again
            self.rfile.close()
            raw = socket.SocketIO(self.connection, "rb")
            self.rfile = io.BufferedReader(_Prefixed(prefix, raw))
        # The longest silence allowed on any read or write of this connection.
        self.connection.settimeout(self.api.limits.client_timeout)
        self.responded = False
        self.body_left = 0
        self.body: _Body | None = None
        self.expect_continue = False
        self.query: dict[str, str] = {}
        self.big_body = False

    def address_string(self) -> str:
        address = self.client_address
        return str(address[0]) if isinstance(address, tuple) and address else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http", client=self.address_string(), message=format % args)

    def handle_one_request(self) -> None:
        # The whole request head must arrive within head_timeout (slowloris).
        self.listener.set_deadline(self.connection, time.monotonic() + self.api.limits.head_timeout)
        self.responded = False
        self.body_left = 0
        self.body = None
        self.expect_continue = False
        super().handle_one_request()

    def handle_expect_100(self) -> bool:
        # "100 Continue" only once the request passed auth and limits (see body_stream).
        self.expect_continue = True
        return True

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # "GET /path" alone: no headers, no token
            self.send_error(400, "HTTP/0.9 is not supported")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, huge headers) as JSON too."""
        self.close_connection = True
        # A request line too broken to name a version is answered as HTTP/1.1: http.server
        # would assume HTTP/0.9 and send the body without a status line.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.1"
        self.reply_error(code, message or http.server.BaseHTTPRequestHandler.responses.get(
            code, ("error",))[0])  # fmt: skip

    def unread(self) -> int:
        return self.body.left if self.body is not None else self.body_left

    def finish_body(self) -> None:
        """Keep the connection only when the request body was consumed (or is small).

        Unread body bytes would be taken for the next request on the connection.
        """
        left = self.unread()
        if left <= 0 or self.close_connection:
            return
        if left > 65536 or self.expect_continue:
            self.close_connection = True
            return
        try:
            _Body(cast(BinaryIO, self.rfile), left).read()
        except ClientGone:
            self.close_connection = True

    # -- replies

    def reply(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        body = (json.dumps(doc) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.responded = True
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_error(self, status: int, reason: str, kind: str = "http", **extra: Any) -> None:
        headers = {"WWW-Authenticate": 'Bearer realm="pvpy"'} if status == 401 else {}
        if status == 503:
            headers["Retry-After"] = "1"
        self.reply(status, {"error": one_line(reason), "kind": kind, **extra}, headers)

    def reply_head(self, length: int) -> None:
        """200 to a HEAD: the length of what a GET would send, no body."""
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.responded = True

    def reply_text(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.responded = True
        self.wfile.write(data)

    def reply_stream(self, chunks: Iterable[bytes]) -> None:
        """200, text sent chunk by chunk as ``chunks`` yields it; the connection
        ends with the stream (it ends only when the client leaves)."""
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.responded = True
            self.close_connection = True
            for chunk in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
        except OSError as e:
            raise ClientGone(f"log follower left ({e})") from e

    def client_left(self) -> bool:
        """A follower that closed its end (its socket reads EOF) is gone."""
        conn = self.connection
        try:
            readable, _, _ = select.select([conn], [], [], 0)
            if not readable:
                return False
            if not isinstance(conn, ssl.SSLSocket):
                return not conn.recv(1, socket.MSG_PEEK)
            # TLS cannot peek: read (a follower has nothing to say but close_notify).
            conn.setblocking(False)
            try:
                return not conn.recv(1)
            except ssl.SSLWantReadError:
                return False
            finally:
                conn.settimeout(self.api.limits.client_timeout)
        except (OSError, ValueError):
            return True

    # -- dispatch

    def do_GET(self) -> None:
        self.dispatch()

    def do_HEAD(self) -> None:
        self.dispatch()

    def do_PUT(self) -> None:
        self.dispatch()

    def do_POST(self) -> None:
        self.dispatch()

    def do_DELETE(self) -> None:
        self.dispatch()

    def do_PATCH(self) -> None:
        self.dispatch()

    def do_OPTIONS(self) -> None:
        self.dispatch()

    def dispatch(self) -> None:
        self.listener.set_deadline(self.connection, None)
        lengths = self.headers.get_all("Content-Length") or []
        raw = lengths[0] if lengths else "0"
        self.body = None
        # Unknown length (chunked, garbage): an unread body can only be dropped by closing.
        self.body_left = int(raw) if DIGITS.fullmatch(raw) else 1 << 62
        if "Transfer-Encoding" in self.headers:
            self.body_left = 1 << 62
        try:
            if len(lengths) > 1 or not DIGITS.fullmatch(raw):
                # Where this request ends is a guess, and the next one would start
                # there (request smuggling): refuse it and close (RFC 9112 6.3).
                self.close_connection = True
                raise ApiError(400, "bad Content-Length: one decimal length at most")
            self.route()
        except ApiError as e:
            self.fail(e.status, e.reason, e.kind, **e.extra)
        except PvpyError as e:
            status, kind = http_status(e)
            if status >= 500:
                log.error("request failed", path=self.path, error=str(e))
            self.fail(status, str(e), kind)
        except (ClientGone, ConnectionError, TimeoutError) as e:
            log.info("client gone", client=self.address_string(), reason=str(e))
            self.close_connection = True
        except Exception as e:  # a bug: the server must outlive it; logged, one line, 500
            log.exception("request crashed", path=self.path)
            self.fail(500, f"internal error: {type(e).__name__}", "internal")
        finally:
            if self.big_body:
                self.big_body = False
                self.api.big_bodies.release()
            self.finish_body()

    def fail(self, status: int, reason: str, kind: str, **extra: Any) -> None:
        if self.responded:  # a stream already under way: all we can do is stop it
            self.close_connection = True
            return
        if self.unread() > 65536 or self.expect_continue:
            self.close_connection = True  # said in the reply; finish_body closes
        with contextlib.suppress(OSError):
            self.reply_error(status, reason, kind, **extra)

    def route(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        allowed: list[str] = []
        for method, pattern, endpoint in ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            allowed.append(method)
            if method == self.command:
                self.authorize()
                self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                endpoint(self, **match.groupdict())
                return
        if allowed:
            self.authorize()  # no probing of routes without the token
            raise ApiError(405, f"{self.command} not allowed on {path}",
                           allowed=sorted(set(allowed)))  # fmt: skip
        self.authorize()
        raise ApiError(404, f"no such endpoint: {one_line(path, 100)}")

    def authorize(self) -> None:
        if self.listener.needs_token and not self.api.token.accepts(
            self.headers.get("Authorization")
        ):
            raise ApiError(401, "missing or wrong bearer token", kind="auth")

    # -- bodies

    def body_length(self, limit: int) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send the body with a Content-Length, not chunked")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise ApiError(411, "Content-Length required")
        length = int(values[0])  # one decimal value: checked by dispatch
        if length > limit:
            raise ApiError(413, f"body of {length} bytes is over the limit of {limit} bytes")
        return length

    def body_stream(self, length: int) -> BinaryIO:
        if self.expect_continue:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
            self.expect_continue = False
        limits = self.api.limits
        # A slow drip must not hold a slot forever: a deadline from the body size.
        grace = limits.client_timeout + length / limits.min_rate
        self.listener.set_deadline(self.connection, time.monotonic() + grace)
        self.body = _Body(cast(BinaryIO, self.rfile), length)
        return cast(BinaryIO, self.body)

    def body_done(self) -> None:
        """The body is read: no deadline until the reply is written."""
        self.listener.set_deadline(self.connection, None)

    def read_json(self, limit: int) -> dict[str, Any]:
        length = self.body_length(limit)
        if length > BIG_BODY:  # held until the request is answered (see dispatch)
            if not self.api.big_bodies.acquire(timeout=self.api.limits.client_timeout):
                raise ApiError(503, "too many large requests at once; try again")
            self.big_body = True
        data = self.body_stream(length).read()
        self.body_done()
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"body is not JSON: {one_line(str(e), 120)}") from e
        if not isinstance(doc, dict):
            raise ApiError(400, "body must be a JSON object")
        return doc

    # -- query parameters

    def query_int(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.query.get(name)
        if raw is None:
            return default
        if not DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
            raise ApiError(400, f"{name} must be an integer from {low} to {high}")
        return int(raw)

    def query_bool(self, name: str) -> bool:
        raw = self.query.get(name, "0").lower()
        if raw not in ("0", "1", "true", "false"):
            raise ApiError(400, f"{name} must be 0, 1, true or false")
        return raw in ("1", "true")
