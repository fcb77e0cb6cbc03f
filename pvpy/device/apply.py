"""PID 1's half of an update: apply, test, commit or roll back; GC after.

The staging half (signature, objects, trail) runs elsewhere (``pvpy.device.update``);
PID 1 receives "apply revision N" on its control socket and drives it from
its loop: verify N in a child, classify against what runs, then either
switch the changed containers (app-only) or write ``pv_try`` and reboot;
TESTING until every goal held for the commit delay; commit (``pv_rev``) or
roll back. Every boot reconciles the records a power cut left half way.
PID 1 gives it the storage, the boot environment, the supervisor, the boot
facts, and the ways to verify, reboot and set the running revision: exactly
``ApplyHost`` (``pvpy.device._apply_host``), nothing else of PID 1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pvpy import bootvars, paths
from pvpy.bootvars import BootVars
from pvpy.log import get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

    from pvpy.device._apply_host import ApplyHost
    from pvpy.device.supervisor import Supervisor

log = get_logger("apply")


class UpdateRun:
    """An update PID 1 is applying or testing."""

    def __init__(self, revision: int, kind: str, phase: str, old_state: Any = None) -> None:
        self.revision = revision
        self.kind = kind
        self.phase = phase  # verifying, switching, testing, rollback
        self.old_state = old_state
        self.testing_since = 0.0
        self.goals_met_at: float | None = None
        self.restarts: dict[str, int] = {}


class Applier:
    """Drives the update under way (at most one) for PID 1."""

    def __init__(self, host: ApplyHost) -> None:
        self.host = host
        self.update: UpdateRun | None = None
        self.health_reported = False
        # Trails the last GC kept only because running containers still use their
        # disks: collected as soon as one of them is no longer used (see ``check``).
        self.gc_owed: set[int] = set()
        self.gc_retry_at: float | None = None  # GC deferred while a revision was staged

    @property
    def trying(self) -> bool:
        """A try-boot revision is under test."""
        from pvpy.device.update import KIND_REBOOT

        u = self.update
        return u is not None and u.kind == KIND_REBOOT and u.phase == "testing"

    def _running(self) -> Supervisor:
        sup = self.host.supervisor
        if sup is None:
            raise RuntimeError("an update is under way but no revision runs")
        return sup

    def collect(self, now: float) -> None:
        """GC now, or again in GC_RETRY seconds if staging holds the install lock."""
        owed = collect_garbage(self.host)
        self.gc_retry_at = now + GC_RETRY if owed is None else None
        self.gc_owed = owed or set()

    def gc_now(self) -> dict[str, Any]:
        """GC on request (``pvpy device gc``): only between updates, as after a commit."""
        if self.update is not None:
            return {"ok": False, "error": f"update to {self.update.revision} in progress"}
        if self.host.shutdown_pending or self.host.supervisor is None:
            return {"ok": False, "error": "device is not running a revision"}
        outcome = run_gc(self.host)
        if outcome.get("ok"):
            self.gc_retry_at = None
            self.gc_owed = set(outcome["kept_in_use"])
        return outcome

    def next_deadline(self) -> float | None:
        """When ``check`` must run although nothing else happens: the commit delay
        or the commit timeout running out, a deferred GC (PID 1's loop sleeps until then)."""
        u, sup = self.update, self.host.supervisor
        if u is None and self.gc_retry_at is not None and not self.host.shutdown_pending:
            return self.gc_retry_at
        if u is None or u.phase != "testing" or sup is None or self.host.shutdown_pending:
            return None
        if u.goals_met_at is not None:
            return u.goals_met_at + self.host.commit_delay
        if sup.all_goals_met():
            return time.monotonic()  # met since the last check: start the commit delay now
        return u.testing_since + self.host.commit_timeout

    def countdown(self) -> dict[str, Any] | None:
        """While TESTING: seconds until the commit (every goal held so far) or until
        the commit timeout gives up (a goal not met), for status to show."""
        u = self.update
        if u is None or u.phase != "testing":
            return None
        now = time.monotonic()
        if u.goals_met_at is not None:
            commit_in: float | None = max(0.0, u.goals_met_at + self.host.commit_delay - now)
        else:
            commit_in = None
        gives_up_in = max(0.0, u.testing_since + self.host.commit_timeout - now)
        return {"revision": u.revision, "for": round(now - u.testing_since, 1),
                "commit_in": None if commit_in is None else round(commit_in, 1),
                "gives_up_in": round(gives_up_in, 1)}  # fmt: skip

    def reconcile(self, booted: int | None) -> None:
        """Make every update record tell the truth after a (re)boot (see
        ``reconcile_records``); a try we are booting now goes to TESTING."""
        from pvpy.device import update as up

        trying = reconcile_records(self.host, booted)
        if trying is not None:
            up.write_progress(self.host.storage, trying, up.TESTING, "booted the try revision",
                              kind=up.KIND_REBOOT)  # fmt: skip
            up.persist_point("reboot:testing")
            self.update = UpdateRun(trying, up.KIND_REBOOT, "testing")
            self.update.testing_since = time.monotonic()

    def begin(self, revision: int) -> dict[str, Any]:
        """Apply an installed (staged) revision: verify it in a child first; the rest
        happens in ``verified`` when that child exits."""
        from pvpy.store import Storage

        if self.update is not None:
            return {"ok": False, "error": f"update to {self.update.revision} in progress"}
        if self.host.shutdown_pending or self.host.supervisor is None:
            return {"ok": False, "error": "device is not running a revision"}
        if not Storage(self.host.storage).has_revision(revision):
            return {"ok": False, "error": f"revision {revision} is not installed"}
        from pvpy.device import update as up

        # a fresh record: a rollback re-applies a revision whose old record is final
        up.write_progress(self.host.storage, revision, up.INPROGRESS, "verifying before applying")
        self.update = UpdateRun(revision, "", "verifying")
        self.host.start_verify(revision, self.verified)
        return {"ok": True, "accepted": revision}

    def verified(self, revision: int, problem: str | None) -> None:
        """The installed revision verified (or not): restart what changed, or try-boot."""
        from pvpy.device import update as up
        from pvpy.state import canonical
        from pvpy.state.model import State
        from pvpy.store import Storage

        self.update = None
        if problem is not None:
            up.write_progress(self.host.storage, revision, up.WONTGO, problem)
            return
        sup = self.host.supervisor
        if self.host.shutdown_pending or sup is None:
            up.write_progress(self.host.storage, revision, up.ERROR, "device went down before it")
            return
        state_bytes, _ = Storage(self.host.storage).read_trail(revision)
        new_state = State.from_dict(canonical.decode(state_bytes))
        change = up.classify(sup.state, new_state)
        if change.kind == up.KIND_REBOOT:
            if self.host.bootenv.writes_try_partition():
                # The Pi's firmware boots files, not the storage: they go to the try
                # boot partition first (a child does it), pv_try only after that.
                up.write_progress(self.host.storage, revision, up.INPROGRESS,
                                  f"{change.why}: writing the try boot partition",
                                  kind=up.KIND_REBOOT)  # fmt: skip
                self.update = UpdateRun(revision, up.KIND_REBOOT, "writing")
                self.host.start_write_boot(revision, self.boot_written)
                return
            self.try_boot(revision, change.why)
            return
        restart = set(change.changed) | set(change.removed)
        up.write_progress(self.host.storage, revision, up.INPROGRESS,
                          f"restarting {sorted(restart | set(change.added))}",
                          kind=up.KIND_APP)  # fmt: skip
        self.update = UpdateRun(revision, up.KIND_APP, "switching", sup.state)
        sup.switch(new_state, restart)

    def boot_written(self, revision: int, problem: str | None) -> None:
        """The try boot partition is written (or not): set pv_try and try-boot."""
        from pvpy.device import update as up

        self.update = None
        if problem is not None:
            up.write_progress(self.host.storage, revision, up.ERROR,
                              f"cannot write the try boot partition: {problem}",
                              kind=up.KIND_REBOOT)  # fmt: skip
            return
        if self.host.shutdown_pending:
            up.write_progress(self.host.storage, revision, up.ERROR,
                              "device went down before it", kind=up.KIND_REBOOT)  # fmt: skip
            return
        self.try_boot(revision, "boot partition written")

    def try_boot(self, revision: int, why: str) -> None:
        """pv_try in one boot-env write, then reboot — with the boot env's reboot
        argument when it has one (the Pi's "0 tryboot")."""
        from pvpy.device import update as up

        up.write_progress(self.host.storage, revision, up.INPROGRESS,
                          f"{why}: rebooting into it", kind=up.KIND_REBOOT)  # fmt: skip
        self.host.bootenv.write(bootvars.start_try(revision))
        up.persist_point("reboot:try")
        argument = self.host.bootenv.try_reboot_argument()
        self.host.request("reboot", f"update to revision {revision}", argument)

    def check(self, now: float) -> None:
        """Drive the update under way: switching -> testing -> commit or roll back."""
        from pvpy.device import update as up

        u, sup = self.update, self.host.supervisor
        idle = u is None and sup is not None and not self.host.shutdown_pending
        if (
            idle
            and sup is not None
            and (
                (self.gc_retry_at is not None and now >= self.gc_retry_at)
                or self.gc_owed - sup.revisions_in_use()
            )
        ):
            self.collect(now)
        if u is None or sup is None or self.host.shutdown_pending:
            return
        if u.phase == "switching" and sup.pending_switch is None:
            up.persist_point("app:switched")
            u.phase = "testing"
            u.testing_since = now
            u.restarts = {n: m.total_restarts for n, m in sup.containers.items()}
            up.write_progress(self.host.storage, u.revision, up.TESTING, "waiting for goals",
                              kind=u.kind)  # fmt: skip
            return
        if u.phase == "rollback" and sup.pending_switch is None:
            log.info("rolled back", revision=u.revision, running=sup.state.revision)
            self.update = None
            return
        if u.phase != "testing":
            return
        if not u.restarts:
            u.restarts = {n: m.total_restarts for n, m in sup.containers.items()}
        failure = None
        for name, m in sup.containers.items():
            if m.status == "FAILED":
                failure = f"{name} failed: {m.reason}"
            elif m.total_restarts > u.restarts.get(name, 0):
                failure = f"{name} exited while testing ({m.last_exit})"
        if failure is None and sup.goals_missed:
            failure = f"goals missed: {sup.goals_missed}"
        if failure is None and sup.all_goals_met():
            if u.goals_met_at is None:
                u.goals_met_at = now
                log.info("all goals met; commit after delay", delay=self.host.commit_delay)
            if now - u.goals_met_at >= self.host.commit_delay:
                self.commit(u)
                return
        elif failure is None:
            u.goals_met_at = None
            if now - u.testing_since > self.host.commit_timeout:
                failure = f"goals not met within {self.host.commit_timeout:g}s"
        if failure is not None:
            self.fail(u, failure)

    def check_health(self) -> None:
        """A factory revision that misses its goals cannot roll back: say ERROR, run on.

        (A revision that came by update is judged while TESTING instead.)
        """
        from pvpy.device import update as up

        sup, running = self.host.supervisor, self.host.revision
        if self.health_reported or sup is None or self.update is not None:
            return
        if self.host.shutdown_pending:
            return
        if sup.group_index < len(sup.groups) or running is None:
            return  # still starting
        failed = [n for n, m in sup.containers.items() if m.status == "FAILED"]
        if not failed and not sup.goals_missed:
            return
        self.health_reported = True
        if up.read_progress(self.host.storage, running) is None:
            up.write_progress(
                self.host.storage, running, up.ERROR,
                f"factory revision failing (failed: {failed}, goals missed: {sup.goals_missed});"
                " nothing older to roll back to, keeps running",
            )  # fmt: skip

    def commit(self, u: UpdateRun) -> None:
        from pvpy.device import update as up

        # One batch for both kinds. An app update used to write pv_rev alone; the try
        # variables the batch also clears are unset then (``begin`` refuses while a
        # try is testing, ``reconcile`` cleared any other), so the effect is the same.
        self.host.bootenv.write(bootvars.commit(u.revision))
        if u.kind == up.KIND_APP:
            up.persist_point("app:commit")
            up.write_progress(
                self.host.storage, u.revision, up.UPDATED, "committed", 100, kind=u.kind
            )
        else:
            up.persist_point("reboot:commit")
            up.write_progress(self.host.storage, u.revision, up.DONE, "committed", 100, kind=u.kind)
        self.host.set_revision(u.revision)
        self.update = None
        self.collect(time.monotonic())

    def fail(self, u: UpdateRun, reason: str) -> None:
        from pvpy.device import update as up

        log.error("update failed; rolling back", revision=u.revision, reason=reason)
        up.write_progress(self.host.storage, u.revision, up.ERROR, f"rolled back: {reason}",
                          kind=u.kind)  # fmt: skip
        if u.kind == up.KIND_APP:
            up.persist_point("app:rollback")
            sup = self._running()
            change = up.classify(u.old_state, sup.state)
            u.phase = "rollback"
            sup.switch(u.old_state, set(change.changed) | set(change.removed) | set(change.added))
            return
        up.persist_point("reboot:rollback")
        # Record first, then clear the try: a cut in between still ends in ERROR.
        self.host.bootenv.write(bootvars.clear_try())
        self.update = None
        self.host.request("reboot", f"revision {u.revision} failed testing")

    def rollback(self) -> dict[str, Any]:
        """Go back to the newest good revision older than the running one."""
        from pvpy.device import update as up
        from pvpy.store import Storage

        running = self.host.revision
        if running is None:
            return {"ok": False, "error": "device is not running a revision"}
        older = up.good_revisions_below(Storage(self.host.storage), running)
        if not older:
            return {"ok": False, "error": "no older good revision is installed"}
        reply = self.begin(max(older))
        return {**reply, "revision": max(older)}


def reconcile_records(host: ApplyHost, booted: int | None) -> int | None:
    """The update records after a (re)boot; returns the try being booted now, if any.

    A try that did not commit is ERROR (and pv_try cleared, after the
    failure is recorded); a committed revision whose record a power cut
    left unfinished is DONE/UPDATED; anything else left half-way was
    interrupted: ERROR. The record of the try booted now is left to the caller.
    """
    from pvpy.device import update as up

    env = BootVars.parse(host.bootenv.read())
    committed = env.rev
    trying = host.boot_revision if host.boot_trying else None
    failed_try = host.failed_try
    reason = (host.failed_try_reason
              or "did not commit; rolled back to the last good revision")  # fmt: skip
    if trying is not None and booted != trying:
        failed_try = trying  # it would not even verify: we booted another one
    pending = env.try_rev
    if failed_try is None and pending is not None and pending not in (committed, trying):
        # A try the bootloader never booted (a plain reboot, or one that could
        # not carry the try): running the last good revision, the try is over.
        failed_try = pending
        reason = host.failed_try_reason or (
            "the bootloader did not boot it; running the last good revision"
        )
    if failed_try is not None:
        record = up.read_progress(host.storage, failed_try)
        if record is None or record.status != up.ERROR:
            up.write_progress(host.storage, failed_try, up.ERROR, reason,
                              kind=up.KIND_REBOOT)  # fmt: skip
        host.bootenv.write(bootvars.clear_try())
    for record in up.all_progress(host.storage):
        if record.status in up.FINAL:
            continue
        if record.revision == trying and booted == trying:
            continue
        if record.revision == committed:
            done = up.UPDATED if record.kind == up.KIND_APP else up.DONE
            up.write_progress(host.storage, record.revision, done, "committed", 100,
                              kind=record.kind)  # fmt: skip
        elif record.good_before:  # a rollback to it, cut short: it is as good as it was
            reason = f"a rollback to it was interrupted while {record.status}; still good"
            up.write_progress(host.storage, record.revision, record.good_before, reason, 100,
                              kind=record.kind)  # fmt: skip
        else:
            reason = f"interrupted while {record.status}"
            up.write_progress(host.storage, record.revision, up.ERROR, reason, kind=record.kind)
    return trying if trying is not None and booted == trying else None


def pinned_revisions(host: ApplyHost) -> set[int]:
    """Revisions GC must keep: last good, try, running, and the good one before."""
    from pvpy.device import update as up
    from pvpy.store import Storage

    env = BootVars.parse(host.bootenv.read())
    pins = {r for r in (env.rev, env.try_rev) if r is not None}
    if host.revision is not None:
        pins.add(host.revision)
    older = up.good_revisions_below(Storage(host.storage), max(pins, default=0))
    if older:
        pins.add(max(older))
    return pins


def revisions_in_use(host: ApplyHost) -> set[int]:
    """Revisions whose trails hold the writable layers of running containers.

    An app-only update keeps an unchanged container running on the writable
    layer (``trails/<rev>/disks/<ctr>/``) of the revision it was started in;
    removing that trail would pull its whole layer from under it. Its next
    start is in the revision then running, with that revision's own layer
    (``revision`` persistence: a layer per revision), and the old trail goes
    at the next GC (``Applier.check`` runs it as soon as it is free).
    """
    sup = host.supervisor
    return sup.revisions_in_use() if sup is not None else set()


GC_RETRY = 5.0  # seconds: how soon GC is tried again when staging held the install lock


def _try_install_lock(storage: Path) -> int | None:
    """The install lock (``pvpy.device.update.install_lock``) if no one holds it, else
    None. PID 1 never waits for it: a staging process may hold it for minutes."""
    import fcntl

    fd = os.open(storage / paths.INSTALL_LOCK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def collect_garbage(host: ApplyHost) -> set[int] | None:
    """Remove every unpinned revision and unreferenced object; returns the revisions
    kept only because running containers still use their disks (GC owed), or None
    when a revision is being staged (GC deferred: see ``run_gc``)."""
    outcome = run_gc(host)
    if outcome.get("deferred"):
        return None
    return set(outcome.get("kept_in_use", ()))


def run_gc(host: ApplyHost) -> dict[str, Any]:
    """One GC; the reply of the control request "gc": ``ok``, and ``removed``
    (revisions), ``objects``, ``freed`` (bytes), ``pinned``, ``kept_in_use``
    (revisions kept only for running containers' disks), or ``deferred``/``error``.

    Staging (``pvpy device update``, the API, the puller: other processes) puts
    objects into the store before the trail that names them exists; a GC in
    between would take them for garbage. Both hold the install lock, so GC only
    runs when no one stages.
    """
    from pvpy.device import update as up
    from pvpy.store import Storage

    try:
        lock = _try_install_lock(Path(host.storage))
    except OSError as e:
        log.warning("gc: install lock unavailable; nothing removed", error=str(e))
        return {"ok": False, "error": f"install lock unavailable: {e}"}
    if lock is None:
        log.info("gc deferred: a revision is being staged")
        return {"ok": False, "deferred": True, "error": "a revision is being staged"}
    try:
        pins = pinned_revisions(host)
        in_use = revisions_in_use(host)
        result = Storage(host.storage).gc(pins | in_use)
        log.info("garbage collected", revisions=result.removed_revisions,
                 objects=len(result.removed_objects), freed=result.freed_bytes,
                 kept_in_use=sorted(in_use - pins) or None)  # fmt: skip
        up.persist_point("gc:done")
    except Exception as e:
        log.warning("gc failed; nothing removed", error=str(e))
        return {"ok": False, "error": f"gc failed: {e}"}
    finally:
        os.close(lock)
    return {"ok": True, "removed": result.removed_revisions,
            "objects": len(result.removed_objects), "freed": result.freed_bytes,
            "pinned": sorted(pins), "kept_in_use": sorted(in_use - pins)}  # fmt: skip
