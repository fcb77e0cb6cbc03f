"""The device API: HTTP/1.1 on RUN_DIR/api.sock (root only) and on TCP (bearer token).

``pvpy device api`` runs it as a process of its own, started and restarted by
PID 1 (``Init.ensure_api``): PID 1 never serves a network client, so a hung or
hostile client can at worst stall or kill this process. The server talks to
PID 1 only through its control socket (one JSON line each way, at most
``CONTROL_SLOTS`` requests in flight), reads update records and container logs
from the storage, and does the heavy work itself: hashing uploads while they
stream, checking signatures, installing trails.

Endpoints (``docs/openapi.yaml`` is the contract; the tests fuzz the server
from it)::

    GET  /v1/status                     PID 1's status
    GET  /v1/revisions                  installed revisions and update records
    GET  /v1/revisions/{rev}            one revision's progress
    POST /v1/revisions                  install a signed state, ask PID 1 to apply it
    HEAD /v1/objects/{sha256}           200 when the device has the object
    PUT  /v1/objects/{sha256}           upload an object (hash checked as it streams)
    POST /v1/objects/missing            which objects the device lacks
    GET  /v1/containers                 containers and their states
    POST /v1/containers/{name}/restart
    GET  /v1/logs                       every container's log (tail, follow)
    GET  /v1/logs/{name}                one container's log (tail, follow)
    POST /v1/commands/{reboot,poweroff}

A push: ``POST /v1/objects/missing`` with the signed state (checked: signature,
schema, anti-rollback; its objects become *pending*, so uploads of them are held
to their signed sizes), ``PUT`` each missing object, ``POST /v1/revisions``,
then poll ``GET /v1/revisions/{rev}`` to UPDATED, DONE, WONTGO or ERROR.

Limits: ``Limits.max_connections`` per listener (the unix socket has its own, so
a flood on TCP never locks out the local admin; the next client gets a quick
503), half of them at most for log follows; a request head must arrive within
``head_timeout``; bodies need a Content-Length within their limit (state 16 MiB,
objects their signed size or ``max_object``) and must keep a minimum rate.

TLS: with a device certificate (STORAGE/config/api-cert.pem and api-key.pem, or
``--tls-cert/--tls-key``) the TCP listener speaks TLS 1.2+ only; the handshake
runs in the connection's thread under the head deadline.

Errors are ``{"error": "<one line>", "kind": "..."}``; every pvpy error maps to
a status in ``http_status`` and nowhere else.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import http.server
import json
import os
import re
import select
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, cast
from urllib.parse import parse_qs, urlsplit

from pvpy.device import update as up
from pvpy.errors import (
    BootEnvError,
    CommandError,
    ContainerError,
    DeviceError,
    KeyFileError,
    ManifestError,
    ObjectCorruptError,
    ObjectMissingError,
    ObjectNameError,
    PvpyError,
    RollbackError,
    StoreError,
    TrustError,
    UsageError,
)
from pvpy.log import get_logger
from pvpy.store import Storage, check_name
from pvpy.trust import MAX_STATE, VerifiedRevision

log = get_logger("api")

API_SOCKET = "api.sock"
CONTROL_SOCKET = "control.sock"
TOKEN_FILE = Path("config") / "api-token"
TLS_CERT = Path("config") / "api-cert.pem"  # the device certificate (chain) for TCP
TLS_KEY = Path("config") / "api-key.pem"
MIN_TOKEN = 16  # characters: a shorter token is guessable, refuse to serve TCP with it
CONTROL_SLOTS = 2  # control requests in flight: PID 1 answers them one by one anyway
CONTROL_TIMEOUT = 10.0
APPLY_TIMEOUT = 300.0  # PID 1 re-verifies (hashes) the revision before it answers
PENDING_FOR = 3600.0  # seconds a checked state keeps its objects' sizes pending
MAX_PENDING = 8
MAX_NAMES = 100_000  # object names in one /v1/objects/missing question
MAX_TAIL = 10_000  # lines
STOP_GRACE = 2.0  # seconds connections in flight get to finish when we are stopped
BIG_BODY = 1 << 20  # a JSON body larger than this waits for one of BIG_BODIES slots
BIG_BODIES = 2
FOLLOW_POLL = 0.25
DISK_RESERVE = 16 << 20  # bytes an upload must leave free (progress records, logs)
COMMANDS = ("reboot", "poweroff")
_CONTAINER = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")  # $defs/name of the state schema
_REVISION = re.compile(r"^[0-9]{1,18}$")
_DIGITS = re.compile(r"^[0-9]{1,18}$")  # ASCII only: str.isdigit() takes "²", int() does not


@dataclass(frozen=True)
class Limits:
    max_connections: int = 32  # per listener
    max_state: int = MAX_STATE
    max_json: int = 8 << 20  # any other JSON body (e.g. 100k object names)
    max_object: int = 1 << 30  # an object no pending state names
    head_timeout: float = 10.0  # from connect (or the last response) to a full request head
    client_timeout: float = 30.0  # the longest silence while a body or response moves
    min_rate: int = 64 << 10  # bytes/s a body must average, beyond client_timeout

    @property
    def max_revision_body(self) -> int:
        # The state travels as a JSON string: escaping (\" \\) at most doubles it.
        return 2 * self.max_state + (1 << 20)


# -- errors: the one mapping from pvpy errors to HTTP ------------------------------------


class ApiError(Exception):
    """A refusal at the HTTP level: status, one-line reason, extra JSON fields."""

    def __init__(self, status: int, reason: str, kind: str = "http", **extra: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind
        self.extra = extra


class _ClientGone(Exception):
    """The client stopped sending or reading; nothing can be answered."""


# Most specific first. ``kind`` lets a client map the error back to pvpy's exit codes.
_ERROR_STATUS: tuple[tuple[type[PvpyError], int, str], ...] = (
    (UsageError, 400, "usage"),
    (ObjectNameError, 400, "store"),
    (ObjectMissingError, 409, "store"),
    (ObjectCorruptError, 422, "store"),
    (StoreError, 500, "store"),
    (RollbackError, 409, "trust"),
    (TrustError, 403, "trust"),
    (ManifestError, 422, "manifest"),
    (KeyFileError, 500, "device"),
    (BootEnvError, 500, "device"),
    (CommandError, 500, "device"),
    (ContainerError, 409, "device"),
    (DeviceError, 409, "device"),
)


def http_status(error: PvpyError) -> tuple[int, str]:
    """The HTTP status and error kind for a pvpy error (500/"internal" for the rest)."""
    for cls, status, kind in _ERROR_STATUS:
        if isinstance(error, cls):
            return status, kind
    return 500, "internal"


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- PID 1's control socket ------------------------------------------------------------------


class Control:
    """Requests to PID 1 (``Init.handle``) through ``pvpy.control``, a few at a time."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / CONTROL_SOCKET
        self.slots = threading.BoundedSemaphore(CONTROL_SLOTS)

    def request(self, request: dict[str, Any], timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
        """PID 1's reply. Raises ApiError 503 when PID 1 does not answer, DeviceError
        when it refuses."""
        from pvpy import control

        if not self.slots.acquire(timeout=timeout):
            raise ApiError(503, "PID 1 is busy; try again", kind="device")
        try:
            reply = control.request(self.path, request, timeout)
        except DeviceError as e:
            raise ApiError(503, f"PID 1 does not answer ({e})", kind="device") from e
        finally:
            self.slots.release()
        if not reply.get("ok"):
            raise DeviceError(_one_line(str(reply.get("error"))))
        return reply

    def status(self) -> dict[str, Any]:
        reply = self.request({"cmd": "status"})
        reply.pop("ok", None)
        return reply


# -- the bearer token -------------------------------------------------------------------------


class Token:
    """The TCP bearer token, read from its file again whenever the file changes.

    Re-reading lets a device get (or rotate) its token without restarting the
    API. A missing, short, or group/world-accessible token file means no TCP
    client gets in (like ssh and its key files).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, ...] | None = None
        self._value: bytes | None = None
        self._lock = threading.Lock()

    def current(self) -> bytes | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            stamp: tuple[int, ...] = ()
        else:
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                self._value = self._load(stamp)
            return self._value

    def _load(self, stamp: tuple[int, ...]) -> bytes | None:
        if not stamp:
            log.warning("no api token: TCP clients are refused", path=str(self.path))
            return None
        if stamp[3] & 0o077:
            log.error("api token file is readable by others: TCP clients are refused",
                      path=str(self.path), mode=oct(stamp[3] & 0o777))  # fmt: skip
            return None
        try:
            assert self.path is not None
            value = self.path.read_bytes().strip()
        except OSError as e:
            log.error("api token unreadable: TCP clients are refused", error=str(e))
            return None
        if len(value) < MIN_TOKEN or not all(0x21 <= b < 0x7F for b in value):
            log.error("api token must be 16+ printable characters: TCP clients are refused")
            return None
        log.info("api token loaded", path=str(self.path))
        return value

    def accepts(self, header: str | None) -> bool:
        expected = self.current()
        if expected is None or header is None:
            return False
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(errors="replace"), expected)


# -- staging an uploaded revision ---------------------------------------------------------------


@dataclass
class _Pending:
    revision: int
    sizes: dict[str, int]
    expires: float


def parse_revision_body(body: dict[str, Any], max_state: int) -> tuple[bytes, bytes, bytes | None]:
    """The unverified (state, signature, keys) bytes of a posted revision.

    Each is the exact text of state.json, state.sig.json and keys.json as a
    JSON string, or ``{"base64": "..."}``: the signature covers exact bytes.
    """
    unknown = sorted(set(body) - {"state", "signature", "keys"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}")

    def as_bytes(name: str, required: bool) -> bytes | None:
        value = body.get(name)
        if value is None and not required:
            return None
        try:
            if isinstance(value, str):
                data = value.encode("utf-8")
            elif isinstance(value, dict) and set(value) == {"base64"} and isinstance(
                value["base64"], str
            ):
                data = base64.b64decode(value["base64"], validate=True)
            else:
                raise ApiError(400, f"{name} must be a string or {{\"base64\": string}}")
        except (UnicodeEncodeError, binascii.Error, ValueError) as e:
            raise ApiError(400, f"{name}: {_one_line(str(e), 120)}") from e
        if len(data) > max_state:
            raise ApiError(413, f"{name} is larger than {max_state} bytes")
        return data

    state = as_bytes("state", True)
    signature = as_bytes("signature", True)
    assert state is not None and signature is not None
    return state, signature, as_bytes("keys", False)


# -- the API: what each endpoint does ----------------------------------------------------------


@dataclass
class Api:
    """Everything the handlers share; one per process."""

    storage: Storage
    run_dir: Path
    token: Token
    limits: Limits = field(default_factory=Limits)
    control: Control = field(init=False)
    pending: dict[int, _Pending] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    install_lock: threading.Lock = field(default_factory=threading.Lock)
    # JSON bodies are parsed in memory: only a few big ones at a time (a 32 MiB body
    # on every connection would not fit a small device).
    big_bodies: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(BIG_BODIES)
    )

    def __post_init__(self) -> None:
        self.control = Control(self.run_dir)

    def trust(self) -> Any:
        from pvpy.trust import load_trust

        return load_trust(self.storage.root)

    # pending states: the signed sizes uploads are held to

    def add_pending(self, verified: VerifiedRevision) -> None:
        sizes = {ref.sha256: ref.size for ref in verified.state.objects().values()}
        now = time.monotonic()
        with self.lock:
            for rev in [r for r, p in self.pending.items() if p.expires < now]:
                del self.pending[rev]
            self.pending[verified.revision] = _Pending(verified.revision, sizes, now + PENDING_FOR)
            while len(self.pending) > MAX_PENDING:
                del self.pending[min(self.pending, key=lambda r: self.pending[r].expires)]

    def signed_size(self, name: str) -> int | None:
        now = time.monotonic()
        with self.lock:
            sizes = [p.sizes[name] for p in self.pending.values()
                     if p.expires >= now and name in p.sizes]  # fmt: skip
        return max(sizes) if sizes else None

    def drop_pending(self, revision: int) -> None:
        with self.lock:
            self.pending.pop(revision, None)

    # revisions

    def revision_record(self, revision: int, installed: set[int]) -> dict[str, Any] | None:
        p = up.read_progress(self.storage.root, revision)
        if p is None and revision not in installed:
            return None
        record: dict[str, Any] = (
            p.to_dict() if p is not None else
            {"revision": revision, "status": None, "reason": "", "percent": None, "kind": None,
             "time": None}
        )  # fmt: skip
        record["installed"] = revision in installed
        return record

    def revisions(self) -> dict[str, Any]:
        installed = set(self.storage.revisions())
        known = {p.revision for p in up.all_progress(self.storage.root)} | installed
        records = [self.revision_record(r, installed) for r in sorted(known)]
        return {"revisions": [r for r in records if r is not None],
                "highest": up.highest_revision(self.storage)}  # fmt: skip

    def check_state(self, body: dict[str, Any]) -> VerifiedRevision:
        state, signature, keyset = parse_revision_body(body, self.limits.max_state)
        return up.verify_incoming(self.storage, state, signature, keyset, self.trust())

    def post_revision(self, body: dict[str, Any]) -> dict[str, Any]:
        """Install a posted state and ask PID 1 to apply it."""
        state, signature, keyset = parse_revision_body(body, self.limits.max_state)
        status = self.control.status()
        # Refuse while busy before anything is recorded: the revision is not at fault.
        if status.get("updating") is not None:
            raise ApiError(409, f"update to revision {status['updating']} in progress",
                           kind="device")  # fmt: skip
        if status.get("pending"):
            raise ApiError(409, f"device is going down ({status['pending']})", kind="device")
        if not self.install_lock.acquire(timeout=1.0):
            raise ApiError(409, "another revision is being installed", kind="device")
        try:
            verified = up.verify_incoming(self.storage, state, signature, keyset, self.trust())
            revision = verified.revision
            up.install_verified(self.storage, verified, keyset)
            self.drop_pending(revision)
            log.info("revision installed", revision=revision)
            reply = up.hand_to_pid1(
                self.storage, revision, lambda m, t: self.control.request(m, timeout=t),
                APPLY_TIMEOUT,
            )  # fmt: skip
        finally:
            self.install_lock.release()
        log.info("update requested", revision=revision, kind=reply.get("kind"))
        return {
            "revision": revision,
            "kind": reply.get("kind"),
            "changed": list(reply.get("changed") or []),
            "progress": f"/v1/revisions/{revision}",
        }


# -- HTTP ------------------------------------------------------------------------------------------


class _Body:
    """A request body of known length as a stream: never reads past it, and turns
    a slow or vanished client into ``_ClientGone`` (not OSError: the store would
    take that for a disk problem)."""

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
            raise _ClientGone(f"client stopped sending ({e})") from e
        if not data:
            raise _ClientGone("client closed the connection before the end of its body")
        self.left -= len(data)
        return data


Route = tuple[str, "re.Pattern[str]", str]

_ROUTES: tuple[Route, ...] = tuple(
    (method, re.compile(f"^{pattern}$"), name)
    for method, pattern, name in (
        ("GET", "/v1/status", "get_status"),
        ("GET", "/v1/revisions", "get_revisions"),
        ("POST", "/v1/revisions", "post_revisions"),
        ("GET", "/v1/revisions/(?P<rev>[^/]+)", "get_revision"),
        ("POST", "/v1/objects/missing", "post_missing"),
        ("HEAD", "/v1/objects/(?P<name>[^/]+)", "head_object"),
        ("PUT", "/v1/objects/(?P<name>[^/]+)", "put_object"),
        ("GET", "/v1/containers", "get_containers"),
        ("POST", "/v1/containers/(?P<name>[^/]+)/restart", "post_restart"),
        ("GET", "/v1/logs", "get_logs"),
        ("GET", "/v1/logs/(?P<name>[^/]+)", "get_log"),
        ("POST", "/v1/commands/(?P<command>[^/]+)", "post_command"),
    )
)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "pvpy"  # not the Python version: no help to an attacker

    # -- plumbing

    @property
    def listener(self) -> _Listener:
        return cast(_Listener, self.server)

    @property
    def api(self) -> Api:
        return self.listener.api

    def setup(self) -> None:
        super().setup()
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
        # "100 Continue" only once the request passed auth and limits (see read_body).
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
        self.reply(status, {"error": _one_line(reason), "kind": kind, **extra}, headers)

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
        except _ClientGone:
            self.close_connection = True

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
        raw = self.headers.get("Content-Length") or "0"
        self.body = None
        # Unknown length (chunked, garbage): an unread body can only be dropped by closing.
        self.body_left = int(raw) if _DIGITS.match(raw) else 1 << 62
        if "Transfer-Encoding" in self.headers:
            self.body_left = 1 << 62
        try:
            self.route()
        except ApiError as e:
            self.fail(e.status, e.reason, e.kind, **e.extra)
        except PvpyError as e:
            status, kind = http_status(e)
            if status >= 500:
                log.error("request failed", path=self.path, error=str(e))
            self.fail(status, str(e), kind)
        except (_ClientGone, ConnectionError, TimeoutError) as e:
            log.info("client gone", client=self.address_string(), reason=str(e))
            self.close_connection = True
        except Exception as e:  # a bug: log it, answer one line, keep serving
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
        for method, pattern, name in _ROUTES:
            match = pattern.match(path)
            if match is None:
                continue
            allowed.append(method)
            if method == self.command:
                self.authorize()
                self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                getattr(self, name)(**match.groupdict())
                return
        if allowed:
            self.authorize()  # no probing of routes without the token
            raise ApiError(405, f"{self.command} not allowed on {path}",
                           allowed=sorted(set(allowed)))  # fmt: skip
        self.authorize()
        raise ApiError(404, f"no such endpoint: {_one_line(path, 100)}")

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
        if len(set(values)) != 1 or not _DIGITS.match(values[0]):
            raise ApiError(400, "bad Content-Length")
        length = int(values[0])
        if length > limit:
            raise ApiError(413, f"body of {length} bytes is over the limit of {limit} bytes")
        return length

    def body_stream(self, length: int) -> _Body:
        if self.expect_continue:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
            self.expect_continue = False
        limits = self.api.limits
        # A slow drip must not hold a slot forever: a deadline from the body size.
        grace = limits.client_timeout + length / limits.min_rate
        self.listener.set_deadline(self.connection, time.monotonic() + grace)
        self.body = _Body(cast(BinaryIO, self.rfile), length)
        return self.body

    def read_json(self, limit: int) -> dict[str, Any]:
        length = self.body_length(limit)
        if length > BIG_BODY:  # held until the request is answered (see dispatch)
            if not self.api.big_bodies.acquire(timeout=self.api.limits.client_timeout):
                raise ApiError(503, "too many large requests at once; try again")
            self.big_body = True
        data = self.body_stream(length).read()
        self.listener.set_deadline(self.connection, None)
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"body is not JSON: {_one_line(str(e), 120)}") from e
        if not isinstance(doc, dict):
            raise ApiError(400, "body must be a JSON object")
        return doc

    # -- query parameters

    def query_int(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.query.get(name)
        if raw is None:
            return default
        if not _DIGITS.match(raw) or not low <= int(raw) <= high:
            raise ApiError(400, f"{name} must be an integer from {low} to {high}")
        return int(raw)

    def query_bool(self, name: str) -> bool:
        raw = self.query.get(name, "0").lower()
        if raw not in ("0", "1", "true", "false"):
            raise ApiError(400, f"{name} must be 0, 1, true or false")
        return raw in ("1", "true")

    # -- endpoints

    def get_status(self) -> None:
        self.reply(200, self.api.control.status())

    def get_revisions(self) -> None:
        self.reply(200, self.api.revisions())

    def get_revision(self, rev: str) -> None:
        if not _REVISION.match(rev):
            raise ApiError(400, "revision must be a non-negative integer")
        record = self.api.revision_record(int(rev), set(self.api.storage.revisions()))
        if record is None:
            raise ApiError(404, f"no revision {int(rev)} on this device")
        self.reply(200, record)

    def post_revisions(self) -> None:
        body = self.read_json(self.api.limits.max_revision_body)
        result = self.api.post_revision(body)
        self.reply(202, result, {"Location": result["progress"]})

    def post_missing(self) -> None:
        body = self.read_json(max(self.api.limits.max_json, self.api.limits.max_revision_body))
        if "state" in body:
            verified = self.api.check_state(body)
            self.api.add_pending(verified)
            refs = verified.state.objects().values()
            missing = [r for r in refs if not self.api.storage.objects.has(r.sha256)]
            self.reply(200, {"revision": verified.revision,
                             "missing": [r.sha256 for r in missing],
                             "bytes": sum(r.size for r in missing)})  # fmt: skip
            return
        unknown = sorted(set(body) - {"objects"})
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}")
        names = body.get("objects")
        if not isinstance(names, list) or len(names) > MAX_NAMES:
            raise ApiError(400, f"objects must be a list of at most {MAX_NAMES} names")
        seen: dict[str, None] = {}
        for name in names:
            seen[check_name(name)] = None
        objects = self.api.storage.objects
        self.reply(200, {"missing": [n for n in seen if not objects.has(n)]})

    def head_object(self, name: str) -> None:
        objects = self.api.storage.objects
        if not objects.has(name):  # check_name first: ObjectNameError -> 400
            raise ApiError(404, f"no object {name}")
        self.send_response(200)
        self.send_header("Content-Length", str(objects.size(name)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.responded = True

    def put_object(self, name: str) -> None:
        api = self.api
        objects = api.storage.objects
        check_name(name)
        signed = api.signed_size(name)
        length = self.body_length(signed if signed is not None else api.limits.max_object)
        if signed is not None and length != signed:
            raise ApiError(422, f"object {name} is {signed} bytes in a pending revision, "
                           f"not {length}", kind="store")  # fmt: skip
        if objects.has(name):  # idempotent: an object is its name, no need to resend it
            self.reply(200, {"sha256": name, "size": objects.size(name), "created": False})
            return
        objects.ensure()
        free = _free_bytes(objects.root)
        if free is not None and length + DISK_RESERVE > free:
            raise ApiError(507, f"object of {length} bytes does not fit ({free} bytes free)",
                           kind="store")  # fmt: skip
        body = cast(BinaryIO, self.body_stream(length))
        stored = objects.put_stream(body, expected=name, max_size=length)
        self.listener.set_deadline(self.connection, None)
        log.info("object stored", sha256=stored, size=length, client=self.address_string())
        self.reply(201, {"sha256": stored, "size": length, "created": True})

    def get_containers(self) -> None:
        self.reply(200, {"containers": self.api.control.status().get("containers", [])})

    def post_restart(self, name: str) -> None:
        if not _CONTAINER.match(name):
            raise ApiError(400, "not a container name")
        names = {c.get("name") for c in self.api.control.status().get("containers", [])}
        if name not in names:
            raise ApiError(404, f"no container {name!r}")
        self.api.control.request({"cmd": "restart", "container": name})
        log.info("container restart requested", container=name, client=self.address_string())
        self.reply(202, {"container": name, "action": "restart"})

    def post_command(self, command: str) -> None:
        if command not in COMMANDS:
            raise ApiError(404, f"no command {_one_line(command, 40)!r} (one of {list(COMMANDS)})")
        self.api.control.request({"cmd": command})
        log.info("command requested", command=command, client=self.address_string())
        self.reply(202, {"command": command})

    # -- logs

    def get_logs(self) -> None:
        self.serve_logs(None)

    def get_log(self, name: str) -> None:
        if not _CONTAINER.match(name):
            raise ApiError(400, "not a container name")
        self.serve_logs(name)

    def serve_logs(self, name: str | None) -> None:
        tail = self.query_int("tail", 100, 0, MAX_TAIL)
        follow = self.query_bool("follow")
        logs_dir = self.api.storage.root / "logs"
        if name is not None and not (logs_dir / f"{name}.log").is_file():
            names = {c.get("name") for c in self.api.control.status().get("containers", [])}
            if name not in names:
                raise ApiError(404, f"no log of container {name!r}")
        files = _LogFiles(logs_dir, name)
        if not follow:
            data = files.tail(tail)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.responded = True
            self.wfile.write(data)
            return
        if not self.listener.start_follow():
            raise ApiError(503, "too many log followers; try again later")
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.responded = True
            self.close_connection = True  # a follow ends only when the client leaves
            for chunk in files.follow(tail, self.client_left):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
        except OSError as e:
            raise _ClientGone(f"log follower left ({e})") from e
        finally:
            self.listener.end_follow()

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


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class _LogFile:
    """One container log, read as it grows; follows the supervisor's rotation
    (name.log renamed to name.log.1, a new name.log opened)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.inode: int | None = None

    def open_at_end(self) -> None:
        with contextlib.suppress(OSError):
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(self.fd)
            self.inode = st.st_ino
            os.lseek(self.fd, st.st_size, os.SEEK_SET)

    def read_new(self, limit: int = 65536) -> bytes:
        if self.fd is None:
            self.open_at_start()
            if self.fd is None:
                return b""
        data = os.read(self.fd, limit)
        if data:
            return data
        try:
            st = os.stat(self.path)
        except OSError:
            return b""
        pos = os.lseek(self.fd, 0, os.SEEK_CUR)
        if st.st_ino != self.inode or st.st_size < pos:  # rotated or truncated
            self.close()
            self.open_at_start()
        return b""

    def open_at_start(self) -> None:
        with contextlib.suppress(OSError):
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self.inode = os.fstat(self.fd).st_ino

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = None


class _LogFiles:
    """The log of one container (raw bytes) or of all (lines prefixed "name| ")."""

    MAX_READ = 2 << 20  # a log file and its .1 are capped at 1 MiB each

    def __init__(self, logs_dir: Path, name: str | None) -> None:
        self.dir = logs_dir
        self.name = name

    def names(self) -> list[str]:
        if self.name is not None:
            return [self.name]
        try:
            entries = os.listdir(self.dir)
        except OSError:
            return []
        found = (e[: -len(".log")] for e in entries if e.endswith(".log"))
        return sorted(n for n in found if _CONTAINER.match(n))

    def _tail_of(self, name: str, lines: int) -> bytes:
        if lines == 0:
            return b""
        data = b""
        for path in (self.dir / f"{name}.log.1", self.dir / f"{name}.log"):
            with contextlib.suppress(OSError), open(path, "rb") as f:
                data += f.read(self.MAX_READ)
        kept = data.splitlines(keepends=True)[-lines:]
        return b"".join(kept)

    def tail(self, lines: int) -> bytes:
        if self.name is not None:
            return self._tail_of(self.name, lines)
        return b"".join(_prefixed(n, self._tail_of(n, lines)) for n in self.names())

    def follow(self, lines: int, gone: Callable[[], bool]) -> Iterator[bytes]:
        files: dict[str, _LogFile] = {}
        partial: dict[str, bytes] = {}

        def scan() -> None:
            for n in self.names():
                if n not in files:
                    files[n] = _LogFile(self.dir / f"{n}.log")
                    files[n].open_at_end()

        first = self.tail(lines)
        scan()  # tail then position at the end: a line written in between may show twice
        if first:
            yield first
        last_scan = time.monotonic()
        try:
            while not gone():
                sent = False
                for n, f in list(files.items()):
                    data = f.read_new()
                    if not data:
                        continue
                    if self.name is not None:
                        yield data
                    else:
                        complete, _, rest = (partial.get(n, b"") + data).rpartition(b"\n")
                        partial[n] = rest[-65536:]
                        if complete:
                            yield _prefixed(n, complete + b"\n")
                    sent = True
                if self.name is None and time.monotonic() - last_scan > 1.0:
                    scan()  # containers added by an update
                    last_scan = time.monotonic()
                if not sent:
                    time.sleep(FOLLOW_POLL)
        finally:
            for f in files.values():
                f.close()


def _prefixed(name: str, data: bytes) -> bytes:
    prefix = name.encode() + b"| "
    return b"".join(prefix + line for line in data.splitlines(keepends=True))


# -- listeners: bounded connections, deadlines -----------------------------------------------


class _Listener(socketserver.ThreadingMixIn):
    """A thread per connection, at most ``max_connections`` of them; the next
    client gets a 503 right away from a short-lived refuser thread (bounded too).

    A janitor thread shuts down connections past their deadline (a request head
    that takes too long, a body slower than the minimum rate): a blocked read
    then returns EOF and the connection's thread ends.
    """

    daemon_threads = True
    block_on_close = False
    api: Api
    needs_token: bool
    name: str

    def setup_limits(
        self, api: Api, needs_token: bool, name: str, tls: ssl.SSLContext | None = None
    ) -> None:
        self.api = api
        self.tls = tls
        self.needs_token = needs_token
        self.name = name
        self.active = 0
        self.refusing = 0
        self.followers = 0
        self.guard = threading.Lock()
        self.deadlines: dict[socket.socket, float | None] = {}
        threading.Thread(target=self._janitor, name=f"janitor-{name}", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.guard:
            busy = self.active >= self.api.limits.max_connections
            if not busy:
                self.active += 1
                self.deadlines[request] = None
            elif self.refusing < self.api.limits.max_connections * 2:
                self.refusing += 1
            else:
                request.close()  # beyond even refusing politely: drop it
                return
        if busy:
            threading.Thread(target=self._refuse, args=(request,), daemon=True).start()
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        conn = request
        try:
            if self.tls is not None:
                conn = self._handshake(request)
            super().process_request_thread(conn, client_address)
        except (OSError, ssl.SSLError) as e:  # only the handshake gets here
            log.info("tls handshake failed", client=str(client_address), error=str(e))
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self._release(request, conn)

    def _handshake(self, request: socket.socket) -> ssl.SSLSocket:
        """TLS in the connection's own thread (in the accept loop a slow client would
        stall every other one), under the head deadline."""
        assert self.tls is not None
        request.settimeout(self.api.limits.client_timeout)
        conn = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        with self.guard:
            self.deadlines.pop(request, None)
            self.deadlines[conn] = time.monotonic() + self.api.limits.head_timeout
        try:
            conn.do_handshake()
        except BaseException:
            with self.guard:
                self.deadlines.pop(conn, None)
            conn.close()  # wrap_socket detached ``request``: this is the one to close
            raise
        return conn

    def _release(self, request: Any, conn: Any = None) -> None:
        with self.guard:
            self.active -= 1
            self.deadlines.pop(request, None)
            self.deadlines.pop(conn, None)

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 to a client over the limit, after reading its request head
        (closing on unread bytes would reset the connection before it reads us)."""
        try:
            request.settimeout(1.0)
            if self.tls is not None:  # a TLS client would take plain text for an attack
                try:
                    request = self.tls.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError):
                    return
            head = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in head and len(head) < 16384:
                    chunk = request.recv(4096)
                    if not chunk:
                        break
                    head += chunk
            body = b'{"error": "too many connections; try again", "kind": "http"}\n'
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body)
                )
                request.shutdown(socket.SHUT_WR)
        finally:
            request.close()
            with self.guard:
                self.refusing -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback: a reset connection is no news.
        log.info("connection ended", client=str(client_address), error=repr(sys.exc_info()[1]))

    def set_deadline(self, conn: socket.socket, deadline: float | None) -> None:
        with self.guard:
            if conn in self.deadlines:
                self.deadlines[conn] = deadline

    def start_follow(self) -> bool:
        with self.guard:
            if self.followers >= max(self.api.limits.max_connections // 2, 1):
                return False
            self.followers += 1
            return True

    def end_follow(self) -> None:
        with self.guard:
            self.followers -= 1

    def _janitor(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self.guard:
                late = [c for c, d in self.deadlines.items() if d is not None and d < now]
                for conn in late:
                    self.deadlines[conn] = None
            for conn in late:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


class _TcpListener(_Listener, socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = 64


class _TcpListener6(_TcpListener):
    address_family = socket.AF_INET6


class _UnixListener(_Listener, socketserver.UnixStreamServer):
    request_queue_size = 64


def parse_hostport(text: str) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT". Raises UsageError."""
    host, sep, port = text.rpartition(":")
    if not sep or not _DIGITS.match(port) or not 0 < int(port) < 65536:
        raise UsageError(f"--tcp must be HOST:PORT, not {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


def open_unix(api: Api, path: Path) -> _UnixListener:
    """The root-only socket: created under umask 0177, so it is never briefly open."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o177)
    try:
        server = _UnixListener(str(path), Handler)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.setup_limits(api, needs_token=False, name="unix")
    return server


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The TCP listener's TLS (1.2 at least) with the device certificate. Raises DeviceError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise DeviceError(f"api: cannot load the TLS certificate {cert}: {e}") from e
    return context


def open_tcp(api: Api, hostport: str, tls: ssl.SSLContext | None = None) -> _TcpListener:
    host, port = parse_hostport(hostport)
    cls = _TcpListener6 if ":" in host else _TcpListener
    server = cls((host, port), Handler)
    server.setup_limits(api, needs_token=True, name="tcp", tls=tls)
    return server


def serve(
    storage: Path,
    run_dir: Path,
    tcp: str | None = None,
    token_file: Path | None = None,
    limits: Limits | None = None,
    tls: tuple[Path, Path] | None = None,
) -> NoReturn:
    """Run the API until SIGTERM/SIGINT (PID 1 stops it with SIGTERM before a reboot).

    TCP speaks TLS with ``tls`` (certificate, key), or when the storage holds
    config/api-cert.pem and config/api-key.pem (so PID 1 needs no option for it).
    Raises UsageError or DeviceError before serving when a listener cannot be opened.
    """
    store = Storage(Path(storage))
    if tls is None and (store.root / TLS_CERT).is_file() and (store.root / TLS_KEY).is_file():
        tls = (store.root / TLS_CERT, store.root / TLS_KEY)
    context = tls_context(*tls) if tcp and tls else None
    token = Token((token_file or store.root / TOKEN_FILE) if tcp else None)
    api = Api(store, Path(run_dir), token, limits or Limits())
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    sock_path = Path(run_dir) / API_SOCKET
    # Signals are taken by sigwait below: blocked here, before any thread inherits the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    servers: list[_UnixListener | _TcpListener] = []
    try:
        servers.append(open_unix(api, sock_path))
        if tcp:
            servers.append(open_tcp(api, tcp, context))
    except OSError as e:
        raise DeviceError(f"api: cannot listen ({e.strerror or e})") from e
    if tcp:
        token.current()  # say now whether TCP clients can get in
    for server in servers:
        threading.Thread(target=server.serve_forever, name=server.name, daemon=True).start()
    log.info("api serving", socket=str(sock_path), tcp=tcp, tls=context is not None,
             pid=os.getpid())  # fmt: skip
    signum = signal.sigwait({signal.SIGTERM, signal.SIGINT})
    log.info("api stopping", signal=signal.Signals(signum).name)
    for server in servers:
        server.shutdown()  # no new connections; those in flight go on
        server.server_close()
    with contextlib.suppress(OSError):
        sock_path.unlink()
    # A reply in flight gets a moment to go out: PID 1 stops us as soon as it
    # acts on a reboot/poweroff command, before that command's reply is written.
    deadline = time.monotonic() + STOP_GRACE
    while any(server.active for server in servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Uploads in flight die with us; their temp files are cleaned before the next staging.
    os._exit(0)
