"""The soak on the QEMU board (#14, part 4): one qemu-arm64 guest through a random
sequence of steps, reproducible from the seed, with real reboots through U-Boot
and power cuts by SIGKILL of QEMU: the guest's page cache is really lost, which
the sandbox soak (tests/soak/driver.py) cannot show.

Steps: app-only updates pushed over the API (an app added, removed or on another
image); host OS updates that try-boot through U-Boot and commit (a new host OS
container, sometimes a new initrd too); a host OS that dies on its try (back to
the last good revision); clean reboots; and power cuts at a random instant
while idle, during an update's upload or install, during a boot, during U-Boot's
try marker write and during the commit of a try. All the while the ``writer``
app appends numbered lines to its permanent data (copy, append, fsync, rename,
fsync the directory) and prints ``writer: synced N`` after each; a thread on the
host reads that log over the API, so at every cut the host knows a line the
disk must hold.

After each step: the guest boots again, the API answers, the revision running is
the one the model (tests/soak/model.py) allows, every container of it is at its
goal, the update records and installed revisions agree with what happened, and
the writer's data is intact — from its log (every start finds the whole file,
never fewer lines than it had synced), and after each cut from the disk image
itself: the ext4 journal replayed on a copy of the storage partition, the file
system clean (``e2fsck -fn``), the records file whole and holding at least the
last line acknowledged before the cut.

PID 1 runs with ``--commit-delay 5`` (the board default is 25 s): a copy of
boards/qemu-arm64 in the work directory, otherwise the same board.

    python -m tests.soak.qemu --steps 20 --seed 14
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvpy.device import update as up
from pvpy.errors import PvpyError
from pvpy.store import ObjectStore
from pvpy.workstation.image import DEFAULT_SPEC, ImageBuild, build_board_revision, build_image
from pvpy.workstation.image.board import BOARDS
from pvpy.workstation.qemu import Machine, ensure_qemu
from tests.qemu_guest import (
    BOOT_TIMEOUT,
    PUSH_TIMEOUT,
    UBOOT,
    Guest,
    busybox_tree,
    cpio,
    derive_revision,
    free_port,
)
from tests.soak.model import GOOD_STATES, WRITER, Model, SoakFailure, read_records, settled

COMMIT_DELAY = 5
OPTIONAL_APPS = ("alpha", "beta")
VARIANTS = ("v0", "v1", "v2")
# The writer: a new version of its records file per line (copy, append, fsync,
# rename, fsync the dir), then "synced N". At start it says what it found.
WRITER_SCRIPT = (
    "trap 'exit 0' TERM; rm -f /data/records.tmp; "
    "n=$(tail -n 1 /data/records 2>/dev/null); n=${n:-0}; "
    "l=0; [ -f /data/records ] && l=$(wc -l < /data/records); "
    'echo "writer: start $n lines $((l))"; '
    "while :; do n=$((n+1)); "
    "cp /data/records /data/records.tmp 2>/dev/null || : > /data/records.tmp; "
    'echo "$n" >> /data/records.tmp; sync /data/records.tmp; '
    'mv /data/records.tmp /data/records; sync /data; echo "writer: synced $n"; '
    "sleep 0.5 & wait $!; done"
)
APP_SCRIPT = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
# Where the writer's permanent data lives in the storage partition's file system.
RECORDS = Model(storage=Path("/"), shapes={}, running=0).permanent_records

STEP_WEIGHTS: dict[str, int] = {
    "app-update": 5,
    "hostos-update": 2,
    "hostos-dies": 1,
    "reboot": 1,
    "power-cut": 6,
}
# what a power cut interrupts -> the longest random delay before it (s), counted from
# the push (idle, upload, app-update), the reboot command (boot), the try's U-Boot
# banner (try-boot: its marker write and early boot) or, for commit, from the commit
# delay's end (a random instant in [-2, +1.5] s around it)
CUT_DURING: dict[str, float] = {
    "idle": 3.0,
    "upload": 8.0,
    "app-update": 20.0,
    "boot": 40.0,
    "try-boot": 4.0,
    "commit": 1.5,
}
SYNCED = re.compile(r"writer: synced (\d+)\s*$")
STARTED = re.compile(r"writer: start (\d+) lines (\d+)\s*$")


class QemuSoak:
    def __init__(
        self, work: Path, seed: int, weights: dict[str, int] | None = None,
        say: Callable[[str], None] = print,
    ) -> None:  # fmt: skip
        self.work, self.seed, self.say = work, seed, say
        self.rng = random.Random(seed)
        self.weights = weights or STEP_WEIGHTS
        self.steps: list[str] = []
        self.step_deck: list[str] = []
        self.cut_deck: list[str] = []
        self.counts: Counter[str] = Counter()
        self.image: ImageBuild | None = None
        self.guest: Guest | None = None
        self.model: Model | None = None
        self.consoles = 0
        self.acked = 0  # the highest "writer: synced N" the host has read
        self.acked_at_check = 0
        self._stop_poll = threading.Event()
        self._poller: threading.Thread | None = None
        self.push_proc: subprocess.Popen[str] | None = None  # a push a cut will interrupt

    @property
    def g(self) -> Guest:
        assert self.guest is not None
        return self.guest

    @property
    def m(self) -> Model:
        assert self.model is not None
        return self.model

    # -- the image and its revisions ---------------------------------------------

    def build_image(self) -> None:
        """The factory image: a copy of the qemu-arm64 board with a short commit
        delay, a busybox host OS, the writer and one optional app."""
        trees = self.work / "trees"
        busybox_tree(trees / "hostos", DEFAULT_SPEC.parent / "overlays" / "hostos")
        busybox_tree(trees / "base")
        for variant in VARIANTS:  # each variant its own image: changing it sends one object
            shutil.copytree(trees / "base", trees / variant, symlinks=True)
            (trees / variant / "etc" / "variant").write_text(variant + "\n")
        board = self.work / "board" / "qemu-arm64"
        shutil.copytree(BOARDS / "qemu-arm64", board)
        doc = (board / "board.yaml").read_text()
        doc, n = re.subn(r"^init_args: \[(.*)\]$",
                         rf'init_args: [\1, "--commit-delay", "{COMMIT_DELAY}"]', doc,
                         flags=re.M)  # fmt: skip
        assert n == 1, "boards/qemu-arm64/board.yaml: no init_args line"
        (board / "board.yaml").write_text(doc)
        shape = {"hostos": "os1", WRITER: "v0", "alpha": "v0"}
        spec = self.write_spec(shape, 1)
        self.image = build_image(str(board), self.work / "image", spec=spec)
        self.model = Model(storage=self.work / "image", shapes={1: shape}, running=1, good={1})

    def write_spec(self, shape: dict[str, str], revision: int) -> Path:
        import yaml

        trees = self.work / "trees"
        containers: dict[str, Any] = {}
        for name, variant in shape.items():
            if name == "hostos":
                hostos: dict[str, Any] = {
                    "role": "host-os", "rootfs": {"dir": str(trees / "hostos"), "all_root": True},
                    "args": ["/sbin/init"], "env": {"PVPY_SOAK_OS": variant},
                }  # fmt: skip
                if variant == "dead":
                    hostos["args"] = ["/bin/sh", "-c", "echo hostos: dying on purpose; exit 7"]
                    hostos["restart"] = {"policy": "no"}
                containers[name] = hostos
                continue
            container: dict[str, Any] = {
                "rootfs": {"dir": str(trees / variant), "all_root": True},
                "depends_on": [],
                "restart": {"policy": "always", "backoff_initial_ms": "500ms"},
            }
            if name == WRITER:
                container["args"] = ["/bin/sh", "-c", WRITER_SCRIPT]
                container["volumes"] = [{"name": "data", "target": "/data",
                                         "persistence": "permanent"}]  # fmt: skip
            else:
                container["args"] = ["/bin/sh", "-c", APP_SCRIPT]
            containers[name] = container
        spec = self.work / "specs" / f"spec-{revision}.yaml"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(yaml.safe_dump({"revision": revision, "containers": containers}))
        return spec

    def mutate_apps(self, shape: dict[str, str]) -> dict[str, str]:
        """One or two changes: an app added, removed, or on another image (two that
        cancel out are drawn again)."""
        new = dict(shape)
        while new == shape:
            new = self._mutate_apps(shape)
        return new

    def _mutate_apps(self, shape: dict[str, str]) -> dict[str, str]:
        new = dict(shape)
        for _ in range(self.rng.randint(1, 2)):
            absent = [a for a in OPTIONAL_APPS if a not in new]
            present = [a for a in OPTIONAL_APPS if a in new]
            change = self.rng.choice(["add"] * bool(absent) + ["remove"] * bool(present)
                                     + ["change"])  # fmt: skip
            if change == "add":
                new[self.rng.choice(absent)] = self.rng.choice(VARIANTS)
            elif change == "remove":
                del new[self.rng.choice(present)]
            else:
                name = self.rng.choice([WRITER, *present])
                new[name] = self.rng.choice([v for v in VARIANTS if v != new[name]])
        return new

    def make_update(self, kind: str) -> tuple[int, Path]:
        """A signed revision for ``kind``, built on the running one's BSP."""
        assert self.image is not None and self.image.key is not None
        shape = self.m.shapes[self.m.running]
        base = self.g.revisions[self.m.running]
        revision = self.g.next_revision()
        new_initrd = False
        if kind == "app-update":
            new = self.mutate_apps(shape)
        elif kind == "hostos-update":
            new = {**shape, "hostos": f"os{revision}"}
            if self.rng.random() < 0.3:
                new = self.mutate_apps(new)
            new_initrd = self.rng.random() < 0.5
        else:
            assert kind == "hostos-dies", kind
            new = {**shape, "hostos": "dead"}
        out = self.work / "revs" / str(revision)
        built = build_board_revision(self.image, self.write_spec(new, revision),
                                     out.with_name(f".{revision}"), bsp_from=base,
                                     revision=revision)  # fmt: skip
        if new_initrd:  # the running initramfs plus one file: a BSP change too
            note = cpio(self.work / "notes" / str(revision),
                        {"pvpy-soak-note": f"revision {revision}\n"})  # fmt: skip

            def add_a_file(doc: dict[str, Any], objects: ObjectStore) -> None:
                data = (base / "objects" / doc["bsp"]["initrd"]["sha256"]).read_bytes() + note
                doc["bsp"]["initrd"] = {"sha256": objects.put_bytes(data), "size": len(data)}

            derive_revision(built, out, revision, self.image.key, add_a_file)
            shutil.rmtree(built)
        else:
            built.rename(out)
        self.g.revisions[revision] = out
        self.m.shapes[revision] = new
        self.counts["updates"] += 1
        self.steps[-1] += f" -> r{revision} {sorted(new.items())}" + " +initrd" * new_initrd
        return revision, out

    # -- the guest -----------------------------------------------------------------

    def start_machine(self) -> None:
        """Power on: a new QEMU process on the same disk, its own console log."""
        assert self.image is not None
        self.consoles += 1
        machine = Machine(self.image.out, port=self.g.port if self.guest else free_port(),
                          log_path=self.work / f"console-{self.consoles}.log")  # fmt: skip
        machine.start()
        if self.guest is None:
            self.guest = Guest(self.image, machine, machine_port(machine), self.work,
                               {1: self.image.revision_dir}, 1)  # fmt: skip
        else:
            self.g.machine = machine
        self.counts["boots"] += 1

    def settle(self, timeout: float = BOOT_TIMEOUT) -> dict[str, Any]:
        """The guest's status once it settled (model.settled: no update, no try,
        all goals met, running what it committed) and nothing is pending."""
        deadline = time.monotonic() + timeout
        status: Any = None
        while True:
            with contextlib.suppress(PvpyError):
                status = self.g.api("/v1/status")
                if settled(status) and not status["pending"]:
                    return dict(status)
            if not self.g.machine.running():
                raise SoakFailure(f"qemu exited ({self.g.machine.status})")
            if time.monotonic() > deadline:
                raise SoakFailure(f"not settled in {timeout:g}s: {status}")
            time.sleep(2)

    def follow_writer(self) -> None:
        """Thread: the highest line the writer said it synced, from its log followed
        over the API (one connection per boot: a TLS handshake costs the emulated
        guest dearly); a stream silent for 20 s or broken (a cut, a reboot) is
        opened again."""
        from tests import apiclient

        while not self._stop_poll.is_set():
            try:
                device = apiclient.device(self.g.url, self.g.token_file, timeout=20)
                conn, response = device.open("GET", f"/v1/logs/{WRITER}?tail=5&follow=1",
                                             headers={"Accept": "text/plain"})  # fmt: skip
            except PvpyError:
                self._stop_poll.wait(1.0)
                continue
            pending = b""
            try:
                while not self._stop_poll.is_set() and (chunk := response.read1(65536)):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if match := SYNCED.search(line.decode(errors="replace")):
                            self.acked = max(self.acked, int(match.group(1)))
            except (OSError, ValueError, http.client.HTTPException):
                pass  # the guest went away, or said nothing for 20 s
            finally:
                conn.close()

    def power_cut(self, when: str) -> None:
        """SIGKILL of QEMU: the guest's page cache is gone. Then the disk must hold
        at least the line acknowledged before, in a whole file on a clean ext4."""
        machine = self.g.machine
        assert machine.pid is not None
        os.kill(machine.pid, signal.SIGKILL)
        acked = self.acked  # every line read so far was synced before the kill
        machine.stop()
        self.counts["power cuts"] += 1
        self.check_disk(acked, f"after the power cut {when}")

    def check_disk(self, acked: int, when: str) -> None:
        """The storage partition as the cut left it: its journal replayed on a copy
        (what the next boot's kernel does), the file system clean, the records whole."""
        assert self.image is not None
        table = json.loads(subprocess.run(["sfdisk", "-J", str(self.image.disk)],
                                          capture_output=True, check=True).stdout)  # fmt: skip
        part = table["partitiontable"]["partitions"][0]
        copy = self.work / "storage-after-cut.img"
        subprocess.run(["dd", f"if={self.image.disk}", f"of={copy}", "bs=1M", "conv=sparse",
                        "iflag=skip_bytes,count_bytes", f"skip={int(part['start']) * 512}",
                        f"count={int(part['size']) * 512}", "status=none"], check=True)  # fmt: skip
        try:
            replay = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(copy)],
                                    capture_output=True, text=True)  # fmt: skip
            if replay.returncode not in (0, 1):
                raise SoakFailure(f"{when}: journal replay failed ({replay.returncode}): "
                                  f"{replay.stdout}{replay.stderr}")  # fmt: skip
            fsck = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True)
            if fsck.returncode != 0:
                raise SoakFailure(f"{when}: the storage file system is not clean "
                                  f"(e2fsck {fsck.returncode}): {fsck.stdout[-1500:]}")  # fmt: skip
            cat = subprocess.run(["debugfs", "-R", f"cat {RECORDS}", str(copy)],
                                 capture_output=True)  # fmt: skip
            records = self.work / "records-after-cut"
            records.write_bytes(cat.stdout)
            numbers = read_records(records)
        finally:
            copy.unlink(missing_ok=True)
        if len(numbers) < acked:
            raise SoakFailure(f"{when}: permanent data lost: {len(numbers)} records on the "
                              f"disk, {acked} were acknowledged as synced")  # fmt: skip
        self.counts["disk checks"] += 1

    # -- the checks ----------------------------------------------------------------

    def check(self, mark: tuple[int, int]) -> None:
        """Every invariant of a settled guest (``mark``: console and line since the step began)."""
        status = self.settle()
        if status["revision"] != self.m.running:
            raise SoakFailure(f"running r{status['revision']}, the model says r{self.m.running}")
        if status.get("boot_error"):
            raise SoakFailure(f"boot error: {status['boot_error']}")
        if status["pid"] != 1:
            raise SoakFailure(f"the API's status is not PID 1's: {status['pid']}")
        expected = set(self.m.shapes[self.m.running])
        names = {c["name"] for c in status["containers"]}
        if names != expected:
            raise SoakFailure(f"containers {sorted(names)}, r{self.m.running} has "
                              f"{sorted(expected)}")  # fmt: skip
        for c in status["containers"]:
            if c["status"] not in (c["goal"], "READY") or not c.get("pid"):
                raise SoakFailure(f"container {c['name']} is {c['status']} ({c.get('reason')})")
        self.check_revisions()
        self.check_writer()
        console, line = mark
        for k in range(console, self.consoles + 1):  # the QEMU processes of this step
            log = (self.work / f"console-{k}.log").read_text(errors="replace").splitlines()
            skip = line + 1 if k == console else 1  # line 1 is QEMU's command line
            if any("Traceback" in text for text in log[skip:]):
                raise SoakFailure(f"a Python traceback on the console ({k})")

    def check_revisions(self) -> None:
        listing = self.g.api("/v1/revisions")["revisions"]
        records = {r["revision"]: r for r in listing}
        for revision, r in records.items():
            state = r["status"]
            if state is not None and state not in up.FINAL:
                raise SoakFailure(f"r{revision} left {state}")
            if state in GOOD_STATES and revision not in self.m.good:
                raise SoakFailure(f"r{revision} recorded {state}, but it never committed")
        for revision in self.m.good:
            state = records.get(revision, {}).get("status")
            factory = revision == 1 and state is None  # installed by provisioning: no record
            if state not in GOOD_STATES and not factory:
                raise SoakFailure(f"r{revision} committed but recorded {state}")
        for revision in self.m.failed:
            if records.get(revision, {}).get("status") != up.ERROR:
                raise SoakFailure(f"r{revision} failed but recorded {records.get(revision)}")
        for revision in self.m.refused:
            r = records.get(revision, {})
            if r.get("status") != up.WONTGO or r.get("installed"):
                raise SoakFailure(f"r{revision} was refused but recorded {r}")
        for revision in (self.m.running, self.m.fallback):
            if revision in self.m.good and not records.get(revision, {}).get("installed"):
                raise SoakFailure(f"r{revision} (running r{self.m.running}) is not installed: "
                                  f"{records.get(revision)}")  # fmt: skip

    def check_writer(self) -> None:
        """Its log, in order: each start found the whole file (lines == last number)
        and no fewer lines than it had synced before; then it writes on."""
        acked = max(self.acked, self.acked_at_check)  # before the log: the thread reads on
        log = self.g.text(f"/v1/logs/{WRITER}?tail=5000", timeout=30)
        synced = 0
        starts = 0
        for line in log.splitlines():
            if match := STARTED.search(line):
                found, lines = int(match.group(1)), int(match.group(2))
                starts += 1
                if found != lines:
                    raise SoakFailure(f"writer: its records end with {found} in {lines} lines")
                if found < synced:
                    raise SoakFailure(f"writer: started with {found} records after it had "
                                      f"synced {synced}")  # fmt: skip
                synced = found
            elif match := SYNCED.search(line):
                synced = int(match.group(1))
        if starts == 0 and self.counts["steps"] == 0:  # later, it may be older than the tail
            raise SoakFailure("writer: no start line in its log")
        if synced < acked:
            raise SoakFailure(f"writer: its log ends at {synced}, {acked} were acknowledged")
        deadline = time.monotonic() + 30
        while self.acked <= max(synced, self.acked_at_check):  # it writes on
            if time.monotonic() > deadline:
                raise SoakFailure(f"writer: no new record in 30s (at {self.acked})")
            time.sleep(0.5)
        self.acked_at_check = self.acked
        self.counts["data checks"] += 1

    # -- steps ---------------------------------------------------------------------

    def mark(self) -> tuple[int, int]:
        return self.consoles, len(self.g.machine.lines)

    def step(self, kind: str) -> None:
        self.steps.append(kind)
        mark = self.mark()
        if kind == "power-cut":
            self.cut_step()
        elif kind == "reboot":
            self.reboot()
        else:
            self.update_step(kind)
        self.check(mark)

    def update_step(self, kind: str) -> None:
        revision, directory = self.make_update(kind)
        _, line = self.mark()
        push = self.g.push(directory)
        out = push.stdout + push.stderr
        wanted = {"app-update": (0, "UPDATED"), "hostos-update": (0, "DONE"),
                  "hostos-dies": (3, "ERROR")}[kind]  # fmt: skip
        if push.returncode != wanted[0] or f"revision {revision}: {wanted[1]}" not in out:
            raise SoakFailure(f"{kind} r{revision}: exit {push.returncode}, wanted "
                              f"{wanted}: {out.strip()[-600:]}")  # fmt: skip
        rebooted = self.g.machine.find(UBOOT, line) is not None
        if rebooted != (kind != "app-update"):
            raise SoakFailure(f"{kind} r{revision}: rebooted: {rebooted}")
        if kind == "hostos-dies":
            self.m.failed.add(revision)
            self.counts["rollbacks"] += 1
        else:
            self.m.committed(revision)

    def reboot(self) -> None:
        _, line = self.mark()
        self.g.api("/v1/commands/reboot", method="POST")
        self.g.machine.wait_for(UBOOT, BOOT_TIMEOUT, line)
        self.counts["reboots"] += 1

    def draw(self, deck: list[str], weights: dict[str, int]) -> str:
        """The next card of a shuffled deck holding each kind as often as its weight:
        every kind comes once per deck, so a short run covers them all."""
        if not deck:
            deck.extend(kind for kind, weight in sorted(weights.items()) for _ in range(weight))
            self.rng.shuffle(deck)
        return deck.pop()

    def cut_step(self) -> None:
        during = self.draw(self.cut_deck, dict.fromkeys(CUT_DURING, 1))
        delay = round(self.rng.uniform(0, CUT_DURING[during]), 2)
        if during == "commit":
            delay = round(COMMIT_DELAY - 2 + delay * 3.5 / CUT_DURING["commit"], 2)
        self.steps[-1] += f" during {during} after {delay}s"
        running = self.m.running
        outcomes: dict[int, bool] = {running: False}
        proc: subprocess.Popen[str] | None = None
        _, line = self.mark()
        if during == "boot":
            self.g.api("/v1/commands/reboot", method="POST")
            self.counts["reboots"] += 1
        elif during != "idle":
            if during in ("try-boot", "commit"):
                kind = "hostos-update"
            elif during == "upload":
                kind = self.rng.choice(["app-update", "hostos-update", "hostos-dies"])
            else:
                kind = "app-update"
            revision, directory = self.make_update(kind)
            if kind != "hostos-dies":
                outcomes[revision] = True
            proc = self.push_proc = subprocess.Popen(
                self.g.push_argv(directory), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, start_new_session=True,
            )  # fmt: skip
            if during in ("try-boot", "commit"):
                try:
                    line = self.g.machine.wait_for(UBOOT, PUSH_TIMEOUT, line)
                    if during == "commit":
                        self.g.machine.wait_for(r'"event": "all goals met; commit after delay"',
                                                BOOT_TIMEOUT, line)  # fmt: skip
                except PvpyError as e:
                    raise SoakFailure(f"{during}: {e}; push: {finish(proc)}") from e
        time.sleep(delay)
        self.power_cut(f"{delay}s into {during}")
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.steps[-1] += f" (push said: {last_progress(finish(proc))})"
            self.push_proc = None
        self.start_machine()
        status = self.settle()
        self.m.resolve(status, outcomes)
        for revision in outcomes:
            if revision in self.m.failed:
                self.counts["rollbacks"] += 1

    # -- a run -------------------------------------------------------------------------

    def run(self, steps: int) -> Counter[str]:
        self.say(f"qemu soak: seed {self.seed}, {steps} steps, in {self.work}")
        started = time.monotonic()
        try:
            ensure_qemu()
            self.build_image()
            self.start_machine()
            self._poller = threading.Thread(target=self.follow_writer, daemon=True)
            self._poller.start()
            self.check(self.mark())
            for n in range(steps):
                kind = self.draw(self.step_deck, self.weights)
                t = time.monotonic()
                self.step(kind)
                self.counts["steps"] += 1
                self.say(f"  {n + 1:3d} {self.steps[-1]}  ({time.monotonic() - t:.0f}s, "
                         f"running r{self.m.running}, {self.acked} records synced)")  # fmt: skip
            self.power_off()
        except BaseException as e:
            self.say(self.failure_report(e))
            raise
        finally:
            self._stop_poll.set()
            if self.push_proc is not None:  # a failure in the middle of a cut step
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.push_proc.pid, signal.SIGKILL)
                finish(self.push_proc)
            if self.guest is not None:
                self.g.machine.stop()
        self.say(self.summary() + f" in {time.monotonic() - started:.0f}s")
        return self.counts

    def power_off(self) -> None:
        """Through the API: QEMU ends by itself; then the disk holds every acknowledged line."""
        _, line = self.mark()
        self.g.api("/v1/commands/poweroff", method="POST")
        deadline = time.monotonic() + 120
        while self.g.machine.running():
            if time.monotonic() > deadline:
                raise SoakFailure("qemu still running 120s after the power off")
            time.sleep(0.2)
        if self.g.machine.status != 0 or self.g.machine.find(UBOOT, line) is not None:
            raise SoakFailure(f"power off: qemu ended {self.g.machine.status}")
        self.g.machine.stop()
        self.check_disk(self.acked, "after the power off")

    def summary(self) -> str:
        c = self.counts
        return (f"qemu soak: seed {self.seed}: {c['steps']} steps, {c['updates']} updates, "
                f"{c['rollbacks']} rollbacks, {c['power cuts']} power cuts, {c['boots']} QEMU "
                f"starts, {c['reboots']} reboots, {c['data checks']} data checks, "
                f"{c['disk checks']} disk checks")  # fmt: skip

    def failure_report(self, error: BaseException) -> str:
        lines = [f"QEMU SOAK FAILED (seed {self.seed}): {error}", "steps:"]
        lines += [f"  {n + 1:3d} {s}" for n, s in enumerate(self.steps)]
        for k in range(max(1, self.consoles - 1), self.consoles + 1):
            log = self.work / f"console-{k}.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-60:]
                lines += [f"serial console {log} (last lines):", *tail]
        weights = ""
        if self.weights != STEP_WEIGHTS:
            weights = " --weights " + ",".join(f"{k}={w}" for k, w in sorted(self.weights.items()))
        lines.append(f"reproduce: python -m tests.soak.qemu --seed {self.seed} "
                     f"--steps {len(self.steps)}{weights}")  # fmt: skip
        return "\n".join(lines)


def machine_port(machine: Machine) -> int:
    """The host port of a Machine's API hostfwd."""
    match = re.search(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-", " ".join(machine.argv))
    assert match, machine.argv
    return int(match.group(1))


def finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def last_progress(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("revision ")]
    return lines[-1] if lines else "nothing"


def parse_weights(text: str) -> dict[str, int]:
    """``kind=N,...`` -> {kind: N}; argparse turns the ValueError into a usage error."""
    weights = {}
    for item in text.split(","):
        kind, _, number = item.partition("=")
        if kind not in STEP_WEIGHTS or not number.isdigit() or int(number) < 1:
            raise ValueError(f"{item!r}: want KIND=N, KIND one of {sorted(STEP_WEIGHTS)}")
        weights[kind] = int(number)
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak.qemu",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--work", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--weights", type=parse_weights, default=None,
                        help="step kinds and how often each comes per deck, e.g. "
                             "app-update=3,hostos-update=2,hostos-dies=1,power-cut=6 "
                             "(default: " + ",".join(f"{k}={w}" for k, w in
                                                     sorted(STEP_WEIGHTS.items())) + ")")  # fmt: skip
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    work = args.work or Path(tempfile.mkdtemp(prefix="pvpy-soak-qemu."))
    work.mkdir(parents=True, exist_ok=True)
    # SIGTERM ends the run like Ctrl-C: QEMU (in its own session) is stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
    try:
        QemuSoak(work, seed, args.weights, say=lambda s: print(s, flush=True)).run(args.steps)
    except (SoakFailure, PvpyError):
        print(f"(work dir kept: {work})")
        return 1
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
