"""The one place where unverified bytes become a ``VerifiedRevision``.

Steps, in this order (each refuses with a TrustError, ManifestError or
StoreError and a one-line reason):

1. rotate keys: a keys.json shipped with the revision must be signed by the
   trusted keys and its own (TUF root rotation); the set already trusted is
   no rotation;
2. signature: a threshold of trusted keys signed the exact state bytes
   (checked before the payload is parsed any further);
3. canonical form and schema: the bytes are the canonical JSON of a valid
   pvpy-state@1 document;
4. anti-rollback: the revision number is higher than the current one;
5. fleet: a device bound to a fleet takes only revisions naming that fleet;
6. freshness: not past ``expires``, judged at the later of the clock and the
   device's time floor (the newest signed ``created`` it verified: a board
   without a real-time clock boots in 1970);
7. objects: every object the state names is present, of the stated size,
   and hashes to its name.

Steps 1-2 (``check_signature``) say whether the bytes come from the trusted
keys at all; only then is anything the state says (its revision number) worth
recording (``pvpy.device.update``). ``verify_signed`` does 3-7.

What this resists (TUF's attack list): arbitrary software (2, 7), rollback
(4), indefinite freeze (6, when the signer sets an expiry; the floor keeps a
clock set back from reviving an expired revision), endless data (sizes are
signed; downloads can stop at them), mix-and-match (one envelope covers one
state whose objects are pinned by hash), malicious mirrors (trust does not
depend on where bytes came from; a mirror of another fleet signed by the same
key is refused by 5), key compromise (threshold and rotation; a device keeps
its rotations in its trust root, ``pvpy.trustroot``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from pvpy import paths
from pvpy.errors import (
    ExpiredError,
    FleetError,
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
from pvpy.trustroot import load_trust_root
from pvpy.trustroot import parse_timestamp as parse_timestamp

MAX_STATE = 16 * 1024 * 1024


@dataclass(frozen=True)
class SignedState:
    """State bytes a threshold of trusted keys signed (steps 1-2): authentic, not
    yet checked for anything else. ``rotated_keyset`` is the keys.json that moved
    ``trust`` to a newer key set, None when none did."""

    state_bytes: bytes
    signature_bytes: bytes
    signed_by: tuple[str, ...]
    trust: TrustStore
    rotated_keyset: bytes | None


@dataclass(frozen=True)
class VerifiedRevision:
    """A state that passed every check of ``verify_revision``."""

    state: State
    state_bytes: bytes
    signature_bytes: bytes
    signed_by: tuple[str, ...]
    trust: TrustStore
    rotated_keyset: bytes | None = None  # keys.json to keep in the trust root, if it rotated

    @property
    def revision(self) -> int:
        return self.state.revision


def check_signature(
    state_bytes: bytes,
    signature_bytes: bytes,
    trust: TrustStore,
    keyset_bytes: bytes | None = None,
) -> SignedState:
    """Steps 1-2: rotate to a shipped key set, then the signature threshold over the
    exact state bytes. Raises TrustError, ManifestError (state too large)."""
    rotated = None
    if keyset_bytes is not None:
        new = trust.rotate(keyset_bytes)
        if new is not trust:
            trust, rotated = new, keyset_bytes
    if len(state_bytes) > MAX_STATE:
        raise ManifestError(f"state.json is larger than {MAX_STATE} bytes")
    signatures = parse_envelope_unverified(signature_bytes)
    signed_by = trust.check_signed(DOMAIN_STATE, state_bytes, signatures, "state.json")
    return SignedState(state_bytes, signature_bytes, tuple(signed_by), trust, rotated)


def trusted_now(now: dt.datetime | None, floor: dt.datetime | None) -> dt.datetime:
    """The time expiry is judged at: the clock (or ``now``), never before ``floor``."""
    clock = now or dt.datetime.now(dt.UTC)
    return max(clock, floor) if floor is not None else clock


def verify_signed(
    signed: SignedState,
    *,
    objects: ObjectStore | None,
    current_revision: int | None = None,
    fleet: str | None = None,
    now: dt.datetime | None = None,
    time_floor: dt.datetime | None = None,
    check_expiry: bool = True,
) -> VerifiedRevision:
    """Steps 3-7 for authentic bytes; see ``verify_revision`` for the arguments."""
    doc = canonical.decode(signed.state_bytes)
    if canonical.encode(doc) != signed.state_bytes:
        raise ManifestError("state.json is not in canonical form")
    validate(doc)
    state = State.from_dict(doc)

    if current_revision is not None and state.revision <= current_revision:
        raise RollbackError(
            f"revision {state.revision} is not newer than the current revision {current_revision}"
        )
    if fleet is not None and state.fleet != fleet:
        names = f"fleet {state.fleet!r}" if state.fleet is not None else "no fleet"
        raise FleetError(
            f"revision {state.revision} names {names}; this device is bound to fleet {fleet!r}"
        )
    if check_expiry and state.expires is not None:
        when = trusted_now(now, time_floor)
        try:
            expires = parse_timestamp(state.expires)
        except ValueError as e:
            raise ManifestError(f"not a valid time: {state.expires!r}", "$.expires") from e
        if when >= expires:
            raise ExpiredError(f"revision {state.revision} expired at {state.expires}")

    if objects is not None:
        for ref in state.objects().values():
            objects.verify(ref.sha256, size=ref.size)
    return VerifiedRevision(state, signed.state_bytes, signed.signature_bytes, signed.signed_by,
                            signed.trust, signed.rotated_keyset)  # fmt: skip


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
    fleet: str | None = None,
    time_floor: dt.datetime | None = None,
) -> VerifiedRevision:
    """Check a revision end to end; see the module docstring for the steps.

    ``check_expiry=False`` is for revisions already installed: expiry stops a
    device from accepting stale metadata, never from running what it has.

    ``objects=None`` skips step 7 (for a state whose objects are still to be
    fetched: they are then checked one by one as they arrive).

    ``fleet``: the fleet the device is bound to (None: unbound, any fleet).
    ``time_floor``: expiry is never judged before this time (``pvpy.trustroot``).
    """
    signed = check_signature(state_bytes, signature_bytes, trust, keyset_bytes)
    return verify_signed(
        signed, objects=objects, current_revision=current_revision, fleet=fleet, now=now,
        time_floor=time_floor, check_expiry=check_expiry,
    )  # fmt: skip


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
    """The keys a device trusts for anything new: its factory keys rotated through
    every key set it installed (``pvpy.trustroot``). Raises DeviceError (none),
    KeyFileError."""
    return load_trust_root(storage).current
