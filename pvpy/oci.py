"""Signed revisions as OCI artifacts in a registry (distribution-spec v2).

``pvpy.workstation.publish.publish`` (workstation, ``pvpy state publish``) stores a signed revision
directory in a registry; ``pvpy.device.puller.Puller`` (device, ``pvpy device pull``, a process of
its own, never PID 1) polls a tag and installs what is new, then asks PID 1 to
apply it over the control socket — the same path as a push, fed from a registry.

Layout, one OCI image-spec 1.1 *artifact* per revision::

    manifest  application/vnd.oci.image.manifest.v1+json
      artifactType  application/vnd.pvpy.revision.v1
      config        the empty descriptor ({}, application/vnd.oci.empty.v1+json)
      layers        state.json        application/vnd.pvpy.state.v1+json    role=state
                    state.sig.json    application/vnd.pvpy.signature.v1+json role=signature
                    keys.json         application/vnd.pvpy.keyset.v1+json    role=keyset (optional)
                    objects/<sha256>  application/vnd.pvpy.object.v1         role=object
      annotations   org.pvpy.revision=N
    tags      TAG (e.g. "stable") and "N"

An object's blob digest *is* ``sha256:<object name>``: content addressing
carries over, so a registry stores an object once for every revision and
repository that names it, and a publish sends only the blobs it lacks (HEAD
first). The manifest is canonical JSON, so publishing the same revision twice
changes nothing. Debian bookworm's docker-registry (distribution 2.8.2)
accepts this manifest as is (tested in tests/test_registry.py: it stores and
serves artifactType and the empty config untouched), so no image-manifest
fallback is needed.

Trust: nothing the registry says is believed. The manifest only says where the
state, its signature and key set are; those go through ``pvpy.device.update.verify_incoming``
(signature, schema, anti-rollback) before any object is fetched, and objects are
then fetched by the names in the *verified* state — never by the manifest's
layers — each hashed while it streams into the store (``put_stream(expected=)``)
and held to its signed size. A lying registry can withhold updates, never plant one.

Polling policy (``Puller.poll``): a tag whose revision is not newer than the
highest the device ever installed is "nothing new", not an error, and records
nothing. A manifest that failed is not tried again by this process (refused:
never; a download or corruption failure: after ``retry_failed`` seconds), so a
refused revision signed by the device's keys is recorded WONTGO once, not on every
poll; unsigned or untrusted input leaves only a bounded note (``pvpy.device.update``
keeps the last refusals), never a record under the number it claims. A failed download
is recorded WONTGO, never ERROR: WONTGO does not use up the revision number
(``pvpy.device.update.highest_revision``), so the next attempt may install it.

Errors: ``RegistryError`` (a PvpyError, exit 11) when the registry cannot be
reached or answers with an error; the revision's own faults are the usual
TrustError, ManifestError and StoreError.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

from pvpy._http import Readable
from pvpy.errors import (
    ManifestError,
    ObjectMissingError,
    RegistryError,
    UsageError,
    one_line,
)
from pvpy.log import get_logger

log = get_logger("oci")

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.pvpy.revision.v1"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
STATE_TYPE = "application/vnd.pvpy.state.v1+json"
SIGNATURE_TYPE = "application/vnd.pvpy.signature.v1+json"
KEYSET_TYPE = "application/vnd.pvpy.keyset.v1+json"
OBJECT_TYPE = "application/vnd.pvpy.object.v1"
ROLE = "org.pvpy.role"
REVISION = "org.pvpy.revision"
ROLES = {"state": STATE_TYPE, "signature": SIGNATURE_TYPE, "keyset": KEYSET_TYPE}

MAX_MANIFEST = 4 << 20  # distribution's own limit for a manifest
MAX_SMALL_BLOB = 16 << 20  # state, signature, key set (trust.MAX_STATE)
MAX_REDIRECTS = 5

# distribution-spec: repository name components and tags
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
# Used with fullmatch only: "$" also matches before a trailing newline.
_REPO = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


# -- references ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """``REGISTRY/REPO:TAG``, e.g. ``127.0.0.1:5000/fleet/demo:stable``."""

    registry: str
    repository: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Raises UsageError: the registry host is required, the tag too."""
        host, slash, rest = text.partition("/")
        repo, colon, tag = rest.rpartition(":")
        if not slash or not colon or "/" in tag or not _HOST.fullmatch(host):
            raise UsageError(f"{text!r}: expected REGISTRY/REPO:TAG (127.0.0.1:5000/demo:stable)")
        if not _REPO.fullmatch(repo) or len(repo) > 255:
            raise UsageError(f"{text!r}: {repo!r} is not a repository name (lowercase, a-z0-9._-/)")
        if not _TAG.fullmatch(tag):
            raise UsageError(f"{text!r}: {tag!r} is not a tag ([A-Za-z0-9_][A-Za-z0-9._-]*)")
        return cls(host, repo, tag)

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load_auth(path: Path) -> tuple[str, str]:
    """``user:password`` from a file only root can read (like the API token).

    Raises UsageError; its message names the file, never what it holds."""
    try:
        st = path.stat()
        with open(path, "rb") as f:
            data = f.read(4097)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from e
    if st.st_mode & 0o077:
        raise UsageError(f"{path}: readable by others (chmod 600 it)")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a user:password text file") from None
    user, colon, password = text.partition(":")
    if len(data) > 4096 or "\n" in text or not colon or not user:
        raise UsageError(f"{path}: expected one line, user:password")
    return user, password


def _origin(url: str) -> tuple[str, str, int]:
    """Scheme, host and port of a URL (the port made explicit): who may see credentials."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


# -- the distribution-spec client -------------------------------------------------------------


class Registry:
    """A small distribution-spec v2 client on http.client: blobs, uploads, manifests.

    One connection per request. Basic auth when credentials are given (bearer
    token challenges are not spoken yet). Blob GETs follow redirects (registries
    with object storage send blobs from elsewhere, e.g. a CDN's signed URL), but
    credentials go only to the registry itself (same scheme, host and port): a
    redirect elsewhere is followed without them, and one from https to http is
    refused (the bytes would be checked, but who asks for what would show).
    """

    def __init__(
        self,
        host: str,
        plain_http: bool = False,
        cacert: str | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.base = f"{'http' if plain_http else 'https'}://{host}"
        self.cacert = cacert
        self.timeout = timeout
        self.authorization = (
            "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode() if auth else None
        )
        if cacert and plain_http:
            raise UsageError("--cacert is for https registries")

    def _connection(self, url: str, timeout: float) -> http.client.HTTPConnection:
        parts = urlsplit(url)
        if not parts.hostname:
            raise RegistryError(f"{url}: no host")
        if parts.scheme not in ("http", "https"):
            raise RegistryError(f"{url}: not an http(s) URL")
        from pvpy._http import http_connection

        return http_connection(parts.hostname, parts.port, parts.scheme == "https",
                               self.cacert, timeout)  # fmt: skip

    def open(
        self,
        method: str,
        url: str,
        body: bytes | Readable | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        redirects: int = 0,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request to a path (of this registry) or a URL; return the connection
        (caller closes) and the response. Raises RegistryError unless its status is in
        ``ok`` (after following up to ``redirects`` redirects)."""
        url = urljoin(self.base + "/", url)
        if urlsplit(self.base).scheme == "https" and urlsplit(url).scheme != "https":
            raise RegistryError(f"{self.base}: refused to go from https to "
                                f"{urlsplit(url).scheme}://{urlsplit(url).netloc}")  # fmt: skip
        conn = self._connection(url, self.timeout)
        # Credentials only to the registry's own origin: never to a CDN a blob redirects
        # to, nor in clear text (a Location may name http:// on the same host).
        own = _origin(url) == _origin(self.base)
        hdrs = {k: v for k, v in (headers or {}).items() if own or k.lower() != "authorization"}
        if self.authorization and own:
            hdrs["Authorization"] = self.authorization
        if isinstance(body, bytes):
            hdrs.setdefault("Content-Length", str(len(body)))
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        log.debug("registry request", method=method, url=url)
        try:
            conn.request(method, target, body=body, headers=hdrs)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or "timeout"
            raise RegistryError(f"{self.base}: cannot reach the registry ({reason})") from e
        location = response.getheader("Location")
        if response.status in (301, 302, 303, 307, 308) and redirects > 0 and location:
            conn.close()
            return self.open(method, urljoin(url, location), None, headers, ok, redirects - 1)
        if response.status not in ok:
            try:
                data = response.read(65536) if method != "HEAD" else b""
            except (OSError, http.client.HTTPException):
                data = b""
            finally:
                conn.close()
            raise _error_from(f"{method} {parts.path}", response.status, data)
        return conn, response

    def call(self, method: str, url: str, body: bytes | Readable | None = None,
             headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200,),
             ) -> http.client.HTTPResponse:  # fmt: skip
        """A request whose reply body does not matter (read and dropped)."""
        conn, response = self.open(method, url, body, headers, ok)
        try:
            if method != "HEAD":
                response.read(65536)
        except (OSError, http.client.HTTPException) as e:
            raise RegistryError(f"{self.base}: the registry stopped answering ({e})") from e
        finally:
            conn.close()
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
                  ok=(201,))  # fmt: skip

    def open_blob(self, repo: str, digest: str) -> BlobStream:
        conn, response = self.open("GET", f"/v2/{repo}/blobs/{digest}", redirects=MAX_REDIRECTS)
        return BlobStream(conn, response, digest)

    def read_blob(self, repo: str, digest: str, max_size: int) -> bytes:
        """A small blob, whole, its digest checked. Raises RegistryError."""
        with self.open_blob(repo, digest) as f:
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise RegistryError(f"blob {digest} is larger than {max_size} bytes")
        if digest_of(data) != digest:
            raise RegistryError(f"blob {digest}: the registry sent other bytes")
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
            raise RegistryError(f"{self.base}: the registry stopped answering ({e})") from e
        finally:
            conn.close()
        if len(data) > MAX_MANIFEST:
            raise RegistryError(f"{repo}:{reference}: manifest larger than {MAX_MANIFEST} bytes")
        return data, digest_of(data)


class BlobStream:
    """A blob being downloaded; read errors become ObjectMissingError.

    ``install_verified`` records WONTGO for it (the revision is not at fault, but
    its number is not used up either: a later poll tries again).
    """

    stop_requested = False  # set by SIGTERM: end a download cleanly, recorded, retried later

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 digest: str) -> None:  # fmt: skip
        self.conn = conn
        self.response = response
        self.digest = digest

    def read(self, n: int = -1) -> bytes:
        if BlobStream.stop_requested:
            raise ObjectMissingError(f"download of {self.digest} stopped (SIGTERM)")
        try:
            return self.response.read(n) if n >= 0 else self.response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ObjectMissingError(f"download of {self.digest} broke ({e or 'timeout'})") from e

    def close(self) -> None:
        self.conn.close()

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


@dataclass(frozen=True)
class UnverifiedRevision:
    """What a manifest points at: the bytes ``verify_incoming`` will judge."""

    manifest_digest: str
    state: bytes
    signature: bytes
    keyset: bytes | None


def parse_manifest_unverified(data: bytes) -> dict[str, dict[str, Any]]:
    """The state, signature and (optional) key set descriptors of a pvpy manifest.

    Raises RegistryError for anything that is not one (the registry is at fault,
    or the tag names something else: nothing is recorded for it).
    """
    try:
        doc = json.loads(data)
        layers = doc["layers"]
        if doc.get("mediaType") != MANIFEST_TYPE or doc.get("artifactType") != ARTIFACT_TYPE:
            raise ValueError(f"artifactType {doc.get('artifactType')!r}, not {ARTIFACT_TYPE}")
        found: dict[str, dict[str, Any]] = {}
        for layer in layers:
            role = (layer.get("annotations") or {}).get(ROLE)
            if role in ROLES:
                if role in found or layer.get("mediaType") != ROLES[role]:
                    raise ValueError(f"a second or mistyped {role} layer")
                if not _DIGEST.fullmatch(str(layer.get("digest"))):
                    raise ValueError(f"{role}: digest {layer.get('digest')!r}")
                found[role] = layer
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RegistryError(f"not a pvpy revision manifest ({e})") from e
    if "state" not in found or "signature" not in found:
        raise RegistryError("not a pvpy revision manifest (no state or signature layer)")
    return found


def unverified_revision_number(state: bytes) -> int | None:
    """The revision number a state claims (signature not checked yet), or None."""
    from pvpy.state import canonical

    try:
        doc = canonical.decode(state)
    except ManifestError:
        return None
    revision = doc.get("revision") if isinstance(doc, dict) else None
    return revision if isinstance(revision, int) and not isinstance(revision, bool) else None
