"""The one place where unverified bytes become a ``VerifiedRevision``.

Steps, in this order (each refuses with a TrustError, ManifestError or
StoreError and a one-line reason):

1. rotate keys: a keys.json shipped with the revision must be signed by the
   trusted keys and its own (TUF root rotation);
2. signature: a threshold of trusted keys signed the exact state bytes
   (checked before the payload is parsed any further);
3. canonical form and schema: the bytes are the canonical JSON of a valid
   pvpy-state@1 document;
4. anti-rollback: the revision number is higher than the current one;
5. freshness: not past ``expires``;
6. objects: every object the state names is present, of the stated size,
   and hashes to its name.

What this resists (TUF's attack list): arbitrary software (2, 6), rollback
(4), indefinite freeze (5, when the signer sets an expiry), endless data
(sizes are signed; downloads can stop at them), mix-and-match (one envelope
covers one state whose objects are pinned by hash), malicious mirrors (trust
does not depend on where bytes came from), key compromise (threshold and
rotation).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from pvpy import paths
from pvpy.errors import (
    DeviceError,
    ExpiredError,
    ManifestError,
    RollbackError,
    SignatureError,
    StoreError,
)

# KEYSET_FILE is named once, in pvpy.paths; re-exported for `from pvpy.trust import KEYSET_FILE`.
from pvpy.paths import KEYSET_FILE as KEYSET_FILE
from pvpy.paths import SIGNATURE_FILE, STATE_FILE
from pvpy.signing import DOMAIN_STATE, TrustStore, parse_envelope_unverified
from pvpy.state import State, canonical, validate
from pvpy.store import ObjectStore

MAX_STATE = 16 * 1024 * 1024


@dataclass(frozen=True)
class VerifiedRevision:
    """A state that passed every check of ``verify_revision``."""

    state: State
    state_bytes: bytes
    signature_bytes: bytes
    signed_by: tuple[str, ...]
    trust: TrustStore

    @property
    def revision(self) -> int:
        return self.state.revision


def parse_timestamp(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def verify_revision(
    state_bytes: bytes,
    signature_bytes: bytes,
    trust: TrustStore,
    *,
    objects: ObjectStore | None,
    current_revision: int | None = None,
    now: dt.datetime | None = None,
    keyset_bytes: bytes | None = None,
    check_expiry: bool = True,
) -> VerifiedRevision:
    """Check a revision end to end; see the module docstring for the steps.

    ``check_expiry=False`` is for revisions already installed: expiry stops a
    device from accepting stale metadata, never from running what it has.

    ``objects=None`` skips step 6 (for a state whose objects are still to be
    fetched: they are then checked one by one as they arrive).
    """
    if keyset_bytes is not None:
        trust = trust.rotate(keyset_bytes)
    if len(state_bytes) > MAX_STATE:
        raise ManifestError(f"state.json is larger than {MAX_STATE} bytes")
    signatures = parse_envelope_unverified(signature_bytes)
    signed_by = trust.check_signed(DOMAIN_STATE, state_bytes, signatures, "state.json")

    doc = canonical.decode(state_bytes)
    if canonical.encode(doc) != state_bytes:
        raise ManifestError("state.json is not in canonical form")
    validate(doc)
    state = State.from_dict(doc)

    if current_revision is not None and state.revision <= current_revision:
        raise RollbackError(
            f"revision {state.revision} is not newer than the current revision {current_revision}"
        )
    if check_expiry and state.expires is not None:
        when = now or dt.datetime.now(dt.UTC)
        try:
            expires = parse_timestamp(state.expires)
        except ValueError as e:
            raise ManifestError(f"not a valid time: {state.expires!r}", "$.expires") from e
        if when >= expires:
            raise ExpiredError(f"revision {state.revision} expired at {state.expires}")

    if objects is not None:
        for ref in state.objects().values():
            objects.verify(ref.sha256, size=ref.size)
    return VerifiedRevision(state, state_bytes, signature_bytes, tuple(signed_by), trust)


def read_revision_dir(path: Path) -> tuple[bytes, bytes, bytes | None]:
    """The unverified (state, signature, keys.json or None) bytes of a revision dir."""
    path = Path(path)
    try:
        state = (path / STATE_FILE).read_bytes()
    except FileNotFoundError as e:
        raise StoreError(f"{path}: no {STATE_FILE} (not a revision directory)") from e
    except OSError as e:
        raise StoreError(f"{path / STATE_FILE}: {e.strerror}") from e
    try:
        signature = (path / SIGNATURE_FILE).read_bytes()
    except FileNotFoundError as e:
        raise SignatureError(f"{path}: not signed (no {SIGNATURE_FILE})") from e
    except OSError as e:
        raise StoreError(f"{path / SIGNATURE_FILE}: {e.strerror}") from e
    keyset_path = path / KEYSET_FILE
    keyset = keyset_path.read_bytes() if keyset_path.is_file() else None
    return state, signature, keyset


def verify_revision_dir(
    path: Path,
    trust: TrustStore,
    *,
    current_revision: int | None = None,
    now: dt.datetime | None = None,
    check_objects: bool = True,
) -> VerifiedRevision:
    """Verify a signed revision directory (state.json, state.sig.json, objects/)."""
    state, signature, keyset = read_revision_dir(path)
    return verify_revision(
        state,
        signature,
        trust,
        objects=ObjectStore(Path(path) / paths.OBJECTS) if check_objects else None,
        current_revision=current_revision,
        now=now,
        keyset_bytes=keyset,
    )


def load_trust(storage: Path) -> TrustStore:
    """The keys a device trusts: every file of STORAGE/trust. Raises DeviceError."""
    files = sorted((Path(storage) / paths.TRUST).glob("*"))
    if not files:
        raise DeviceError(f"{storage}: no trusted keys (run `pvpy device provision`)")
    return TrustStore.from_files(files)
