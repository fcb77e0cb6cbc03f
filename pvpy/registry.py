"""Pull mode: signed revisions as OCI artifacts in a registry (distribution-spec v2).

``publish`` (workstation, ``pvpy state publish``) stores a signed revision
directory in a registry; ``Puller`` (device, ``pvpy device pull``, a process of
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
state, its signature and key set are; those go through ``update.verify_incoming``
(signature, schema, anti-rollback) before any object is fetched, and objects are
then fetched by the names in the *verified* state — never by the manifest's
layers — each hashed while it streams into the store (``put_stream(expected=)``)
and held to its signed size. A lying registry can withhold updates, never plant one.

Polling policy (``Puller.poll``): a tag whose revision is not newer than the
highest the device ever installed is "nothing new", not an error, and records
nothing. A manifest that failed is not tried again by this process (refused:
never; a download or corruption failure: after ``retry_failed`` seconds), so a
refused revision is recorded WONTGO once, not on every poll. A failed download
is recorded WONTGO, never ERROR: WONTGO does not use up the revision number
(``update.highest_revision``), so the next attempt may install it.

Errors: ``RegistryError`` (a PvpyError, exit 11) when the registry cannot be
reached or answers with an error; the revision's own faults are the usual
TrustError, ManifestError and StoreError.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import urlencode, urljoin, urlsplit

from pvpy import update as up
from pvpy.errors import (
    DeviceError,
    ManifestError,
    ObjectMissingError,
    PvpyError,
    RegistryError,
    TrustError,
    UsageError,
)
from pvpy.log import get_logger
from pvpy.remote import ProgressBar, Readable, _Counting, _size
from pvpy.state.model import ObjectRef
from pvpy.store import Storage

log = get_logger("pull")

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
AUTH_FILE = Path("config") / "registry-auth"  # "user:password", mode 0600
APPLY_TIMEOUT = 300.0  # PID 1 re-verifies (hashes) the revision before it answers
FINAL_TIMEOUT = 3600.0  # longest wait for an applied revision's final record

# distribution-spec: repository name components and tags
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


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
        if not slash or not colon or "/" in tag or not _HOST.match(host):
            raise UsageError(f"{text!r}: expected REGISTRY/REPO:TAG (127.0.0.1:5000/demo:stable)")
        if not _REPO.match(repo) or len(repo) > 255:
            raise UsageError(f"{text!r}: {repo!r} is not a repository name (lowercase, a-z0-9._-/)")
        if not _TAG.match(tag):
            raise UsageError(f"{text!r}: {tag!r} is not a tag ([A-Za-z0-9_][A-Za-z0-9._-]*)")
        return cls(host, repo, tag)

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load_auth(path: Path) -> tuple[str, str]:
    """``user:password`` from a file only root can read (like the API token)."""
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from e
    if st.st_mode & 0o077:
        raise UsageError(f"{path}: readable by others (chmod 600 it)")
    user, colon, password = text.partition(":")
    if not colon or not user:
        raise UsageError(f"{path}: expected user:password")
    return user, password


# -- the distribution-spec client -------------------------------------------------------------


class Registry:
    """A small distribution-spec v2 client on http.client: blobs, uploads, manifests.

    One connection per request. Basic auth when credentials are given (bearer
    token challenges are not spoken yet). Blob GETs follow redirects (registries
    with object storage send blobs from elsewhere); credentials never follow a
    redirect to another host.
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
        conn = self._connection(url, self.timeout)
        hdrs = dict(headers or {})
        if self.authorization and urlsplit(url).netloc == self.host:
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
        reason = data.decode(errors="replace").strip().splitlines()[0][:200] if data.strip() else ""
    if status == 401:
        reason = reason or "authentication required"
    return RegistryError(f"{what}: {status} {reason}".rstrip(), status)


# -- publish ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    role: str
    media_type: str
    digest: str
    size: int
    data: bytes | None = None  # small blobs in memory; objects are read from ``path``
    path: Path | None = None

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                             "size": self.size, "annotations": {ROLE: self.role}}  # fmt: skip
        return d


@dataclass
class PublishResult:
    revision: int
    digest: str
    blobs: int
    sent_blobs: int
    sent_bytes: int
    tags: list[str]


def revision_blobs(signed_dir: Path) -> tuple[int, list[Blob]]:
    """The blobs of a signed revision dir: state, signature, key set, objects.

    The state is parsed (schema) but its signature is not checked here: the
    device checks it (``pvpy state verify`` does, with the trusted keys).
    Raises UsageError for an incomplete dir, ManifestError for a bad state.
    """
    from pvpy.state import parse_unverified
    from pvpy.trust import read_revision_dir

    state_bytes, sig_bytes, keyset = read_revision_dir(Path(signed_dir))
    state = parse_unverified(state_bytes)
    small = [("state", state_bytes), ("signature", sig_bytes)]
    if keyset is not None:
        small.append(("keyset", keyset))
    blobs = [Blob(role, ROLES[role], digest_of(data), len(data), data) for role, data in small]
    for name, ref in sorted(state.objects().items()):
        path = Path(signed_dir) / "objects" / name
        try:
            size = path.stat().st_size
        except OSError as e:
            raise UsageError(f"{path}: {e.strerror} (not a complete revision dir)") from e
        if size != ref.size:
            raise UsageError(f"{path}: {size} bytes, the state says {ref.size}")
        # the registry checks each object's digest as it takes it (PUT ?digest=)
        blobs.append(Blob("object", OBJECT_TYPE, f"sha256:{name}", size, path=path))
    return state.revision, blobs


def make_manifest(revision: int, blobs: list[Blob]) -> bytes:
    """Canonical JSON (sorted keys, no spaces): the same revision, the same digest."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": EMPTY_TYPE,
            "digest": digest_of(EMPTY),
            "size": len(EMPTY),
            "data": base64.b64encode(EMPTY).decode(),
        },
        "layers": [b.descriptor() for b in blobs],
        "annotations": {REVISION: str(revision)},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def publish(
    registry: Registry, ref: Reference, signed_dir: Path, say: Callable[[str], None] = print
) -> PublishResult:
    """``pvpy state publish``: upload the blobs the registry lacks, then the manifest,
    tagged ``ref.tag`` and the revision number. Raises RegistryError, UsageError."""
    revision, blobs = revision_blobs(signed_dir)
    repo = ref.repository
    config = Blob("config", EMPTY_TYPE, digest_of(EMPTY), len(EMPTY), EMPTY)
    every = [config, *blobs]
    missing = [b for b in every if not registry.has_blob(repo, b.digest)]
    total = sum(b.size for b in missing)
    say(f"revision {revision}: {len(every)} blob(s), {len(missing)} missing ({_size(total)})")
    bar = ProgressBar(total)
    try:
        for i, blob in enumerate(missing, 1):
            if blob.data is not None:
                registry.upload_blob(repo, blob.digest, blob.size, blob.data)
                bar.add(blob.size)
            else:
                assert blob.path is not None
                with open(blob.path, "rb") as f:
                    registry.upload_blob(repo, blob.digest, blob.size, _Counting(f, bar.add))
            bar.object_done(i, len(missing), blob.digest.removeprefix("sha256:"), blob.size)
    finally:
        bar.close()
    manifest = make_manifest(revision, blobs)
    tags = list(dict.fromkeys([ref.tag, str(revision)]))
    for tag in tags:
        registry.put_manifest(repo, tag, manifest)
    digest = digest_of(manifest)
    say(f"revision {revision}: sent {len(missing)} blob(s), {_size(bar.sent)}; "
        f"{ref.registry}/{repo}@{digest} tagged {', '.join(tags)}")  # fmt: skip
    return PublishResult(revision, digest, len(every), len(missing), bar.sent, tags)


# -- pull -------------------------------------------------------------------------------------


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
                if not _DIGEST.match(str(layer.get("digest"))):
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


@dataclass
class Outcome:
    """What one poll did; ``exit_code`` for ``--once``."""

    what: str  # busy, unreachable, unchanged, nothing new, refused, failed, UPDATED, DONE, ERROR...
    revision: int | None = None
    reason: str = ""

    @property
    def exit_code(self) -> int:
        if self.what in ("unchanged", "nothing new", up.UPDATED, up.DONE):
            return 0
        if self.what in ("refused", "failed", up.WONTGO, up.ERROR):
            return 3
        return 10  # busy, unreachable, still going

    def __str__(self) -> str:
        rev = f"revision {self.revision}: " if self.revision is not None else ""
        return f"{rev}{self.what}{f' ({self.reason})' if self.reason else ''}"


@dataclass
class Puller:
    """Poll a registry tag; install and apply what is new. One per storage."""

    storage: Storage
    run_dir: Path
    registry: Registry
    ref: Reference
    retry_failed: float = 600.0
    final_timeout: float = FINAL_TIMEOUT
    # manifest digest -> monotonic time it may be looked at again (inf: never)
    skip: dict[str, float] = field(default_factory=dict)
    last: str = ""  # the last outcome logged

    def control(self, request: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        from pvpy import control

        reply = control.request(self.run_dir / "control.sock", request, timeout)
        if not reply.get("ok"):
            raise DeviceError(str(reply.get("error")))
        return reply

    def poll(self) -> Outcome:
        """One round: device idle? → tag → manifest → state → verify → objects → apply.

        Never raises a PvpyError: each failure is an Outcome (and a log line).
        """
        try:
            status = self.control({"cmd": "status"})
        except DeviceError as e:
            return self._say(Outcome("unreachable", reason=f"PID 1: {e}"))
        if status.get("updating") is not None or status.get("pending"):
            busy = status.get("updating") or status.get("pending")
            return self._say(Outcome("busy", reason=f"device busy ({busy})"))
        try:
            incoming = self.fetch_revision()
        except RegistryError as e:
            return self._say(Outcome("unreachable", reason=str(e)))
        if isinstance(incoming, Outcome):
            return self._say(incoming)
        return self.take(incoming)

    def fetch_revision(self) -> UnverifiedRevision | Outcome:
        """The tag's state, signature and key set; or the Outcome "unchanged" (the tag
        did not move since it was handled) or "nothing new". Raises RegistryError."""
        repo = self.ref.repository
        manifest, digest = self.registry.get_manifest(repo, self.ref.tag)
        if time.monotonic() < self.skip.get(digest, 0.0):
            return Outcome("unchanged")
        try:
            layers = parse_manifest_unverified(manifest)
        except RegistryError:
            self.skip[digest] = float("inf")
            raise
        state = self.registry.read_blob(repo, layers["state"]["digest"], MAX_SMALL_BLOB)
        revision = unverified_revision_number(state)
        highest = up.highest_revision(self.storage)
        if revision is not None and revision <= highest:
            # older or the same: not worth a look (and no WONTGO): the tag may lag
            self.skip[digest] = float("inf")
            return Outcome("nothing new", revision, f"the device had {highest}")
        signature = self.registry.read_blob(repo, layers["signature"]["digest"], MAX_SMALL_BLOB)
        keyset = None
        if "keyset" in layers:
            keyset = self.registry.read_blob(repo, layers["keyset"]["digest"], MAX_SMALL_BLOB)
        return UnverifiedRevision(digest, state, signature, keyset)

    def take(self, incoming: UnverifiedRevision) -> Outcome:
        """Verify, install, apply, wait for the final record."""
        from pvpy.sandbox import load_trust

        digest = incoming.manifest_digest
        try:
            trust = load_trust(self.storage.root)
            verified = up.verify_incoming(self.storage, incoming.state, incoming.signature,
                                          incoming.keyset, trust)  # fmt: skip
        except (TrustError, ManifestError) as e:
            self.skip[digest] = float("inf")  # the same bytes are refused again: WONTGO once
            return self._say(Outcome("refused", unverified_revision_number(incoming.state), str(e)))
        except DeviceError as e:  # no trusted keys on this device
            return self._say(Outcome("failed", reason=str(e)))
        revision = verified.revision
        log.info("installing", revision=revision, tag=str(self.ref), manifest=digest)
        self.storage.clean_temp()

        def fetch(ref: ObjectRef) -> BinaryIO:
            try:
                blob = self.registry.open_blob(self.ref.repository, f"sha256:{ref.sha256}")
                return cast(BinaryIO, blob)  # read(), close(), a context manager
            except RegistryError as e:
                raise ObjectMissingError(f"object {ref.sha256}: {e}") from e

        try:
            up.install_verified(self.storage, verified, incoming.keyset, fetch)
        except PvpyError as e:  # recorded by install_verified (WONTGO: retried later)
            self.skip[digest] = time.monotonic() + self.retry_failed
            return self._say(Outcome("failed", revision, str(e)))
        return self.apply(revision, digest)

    def apply(self, revision: int, digest: str) -> Outcome:
        try:
            reply = up.hand_to_pid1(self.storage, revision, self.control, APPLY_TIMEOUT)
        except Exception as e:  # recorded WONTGO by hand_to_pid1; the number can come again
            self.skip[digest] = time.monotonic() + self.retry_failed
            return self._say(Outcome("failed", revision, f"not applied: {e}"))
        log.info("update requested", revision=revision, accepted=reply.get("accepted"))
        final = self.wait_final(revision)
        self.skip[digest] = float("inf")  # whatever its end, this revision's number is used
        if final is None:
            return self._say(Outcome("still going", revision))
        return self._say(Outcome(final.status, revision, final.reason))

    def wait_final(self, revision: int) -> up.Progress | None:
        deadline = time.monotonic() + self.final_timeout
        while True:
            p = up.read_progress(self.storage.root, revision)
            if p is not None and p.status in up.FINAL:
                return p
            if time.monotonic() > deadline or BlobStream.stop_requested:
                return None
            time.sleep(0.5)

    def _say(self, outcome: Outcome) -> Outcome:
        """Log what changed: the same outcome poll after poll (registry down) once."""
        quiet = outcome.what in ("busy", "unchanged") or str(outcome) == self.last
        self.last = str(outcome)
        (log.debug if quiet else log.warning if outcome.exit_code else log.info)(
            "pull", tag=str(self.ref), outcome=outcome.what, revision=outcome.revision,
            reason=outcome.reason or None,
        )  # fmt: skip
        return outcome


def _lock(storage: Storage) -> int:
    """One puller per storage: two would race to install the same revision."""
    import fcntl

    storage.ensure()
    fd = os.open(storage.root / ".pull.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise DeviceError(f"{storage.root}: another `pvpy device pull` runs for it") from e
    return fd


def run(puller: Puller, interval: float, once: bool, say: Callable[[str], None]) -> int:
    """``pvpy device pull``: poll every ``interval`` seconds (or once) until SIGTERM.

    SIGTERM ends a download cleanly (its objects removed, WONTGO, tried again by
    the next puller); an update PID 1 is applying is left to PID 1.
    """
    _lock(puller.storage)
    BlobStream.stop_requested = False

    def stop(signum: int, frame: object) -> None:
        BlobStream.stop_requested = True

    signal.signal(signal.SIGTERM, stop)
    log.info("pulling", tag=str(puller.ref), interval=None if once else interval)
    said = ""
    while True:
        outcome = puller.poll()
        if once or (outcome.what != "unchanged" and str(outcome) != said):
            said = str(outcome)
            say(said)
        if once:
            return outcome.exit_code
        deadline = time.monotonic() + interval
        while time.monotonic() < deadline and not BlobStream.stop_requested:
            time.sleep(min(0.2, interval))
        if BlobStream.stop_requested:
            log.info("pull stopped")
            return 0

