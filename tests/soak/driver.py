"""The soak driver: one sandbox device through a random sequence of steps.

Every choice (the step kinds, what each update changes, where a power cut
lands) comes from one ``random.Random(seed)``: the same seed gives the same
step list. The device's timing is not the seed's, so a power cut at "2.3 s
into an update" lands near, not exactly at, the same place on a re-run.

Run long with ``tools/soak --steps N --seed S [--minutes M]``; ``tests/test_soak.py``
runs it short.

Broken updates of every kind: a crash loop, a missed goal (a readiness check that
never passes), a host OS dying on its try, a corrupt or a missing object in the
revision shipped, a wrong (or rotated-out) key, a replayed revision; and an object
of an installed rollback target corrupted or deleted on disk, which PID 1 finds
when it verifies the target before applying it (it hashes every object then, and
at boot; a container start does not re-hash, so the soak corrupts only targets it
will apply). Key rotations ship a new signed key set; GC runs on request too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
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

from pvpy.store import Storage
from tests.device import COMMIT, HOSTOS, SandboxDevice, app, build_revision, pvpy
from tests.soak.model import GOOD_STATES, WRITER, Model, SoakFailure, settled

# Every app checks twice a second that the file it wrote into its writable
# layer at its start is still there (a layer pulled from under it says LOST).
KEEP = "[ -f /kept ] || echo mine > /kept; "
WATCH = "[ -f /kept ] || echo LOST; "
APP = f"trap 'exit 0' TERM; {KEEP}while :; do {WATCH}sleep 0.5 & wait $!; done"
# The writer appends a numbered line to its permanent and its revision-scoped
# data: copy, append, fsync, rename, fsync the dir. A TERM lands between two
# commands: the file is always one whole version.
WRITER_SCRIPT = (
    "trap 'exit 0' TERM; " + KEEP + "rm -f /data/records.tmp /rev/records.tmp; "
    'put() { cp "$1/records" "$1/records.tmp" 2>/dev/null || : > "$1/records.tmp"; '
    'echo "$2" >> "$1/records.tmp"; sync "$1/records.tmp"; '
    'mv "$1/records.tmp" "$1/records"; sync "$1"; }; '
    "n=$(tail -n 1 /data/records 2>/dev/null); n=${n:-0}; "
    "m=$(tail -n 1 /rev/records 2>/dev/null); m=${m:-0}; "
    "while :; do " + WATCH + "n=$((n+1)); put /data $n; m=$((m+1)); put /rev $m; "
    "sleep 0.3 & wait $!; done"
)
CRASH = "exit 1"
# a readiness check that never passes: the update misses its goal (ERROR, rolled back)
UNREADY = {"status_goal": "READY", "readiness": {"type": "file", "path": "/never-ready"}}
OPTIONAL_APPS = ("alpha", "beta", "gamma")
VARIANTS = ("v0", "v1", "v2", "v3")

# kind -> weight in a random run (tests/test_soak.py may pass its own mix)
STEP_WEIGHTS: dict[str, int] = {
    "app-update": 6,
    "crash-update": 2,
    "missed-goal": 1,
    "hostos-update": 2,
    "hostos-dies": 1,
    "corrupt-object": 1,
    "missing-object": 1,
    "corrupt-installed": 1,
    "replay": 1,
    "wrong-key": 1,
    "key-rotation": 1,
    "gc": 2,
    "rollback": 2,
    "restart": 2,
    "reboot": 1,
    "power-cut": 5,
}
# what a power cut interrupts, and the longest random delay before it (s)
CUT_DURING: dict[str, float] = {
    "idle": 1.0,
    "boot": 3.0,
    "app-update": 5.0,
    "crash-update": 4.0,
    "missed-goal": 8.0,
    "hostos-update": 8.0,
    "hostos-dies": 6.0,
    "corrupt-object": 2.5,
    "missing-object": 2.5,
    "corrupt-installed": 3.0,
    "key-rotation": 5.0,
    "gc": 0.1,  # from the request on PID 1's socket: a GC takes ~10-100 ms here
    "rollback": 6.0,
    "reboot": 4.0,
}
# kinds that ship an update (a new revision number) and what its command must end in
UPDATES = ("app-update", "crash-update", "missed-goal", "hostos-update", "hostos-dies",
           "key-rotation", "corrupt-object", "missing-object")  # fmt: skip
UPDATE_TIMEOUT = 120


class Soak:
    def __init__(
        self,
        work: Path,
        seed: int,
        weights: dict[str, int] | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.work, self.seed, self.say = work, seed, say
        self.rng = random.Random(seed)
        self.weights = weights or STEP_WEIGHTS
        self.key_dirs: dict[int, Path] = {0: work / "keys"}  # key set version -> its key
        self.signed_with: dict[int, int] = {}  # revision -> key set version of its signer
        self.ships_keyset: dict[int, int] = {}  # revision -> version of the keys.json it ships
        self.steps: list[str] = []
        self.counts: Counter[str] = Counter()
        self.dirs: dict[int, Path] = {}
        self.next_revision = 1
        self.device: SandboxDevice | None = None
        self.model: Model | None = None
        self.extra: dict[str, Any] = {}  # what the step under way did (damage, GC before)

    @property
    def keys(self) -> Path:
        """The key the device trusts now: what every good revision is signed with."""
        return self.key_dirs[self.m.key_version if self.model else 0]

    # -- revisions ---------------------------------------------------------------

    def container(self, name: str, variant: str) -> dict[str, Any]:
        if name == "hostos":
            args = ["/bin/sh", "-c", "exit 7"] if variant == "dead" else ["/sbin/init", variant]
            return {**HOSTOS, "args": args}
        # each app's variant its own image: changing it sends one object, and a
        # revision has objects of its own (see damage_installed)
        tree = self.work / "trees" / f"{name}-{variant}"
        if not tree.exists():
            from tests.device import BUSYBOX_TREE

            shutil.copytree(BUSYBOX_TREE, tree, symlinks=True)
            (tree / "etc" / "variant").write_text(f"{name} {variant}\n")
        rootfs = {"dir": str(tree), "all_root": True}
        if variant == "crash":
            restart = {"policy": "always", "backoff_initial_ms": "100ms"}
            return {**app(CRASH), "rootfs": rootfs, "restart": restart}
        if variant == "unready":
            return {**app(APP), "rootfs": rootfs, **UNREADY}
        if name == WRITER:
            volumes = [{"name": "data", "target": "/data", "persistence": "permanent"},
                       {"name": "rev", "target": "/rev", "persistence": "revision"}]  # fmt: skip
            return {**app(WRITER_SCRIPT), "rootfs": rootfs, "volumes": volumes}
        return {**app(APP), "rootfs": rootfs}

    def build(
        self, shape: dict[str, str], keys: Path | None = None, keyset: Path | None = None
    ) -> int:
        """A signed revision of ``shape`` (signed by the trusted key unless ``keys``)."""
        revision = self.next_revision
        self.next_revision += 1
        containers = {name: self.container(name, v) for name, v in shape.items()}
        out = self.work / "revs"
        out.mkdir(exist_ok=True)
        self.dirs[revision] = build_revision(out, keys or self.keys, revision, containers)
        if keyset is not None:
            pvpy("state", "sign", self.dirs[revision], "--key", keys or self.keys,
                 "--keyset", keyset)  # fmt: skip
        self.signed_with[revision] = self.model.key_version if self.model else 0
        if self.model is not None:
            self.model.shapes[revision] = dict(shape)
        return revision

    def objects_of(self, revision: int) -> dict[str, str]:
        """container -> its rootfs object, from the built revision."""
        doc = json.loads((self.dirs[revision] / "state.json").read_text())
        return {n: c["rootfs"]["sha256"] for n, c in doc["containers"].items()}

    def mutate_apps(self, shape: dict[str, str], broken: str = "") -> dict[str, str]:
        """One to three changes: an app added, removed, or on another image; with
        ``broken``, one app then runs that variant."""
        new = dict(shape)
        for _ in range(self.rng.randint(1, 3)):
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
        if broken:
            new[self.rng.choice([n for n in new if n != "hostos"])] = broken
        return new

    # -- the device ----------------------------------------------------------------

    @property
    def dev(self) -> SandboxDevice:
        assert self.device is not None
        return self.device

    @property
    def m(self) -> Model:
        assert self.model is not None
        return self.model

    def boot_device(self) -> None:
        from pvpy.signing import generate_key

        generate_key(self.key_dirs[0])
        generate_key(self.work / "attacker")
        shape = {"hostos": "os0", WRITER: "v0", "alpha": "v0"}
        first = self.build(shape)
        storage = self.work / "device"
        pvpy("device", "provision", "--storage", storage, "--state", self.dirs[first],
             "--trust", self.key_dirs[0] / "pvpy.pub")  # fmt: skip
        self.model = Model(storage=storage, shapes={first: shape}, running=first, good={first})
        self.model.booted()
        self.device = SandboxDevice(storage, self.work / "device.log").start(*COMMIT)

    def settle(self, timeout: float = 90) -> dict[str, Any]:
        return self.dev.wait_for("the device to settle", settled, timeout)

    def boots(self) -> int:
        return sum(e.get("event") == "boot" for e in self.dev.events())

    def client(self, *args: Any) -> subprocess.Popen[str]:
        """A `pvpy device ...` command, in its own process group (a cut kills it too)."""
        return subprocess.Popen(
            [sys.executable, "-m", "pvpy", "device", *map(str, args), "--storage",
             str(self.m.storage)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip

    def finish(self, proc: subprocess.Popen[str], what: str) -> tuple[int, str]:
        try:
            out, err = proc.communicate(timeout=UPDATE_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SoakFailure(f"{what}: no answer in {UPDATE_TIMEOUT}s") from e
        return proc.returncode, out + err

    # -- actions: each starts something, returns (process, possible outcomes) -----
    # outcomes: revision -> whether running it means that revision committed; a
    # revision mapped to False that never runs is there for its record (see resolve)

    def new_update(self, kind: str) -> tuple[int, dict[str, Any]]:
        """Build the revision an update step ships; returns it and what is special."""
        running = self.m.running
        shape = self.m.shapes[running]
        extra: dict[str, Any] = {}
        if kind.startswith("hostos"):
            new = dict(shape)
            new["hostos"] = "dead" if kind == "hostos-dies" else f"os{self.next_revision}"
            if self.rng.random() < 0.5:
                new = self.mutate_apps(new)
            return self.build(new), extra
        broken = {"crash-update": "crash", "missed-goal": "unready"}.get(kind, "")
        if kind in ("corrupt-object", "missing-object"):
            broken = f"x{self.next_revision}"  # an image of its own: an object the device lacks
        new = self.mutate_apps(shape, broken=broken)
        if kind == "key-rotation":
            from pvpy.signing import generate_key

            version = self.m.key_version + 1
            key = self.work / f"keys-v{version}-r{self.next_revision}"
            generate_key(key)
            keyset = key / "keys.json"
            pvpy("key", "keyset", "--key", key / "pvpy.pub", "--sign", self.keys, "--sign", key,
                 "--version", version, "--out", keyset)  # fmt: skip
            self.key_dirs[version] = key
            revision = self.build(new, keys=key, keyset=keyset)
            self.signed_with[revision] = self.ships_keyset[revision] = version
            self.counts["key rotations"] += 1
            return revision, {"version": version}
        revision = self.build(new)
        if broken.startswith("x"):
            name = next(n for n, v in new.items() if v == broken)
            obj = self.dirs[revision] / "objects" / self.objects_of(revision)[name]
            if kind == "missing-object":
                obj.unlink()
            else:
                flip_byte(obj)
            extra["object"] = obj.name
        return revision, extra

    def quiet_request(self, request: dict[str, Any]) -> None:
        """A control request whose answer a power cut may take away."""
        with contextlib.suppress(Exception):
            self.dev.request(request, timeout=30)

    def start_action(
        self, kind: str, cut: bool = False
    ) -> tuple[subprocess.Popen[str] | None, dict[int, bool]]:
        running = self.m.running
        if kind in UPDATES:
            revision, self.extra = self.new_update(kind)
            self.steps[-1] += f" -> r{revision} {sorted(self.m.shapes[revision].items())}"
            self.counts["updates"] += 1
            commits = kind in ("app-update", "hostos-update", "key-rotation")
            # a refused or failed one never runs; its record is learnt (resolve)
            return self.client("update", self.dirs[revision]), {running: False, revision: commits}
        if kind in ("rollback", "corrupt-installed"):
            target = self.m.rollback_target()
            self.steps[-1] += f" -> r{target}" if target else " (nothing older to go back to)"
            self.counts["rollbacks"] += 1
            if kind == "corrupt-installed":
                self.extra = self.damage_installed(target)
                if target is not None and self.extra:
                    self.steps[-1] += f" ({self.extra['how']} {self.extra['object'][:12]})"
                    self.counts["refusals"] += 1
                    return self.client("rollback"), {running: False, target: False}
            outcomes = {running: False} if target is None else {running: False, target: True}
            return self.client("rollback"), outcomes
        if kind == "gc":
            self.counts["GCs"] += 1
            self.extra = {"before": self.m.installed(), "target": self.m.rollback_target()}
            if not cut:
                return self.client("gc"), {running: False}
            # to be cut: straight to PID 1's socket from here, so that the delay counts
            # from the request (a CLI's start-up takes longer than a GC)
            threading.Thread(target=self.quiet_request, args=({"cmd": "gc"},),
                             daemon=True).start()  # fmt: skip
            return None, {running: False}
        if kind == "reboot":
            self.counts["reboots"] += 1
            return self.client("reboot"), {running: False}
        if kind == "boot":
            self.counts["reboots"] += 1
            self.power_cut("before the boot")
            self.dev.start(*COMMIT)
            return None, {running: False}
        assert kind == "idle", kind
        return None, {running: False}

    def damage_installed(self, target: int | None) -> dict[str, Any]:
        """Corrupt (flip a byte) or delete an object only rollback target ``target``
        uses, on the device's disk; {} when it has none of its own."""
        if target is None:
            return {}
        storage = Storage(self.m.storage)
        others: set[str] = set()
        for revision in storage.revisions():
            if revision != target:
                others |= storage.referenced_by(revision)
        own = sorted(storage.referenced_by(target) - others)
        if not own:
            self.steps[-1] += " (no object of its own: a plain rollback)"
            return {}
        path = storage.objects.path(self.rng.choice(own))
        how = self.rng.choice(["corrupt", "delete"])
        original = path.read_bytes()
        if how == "delete":
            path.unlink()
        else:
            flip_byte(path)
        return {"how": how, "object": path.name, "path": path, "bytes": original,
                "damaged": target}  # fmt: skip

    def undamage(self) -> None:
        """PID 1 never looked at the damaged target (the cut came first): undo the
        damage, so that the model's target stays what the device thinks good."""
        path: Path = self.extra["path"]
        path.unlink(missing_ok=True)
        path.write_bytes(self.extra["bytes"])
        path.chmod(0o444)

    def expect(self, kind: str, rc: int, output: str, outcomes: dict[int, bool]) -> None:
        """A step ran to its end without a cut: what its command must have said."""
        running = self.m.running
        new = next((r for r, commits in outcomes.items() if commits), None)
        target = next((r for r in outcomes if r != running), None)
        if kind == "corrupt-installed" and not self.extra:
            kind = "rollback"  # nothing of the target's own to damage
        wanted = {
            "app-update": (0, "UPDATED"),
            "key-rotation": (0, "UPDATED"),
            "hostos-update": (0, "DONE"),
            "crash-update": (3, "ERROR"),
            "missed-goal": (3, "goals not met"),
            "hostos-dies": (3, "ERROR"),
            "corrupt-object": (5, "hash to"),
            "missing-object": (5, "is missing"),
            "corrupt-installed": (3, "WONTGO"),
            "gc": (0, "gc: removed"),
            "reboot": (0, ""),
            # nothing to go back to: PID 1 refuses (exit 10, a device error)
            "rollback": (0, "rolling back") if len(outcomes) > 1 else (10, "no older good"),
        }[kind]
        if rc != wanted[0] or wanted[1] not in output:
            raise SoakFailure(f"{kind}: exit {rc}, wanted {wanted}: {output.strip()[-300:]}")
        if kind in ("crash-update", "hostos-dies", "missed-goal"):
            assert target is not None
            self.m.failed.add(target)
            if kind == "hostos-dies":
                self.m.booted()  # tried, then back: two boots
            else:
                self.m.app_switch(running, target, committed=False)
        elif kind in ("corrupt-object", "missing-object"):
            assert target is not None
            self.m.refused.add(target)
            self.counts["refusals"] += 1
        elif kind == "corrupt-installed" and len(outcomes) > 1:
            assert target is not None
            self.m.good.discard(target)
            self.m.broken.add(target)
        elif kind == "reboot":
            self.m.booted()
        elif new is not None:
            reboot = self.m.shapes[running]["hostos"] != self.m.shapes[new]["hostos"]
            if not reboot:
                self.m.app_switch(running, new, committed=True)
            self.m.committed(new)
            if reboot:
                self.m.booted()
            if kind == "key-rotation":
                self.m.key_version = self.ships_keyset[new]

    # -- steps ---------------------------------------------------------------------

    def step(self, kind: str, during: str = "", delay: float = 0.0) -> None:
        self.steps.append(kind)
        self.extra = {}
        self.m.step_started()
        if kind == "power-cut":
            self.steps[-1] += f" during {during} after {delay}s"
            proc, outcomes = self.start_action(during, cut=True)
            time.sleep(delay)
            if proc is not None:  # the client first: on a board both go at once
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            self.power_cut(f"{delay}s into {during}")
            self.dev.start(*COMMIT)
            self.after_cut(during, self.settle(), outcomes)
        elif kind in ("replay", "wrong-key"):
            self.refused(kind)
        elif kind == "restart":
            self.restart()
        else:
            boots = self.boots()
            proc, outcomes = self.start_action(kind)
            assert proc is not None
            rc, output = self.finish(proc, kind)
            self.expect(kind, rc, output, outcomes)
            if kind == "reboot":
                self.dev.wait_for("the reboot", lambda _: self.boots() > boots, 60)
        status = self.settle()
        self.m.check(status, self.m.storage / "logs")
        if kind == "gc":
            self.m.check_gc(self.extra["before"], self.extra["target"])

    def after_cut(self, during: str, status: dict[str, Any], outcomes: dict[int, bool]) -> None:
        """The device booted again after a cut: learn which outcome it chose."""
        before = self.m.key_version
        damaged = self.extra.get("damaged")
        if damaged is not None:
            outcomes = {r: c for r, c in outcomes.items() if r != damaged}
        self.m.resolve(status, outcomes)
        if damaged is not None:
            record = self.m.records(status).get(damaged)
            if record in GOOD_STATES:
                self.undamage()  # PID 1 never got to it
            else:  # verified (WONTGO) or interrupted while verifying (ERROR)
                self.m.good.discard(damaged)
                self.m.broken.add(damaged)
        if during == "key-rotation":
            trusted = self.m.trusted_key_version()
            if trusted not in (before, before + 1):
                raise SoakFailure(f"after a cut during rotation to key set {before + 1}: "
                                  f"the device trusts {trusted}")  # fmt: skip
            rotating = max(outcomes)
            if self.m.running == rotating and trusted != before + 1:
                raise SoakFailure(f"running r{rotating}, but its key set is not trusted")
            self.m.key_version = trusted
        if during == "gc":
            before_gc = self.extra["before"]
            if not self.m.installed() <= before_gc:
                raise SoakFailure(f"a cut during GC: {sorted(self.m.installed())} installed, "
                                  f"{sorted(before_gc)} before")  # fmt: skip

    def refused(self, kind: str) -> None:
        self.counts["refusals"] += 1
        if kind == "replay":  # any revision at or below the highest installed one
            revision = self.rng.choice(sorted(r for r in self.m.good))
            directory = self.dirs[revision]
            # not newer; unless signed by a rotated-out key (the signature comes first)
            shipped = self.ships_keyset.get(revision)
            old_key = self.signed_with[revision] < self.m.key_version
            why = "untrusted key" if old_key and shipped is None else "not newer"
        else:  # the attacker's key, or one the device rotated out
            signers = [self.work / "attacker", *(self.key_dirs[v] for v in
                                                 range(self.m.key_version))]  # fmt: skip
            signer = self.rng.choice(signers)
            shape = self.mutate_apps(self.m.shapes[self.m.running])
            revision = self.build(shape, keys=signer)
            directory, why = self.dirs[revision], "untrusted key"
            self.m.refused.add(revision)
            self.steps[-1] += f" ({signer.name})"
        self.steps[-1] += f" r{revision}"
        rc, output = self.finish(self.client("update", directory), kind)
        wanted = 3
        if revision == self.m.running:  # the very revision it runs: nothing to do
            wanted, why = 0, "up to date"
            self.counts["refusals"] -= 1
        if rc != wanted or why not in output:
            raise SoakFailure(f"{kind} r{revision}: exit {rc}, wanted {wanted} '{why}': {output}")

    def restart(self) -> None:
        apps = sorted(n for n in self.m.shapes[self.m.running] if n != "hostos")
        name = self.rng.choice(apps)
        self.steps[-1] += f" {name}"
        before = self.m.pids[name] if self.m.pids else None
        reply = self.dev.request({"cmd": "restart", "container": name})
        if not reply.get("ok"):
            raise SoakFailure(f"restart {name}: {reply}")
        self.dev.wait_for(
            f"{name} restarted",
            lambda s: (
                settled(s)
                and any(
                    c["name"] == name and c["pid"] not in (before, None) for c in s["containers"]
                )
            ),
        )
        self.m.restarted(name)

    def power_cut(self, when: str) -> None:
        """SIGKILL of the whole sandbox; nothing of it may be left running or mounted."""
        self.counts["power cuts"] += 1
        self.dev.kill()
        leftovers = strays(self.m.storage)
        if leftovers:
            raise SoakFailure(f"after the power cut {when}: {leftovers}")

    # -- a run -------------------------------------------------------------------------

    def plan(self, steps: int) -> list[tuple[str, str, float]]:
        """The steps a run takes with this seed: (kind, what a power cut interrupts,
        its delay). Drawn ahead from a generator of their own, so the list depends on
        the seed alone (the details, e.g. which app an update changes, draw from
        ``self.rng`` and may depend on how earlier cuts landed)."""
        kinds, weights = zip(*sorted(self.weights.items()), strict=True)
        plan_rng = random.Random(f"{self.seed}:plan")
        plan = []
        for _ in range(steps):
            kind = plan_rng.choices(kinds, weights)[0]
            during = plan_rng.choice(sorted(CUT_DURING))
            delay = round(plan_rng.uniform(0, CUT_DURING[during]), 2)
            plan.append((kind, during, delay) if kind == "power-cut" else (kind, "", 0.0))
        return plan

    def run(self, steps: int, minutes: float | None = None) -> Counter[str]:
        until = "" if minutes is None else f" (or {minutes:g} minutes)"
        self.say(f"soak: seed {self.seed}, {steps} steps{until}, in {self.work}")
        started = time.monotonic()
        try:
            self.boot_device()
            self.m.check(self.settle(), self.m.storage / "logs")
            for n, (kind, during, delay) in enumerate(self.plan(steps)):
                if minutes is not None and time.monotonic() - started > minutes * 60:
                    self.say(f"soak: {minutes:g} minutes are up after {n} steps")
                    break
                t = time.monotonic()
                self.step(kind, during, delay)
                self.counts["steps"] += 1
                self.say(f"  {n + 1:4d} {self.steps[-1]}  ({time.monotonic() - t:.1f}s, "
                         f"running r{self.m.running}, {self.m.acknowledged} records)")  # fmt: skip
            if self.dev.stop() != 0:
                raise SoakFailure(f"power off failed\n{self.dev.tail()}")
            leftovers = strays(self.m.storage)
            if leftovers:
                raise SoakFailure(f"after power off: {leftovers}")
        except BaseException as e:
            self.say(self.failure_report(e))
            raise
        finally:
            if self.device is not None:
                self.device.kill()
        self.say(self.summary() + f" in {time.monotonic() - started:.0f}s")
        return self.counts

    def summary(self) -> str:
        c = self.counts
        c["data checks passed"] = self.m.data_checks if self.model else 0
        return (f"soak: seed {self.seed}: {c['steps']} steps, {c['updates']} updates, "
                f"{c['rollbacks']} rollbacks, {c['power cuts']} power cuts, "
                f"{c['reboots']} reboots, {c['key rotations']} key rotations, "
                f"{c['GCs']} GCs, {c['refusals']} refusals, "
                f"{c['data checks passed']} data checks passed")  # fmt: skip

    def failure_report(self, error: BaseException) -> str:
        lines = [f"SOAK FAILED (seed {self.seed}): {error}", "steps:"]
        lines += [f"  {n + 1:4d} {s}" for n, s in enumerate(self.steps)]
        if self.device is not None:
            lines += ["device log (last lines):", self.device.tail(60)]
            for log in sorted((self.device.storage / "logs").glob("*.log")):
                tail = log.read_bytes().decode(errors="replace").splitlines()[-5:]
                lines += [f"{log.name}:", *("  " + t for t in tail)]
        lines.append(f"reproduce: tools/soak --seed {self.seed} --steps {len(self.steps)}")
        return "\n".join(lines)


def flip_byte(path: Path) -> None:
    """Corrupt a file as a bad sector would: one byte in its middle inverted."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def strays(storage: Path) -> list[str]:
    """Processes, mounts or loop devices left of a sandbox that is powered off."""
    found: list[str] = []
    deadline = time.monotonic() + 5  # the kernel tears the namespaces down
    while True:
        found = []
        pgrep = subprocess.run(["pgrep", "-af", f"--storage {storage} "],
                               capture_output=True, text=True)  # fmt: skip
        found += [f"process {line}" for line in pgrep.stdout.splitlines()]
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        found += [f"mount {m}" for m in mounts if str(storage) in m]
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            try:
                if str(storage) in backing.read_text():
                    found.append(f"loop device {backing.parent.parent.name}")
            except OSError:
                continue  # detached meanwhile
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/soak", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop after this long even if fewer steps ran")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--work", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    work = args.work or Path(tempfile.mkdtemp(prefix="pvpy-soak."))
    try:
        Soak(work, seed, say=lambda s: print(s, flush=True)).run(args.steps, args.minutes)
    except SoakFailure:
        print(f"(work dir kept: {work})")
        return 1
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
