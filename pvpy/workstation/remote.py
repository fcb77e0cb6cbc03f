"""The workstation side of the device API (``pvpy.device.api``): push, status, logs.

A device URL is ``https://HOST:PORT`` (TCP: a bearer token is needed; the
device's self-signed certificate is trusted by the sha256 pinned in its
credentials file, ``pvpy.api_credentials``, or by ``cacert``),
``http://HOST:PORT`` (a device serving ``--plain-http``) or
``unix:/path/to/api.sock`` (on the device itself, as root: no token).

``push`` sends a signed revision directory: it asks the device which objects it
lacks (sending the signed state, which the device checks first: a revision it
would refuse costs no upload), uploads only those with a progress bar on
stderr, posts the state and follows the revision's progress to its end.

Errors: ``pvpy.errors.RemoteError`` with the HTTP status, the device's
one-line reason and its ``kind``, which picks the same exit code a local
command would give (3 trust, 4 manifest, 5 store, 10 device: ``errors.ERRORS``).
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO
from urllib.parse import quote, urlsplit

from pvpy._http import Readable, http_connection
from pvpy._text import Report, TestingTicker, human_size, rollback_advice
from pvpy.errors import EXIT_REFUSED, RemoteError, UsageError, one_line

REFUSED_KINDS = ("trust", "manifest", "store")  # the device refused the revision itself
FINAL_GOOD = ("UPDATED", "DONE")
FINAL_BAD = ("WONTGO", "ERROR")


Body = bytes | Readable | None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout, blocksize=1 << 16)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Device:
    """One device API endpoint; a fresh connection per request (the server closes
    a connection after most errors anyway)."""

    def __init__(
        self, url: str, token: str | None = None, timeout: float = 30.0, cacert: str | None = None,
        pin_sha256: str | None = None,
    ) -> None:  # fmt: skip
        """``pin_sha256``: the device certificate's sha256 (from its credentials file)."""
        self.url = url
        self.token = token
        self.timeout = timeout
        self.cacert = cacert
        self.pin_sha256 = pin_sha256
        parts = urlsplit(url)
        if parts.scheme == "unix":
            self.unix_path: str | None = parts.path or parts.netloc
            if not self.unix_path:
                raise UsageError(f"{url}: a unix URL names a socket: unix:/run/pvpy/api.sock")
            self.host, self.port, self.prefix, self.tls = "", 0, "", False
        elif parts.scheme in ("http", "https"):
            if not parts.hostname:
                raise UsageError(f"{url}: no host (http://HOST:PORT)")
            self.tls = parts.scheme == "https"
            try:
                self.port = parts.port or (443 if self.tls else 80)
            except ValueError as e:
                raise UsageError(f"{url}: bad port") from e
            self.unix_path, self.host = None, parts.hostname
            self.prefix = parts.path.rstrip("/")
        else:
            raise UsageError(f"{url}: the device URL must be http(s)://HOST:PORT or unix:/path")
        if cacert and not self.tls:
            raise UsageError("--cacert is for https:// URLs")
        if pin_sha256 and self.unix_path is None and not self.tls:
            # the device speaks TLS: plain HTTP would hand the token to anyone on the way
            raise UsageError(f"{url}: the token file pins a TLS certificate: use "
                             f"https://{parts.netloc}")  # fmt: skip

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.unix_path is not None:
            return _UnixConnection(self.unix_path, timeout)
        return http_connection(self.host, self.port, self.tls, self.cacert, timeout,
                               self.pin_sha256)  # fmt: skip

    def open(
        self,
        method: str,
        path: str,
        body: Body = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request; return the connection (caller closes) and the response
        head. Raises RemoteError for an error status or an unreachable device."""
        conn = self._connection(timeout or self.timeout)
        all_headers = {"Accept": "application/json", **(headers or {})}
        if self.token and self.unix_path is None:
            all_headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, self.prefix + path, body=body, headers=all_headers)
            response = conn.getresponse()
        except ssl.SSLCertVerificationError as e:
            conn.close()
            hint = "" if self.pin_sha256 or self.cacert else (
                "; give its credentials file (--token-file) or --cacert")  # fmt: skip
            raise RemoteError(f"{self.url}: not the device's certificate "
                              f"({e}){hint}", 0, "auth") from e  # fmt: skip
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or "timeout"
            raise RemoteError(f"{self.url}: cannot reach the device ({reason})") from e
        if response.status >= 400:
            try:
                data = response.read(65536)
            except (OSError, http.client.HTTPException):
                data = b""
            finally:
                conn.close()
            raise _error_from(response.status, data)
        return conn, response

    def call(
        self,
        method: str,
        path: str,
        doc: Any = None,
        body: Body = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One request, its JSON reply decoded."""
        hdrs = dict(headers or {})
        if doc is not None:
            body = json.dumps(doc).encode()
            hdrs["Content-Type"] = "application/json"
        if isinstance(body, bytes):
            hdrs["Content-Length"] = str(len(body))
        conn, response = self.open(method, path, body, hdrs, timeout)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise RemoteError(f"{self.url}: the device stopped answering ({e})") from e
        finally:
            conn.close()
        if method == "HEAD" or not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise RemoteError(f"{self.url}: not a JSON reply", response.status, "device") from e

    def stream(self, path: str) -> Iterator[bytes]:
        """The chunks of a streamed reply (a log follow), as they arrive."""
        conn, response = self.open("GET", path, headers={"Accept": "text/plain"}, timeout=3600)
        try:
            while chunk := response.read1(65536):
                yield chunk
        except (OSError, http.client.HTTPException) as e:
            raise RemoteError(f"{self.url}: the log stream broke ({e})") from e
        finally:
            conn.close()


def _error_from(status: int, data: bytes) -> RemoteError:
    try:
        doc = json.loads(data)
        reason, kind = str(doc["error"]), str(doc.get("kind", "http"))
    except (ValueError, KeyError, TypeError):
        reason, kind = one_line(data.decode(errors="replace"), 200) or "no reason given", "http"
    if status == 401:
        return RemoteError(f"the device refused the token (401): {reason}", status, "auth")
    return RemoteError(f"{reason} ({status})", status, kind)


# -- push -------------------------------------------------------------------------------


def _as_json_text(data: bytes) -> Any:
    """File bytes for the JSON body: as text when they are UTF-8, else base64."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode()}


class ProgressBar:
    """bytes sent / total on stderr: a redrawn bar on a terminal, a line per object otherwise."""

    def __init__(self, total: int, stream: IO[str] | None = None) -> None:
        self.total = max(total, 1)
        self.sent = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = 0.0

    def add(self, n: int) -> None:
        self.sent += n
        now = time.monotonic()
        if self.tty and (now - self.last > 0.1 or self.sent >= self.total):
            self.last = now
            done = self.sent * 30 // self.total
            self.stream.write(f"\rupload [{'#' * done}{'.' * (30 - done)}] "
                              f"{human_size(self.sent)} / {human_size(self.total)} "
                              f"{self.sent * 100 // self.total:3d}%")  # fmt: skip
            self.stream.flush()

    def object_done(self, index: int, count: int, name: str, size: int) -> None:
        if not self.tty:
            self.stream.write(f"upload {index}/{count} {name[:12]} {human_size(size)} "
                              f"({self.sent * 100 // self.total}%)\n")  # fmt: skip
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self.sent:
            self.stream.write("\n")
            self.stream.flush()


class _Counting:
    """A file whose reads advance the progress bar (http.client reads it in blocks)."""

    def __init__(self, f: BinaryIO, on_read: Callable[[int], None]) -> None:
        self.f = f
        self.on_read = on_read

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.on_read(len(data))
        return data


@dataclass
class PushResult:
    revision: int
    objects: int
    sent_objects: int
    sent_bytes: int
    kind: str | None
    changed: list[str]


def upload(device: Device, signed_dir: Path, say: Report) -> PushResult:
    """Send a signed revision: only the objects the device lacks, then the state.

    Raises RemoteError (``exit_code`` 3 when the device refused the revision; an
    anti-rollback refusal says the number to build next).
    """
    from pvpy.state import parse_unverified
    from pvpy.trust import read_revision_dir

    state, signature, keys = read_revision_dir(Path(signed_dir))
    refs = parse_unverified(state).objects()
    revision = parse_unverified(state).revision
    body = {"state": _as_json_text(state), "signature": _as_json_text(signature)}
    if keys is not None:
        body["keys"] = _as_json_text(keys)
    try:
        check = device.call("POST", "/v1/objects/missing", body, timeout=600)
        missing = [str(n) for n in check["missing"] if n in refs]
        total = sum(refs[n].size for n in missing)
        say(
            f"revision {revision}: {len(refs)} object(s), {len(missing)} missing "
            f"({human_size(total)})",
            revision=revision, status="UPLOADING", objects=len(refs), missing=len(missing),
            bytes=total,
        )  # fmt: skip
        bar = ProgressBar(total)
        try:
            for i, name in enumerate(missing, 1):
                path = Path(signed_dir) / "objects" / name
                try:
                    f = open(path, "rb")  # noqa: SIM115 - closed below, after the request
                except OSError as e:
                    raise UsageError(f"{path}: {e.strerror} (not a complete revision dir)") from e
                with f:
                    device.call("PUT", f"/v1/objects/{name}", body=_Counting(f, bar.add),
                                headers={"Content-Length": str(refs[name].size),
                                         "Content-Type": "application/octet-stream"})  # fmt: skip
                bar.object_done(i, len(missing), name, refs[name].size)
        finally:
            bar.close()
        say(f"revision {revision}: sent {len(missing)} object(s), {human_size(bar.sent)}",
            revision=revision, status="UPLOADED", sent_objects=len(missing),
            sent_bytes=bar.sent)  # fmt: skip
        reply = device.call("POST", "/v1/revisions", body, timeout=900)
    except RemoteError as e:
        if e.kind not in REFUSED_KINDS:
            raise
        reason = str(e)
        if e.status == 409 and e.kind == "trust":  # anti-rollback (errors.ERRORS)
            highest = _highest_installed(device)
            if highest is not None:
                reason = rollback_advice(revision, highest)
        # WONTGO whatever the reason: exits EXIT_REFUSED
        raise RemoteError(
            f"the device refused revision {revision}: {reason}", e.status, e.kind, refused=True
        ) from e
    return PushResult(revision, len(refs), len(missing), bar.sent, reply.get("kind"),
                      list(reply.get("changed") or []))  # fmt: skip


def _highest_installed(device: Device) -> int | None:
    """The highest revision the device ever installed (its anti-rollback floor)."""
    try:
        highest = device.call("GET", "/v1/revisions").get("highest")
    except (RemoteError, AttributeError):
        return None
    return highest if isinstance(highest, int) else None


def up_to_date(device: Device, signed_dir: Path) -> int | None:
    """The revision in ``signed_dir`` when the device runs it already (same number, no
    update under way, every object of it on the device), else None."""
    from pvpy.errors import PvpyError
    from pvpy.state import parse_unverified
    from pvpy.trust import read_revision_dir

    try:
        state = parse_unverified(read_revision_dir(Path(signed_dir))[0])
    except PvpyError:
        return None  # the upload says what is wrong with it
    status = device.call("GET", "/v1/status")
    if status.get("revision") != state.revision or status.get("updating") is not None:
        return None
    names = sorted(state.objects())
    if device.call("POST", "/v1/objects/missing", {"objects": names}).get("missing"):
        return None
    return state.revision


def follow(device: Device, revision: int, timeout: float, say: Report) -> int:
    """Print a revision's progress until it ends: 0 UPDATED/DONE, 3 WONTGO/ERROR,
    1 still going at the timeout. A device that reboots (try-boot) is waited for."""
    deadline = time.monotonic() + timeout
    seen: tuple[Any, ...] | None = None
    away = False
    ticker = TestingTicker(say)
    while time.monotonic() < deadline:
        try:
            record = device.call("GET", f"/v1/revisions/{revision}")
        except RemoteError as e:
            if e.status not in (0, 404, 503):
                raise
            if e.status in (0, 503) and not away:
                say(f"revision {revision}: device not answering (rebooting?), waiting",
                    revision=revision, status="UNREACHABLE")  # fmt: skip
            away = e.status in (0, 503)
            time.sleep(1.0)
            continue
        away = False
        status = record.get("status")
        key = (status, record.get("reason"), record.get("percent"))
        if key != seen:
            seen = key
            pct = f" {record['percent']}%" if record.get("percent") is not None else ""
            say(f"revision {revision}: {status}{pct} {record.get('reason') or ''}".rstrip(),
                **record)  # fmt: skip
        ticker.record(record)
        if status in FINAL_GOOD:
            return 0
        if status in FINAL_BAD:
            return EXIT_REFUSED
        time.sleep(0.5)
    state = seen[0] if seen else "unknown"
    say(f"revision {revision}: still {state} after {timeout:g}s", revision=revision,
        status=state, timed_out=True)  # fmt: skip
    return 1


def push(
    device: Device, signed_dir: Path, timeout: float = 300, wait: bool = True,
    say: Report | None = None,
) -> int:  # fmt: skip
    """``pvpy device push``: upload, apply, follow; the revision the device runs
    already is "up to date" (0). Returns the exit code."""
    say = say or Report()
    current = up_to_date(device, signed_dir)
    if current is not None:
        say(f"revision {current}: up to date (the device runs it)", revision=current,
            status="UP-TO-DATE")  # fmt: skip
        return 0
    result = upload(device, signed_dir, say)
    if result.kind:
        changed = f", restarting {', '.join(result.changed)}" if result.changed else ""
        say(f"revision {result.revision}: {result.kind} update{changed}",
            revision=result.revision, status="ACCEPTED", kind=result.kind,
            changed=result.changed)  # fmt: skip
    else:  # the device classifies it once verified: the progress below tells
        say(f"revision {result.revision}: accepted", revision=result.revision,
            status="ACCEPTED")  # fmt: skip
    if not wait:
        return 0
    return follow(device, result.revision, timeout, say)


def logs_path(
    containers: list[str] | str | None, tail: int, follow: bool, *, timestamps: bool = False,
    since: str | None = None, until: str | None = None, as_json: bool = False,
) -> str:  # fmt: skip
    """The API path of a log request. ``since``/``until`` as on the command line
    (``10m``, a time: ``pvpy.timespec``), sent as unix times.

    Raises UsageError for a bad time, or for several containers (the API serves
    one or all)."""
    from pvpy.timespec import parse_when

    if isinstance(containers, str):
        containers = [containers]
    if containers and len(containers) > 1:
        raise UsageError("over the API: one container or all (several: --storage on the device)")
    where = f"/v1/logs/{quote(containers[0], safe='')}" if containers else "/v1/logs"
    query = f"?tail={tail}&follow={int(follow)}"
    if timestamps:
        query += "&timestamps=1"
    if as_json:
        query += "&format=json"
    for name, text in (("since", since), ("until", until)):
        at = parse_when(text, f"--{name}")
        if at is not None:
            query += f"&{name}={at:.3f}"
    return where + query
