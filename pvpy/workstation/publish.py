"""`pvpy state publish`: a signed revision directory into a registry (see ``pvpy.oci``)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvpy._text import human_size
from pvpy.errors import (
    UsageError,
)
from pvpy.log import get_logger
from pvpy.oci import (
    ARTIFACT_TYPE,
    EMPTY,
    EMPTY_TYPE,
    MANIFEST_TYPE,
    OBJECT_TYPE,
    REVISION,
    ROLE,
    ROLES,
    Reference,
    digest_of,
)
from pvpy.registry import Registry
from pvpy.workstation.remote import ProgressBar, _Counting

log = get_logger("publish")

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
    say(f"revision {revision}: {len(every)} blob(s), {len(missing)} missing ({human_size(total)})")
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
    say(f"revision {revision}: sent {len(missing)} blob(s), {human_size(bar.sent)}; "
        f"{ref.registry}/{repo}@{digest} tagged {', '.join(tags)}")  # fmt: skip
    return PublishResult(revision, digest, len(every), len(missing), bar.sent, tags)
