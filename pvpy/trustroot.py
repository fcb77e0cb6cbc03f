"""A device's trust root on disk: ``STORAGE/trust/``.

What a device trusts outlives every revision, so it lives beside them, not in them::

    STORAGE/trust/NN-<name>               the factory root (pvpy.provision): PEM
                                          public keys or one keys.json key set
    STORAGE/trust/keys-v<V>-rev<R>.json   key set version V, rotated to by
                                          revision R: the exact verified keys.json
    STORAGE/trust/fleet                   the fleet this device is bound to
    STORAGE/trust/time-floor              the newest signed ``created`` it verified

Every file is written with ``write_atomic`` (temp file, fsync, rename, fsync of
the directory) and never rewritten in place, so a power cut leaves the old root
or the new one, never neither; temp files (``.*``) are never read. Each fact
only moves forward: a key set version, a binding, a time.

**Key sets.** The keys a device trusts now (``TrustRoot.current``) are the
factory root rotated through every ``keys-v*`` file in version order, each
rotation checked again at load (signed by a threshold of the keys before it
and of its own, ``TrustStore.rotate``): a newer key set supersedes the factory
PEMs and older sets, which stay on disk as history, never as trust for
anything new. Every path that takes a revision from outside (local update, API
push, registry pull) verifies with ``current``.

**Installed revisions signed by rotated-out keys** stay bootable: boot
verification (``pvpy device verify-installed``) checks an installed revision
against the keys that were current when it was installed
(``keys_for_installed``): the newest key set whose rotating revision is not
newer than it. A revision below the rotation was verified under the old keys
when it arrived, and is what a failed update rolls back to; refusing it at boot
would brick a device whose only good revision predates the rotation. Anything
at or above the rotating revision needs the new keys, at boot too. Nothing
from outside can add such an old-key trail: anti-rollback keeps every new
revision above the rotating one, and every path verifies with ``current``.

**Fleet.** A device bound to a fleet refuses revisions naming another fleet or
none (``pvpy.trust``). It is bound by the ``fleet`` file, written when it
installs a revision naming a fleet, or else by the newest installed revision
naming one (the factory revision on a freshly provisioned device). An unbound
device takes any revision. Binding is for good: moving a device to another
fleet is a re-provisioning.

**Time floor.** A board without a real-time clock (a Raspberry Pi) may boot in
1970. Expiry is checked against the later of the clock and the newest signed
``created`` this device verified (the ``time-floor`` file, or the installed
revisions' own): a revision that expired before that time is refused whatever
the clock says, and a fresh one is never refused for a clock in the past.

Shared: the device writes it (``pvpy.device.update``), ``pvpy.trust`` reads it.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from pvpy import paths
from pvpy.errors import DeviceError, KeyFileError, ManifestError, StoreError, TrustError
from pvpy.signing import TrustStore
from pvpy.store import Storage, fsync_dir, write_atomic

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pvpy.trust import VerifiedRevision

# File names in STORAGE/paths.TRUST. They belong in pvpy.paths (asked for in #13);
# named here until then.
ROTATED_KEYSET = re.compile(r"keys-v([1-9][0-9]{0,17})-rev([1-9][0-9]{0,17})\.json")
FLEET_FILE = paths.TRUST_FLEET
TIME_FLOOR_FILE = paths.TRUST_TIME_FLOOR
TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"  # the state schema's timestamp


def rotated_keyset_name(version: int, revision: int) -> str:
    return f"keys-v{version}-rev{revision}.json"


def parse_timestamp(text: str) -> dt.datetime:
    """A state's timestamp as an aware UTC datetime. Raises ValueError."""
    return dt.datetime.strptime(text, TIMESTAMP).replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class KeyEpoch:
    """Keys trusted from revision ``since_revision`` on (0: the factory root)."""

    since_revision: int
    keys: TrustStore


@dataclass(frozen=True)
class TrustRoot:
    """The key history of a device, oldest first; ``epochs[0]`` is the factory root."""

    epochs: tuple[KeyEpoch, ...]

    @property
    def current(self) -> TrustStore:
        """The keys every revision from outside must be signed with."""
        return self.epochs[-1].keys

    def keys_for_installed(self, revision: int) -> TrustStore:
        """The keys that were current when installed revision ``revision`` arrived."""
        keys = self.epochs[0].keys
        for epoch in self.epochs:
            if epoch.since_revision <= revision:
                keys = epoch.keys
        return keys


def _trust_dir(storage: Path) -> Path:
    return Path(storage) / paths.TRUST


def _is_factory_file(name: str) -> bool:
    reserved = name in (FLEET_FILE, TIME_FLOOR_FILE) or ROTATED_KEYSET.fullmatch(name)
    return not name.startswith(".") and not reserved  # ".*": write_atomic's temp files


def load_trust_root(storage: Path) -> TrustRoot:
    """The factory root and every key set rotated to since. Raises DeviceError (no
    trusted keys), KeyFileError (a key file unreadable, or a rotation that does not
    follow from the keys before it)."""
    trust_dir = _trust_dir(storage)
    names = sorted(p.name for p in trust_dir.iterdir()) if trust_dir.is_dir() else []
    factory = [trust_dir / n for n in names if _is_factory_file(n)]
    if not factory:
        raise DeviceError(f"{storage}: no trusted keys (run `pvpy device provision`)")
    keys = TrustStore.from_files(factory)
    epochs = [KeyEpoch(0, keys)]
    rotated = sorted((int(m[1]), int(m[2]), n) for n in names if (m := ROTATED_KEYSET.fullmatch(n)))
    for _, since, name in rotated:
        path = trust_dir / name
        try:
            keys = keys.rotate(path.read_bytes())
        except OSError as e:
            raise KeyFileError(f"{path}: {e.strerror}") from e
        except TrustError as e:
            raise KeyFileError(f"{path}: not a rotation of the keys before it: {e}") from e
        epochs.append(KeyEpoch(since, keys))
    return TrustRoot(tuple(epochs))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: unreadable ({e})") from e


def _installed_states(storage: Path) -> list[dict[str, object]]:
    """The states of the installed revisions, newest first (each verified when it was
    installed; an unreadable one is skipped: it cannot boot either)."""
    from pvpy.state import canonical

    store = Storage(Path(storage))
    states = []
    for revision in sorted(store.revisions(), reverse=True):
        try:
            doc = canonical.decode(store.read_trail(revision)[0])
        except (StoreError, ManifestError):
            continue
        if isinstance(doc, dict):
            states.append(doc)
    return states


def bound_fleet(storage: Path) -> str | None:
    """The fleet this device is bound to, or None (unbound). Raises StoreError."""
    fleet = _read_text(_trust_dir(storage) / FLEET_FILE)
    if fleet is not None:
        return fleet
    for doc in _installed_states(storage):
        if isinstance(doc.get("fleet"), str):
            return str(doc["fleet"])
    return None


def time_floor(storage: Path) -> dt.datetime | None:
    """The newest signed ``created`` this device verified, or None. Raises StoreError."""
    texts = [_read_text(_trust_dir(storage) / TIME_FLOOR_FILE)]
    texts += [str(doc["created"]) for doc in _installed_states(storage) if "created" in doc]
    times = []
    for text in texts:
        if text is not None:
            try:
                times.append(parse_timestamp(text))
            except ValueError:
                continue  # not a time: no floor from it (schema-checked where it came from)
    return max(times, default=None)


def record_verified(storage: Path, verified: VerifiedRevision) -> list[str]:
    """Make what an installed revision proves part of the trust root: the key set it
    rotated to, the fleet it binds to, the time it was created. Returns the names
    written. Each write is atomic and only moves forward. Raises StoreError."""
    trust_dir = _trust_dir(storage)
    if not trust_dir.is_dir():
        trust_dir.mkdir(parents=True)
        fsync_dir(trust_dir.parent)
    written = []
    if verified.rotated_keyset is not None:
        version = verified.trust.version
        if not any(
            (m := ROTATED_KEYSET.fullmatch(p.name)) and int(m[1]) == version
            for p in trust_dir.iterdir()
        ):
            name = rotated_keyset_name(version, verified.revision)
            write_atomic(trust_dir / name, verified.rotated_keyset)
            written.append(name)
    fleet = verified.state.fleet
    if fleet is not None and _read_text(trust_dir / FLEET_FILE) is None:  # bound for good
        write_atomic(trust_dir / FLEET_FILE, f"{fleet}\n".encode())
        written.append(FLEET_FILE)
    try:
        created = parse_timestamp(verified.state.created) if verified.state.created else None
    except ValueError:
        created = None  # matches the schema's pattern but is no date: no floor from it
    if created is not None:
        floor_text = _read_text(trust_dir / TIME_FLOOR_FILE)
        try:
            floor = parse_timestamp(floor_text) if floor_text else None
        except ValueError:
            floor = None
        if floor is None or created > floor:
            write_atomic(trust_dir / TIME_FLOOR_FILE, f"{verified.state.created}\n".encode())
            written.append(TIME_FLOOR_FILE)
    return written
