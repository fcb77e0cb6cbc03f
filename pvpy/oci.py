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
nothing. A refused manifest is not looked at again by this process, nor is a
small blob the registry got wrong (remembered by digest); a refused revision
signed by the device's keys is recorded WONTGO once, not on every poll; unsigned
or untrusted input leaves only a bounded note (``pvpy.device.update`` keeps the
last refusals), never a record under the number it claims. Only a verified refusal
is WONTGO (an object's bytes that do not hash to its name after a complete
transfer: tried again after ``retry_failed``); a transfer that failed otherwise is
ERROR, which uses up no revision number (``pvpy.device.update.highest_revision``),
and is retried with backoff, resuming where it stopped (see ``pvpy.device.puller``).

Auth (``Registry``): none is offered until the registry asks. Basic, or the token
spec's bearer challenge: ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``
gets a token from the realm, anonymously when no credentials are given (public
repositories), cached per scope (``repository:NAME:pull`` or ``pull,push``). Tested
against docker-registry configured with ``auth: token`` and a token server in the
tests (tests/test_registry.py).

Errors: ``RegistryError`` (a PvpyError, exit 11) when the registry cannot be
reached or answers with an error; the revision's own faults are the usual
TrustError, ManifestError and StoreError.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvpy.errors import (
    ManifestError,
    RegistryError,
    UsageError,
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
