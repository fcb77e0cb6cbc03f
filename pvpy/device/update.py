"""Updates: stage a signed revision, classify the change, record progress.

Two halves, in two processes:

- ``stage`` runs in the process that received the revision (the CLI for a
  local update, the API server for a network one), never in PID 1: it checks
  the signature, schema and anti-rollback, copies the missing objects with
  their hashes checked, and installs the trail atomically. Any refusal leaves
  the storage as it was (objects it added are removed) and is recorded as
  WONTGO (refused) or ERROR (failed) with a reason.
- PID 1 then applies it (``pvpy.device.pid1``): an app-only change restarts just the
  changed containers; a BSP or host OS change sets ``pv_try`` and reboots.
  Either way the new revision is TESTING until every goal is met and the
  commit delay passed quietly; then it is committed, or rolled back.

Progress states: QUEUED, DOWNLOADING, INPROGRESS, TESTING, UPDATED (no reboot needed),
DONE, WONTGO, ERROR — one JSON file per revision under STORAGE/``paths.PROGRESS``.
Only pvpy errors are recorded (WONTGO, ERROR): any other exception is a bug and
propagates unrecorded, so a bug never passes for a refused revision.

Only input that verified leaves a record under its revision number: a state
signed by the trusted keys (and then refused for its number, fleet, expiry,
schema or objects) is WONTGO under the number it was signed with. A state that
is not signed by them says nothing about any revision: its refusal goes to one
bounded file (``refusals``, the last ``MAX_REFUSALS``), so a peer inventing a
revision number per request neither grows the records PID 1 reads nor touches
``highest_revision`` (anti-rollback).

A verified install also moves the trust root forward (``pvpy.trustroot``): the key set
it rotated to, the fleet it binds to, its ``created`` time as the time floor.

Persist points (``persist_point``) name every place the update path made something
durable; ``PVPY_POWERCUT=<point>`` cuts the power there (tests walk every point).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pvpy import paths
from pvpy._record import Record
from pvpy.errors import (
    ManifestError,
    ObjectCorruptError,
    ObjectMissingError,
    ObjectNameError,
    PvpyError,
    StoreError,
    TrustError,
)
from pvpy.log import get_logger
from pvpy.state.model import ObjectRef, State
from pvpy.store import Storage, write_atomic

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:  # pvpy.trust pulls the crypto, which PID 1 (importing us) never loads
    import datetime as dt
    from typing import Any, BinaryIO

    from pvpy.trust import VerifiedRevision

log = get_logger("update")

QUEUED, DOWNLOADING, INPROGRESS, TESTING = "QUEUED", "DOWNLOADING", "INPROGRESS", "TESTING"
UPDATED, DONE, WONTGO, ERROR = "UPDATED", "DONE", "WONTGO", "ERROR"
FINAL = (UPDATED, DONE, WONTGO, ERROR)

KIND_APP = "app"  # only app containers changed: no reboot
KIND_REBOOT = "reboot"  # BSP, host OS or groups changed: try-boot

POWERCUT_EXIT = 99  # PID 1's exit code for a simulated power cut (sandbox only)

PERSIST_POINTS = (
    "stage:object",  # one object of the new revision is on disk
    "stage:trail",  # the new revision's trail is installed, its trust root facts kept
    "app:switched",  # the changed containers run the new revision, nothing committed
    "app:commit",  # pv_rev names the new revision, progress not yet UPDATED
    "app:rollback",  # ERROR recorded, old containers not yet back
    "reboot:try",  # pv_try written, not yet rebooted
    "reboot:testing",  # booted into the try, TESTING recorded
    "reboot:commit",  # pv_rev names the new revision, progress not yet DONE
    "reboot:rollback",  # ERROR recorded, pv_try not yet cleared
    "gc:done",  # unpinned revisions and objects removed
)


# STORAGE/progress/refused.json: the last refusals of unverified input (belongs in
# pvpy.paths, asked for in #13; not a <rev>.json, so no revision's record).
REFUSALS_FILE = paths.REFUSALS
MAX_REFUSALS = 8


def persist_point(name: str) -> None:
    """Cut the power here when the test asks for it (``PVPY_POWERCUT``)."""
    if os.environ.get("PVPY_POWERCUT") != name:
        return
    log.warning("power cut", point=name)
    if os.getpid() == 1:
        os._exit(POWERCUT_EXIT)  # PID 1 gone: the kernel kills its whole namespace
    os.kill(os.getpid(), signal.SIGKILL)


class Progress(Record):
    revision: int
    status: str
    reason: str = ""
    percent: int | None = None
    kind: str | None = None
    time: float = 0.0
    # when this attempt began and entered TESTING (0: unknown), for pvpy device history
    started: float = 0.0
    testing_at: float = 0.0
    good_before: str = ""  # DONE/UPDATED before this attempt (a rollback re-applies it)

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "status": self.status,
            "reason": self.reason,
            "percent": self.percent,
            "kind": self.kind,
            "time": self.time,
            "started": self.started,
            "testing_at": self.testing_at,
            "good_before": self.good_before,
        }


def progress_path(storage: Path, revision: int) -> Path:
    return Path(storage) / paths.PROGRESS / f"{revision}.json"


def write_progress(
    storage: Path,
    revision: int,
    status: str,
    reason: str = "",
    percent: int | None = None,
    kind: str | None = None,
) -> Progress:
    """Record an update's state durably (atomic replace). Never raises."""
    now, old = round(time.time(), 3), read_progress(storage, revision)
    good = old.status if old and old.status in (DONE, UPDATED) else old.good_before if old else ""
    if old is not None and (old.status in FINAL or status == QUEUED):
        old = None  # a new attempt (a rollback re-applies a finished revision)
    started = (old.started or old.time) if old else now
    testing_at = (old.testing_at if old else 0.0) or (now if status == TESTING else 0.0)
    p = Progress(revision, status, reason, percent, kind, now, started, testing_at,
                 "" if status in FINAL else good)  # fmt: skip
    path = progress_path(storage, revision)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(p.to_dict()).encode())
    except (OSError, PvpyError) as e:  # a full disk must not turn into a crash
        log.error("cannot record progress", revision=revision, status=status, error=str(e))
    log.info("update", revision=revision, status=status, reason=reason or None, percent=percent)
    return p


def read_progress(storage: Path, revision: int) -> Progress | None:
    try:
        d = json.loads(progress_path(storage, revision).read_text())
        return Progress(
            d["revision"], d["status"], d.get("reason", ""), d.get("percent"), d.get("kind"),
            d.get("time", 0.0), d.get("started", 0.0), d.get("testing_at", 0.0),
            d.get("good_before", ""),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def all_progress(storage: Path) -> list[Progress]:
    out = []
    for path in sorted((Path(storage) / paths.PROGRESS).glob("*.json")):
        if path.stem.isdigit():
            p = read_progress(storage, int(path.stem))
            if p is not None:
                out.append(p)
    return sorted(out, key=lambda p: p.revision)


# -- classify -------------------------------------------------------------------


class Change(Record):
    kind: str
    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    why: str = ""


def classify(old: State, new: State) -> Change:
    """What it takes to go from ``old`` to ``new``: restarts or a reboot."""
    if old.bsp != new.bsp:
        return Change(KIND_REBOOT, why="BSP changed")
    if old.groups != new.groups:
        return Change(KIND_REBOOT, why="groups changed")
    old_os, new_os = old.host_os, new.host_os
    if old_os != new_os:
        return Change(KIND_REBOOT, why="host OS container changed")
    before = {c.name: c for c in old.containers}
    after = {c.name: c for c in new.containers}
    return Change(
        KIND_APP,
        changed=tuple(sorted(n for n in before.keys() & after.keys() if before[n] != after[n])),
        added=tuple(sorted(after.keys() - before.keys())),
        removed=tuple(sorted(before.keys() - after.keys())),
        why="only app containers changed",
    )


def good_revisions_below(storage: Storage, below: int) -> list[int]:
    """Installed revisions older than ``below`` that once ran well (or the factory one)."""
    good = {p.revision for p in all_progress(storage.root) if p.status in (DONE, UPDATED)}
    return [
        r
        for r in storage.revisions()
        if r < below and (r in good or read_progress(storage.root, r) is None)
    ]


# -- stage ----------------------------------------------------------------------


def highest_revision(storage: Storage) -> int:
    """The anti-rollback reference: the highest revision this device ever installed.

    Trails can be garbage-collected, so progress records count too: those of
    revisions PID 1 took (a refused revision, or one whose transfer failed, was
    never installed: its number is not used up).
    Records exist only for verified revisions (``note_refusal``): nothing
    unverified input says moves this number.
    """
    # used up once PID 1 took it (a kind; TESTING on), not by a staging that failed
    staging = (QUEUED, DOWNLOADING, INPROGRESS, ERROR)
    known = [p.revision for p in all_progress(storage.root)
             if p.status != WONTGO and (p.kind is not None or p.status not in staging)]  # fmt: skip
    return max([0, *storage.revisions(), *known])


def verify_incoming(
    storage: Storage,
    state_bytes: bytes,
    sig_bytes: bytes,
    keyset: bytes | None,
    trust: Any,
    *,
    now: dt.datetime | None = None,
) -> VerifiedRevision:
    """Trust first, before a single object is taken: signature, schema, anti-rollback,
    fleet, expiry (at ``now``, default the clock, never before the time floor).
    Returns the VerifiedRevision; a refusal is recorded and re-raised: WONTGO under
    its number when the trusted keys signed it, else only in the bounded refusals."""
    from pvpy import trustroot
    from pvpy.trust import check_signature, verify_signed

    try:
        signed = check_signature(state_bytes, sig_bytes, trust, keyset)
    except (TrustError, ManifestError) as e:
        note_refusal(storage, state_bytes, str(e))
        raise
    try:
        return verify_signed(
            signed, objects=None, current_revision=highest_revision(storage),
            fleet=trustroot.bound_fleet(storage.root), now=now,
            time_floor=trustroot.time_floor(storage.root),
        )  # fmt: skip
    except (TrustError, ManifestError) as e:
        _refuse_signed(storage, state_bytes, str(e))
        raise


def install_verified(
    storage: Storage,
    verified: VerifiedRevision,
    fetch: Callable[[ObjectRef], BinaryIO] | None = None,
    download: Callable[[ObjectRef], None] | None = None,
) -> None:
    """Take the objects a verified revision lacks from ``fetch`` (None: they must be
    in the store already, uploaded by the API) or ``download`` (it stores each itself,
    resumably: a failed transfer keeps what it verified), check every object, install the
    trail and keep what it proves in the trust root (key set, fleet, time floor).
    Records QUEUED, DOWNLOADING, INPROGRESS "staged"; on failure removes the
    objects it added (and a corrupt stored one no installed revision needs) and
    its trail, records WONTGO (bad input) or ERROR (the device failed) and re-raises.
    """
    with install_lock(storage):
        _install_verified(storage, verified, fetch, download)


def _install_verified(
    storage: Storage,
    verified: VerifiedRevision,
    fetch: Callable[[ObjectRef], BinaryIO] | None,
    download: Callable[[ObjectRef], None] | None = None,
) -> None:
    from pvpy import trustroot

    revision = verified.revision
    write_progress(storage.root, revision, QUEUED, "verified signature and schema")
    refs = list(verified.state.objects().values())
    added: list[str] = []
    done = 0
    installed = False
    try:
        checked = _drop_corrupt(storage, refs)
        missing = [r for r in refs if not storage.objects.has(r.sha256)]
        total = sum(r.size for r in missing) or 1
        if missing and fetch is None and download is None:
            raise ObjectMissingError(
                f"{len(missing)} object(s) not uploaded, first {missing[0].sha256}"
            )
        for ref in missing:
            write_progress(storage.root, revision, DOWNLOADING, f"object {ref.sha256[:12]}",
                           percent=done * 100 // total)  # fmt: skip
            if download is not None:
                download(ref)
            else:
                assert fetch is not None
                with fetch(ref) as f:
                    storage.objects.put_stream(f, expected=ref.sha256, max_size=ref.size)
            added.append(ref.sha256)
            done += ref.size
            persist_point("stage:object")
        for ref in refs:  # objects that came in are checked again (the store's copy)
            if ref.sha256 in checked:
                continue
            try:
                storage.objects.verify(ref.sha256, size=ref.size)
            except ObjectCorruptError:
                _drop_added(storage, [ref.sha256])  # so that the next push sends it again
                raise
        storage.install_revision(revision, verified.state_bytes, verified.signature_bytes)
        installed = True
        # Installed and verified: from now on the device trusts what it proves. A power
        # cut before this leaves the old trust root, after it the new (atomic writes).
        kept = trustroot.record_verified(storage.root, verified)
        if kept:
            log.info("trust root moved forward", revision=revision, files=kept)
        persist_point("stage:trail")
    except PvpyError as e:
        if installed:  # the trust root could not be kept: no half-taken revision
            with contextlib.suppress(PvpyError):
                storage.remove_revision(revision)
        # bad input is refused (WONTGO); a device that failed (disk full) is ERROR
        refused = isinstance(e, ObjectCorruptError | ObjectMissingError | ObjectNameError)
        if refused or download is None:  # a transfer to resume keeps what it verified
            _drop_added(storage, added)
        write_progress(storage.root, revision, WONTGO if refused else ERROR, str(e))
        raise
    write_progress(storage.root, revision, INPROGRESS, "staged", percent=100)


def stage(storage_dir: Path, source: Path, trust: Any) -> State:
    """Verify a signed revision dir and install it into the storage (not applied).

    Records WONTGO (refused: signature, key, rollback, schema, bad object) or
    ERROR (failed: storage, disk full) and re-raises; on any failure the
    objects this call added are removed again and no trail is left.
    """
    from pvpy.trust import read_revision_dir

    storage = Storage(Path(storage_dir)).ensure()
    storage.clean_temp()
    state_bytes, sig_bytes, keyset = read_revision_dir(Path(source))
    verified = verify_incoming(storage, state_bytes, sig_bytes, keyset, trust)

    def fetch(ref: ObjectRef) -> BinaryIO:
        try:
            return open(Path(source) / "objects" / ref.sha256, "rb")
        except FileNotFoundError as e:
            raise ObjectMissingError(f"object {ref.sha256} is missing") from e

    install_verified(storage, verified, fetch)
    return verified.state


def hand_to_pid1(
    storage: Storage,
    revision: int,
    send: Callable[[dict[str, Any], float], dict[str, Any]],
    timeout: float = 300,
) -> dict[str, Any]:
    """Ask PID 1 to apply an installed revision (``send`` is the caller's control
    client; it raises a PvpyError when PID 1 says no or does not answer).

    When PID 1 does not take it, the trail goes again — so the same number can
    be offered once the device is ready — and WONTGO is recorded; re-raises.
    Any other exception is a bug: it propagates and nothing is recorded.
    """
    try:
        return send({"cmd": "update", "revision": revision}, timeout)
    except PvpyError as e:
        with contextlib.suppress(PvpyError):
            storage.remove_revision(revision)
        write_progress(storage.root, revision, WONTGO, f"not applied: {e}")
        raise


@contextlib.contextmanager
def install_lock(storage: Storage) -> Iterator[None]:
    """One installer at a time per storage (CLI, API server and puller are
    separate processes): an exclusive flock on STORAGE/``paths.INSTALL_LOCK``."""
    import fcntl

    storage.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(storage.root / paths.INSTALL_LOCK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _claimed_revision(state_bytes: bytes) -> int | None:
    """The revision number a state claims (unverified), if it can be read at all."""
    from pvpy.state import canonical

    try:
        doc = canonical.decode(state_bytes)
    except ManifestError:
        return None
    revision = doc.get("revision") if isinstance(doc, dict) else None
    ok = isinstance(revision, int) and not isinstance(revision, bool) and revision > 0
    return revision if ok else None


def _refuse_signed(storage: Storage, state_bytes: bytes, reason: str) -> None:
    """WONTGO under the number the trusted keys signed (bounded: only they can make
    one); never over the record of a revision the device really has."""
    revision = _claimed_revision(state_bytes)
    if revision is not None:
        existing = read_progress(storage.root, revision)
        if existing is None and not storage.has_revision(revision):
            write_progress(storage.root, revision, WONTGO, reason)
    log.info("update refused", revision=revision, reason=reason)


def note_refusal(storage: Storage, state_bytes: bytes, reason: str) -> None:
    """A state the trusted keys did not sign: its number is anyone's invention, so it
    names no record; the last ``MAX_REFUSALS`` go to one file. Never raises."""
    entry = {"time": round(time.time(), 3), "claimed_revision": _claimed_revision(state_bytes),
             "reason": reason[:300]}  # fmt: skip
    path = Path(storage.root) / paths.PROGRESS / REFUSALS_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = [*last_refusals(storage.root), entry][-MAX_REFUSALS:]
        write_atomic(path, json.dumps(entries).encode())
    except (OSError, PvpyError) as e:
        log.error("cannot record a refusal", error=str(e))
    log.info("update refused", unverified_revision=entry["claimed_revision"], reason=reason)


def last_refusals(storage: Path) -> list[dict[str, Any]]:
    """The last refusals of unverified input, oldest first (for status and logs)."""
    try:
        entries = json.loads((Path(storage) / paths.PROGRESS / REFUSALS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _drop_corrupt(storage: Storage, refs: list[ObjectRef]) -> set[str]:
    """Check the stored objects a revision names; remove each corrupt one (a bit flip
    on disk) so that it comes again, good, from this source or the next push, even
    when an installed revision names it (that one cannot verify either: the good copy
    heals it). Returns the names found good."""
    good: set[str] = set()
    for ref in (r for r in refs if storage.objects.has(r.sha256)):
        try:
            storage.objects.verify(ref.sha256, size=ref.size)
        except ObjectCorruptError as e:
            log.warning("corrupt object in the store; taking it again", error=str(e))
            storage.objects.remove(ref.sha256)
            continue
        except ObjectMissingError:
            continue  # removed meanwhile: missing, fetched as such
        good.add(ref.sha256)
    return good


def _drop_added(storage: Storage, added: list[str]) -> None:
    """Remove the objects a failed staging added, unless an installed revision needs them."""
    needed: set[str] = set()
    for rev in storage.revisions():
        try:
            needed |= storage.referenced_by(rev)
        except StoreError:
            return  # unsure what is needed: keep everything
    for name in added:
        if name not in needed:
            storage.objects.remove(name)
    storage.clean_temp()
