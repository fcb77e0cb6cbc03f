"""`pvpy device pull`: the device's registry puller (see ``pvpy.oci`` for the format and the
trust argument). Its own process, kept alive by PID 1; never PID 1.

Only pvpy errors become outcomes; anything else is a bug and ends the process
with its traceback (PID 1 restarts it). A refused revision is recorded by
``pvpy.device.update`` (WONTGO under its number only when the trusted keys
signed it); what the puller remembers between polls is bounded (``MAX_SKIPPED``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from pvpy import control, paths
from pvpy.device import update as up
from pvpy.errors import (
    EXIT_REFUSED,
    DeviceError,
    ManifestError,
    ObjectMissingError,
    PvpyError,
    RegistryError,
    TrustError,
    exit_code_of_kind,
)
from pvpy.log import get_logger
from pvpy.oci import (
    MAX_SMALL_BLOB,
    BlobStream,
    Reference,
    Registry,
    UnverifiedRevision,
    parse_manifest_unverified,
    unverified_revision_number,
)
from pvpy.state.model import ObjectRef
from pvpy.store import Storage

log = get_logger("pull")

APPLY_TIMEOUT = 300.0  # PID 1 re-verifies (hashes) the revision before it answers
FINAL_TIMEOUT = 3600.0  # longest wait for an applied revision's final record
MAX_SKIPPED = 256  # manifests remembered as handled (Puller.skip)


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
            return EXIT_REFUSED
        return exit_code_of_kind("device")  # busy, unreachable, still going

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

    def skip_digest(self, digest: str, until: float) -> None:
        """Leave a manifest alone until ``until`` (monotonic). Bounded: a registry
        serving a new manifest at every poll must not grow this without end (the
        oldest go first; one of them coming back costs a look, never a record)."""
        self.skip.pop(digest, None)
        self.skip[digest] = until
        while len(self.skip) > MAX_SKIPPED:
            del self.skip[next(iter(self.skip))]

    def control(self, request: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """PID 1's reply. Raises DeviceError (no answer, or PID 1 says no)."""
        return control.call(paths.control_socket(self.run_dir), request, timeout)

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
            self.skip_digest(digest, float("inf"))
            raise
        state = self.registry.read_blob(repo, layers["state"]["digest"], MAX_SMALL_BLOB)
        revision = unverified_revision_number(state)
        highest = up.highest_revision(self.storage)
        if revision is not None and revision <= highest:
            # older or the same: not worth a look (and no WONTGO): the tag may lag
            self.skip_digest(digest, float("inf"))
            return Outcome("nothing new", revision, f"the device had {highest}")
        signature = self.registry.read_blob(repo, layers["signature"]["digest"], MAX_SMALL_BLOB)
        keyset = None
        if "keyset" in layers:
            keyset = self.registry.read_blob(repo, layers["keyset"]["digest"], MAX_SMALL_BLOB)
        return UnverifiedRevision(digest, state, signature, keyset)

    def take(self, incoming: UnverifiedRevision) -> Outcome:
        """Verify, install, apply, wait for the final record."""
        from pvpy.trust import load_trust

        digest = incoming.manifest_digest
        try:
            trust = load_trust(self.storage.root)
            verified = up.verify_incoming(self.storage, incoming.state, incoming.signature,
                                          incoming.keyset, trust)  # fmt: skip
        except (TrustError, ManifestError) as e:
            self.skip_digest(digest, float("inf"))  # the same bytes are refused again
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
            up.install_verified(self.storage, verified, fetch)
        except PvpyError as e:  # recorded by install_verified (WONTGO: retried later)
            self.skip_digest(digest, time.monotonic() + self.retry_failed)
            return self._say(Outcome("failed", revision, str(e)))
        return self.apply(revision, digest)

    def apply(self, revision: int, digest: str) -> Outcome:
        try:
            reply = up.hand_to_pid1(self.storage, revision, self.control, APPLY_TIMEOUT)
        except PvpyError as e:  # recorded WONTGO by hand_to_pid1; the number can come again
            self.skip_digest(digest, time.monotonic() + self.retry_failed)
            return self._say(Outcome("failed", revision, f"not applied: {e}"))
        log.info("update requested", revision=revision, accepted=reply.get("accepted"))
        final = self.wait_final(revision)
        self.skip_digest(digest, float("inf"))  # whatever its end, this revision's number is used
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
    fd = os.open(storage.root / paths.PULL_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
