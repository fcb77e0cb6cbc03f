"""The distribution-spec v2 client of pull mode (``pvpy.oci`` describes the format and
the auth it speaks): blobs, uploads, manifests; deadlines, resumable blob reads."""

from __future__ import annotations

import base64
import http.client
import json
import re
from urllib.parse import urlencode, urljoin, urlsplit

from pvpy._http import Readable
from pvpy.errors import RegistryError, UsageError, one_line
from pvpy.log import get_logger
from pvpy.oci import _COMPONENT, MANIFEST_TYPE, MAX_MANIFEST, digest_of

log = get_logger("oci")

MAX_REDIRECTS = 5

DEADLINE = 120.0  # seconds for one request, connect to last byte (a blob resumes past it)
MIN_UPLOAD_RATE = 32 << 10  # bytes/s: an upload's deadline grows with its body
MAX_RETRY_AFTER = 3600.0  # a registry's Retry-After is honoured up to this
TOKEN_LIFETIME = 60.0  # the token spec's default when the token server names none


class BlobRefusedError(RegistryError):
    """A blob received whole is not what its digest names: too large (``permanent``:
    that digest names other bytes), or other bytes (the registry's storage may heal).
    (Belongs in pvpy.errors.)"""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def _scope(method: str, url: str) -> str:
    """The token scope a request needs (the token spec's ``repository:NAME:ACTIONS``)."""
    path = urlsplit(url).path
    m = re.fullmatch(rf"/v2/({_COMPONENT}(?:/{_COMPONENT})*)/(?:blobs|manifests|tags)/.*", path)
    if not m:
        return ""
    actions = "pull" if method in ("GET", "HEAD") else "pull,push"
    return f"repository:{m.group(1)}:{actions}"


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` → ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'([A-Za-z_]+)="([^"]*)"', rest)}
    return scheme.lower(), params


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        import time

        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class Registry:
    """A small distribution-spec v2 client on http.client: blobs, uploads, manifests.

    One connection per request, each bounded by a deadline from connect to its last
    byte (``deadline``; an upload's grows with its size), besides ``timeout`` for one
    read: a registry dripping bytes cannot hold a caller. ``abort`` (SIGTERM) cuts
    the requests in flight and refuses new ones.

    Auth is asked for by the registry, never offered first: a 401 with
    ``WWW-Authenticate: Basic`` gets the credentials from then on; one with
    ``Bearer realm=...,service=...,scope=...`` gets a token from the realm (with the
    credentials when given, else anonymously: public repositories need none),
    cached per scope until it expires. Credentials go to the realm only over https,
    or to the registry's own host when the registry itself is plain http; the token
    and Basic credentials go only to the registry itself (same scheme, host and
    port). Blob GETs follow redirects (registries with object storage send blobs
    from elsewhere, e.g. a CDN's signed URL) without them, and one from https to
    http is refused (the bytes would be checked, but who asks for what would show).
    """

    def __init__(
        self,
        host: str,
        plain_http: bool = False,
        cacert: str | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float = 30.0,
        deadline: float = DEADLINE,
    ) -> None:
        self.host = host
        self.base = f"{'http' if plain_http else 'https'}://{host}"
        self.cacert = cacert
        self.timeout = timeout
        self.deadline = deadline
        self.credentials = auth
        self.basic = False  # the registry asked for Basic auth: sent with each request
        self.tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, monotonic expiry)
        self.retry_after: float | None = None  # the last 429/503's Retry-After, for backoff
        self.aborted: str | None = None
        self.live: set[http.client.HTTPConnection] = set()
        if cacert and plain_http:
            raise UsageError("--cacert is for https registries")

    def abort(self, reason: str) -> None:
        """Cut every request in flight and refuse new ones (a signal handler may call
        this: a read blocked on a dripping registry ends at once)."""
        from pvpy._http import _Deadline

        self.aborted = reason
        for conn in list(self.live):
            if isinstance(conn, _Deadline):
                conn.cut()

    def _connection(self, url: str, deadline: float) -> http.client.HTTPConnection:
        parts = urlsplit(url)
        if not parts.hostname:
            raise RegistryError(f"{url}: no host")
        if parts.scheme not in ("http", "https"):
            raise RegistryError(f"{url}: not an http(s) URL")
        from pvpy._http import http_connection

        return http_connection(parts.hostname, parts.port, parts.scheme == "https",
                               self.cacert, self.timeout, deadline=deadline)  # fmt: skip

    def _close(self, conn: http.client.HTTPConnection) -> None:
        self.live.discard(conn)
        conn.close()

    def _authorization(self, scope: str) -> str | None:
        import time

        token = self.tokens.get(scope)
        if token is not None and time.monotonic() < token[1]:
            return f"Bearer {token[0]}"
        if self.basic and self.credentials:
            user, password = self.credentials
            return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        return None

    def _send(
        self, method: str, url: str, body: bytes | Readable | None, headers: dict[str, str],
        size: int,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:  # fmt: skip
        """One request on a connection of its own; raises RegistryError when no answer."""
        if self.aborted:
            raise RegistryError(f"{self.base}: {self.aborted}")
        conn = self._connection(url, self.deadline + size / MIN_UPLOAD_RATE)
        self.live.add(conn)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        log.debug("registry request", method=method, url=url)
        try:
            conn.request(method, target, body=body, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            self._close(conn)
            raise RegistryError(f"{self.base}: cannot reach the registry ({self._why(e)})") from e

    def _why(self, e: BaseException) -> str:
        """What broke a request, in a few words."""
        from pvpy._http import DeadlineExceeded

        if self.aborted:
            return self.aborted
        if isinstance(e, DeadlineExceeded):
            return f"no complete answer within {self.deadline:g} s"
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        return str(e) or type(e).__name__

    def open(
        self,
        method: str,
        url: str,
        body: bytes | Readable | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        redirects: int = 0,
        size: int = 0,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request to a path (of this registry) or a URL; return the connection
        (caller closes it with ``close``) and the response. Answers an auth challenge
        once. Raises RegistryError unless its status is in ``ok`` (after following up
        to ``redirects`` redirects). ``size``: the body's, for its deadline."""
        url = urljoin(self.base + "/", url)
        if urlsplit(self.base).scheme == "https" and urlsplit(url).scheme != "https":
            raise RegistryError(f"{self.base}: refused to go from https to "
                                f"{urlsplit(url).scheme}://{urlsplit(url).netloc}")  # fmt: skip
        # Credentials only to the registry's own origin: never to a CDN a blob redirects
        # to, nor in clear text (a Location may name http:// on the same host).
        own = _origin(url) == _origin(self.base)
        scope = _scope(method, url)
        hdrs = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        if isinstance(body, bytes):
            hdrs.setdefault("Content-Length", str(len(body)))
        for attempt in (1, 2):
            authorization = self._authorization(scope) if own else None
            send = {**hdrs, "Authorization": authorization} if authorization else hdrs
            conn, response = self._send(method, url, body, send, size)
            challenge = response.getheader("WWW-Authenticate") if response.status == 401 else None
            if attempt == 2 or not own or challenge is None:
                break
            self._drain(conn, response, method)
            if not self._answer(challenge, scope):
                raise _error_from(f"{method} {urlsplit(url).path}", 401, b"")
            if body is not None and not isinstance(body, bytes):  # streamed: gone
                raise RegistryError(f"{self.base}: asked to authenticate after a streamed body")
        self.retry_after = None
        if response.status in (429, 503):
            self.retry_after = _retry_after(response.getheader("Retry-After"))
        location = response.getheader("Location")
        if response.status in (301, 302, 303, 307, 308) and redirects > 0 and location:
            self._close(conn)
            return self.open(method, urljoin(url, location), None, headers, ok, redirects - 1)
        if response.status not in ok:
            data = self._drain(conn, response, method)
            raise _error_from(f"{method} {urlsplit(url).path}", response.status, data)
        return conn, response

    def _drain(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
               method: str) -> bytes:  # fmt: skip
        """An error answer's first bytes (for its message); the connection closed."""
        try:
            return response.read(65536) if method != "HEAD" else b""
        except (OSError, http.client.HTTPException):
            return b""
        finally:
            self._close(conn)

    def _answer(self, challenge: str, scope: str) -> bool:
        """Get what a 401's challenge asks for; False when there is nothing to give."""
        scheme, params = _challenge(challenge)
        if scheme == "basic":
            if not self.credentials or self.basic:
                return False  # none to give, or they were refused
            self.basic = True
            return True
        if scheme != "bearer" or "realm" not in params:
            return False
        self.tokens[scope] = self._fetch_token(params)
        return True

    def _fetch_token(self, params: dict[str, str]) -> tuple[str, float]:
        """A bearer token from the challenge's realm (the token spec's GET). Raises
        RegistryError."""
        import time

        realm = params["realm"]
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RegistryError(f"{self.base}: token realm {realm!r} is not an http(s) URL")
        base = urlsplit(self.base)
        if base.scheme == "https" and parts.scheme != "https":
            raise RegistryError(f"{self.base}: refused a token realm over plain http ({realm})")
        query = [(k, params[k]) for k in ("service", "scope") if params.get(k)]
        url = realm + ("&" if parts.query else "?") + urlencode(query) if query else realm
        headers = {"Accept": "application/json"}
        # the password goes to the realm only over https, or to the registry's own
        # host when the registry itself is plain http (a local registry)
        safe = parts.scheme == "https" or (parts.hostname or "") == (base.hostname or "")
        if self.credentials and safe:
            user, password = self.credentials
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{user}:{password}".encode()).decode()  # fmt: skip
        conn, response = self._send("GET", url, None, headers, 0)
        try:
            data = response.read(65536 + 1)
        except (OSError, http.client.HTTPException) as e:
            raise RegistryError(f"{realm}: the token server stopped answering "
                                f"({self._why(e)})") from e  # fmt: skip
        finally:
            self._close(conn)
        if response.status != 200:
            raise _error_from(f"token from {realm}", response.status, data)
        try:
            doc = json.loads(data)
            token = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or TOKEN_LIFETIME)
            if not isinstance(token, str) or not token or len(data) > 65536:
                raise ValueError("no token")
        except (ValueError, TypeError, AttributeError) as e:
            raise RegistryError(f"token from {realm}: not a token answer ({e})") from e
        log.debug("registry token", realm=realm, scope=params.get("scope"), lifetime=lifetime)
        # used until a little before it expires: a request must not carry a dead one
        return token, time.monotonic() + max(lifetime - 5.0, 1.0)

    def call(self, method: str, url: str, body: bytes | Readable | None = None,
             headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200,),
             size: int = 0) -> http.client.HTTPResponse:  # fmt: skip
        """A request whose reply body does not matter (read and dropped)."""
        conn, response = self.open(method, url, body, headers, ok, size=size)
        try:
            if method != "HEAD":
                response.read(65536)
        except (OSError, http.client.HTTPException) as e:
            raise RegistryError(f"{self.base}: the registry stopped answering "
                                f"({self._why(e)})") from e  # fmt: skip
        finally:
            self._close(conn)
        return response

    # blobs

    def has_blob(self, repo: str, digest: str) -> bool:
        response = self.call("HEAD", f"/v2/{repo}/blobs/{digest}", ok=(200, 404))
        return response.status == 200

    def upload_blob(self, repo: str, digest: str, size: int, body: bytes | Readable) -> None:
        """Monolithic upload: POST a session, PUT the bytes with ``?digest=`` (the
        registry checks the digest and refuses bytes that do not match)."""
        response = self.call("POST", f"/v2/{repo}/blobs/uploads/", ok=(202,))
        location = response.getheader("Location")
        if not location:
            raise RegistryError(f"{self.base}: upload session without a Location")
        sep = "&" if "?" in location else "?"
        self.call("PUT", f"{location}{sep}{urlencode({'digest': digest})}", body,
                  {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                  ok=(201,), size=size)  # fmt: skip

    def open_blob(self, repo: str, digest: str, offset: int = 0) -> BlobStream:
        """A blob's bytes from ``offset`` on (HTTP Range); the stream's ``start`` says
        where its bytes begin (0 when the registry sent the whole blob)."""
        headers = {"Range": f"bytes={offset}-"} if offset else None
        conn, response = self.open("GET", f"/v2/{repo}/blobs/{digest}", headers=headers,
                                   ok=(200, 206), redirects=MAX_REDIRECTS)  # fmt: skip
        start = 0
        if response.status == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(?:\d+|\*)", response.getheader("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                self._close(conn)
                raise RegistryError(f"blob {digest}: asked for bytes {offset}-, the registry "
                                    f"sent {response.getheader('Content-Range')!r}")  # fmt: skip
            start = offset
        return BlobStream(self, conn, response, digest, start)

    def read_blob(self, repo: str, digest: str, max_size: int) -> bytes:
        """A small blob, whole, its digest checked. Raises RegistryError (BlobRefusedError
        when it came whole but too large or other bytes than its digest names)."""
        with self.open_blob(repo, digest) as f:
            if f.total is not None and f.total > max_size:
                raise BlobRefusedError(f"blob {digest} is larger than {max_size} bytes", True)
            chunks: list[bytes] = []
            size = 0
            while size <= max_size and (chunk := f.read(1 << 16)):
                chunks.append(chunk)
                size += len(chunk)
        if size > max_size:
            raise BlobRefusedError(f"blob {digest} is larger than {max_size} bytes", True)
        data = b"".join(chunks)
        if digest_of(data) != digest:
            raise BlobRefusedError(f"blob {digest}: the registry sent other bytes")
        return data

    # manifests

    def put_manifest(self, repo: str, reference: str, data: bytes) -> None:
        self.call("PUT", f"/v2/{repo}/manifests/{reference}", data,
                  {"Content-Type": MANIFEST_TYPE}, ok=(201,))  # fmt: skip

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str]:
        """The manifest's bytes and digest (unverified). Raises RegistryError."""
        conn, response = self.open("GET", f"/v2/{repo}/manifests/{reference}",
                                   headers={"Accept": MANIFEST_TYPE})  # fmt: skip
        try:
            data = response.read(MAX_MANIFEST + 1)
        except (OSError, http.client.HTTPException) as e:
            raise RegistryError(f"{self.base}: the registry stopped answering "
                                f"({self._why(e)})") from e  # fmt: skip
        finally:
            self._close(conn)
        if len(data) > MAX_MANIFEST:
            raise RegistryError(f"{repo}:{reference}: manifest larger than {MAX_MANIFEST} bytes")
        return data, digest_of(data)


class BlobStream:
    """A blob being received. ``read`` returns what one read of the socket gave (short
    reads; b"" at its end) and raises RegistryError when the transfer broke: "connection
    lost after N of M bytes", never mistaken for other bytes."""

    def __init__(self, registry: Registry, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse, digest: str, start: int) -> None:  # fmt: skip
        self.registry = registry
        self.conn = conn
        self.response = response
        self.digest = digest
        self.start = start  # the blob's byte this answer begins with
        length = response.getheader("Content-Length")
        self.total = start + int(length) if length and length.isdigit() else None
        self.received = start

    def _broken(self, why: str) -> RegistryError:
        of = f" of {self.total}" if self.total is not None else ""
        return RegistryError(f"blob {self.digest}: {why} after {self.received}{of} bytes")

    def read(self, n: int = 1 << 16) -> bytes:
        if self.registry.aborted:
            raise self._broken(self.registry.aborted)
        try:
            data = self.response.read1(n if n > 0 else 1 << 16)
        except (OSError, http.client.HTTPException) as e:
            why = self.registry._why(e)
            raise self._broken(
                why if why.startswith("no complete") else f"connection lost ({why})"
            ) from e
        if not data and self.total is not None and self.received < self.total:
            raise self._broken(self.registry.aborted or "connection lost")
        self.received += len(data)
        return data

    def close(self) -> None:
        self.registry._close(self.conn)

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error_from(what: str, status: int, data: bytes) -> RegistryError:
    """distribution's {"errors": [{"code", "message"}]} in one line."""
    try:
        first = json.loads(data)["errors"][0]
        reason = f"{first['code']}: {first.get('message', '')}".strip().rstrip(":")
    except (ValueError, KeyError, IndexError, TypeError):
        text = data.decode(errors="replace").strip()
        reason = one_line(text.splitlines()[0], 200) if text else ""
    if status == 401:
        reason = reason or "authentication required"
    return RegistryError(f"{what}: {status} {reason}".rstrip(), status)


def _origin(url: str) -> tuple[str, str, int]:
    """Scheme, host and port of a URL (the port made explicit): who may see credentials."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)
