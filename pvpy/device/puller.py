"""`pvpy device pull`: the device's registry puller (see ``pvpy.oci`` for the format and the
trust argument). Its own process, kept alive by PID 1; never PID 1.

Only pvpy errors become outcomes; anything else is a bug and ends the process
with its traceback (PID 1 restarts it). A refused revision is recorded by
``pvpy.device.update`` (WONTGO under its number only when the trusted keys
signed it); what the puller remembers between polls is bounded (``MAX_SKIPPED``).

Availability against a registry that misbehaves:

- every request has a deadline (``pvpy.registry.Registry``); SIGTERM cuts the one in
  flight at once (``Registry.abort``), the install lock goes with it;
- only a verified refusal (bad signature, an older revision, an object whose bytes
  do not hash to its name after a complete transfer) is WONTGO. A transfer that
  failed otherwise (connection lost, deadline, HTTP 5xx, disk full) is ERROR, which
  uses up no revision number (``pvpy.device.update.highest_revision``): it is tried
  again with exponential backoff (at least the registry's ``Retry-After``), and
  resumes where it stopped: the bytes received so far stay in the store's partial
  download (``ObjectStore.append_partial``), the next request asks for the rest
  (HTTP Range), the whole is hashed before it is used; across restarts too;
- a small blob (state, signature, key set) the registry got wrong is remembered by
  digest, not fetched again at every poll;
- between polls the puller sleeps until the next one is due, or SIGTERM.
"""

from __future__ import annotations

import os
import random
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
    ObjectCorruptError,
    ObjectMissingError,
    ObjectNameError,
    PvpyError,
    RegistryError,
    TrustError,
    exit_code_of_kind,
)
from pvpy.log import get_logger
from pvpy.oci import (
    MAX_SMALL_BLOB,
    Reference,
    UnverifiedRevision,
    parse_manifest_unverified,
    unverified_revision_number,
)
from pvpy.registry import BlobRefusedError, Registry
from pvpy.state.model import ObjectRef
from pvpy.store import Storage

log = get_logger("pull")

APPLY_TIMEOUT = 300.0  # PID 1 re-verifies (hashes) the revision before it answers
FINAL_TIMEOUT = 3600.0  # longest wait for an applied revision's final record
MAX_SKIPPED = 256  # manifests and blobs remembered as handled (Puller.skip)
BACKOFF_FIRST = 1.0  # seconds before the first retry of a failed poll; doubles, up to
BACKOFF_MAX = 600.0  # this (and never beyond the poll interval, unless Retry-After says)
MIN_PROGRESS = 64 << 10  # bytes a cut request must have brought to be resumed at once
MAX_RESUMES = 64  # requests for one object within one attempt (then backoff)


@dataclass
class Outcome:
    """What one poll did; ``exit_code`` for ``--once``."""

    # busy, unreachable, retrying, unchanged, nothing new, refused, failed,
    # UPDATED, DONE, WONTGO, ERROR, still going
    what: str
    revision: int | None = None
    reason: str = ""

    @property
    def exit_code(self) -> int:
        if self.what in ("unchanged", "nothing new", up.UPDATED, up.DONE):
            return 0
        if self.what in ("refused", "failed", up.WONTGO, up.ERROR):
            return EXIT_REFUSED
        return exit_code_of_kind("device")  # busy, unreachable, retrying, still going

    @property
    def transient(self) -> bool:
        """A failure that says nothing about the revision: tried again soon (backoff)."""
        return self.what in ("unreachable", "retrying")

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
    # manifest or blob digest -> monotonic time it may be looked at again (inf: never)
    skip: dict[str, float] = field(default_factory=dict)
    last: str = ""  # the last outcome logged
    failures: int = 0  # transient failures in a row (backoff)
    stopping: bool = False

    def stop(self) -> None:
        """SIGTERM: end the request in flight now; the poll ends as "retrying"."""
        self.stopping = True
        self.registry.abort("stopped (SIGTERM)")

    def skip_digest(self, digest: str, until: float) -> None:
        """Leave a manifest (or blob) alone until ``until`` (monotonic). Bounded: a
        registry serving a new manifest at every poll must not grow this without end
        (the oldest go first; one of them coming back costs a look, never a record)."""
        self.skip.pop(digest, None)
        self.skip[digest] = until
        while len(self.skip) > MAX_SKIPPED:
            del self.skip[next(iter(self.skip))]

    def skipped(self, digest: str) -> bool:
        return time.monotonic() < self.skip.get(digest, 0.0)

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
        did not move since it was handled), "nothing new" or "refused" (a small blob
        the registry got wrong). Raises RegistryError."""
        manifest, digest = self.registry.get_manifest(self.ref.repository, self.ref.tag)
        if self.skipped(digest):
            return Outcome("unchanged")
        try:
            layers = parse_manifest_unverified(manifest)
        except RegistryError:
            self.skip_digest(digest, float("inf"))
            raise
        try:
            state = self.small_blob(layers["state"])
            revision = unverified_revision_number(state)
            highest = up.highest_revision(self.storage)
            if revision is not None and revision <= highest:
                # older or the same: not worth a look (and no WONTGO): the tag may lag
                self.skip_digest(digest, float("inf"))
                return Outcome("nothing new", revision, f"the device had {highest}")
            signature = self.small_blob(layers["signature"])
            keyset = self.small_blob(layers["keyset"]) if "keyset" in layers else None
        except BlobRefusedError as e:
            # the manifest is left alone as long as the blob it names is
            blobs = [self.skip.get(str(layer["digest"]), 0.0) for layer in layers.values()]
            self.skip_digest(digest, max([*blobs, time.monotonic() + self.retry_failed]))
            return Outcome("refused", reason=str(e))
        return UnverifiedRevision(digest, state, signature, keyset)

    def small_blob(self, layer: dict[str, Any]) -> bytes:
        """A state, signature or key set blob. A refusal is remembered by its digest
        (for good when too large: the same digest names the same bytes; for
        ``retry_failed`` when the registry sent other bytes). Raises RegistryError."""
        digest = str(layer["digest"])
        if self.skipped(digest):
            raise BlobRefusedError(f"blob {digest}: refused before, not fetched again")
        size = layer.get("size")
        try:
            if isinstance(size, int) and size > MAX_SMALL_BLOB:
                raise BlobRefusedError(f"blob {digest}: {size} bytes, more than {MAX_SMALL_BLOB}",
                                       permanent=True)  # fmt: skip
            return self.registry.read_blob(self.ref.repository, digest, MAX_SMALL_BLOB)
        except BlobRefusedError as e:
            self.skip_digest(digest, float("inf") if e.permanent else
                             time.monotonic() + self.retry_failed)  # fmt: skip
            raise

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
        # the partial downloads of another revision go: what is kept stays bounded
        self.storage.objects.drop_partials(o.sha256 for o in verified.state.objects().values())
        try:
            up.install_verified(self.storage, verified, download=self.download)
        except (ObjectCorruptError, ObjectMissingError, ObjectNameError) as e:
            # WONTGO (recorded): the registry holds other bytes than the signed ones
            self.skip_digest(digest, time.monotonic() + self.retry_failed)
            return self._say(Outcome("failed", revision, str(e)))
        except PvpyError as e:  # ERROR (recorded), the number not used up: backoff, resume
            return self._say(Outcome("retrying", revision, str(e)))
        return self.apply(revision, digest)

    def download(self, ref: ObjectRef) -> None:
        """One object into the store (``install_verified`` calls this under the install
        lock), from the bytes an earlier attempt left on: HTTP Range for the rest. A
        request cut after it brought ``MIN_PROGRESS`` bytes is followed by the next at
        once; else the attempt fails (backoff). The whole is hashed before it becomes
        the object. Raises RegistryError (transfer), StoreError (ObjectCorruptError:
        other bytes, after a complete transfer)."""
        objects = self.storage.objects
        name, repo = ref.sha256, self.ref.repository
        digest = f"sha256:{name}"
        for _ in range(MAX_RESUMES):
            have = objects.partial_size(name)
            have = have if have <= ref.size else 0
            if have == ref.size and have > 0:
                break
            try:
                with self.registry.open_blob(repo, digest, have) as blob:
                    if blob.start != have:
                        log.info("registry sent the whole blob", object=name, had=have)
                    if blob.total is not None and blob.total > ref.size:
                        raise ObjectCorruptError(f"object {name}: the registry has {blob.total} "
                                                 f"bytes, the signed state {ref.size}")  # fmt: skip
                    got = objects.append_partial(name, cast(BinaryIO, blob), blob.start, ref.size)
            except RegistryError as e:
                if e.status == 416:  # nothing beyond what we have: judged by the hash below
                    break
                got = objects.partial_size(name)
                if self.stopping or got - have < MIN_PROGRESS:
                    raise
                log.info("download resumes", object=name, at=got, size=ref.size, after=str(e))
                continue
            if got <= have or got >= ref.size:
                break  # complete, or a complete answer brought nothing more: judged below
            # an answer that looked complete and was not (a short Content-Length): the rest
            log.info("download resumes", object=name, at=got, size=ref.size, after="a short answer")
        else:
            raise RegistryError(f"blob {digest}: {objects.partial_size(name)} of {ref.size} "
                                f"bytes after {MAX_RESUMES} requests; the rest later")  # fmt: skip
        objects.adopt_partial(name, ref.size)

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
            if time.monotonic() > deadline or self.stopping:
                return None
            time.sleep(0.5)

    def next_poll(self, outcome: Outcome, interval: float) -> float:
        """Seconds until the next poll: ``interval``, or after a transient failure an
        exponential backoff (with jitter, so a fleet does not come back all at once),
        never sooner than the registry's Retry-After."""
        if not outcome.transient:
            self.failures = 0
            return interval
        self.failures += 1
        backoff = BACKOFF_FIRST * 2.0 ** min(self.failures - 1, 30)
        delay = min(backoff, max(interval, BACKOFF_FIRST), BACKOFF_MAX) * random.uniform(1, 1.2)
        retry_after = self.registry.retry_after
        return max(delay, retry_after) if retry_after is not None else delay

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


def _sleep(puller: Puller, seconds: float) -> None:
    """Sleep ``seconds``, or until SIGTERM: one wake-up, not a polling loop. SIGTERM is
    blocked meanwhile so that one arriving now is waited for, not lost."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        if not puller.stopping and signal.sigtimedwait({signal.SIGTERM}, max(seconds, 0.0)):
            puller.stop()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def run(puller: Puller, interval: float, once: bool, say: Callable[[str], None]) -> int:
    """``pvpy device pull``: poll every ``interval`` seconds (or once) until SIGTERM.

    SIGTERM cuts a download at once (what arrived is kept for the next puller to
    resume; the install lock goes); an update PID 1 is applying is left to PID 1.
    """
    _lock(puller.storage)

    def stop(signum: int, frame: object) -> None:
        puller.stop()  # shuts the sockets in flight: no logic beyond that here

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
        if not puller.stopping:
            _sleep(puller, puller.next_poll(outcome, interval))
        if puller.stopping:
            log.info("pull stopped")
            return 0
