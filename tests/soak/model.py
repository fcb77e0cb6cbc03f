"""What a soaked device must look like after each step.

The model knows every revision the driver built (its shape: which variant of
each container it runs), which of them committed, failed or were refused, and
what the writer app had acknowledged, which key set the device trusts, and in
which revision each running container started (its writable layer lives in
that revision's trail: GC must keep it). After each step the driver hands it the
device's status once the device settled; the model checks it and, where a
power cut left two outcomes possible (the update committed just before the cut,
or not), checks the device chose one of them and learns which.

Relaxations (what the model accepts although a stricter device could do better):

- A cut while a staged revision is handed to PID 1 may end WONTGO with the trail
  removed (``pvpy.device.update.hand_to_pid1``; issue #17 asks whether it should).
- A cut during a rollback may leave its target ERROR. It did for a cut re-apply of a
  good target (the boot turned its unfinished record into ERROR): fixed, reconcile now
  restores the DONE/UPDATED it had (tests/test_soak_regressions.py). Still accepted,
  because a target damaged on disk on purpose (``corrupt-installed``) may end ERROR
  when the cut comes after PID 1 refused it; a stricter check needs the step kind here.
- A cut during a key rotation may leave the device trusting the new key set with
  the rotating revision not committed (or refused at the hand-over): the trust root
  moves when a revision is installed, not when it commits (README, "Keys and
  rotation"). The model reads which set the device trusts from STORAGE/trust.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvpy.device import update as up
from pvpy.store import Storage

GOOD_STATES = (up.UPDATED, up.DONE)
WRITER = "writer"


class SoakFailure(AssertionError):
    """The device did not do what the model says it must."""


def settled(s: dict[str, Any]) -> bool:
    """No update, no try, every goal met, running what the boot env committed."""
    return (
        s.get("updating") is None
        and s.get("try") is None
        and bool(s.get("all_goals_met"))
        and s.get("revision") is not None
        and s.get("revision") == s.get("committed")
        and all(u["status"] in up.FINAL for u in s.get("updates", []))
    )


def read_records(path: Path) -> list[int]:
    """The writer's numbered lines; a torn or reordered file fails the model."""
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        raise SoakFailure(f"{path}: torn file (no final newline): {text[-40:]!r}")
    try:
        numbers = [int(line) for line in text.splitlines()]
    except ValueError as e:
        raise SoakFailure(f"{path}: torn record: {e}") from e
    if numbers != list(range(1, len(numbers) + 1)):
        gap = next(i for i, n in enumerate(numbers, 1) if n != i)
        raise SoakFailure(f"{path}: records not 1..n: line {gap} is {numbers[gap - 1]}")
    return numbers


@dataclass
class Model:
    storage: Path
    shapes: dict[int, dict[str, str]]  # revision -> container -> variant
    running: int
    good: set[int] = field(default_factory=set)  # committed once (or the factory one)
    failed: set[int] = field(default_factory=set)  # recorded ERROR
    refused: set[int] = field(default_factory=set)  # never installed
    fallback: int | None = None  # the newest good one below the last commit (GC keeps it)
    acknowledged: int = 0  # the writer's highest record the driver has seen
    pids: dict[str, int] = field(default_factory=dict)
    key_version: int = 0  # the key set the device trusts (0: the factory keys)
    # installed, but an object of theirs was corrupted or deleted on disk (a test's
    # doing): refused when applied, never good again; GC may remove them
    broken: set[int] = field(default_factory=set)
    # container -> the revision it started in (whose trail holds its writable layer)
    started_in: dict[str, int] = field(default_factory=dict)
    data_checks: int = 0  # record files read back whole and in order
    installed_before: set[int] = field(default_factory=set)  # at the start of the step

    @property
    def permanent_records(self) -> Path:
        return self.storage / "disks/permanent" / WRITER / "volumes/data/records"

    def rollback_target(self) -> int | None:
        """What `pvpy device rollback` must go back to: the newest good installed older one."""
        installed = self.installed()
        older = [r for r in self.good if r < self.running and r in installed]
        return max(older) if older else None

    def installed(self) -> set[int]:
        trails = self.storage / "trails"
        return {int(p.name) for p in trails.iterdir() if p.name.isdigit()}

    def in_use(self) -> set[int]:
        """Revisions whose trails hold the writable layers of running containers."""
        return {self.started_in.get(n, self.running) for n in self.shapes[self.running]}

    def trusted_key_version(self) -> int:
        """The newest key set in STORAGE/trust (0: only the factory keys)."""
        names = (p.name for p in (self.storage / "trust").iterdir())
        versions = [int(m[1]) for n in names if (m := re.fullmatch(r"keys-v(\d+)-rev\d+\.json", n))]
        return max(versions, default=0)

    # -- where each container's writable layer is --------------------------------

    def booted(self) -> None:
        """A boot: every container starts in the revision running."""
        self.started_in = {n: self.running for n in self.shapes[self.running]}

    def app_switch(self, old: int, new: int, committed: bool) -> None:
        """An app-only switch from ``old`` to ``new`` ended: committed (the changed and
        added containers started in ``new``) or rolled back (the changed, added and
        removed ones started again in ``old``). The others keep their layers."""
        a, b = self.shapes[old], self.shapes[new]
        touched = {n for n in a.keys() | b.keys() if a.get(n) != b.get(n)}
        target = new if committed else old
        final = b if committed else a
        self.started_in = {
            n: target if n in touched else self.started_in.get(n, target) for n in final
        }

    def restarted(self, name: str) -> None:
        self.started_in[name] = self.running

    # -- learning the outcome of a step ----------------------------------------

    def step_started(self) -> None:
        """Before each step: what is installed (what a commit in it may keep)."""
        self.installed_before = self.installed()

    def committed(self, revision: int) -> None:
        # GC after the commit keeps the newest good revision older than it that was
        # installed (rollback's target): the one the update left, or a newer good one
        # whose trail was kept for a running container's layer (a rollback from it)
        older = [r for r in self.good if r < revision and r in self.installed_before]
        self.fallback = max(older, default=None)
        self.running = revision
        self.good.add(revision)
        self.failed.discard(revision)

    def resolve(self, status: dict[str, Any], candidates: dict[int, bool]) -> None:
        """After a step with several possible outcomes: ``candidates`` maps each
        revision the device may run now to whether running it means it committed."""
        running = status["revision"]
        if running not in candidates:
            raise SoakFailure(f"running revision {running}, expected one of {sorted(candidates)}")
        if candidates[running]:
            self.committed(running)
        else:
            self.running = running
        self.booted()  # a cut: everything started again
        records = self.records(status)
        for revision in candidates:
            if revision == running:
                continue
            record = records.get(revision)
            # the other outcome did not happen: an update to it failed (ERROR), or
            # never got as far as a record; a revision it ran before stays as it was
            if record == up.ERROR:
                self.good.discard(revision)
                self.failed.add(revision)
            elif record == up.WONTGO:
                # The cut came while the client handed the staged revision to PID 1:
                # the hand-over failed ("no device answers"), and the client does what
                # pvpy.device.update.hand_to_pid1 documents: trail removed, WONTGO (the
                # number stays free). Whether a device going away should count as a
                # refusal is issue #17's question ("only a verified refusal is WONTGO").
                self.good.discard(revision)
                self.refused.add(revision)
            elif record is not None and record not in GOOD_STATES:
                raise SoakFailure(f"revision {revision} recorded {record} after the cut")

    # -- the checks ----------------------------------------------------------------

    def records(self, status: dict[str, Any]) -> dict[int, str]:
        return {u["revision"]: u["status"] for u in status.get("updates", [])}

    def check(self, status: dict[str, Any], log_dir: Path) -> list[str]:
        """Every invariant of a settled device; returns what was checked (for the log)."""
        if not settled(status):
            raise SoakFailure(f"not settled: {status}")
        if status["revision"] != self.running:
            raise SoakFailure(f"running {status['revision']}, the model says {self.running}")
        if status.get("boot_error"):
            raise SoakFailure(f"boot error: {status['boot_error']}")
        self._check_containers(status, log_dir)
        self._check_records(status)
        self._check_installed()
        self._check_trust()
        self._check_data()
        self._check_cli()
        return ["revision", "containers", "records", "installed", "trust", "data", "cli"]

    def check_gc(self, before: set[int], target: int | None) -> None:
        """After a GC that ran to its end: exactly the pinned revisions and the trails
        running containers use are left (``before``: installed before it; ``target``:
        the rollback target then, the newest good older one)."""
        kept = {self.running, *self.in_use(), *([target] if target is not None else [])}
        installed = self.installed()
        if installed != kept & before:
            raise SoakFailure(f"after GC: installed {sorted(installed)}, the model keeps "
                              f"{sorted(kept & before)} of {sorted(before)}")  # fmt: skip

    def _check_containers(self, status: dict[str, Any], log_dir: Path) -> None:
        expected = set(self.shapes[self.running])
        names = {c["name"] for c in status["containers"]}
        if names != expected:
            raise SoakFailure(f"containers {sorted(names)}, revision {self.running} has "
                              f"{sorted(expected)}")  # fmt: skip
        for c in status["containers"]:
            if c["status"] not in (c["goal"], "READY") or not c.get("pid"):
                raise SoakFailure(f"container {c['name']} is {c['status']} ({c.get('reason')})")
            # every app checks twice a second that its writable layer is still there
            log = log_dir / f"{c['name']}.log"
            if log.exists() and b"LOST" in log.read_bytes():
                raise SoakFailure(f"container {c['name']}: its writable layer went away")
        self.pids = {c["name"]: c["pid"] for c in status["containers"]}

    def _check_records(self, status: dict[str, Any]) -> None:
        records = self.records(status)
        for revision, state in records.items():
            if revision in self.good and state not in GOOD_STATES:
                raise SoakFailure(f"revision {revision} committed but recorded {state}")
            if revision in self.failed and state != up.ERROR:
                raise SoakFailure(f"revision {revision} failed but recorded {state}")
            if revision in self.refused and state != up.WONTGO:
                raise SoakFailure(f"revision {revision} was refused but recorded {state}")
            if revision in self.broken and state in GOOD_STATES:
                raise SoakFailure(f"revision {revision} has a bad object but recorded {state}")
        if self.running not in self.good:
            raise SoakFailure(f"running revision {self.running}, which never committed")

    def _check_installed(self) -> None:
        installed = self.installed()
        if self.running not in installed:
            raise SoakFailure(f"running revision {self.running} is not installed: {installed}")
        if installed & self.refused:
            raise SoakFailure(f"refused revisions installed: {sorted(installed & self.refused)}")
        if self.fallback in self.good and self.fallback not in installed:
            raise SoakFailure(f"revision {self.fallback}, the newest good one before "
                              f"{self.running}, is not installed: {sorted(installed)}")  # fmt: skip
        # GC keeps the trails running containers use (their writable layers)
        if not self.in_use() <= installed:
            raise SoakFailure(f"trails in use {sorted(self.in_use())} not all installed: "
                              f"{sorted(installed)}")  # fmt: skip
        # a trail is installed only once all its objects are (staging and GC both
        # keep that order, whatever a power cut interrupts); broken ones are the test's
        storage = Storage(self.storage)
        for revision in sorted(installed - self.broken):
            missing = [o for o in storage.referenced_by(revision) if not storage.objects.has(o)]
            if missing:
                raise SoakFailure(f"revision {revision} is installed without object {missing[0]}")

    def _check_trust(self) -> None:
        trusted = self.trusted_key_version()
        if trusted != self.key_version:
            raise SoakFailure(f"device trusts key set {trusted}, the model {self.key_version}")

    def _check_data(self) -> None:
        numbers = read_records(self.permanent_records)
        if len(numbers) < self.acknowledged:
            raise SoakFailure(f"permanent data lost: {len(numbers)} records, "
                              f"{self.acknowledged} were acknowledged")  # fmt: skip
        self.acknowledged = len(numbers)
        self.data_checks += 1
        for records in (self.storage / "trails").glob(f"*/disks/{WRITER}/volumes/rev/records"):
            read_records(records)  # revision-scoped: starts over per revision, never torn
            self.data_checks += 1

    def _check_cli(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "pvpy", "device", "status", "--storage", str(self.storage)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode != 0 or str(self.running) not in result.stdout:
            raise SoakFailure(f"pvpy device status failed ({result.returncode}): {result.stderr}")
