"""What a soaked device must look like after each step.

The model knows every revision the driver built (its shape: which variant of
each container it runs), which of them committed, failed or were refused, and
what the writer app had acknowledged. After each step the driver hands it the
device's status once the device settled; the model checks it and, where a
power cut left two outcomes possible (the update committed just before the cut,
or not), checks the device chose one of them and learns which.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvpy.device import update as up

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
    fallback: int | None = None  # the good revision the last update left
    acknowledged: int = 0  # the writer's highest record the driver has seen
    pids: dict[str, int] = field(default_factory=dict)

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

    # -- learning the outcome of a step ----------------------------------------

    def committed(self, revision: int) -> None:
        # GC keeps the good revision an update left (rollback's target); going back
        # to an older one keeps none older (GC after the commit of the newer one
        # already removed what was before that)
        self.fallback = self.running if revision > self.running else None
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
        self._check_data()
        self._check_cli()
        return ["revision", "containers", "records", "installed", "data", "cli"]

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
        if self.running not in self.good:
            raise SoakFailure(f"running revision {self.running}, which never committed")

    def _check_installed(self) -> None:
        installed = self.installed()
        if self.running not in installed:
            raise SoakFailure(f"running revision {self.running} is not installed: {installed}")
        if installed & self.refused:
            raise SoakFailure(f"refused revisions installed: {sorted(installed & self.refused)}")
        if self.fallback in self.good and self.fallback not in installed:
            raise SoakFailure(f"revision {self.fallback}, the good one before {self.running}, "
                              f"is not installed: {sorted(installed)}")  # fmt: skip

    def _check_data(self) -> None:
        numbers = read_records(self.permanent_records)
        if len(numbers) < self.acknowledged:
            raise SoakFailure(f"permanent data lost: {len(numbers)} records, "
                              f"{self.acknowledged} were acknowledged")  # fmt: skip
        self.acknowledged = len(numbers)
        for records in (self.storage / "trails").glob(f"*/disks/{WRITER}/volumes/rev/records"):
            read_records(records)  # revision-scoped: starts over per revision, never torn

    def _check_cli(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "pvpy", "device", "status", "--storage", str(self.storage)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode != 0 or str(self.running) not in result.stdout:
            raise SoakFailure(f"pvpy device status failed ({result.returncode}): {result.stderr}")
