"""The soak driver: one sandbox device through a random sequence of steps.

Every choice (the step kinds, what each update changes, where a power cut
lands) comes from one ``random.Random(seed)``: the same seed gives the same
step list. The device's timing is not the seed's, so a power cut at "2.3 s
into an update" lands near, not exactly at, the same place on a re-run.

Run long with ``tools/soak --steps N --seed S``; ``tests/test_soak.py`` runs it short.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.device import COMMIT, HOSTOS, SandboxDevice, app, build_revision, pvpy
from tests.soak.model import WRITER, Model, SoakFailure, settled

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
OPTIONAL_APPS = ("alpha", "beta", "gamma")
VARIANTS = ("v0", "v1", "v2", "v3")

# kind -> weight in a random run (tests/test_soak.py may pass its own mix)
STEP_WEIGHTS: dict[str, int] = {
    "app-update": 6,
    "crash-update": 2,
    "hostos-update": 2,
    "hostos-dies": 1,
    "replay": 1,
    "wrong-key": 1,
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
    "hostos-update": 8.0,
    "hostos-dies": 6.0,
    "rollback": 6.0,
    "reboot": 4.0,
}
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
        self.keys = work / "keys"
        self.steps: list[str] = []
        self.counts: Counter[str] = Counter()
        self.dirs: dict[int, Path] = {}
        self.next_revision = 1
        self.device: SandboxDevice | None = None
        self.model: Model | None = None

    # -- revisions ---------------------------------------------------------------

    def container(self, name: str, variant: str) -> dict[str, Any]:
        if name == "hostos":
            args = ["/bin/sh", "-c", "exit 7"] if variant == "dead" else ["/sbin/init", variant]
            return {**HOSTOS, "args": args}
        tree = self.work / "trees" / variant
        if not tree.exists():  # each variant its own image: changing it sends one object
            from tests.device import BUSYBOX_TREE

            shutil.copytree(BUSYBOX_TREE, tree, symlinks=True)
            (tree / "etc" / "variant").write_text(variant + "\n")
        rootfs = {"dir": str(tree), "all_root": True}
        if variant == "crash":
            restart = {"policy": "always", "backoff_initial_ms": "100ms"}
            return {**app(CRASH), "rootfs": rootfs, "restart": restart}
        if name == WRITER:
            volumes = [{"name": "data", "target": "/data", "persistence": "permanent"},
                       {"name": "rev", "target": "/rev", "persistence": "revision"}]  # fmt: skip
            return {**app(WRITER_SCRIPT), "rootfs": rootfs, "volumes": volumes}
        return {**app(APP), "rootfs": rootfs}

    def build(self, shape: dict[str, str], keys: Path | None = None) -> int:
        revision = self.next_revision
        self.next_revision += 1
        containers = {name: self.container(name, v) for name, v in shape.items()}
        out = self.work / "revs"
        out.mkdir(exist_ok=True)
        self.dirs[revision] = build_revision(out, keys or self.keys, revision, containers)
        if self.model is not None and keys is None:
            self.model.shapes[revision] = dict(shape)
        return revision

    def mutate_apps(self, shape: dict[str, str], crash: bool = False) -> dict[str, str]:
        """One to three changes: an app added, removed, or on another image."""
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
        if crash:
            new[self.rng.choice([n for n in new if n != "hostos"])] = "crash"
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

        generate_key(self.keys)
        generate_key(self.work / "attacker")
        shape = {"hostos": "os0", WRITER: "v0", "alpha": "v0"}
        first = self.build(shape)
        storage = self.work / "device"
        pvpy("device", "provision", "--storage", storage, "--state", self.dirs[first],
             "--trust", self.keys / "pvpy.pub")  # fmt: skip
        self.model = Model(storage=storage, shapes={first: shape}, running=first, good={first})
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
    # outcomes: revision -> whether running it means that revision committed

    def start_action(self, kind: str) -> tuple[subprocess.Popen[str] | None, dict[int, bool]]:
        running = self.m.running
        shape = self.m.shapes[running]
        if kind in ("app-update", "crash-update", "hostos-update", "hostos-dies"):
            if kind.startswith("hostos"):
                new = dict(shape)
                new["hostos"] = "dead" if kind == "hostos-dies" else f"os{self.next_revision}"
                if self.rng.random() < 0.5:
                    new = self.mutate_apps(new)
            else:
                new = self.mutate_apps(shape, crash=kind == "crash-update")
            revision = self.build(new)
            self.steps[-1] += f" -> r{revision} {sorted(new.items())}"
            self.counts["updates"] += 1
            good = kind in ("app-update", "hostos-update")
            outcomes = {running: False, revision: True} if good else {running: False}
            return self.client("update", self.dirs[revision]), outcomes
        if kind == "rollback":
            target = self.m.rollback_target()
            self.steps[-1] += f" -> r{target}"
            self.counts["rollbacks"] += 1
            outcomes = {running: False} if target is None else {running: False, target: True}
            return self.client("rollback"), outcomes
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

    def expect(self, kind: str, rc: int, output: str, outcomes: dict[int, bool]) -> None:
        """A step ran to its end without a cut: what its command must have said."""
        new = next((r for r, commits in outcomes.items() if commits), None)
        wanted = {
            "app-update": (0, "UPDATED"),
            "hostos-update": (0, "DONE"),
            "crash-update": (3, "ERROR"),
            "hostos-dies": (3, "ERROR"),
            "reboot": (0, ""),
            # nothing to go back to: PID 1 refuses (exit 10, a device error)
            "rollback": (0, "rolling back") if len(outcomes) > 1 else (10, "no older good"),
        }[kind]
        if rc != wanted[0] or wanted[1] not in output:
            raise SoakFailure(f"{kind}: exit {rc}, wanted {wanted}: {output.strip()[-300:]}")
        if kind in ("crash-update", "hostos-dies"):
            self.m.failed.add(self.next_revision - 1)
        elif new is not None:
            self.m.committed(new)

    # -- steps ---------------------------------------------------------------------

    def step(self, kind: str) -> None:
        self.steps.append(kind)
        if kind == "power-cut":
            during = self.rng.choice(sorted(CUT_DURING))
            delay = round(self.rng.uniform(0, CUT_DURING[during]), 2)
            self.steps[-1] += f" during {during} after {delay}s"
            proc, outcomes = self.start_action(during)
            time.sleep(delay)
            self.power_cut(f"{delay}s into {during}")
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            self.dev.start(*COMMIT)
            self.m.resolve(self.settle(), outcomes)
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
        self.m.check(self.settle(), self.m.storage / "logs")

    def refused(self, kind: str) -> None:
        if kind == "replay":  # any revision at or below the highest installed one
            revision = self.rng.choice(sorted(r for r in self.m.good))
            directory, why = self.dirs[revision], "not newer"
        else:
            shape = self.mutate_apps(self.m.shapes[self.m.running])
            revision = self.build(shape, keys=self.work / "attacker")
            directory, why = self.dirs[revision], "untrusted key"
            self.m.refused.add(revision)
        self.steps[-1] += f" r{revision}"
        rc, output = self.finish(self.client("update", directory), kind)
        if rc != 3 or why not in output:
            raise SoakFailure(f"{kind} r{revision}: exit {rc}, wanted 3 '{why}': {output}")

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

    def power_cut(self, when: str) -> None:
        """SIGKILL of the whole sandbox; nothing of it may be left running or mounted."""
        self.counts["power cuts"] += 1
        self.dev.kill()
        leftovers = strays(self.m.storage)
        if leftovers:
            raise SoakFailure(f"after the power cut {when}: {leftovers}")

    # -- a run -------------------------------------------------------------------------

    def run(self, steps: int) -> Counter[str]:
        self.say(f"soak: seed {self.seed}, {steps} steps, in {self.work}")
        started = time.monotonic()
        try:
            self.boot_device()
            self.m.check(self.settle(), self.m.storage / "logs")
            kinds, weights = zip(*sorted(self.weights.items()), strict=True)
            for n in range(steps):
                kind = self.rng.choices(kinds, weights)[0]
                t = time.monotonic()
                self.step(kind)
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
        return (f"soak: seed {self.seed}: {c['steps']} steps, {c['updates']} updates, "
                f"{c['rollbacks']} rollbacks, {c['power cuts']} power cuts, "
                f"{c['reboots']} reboots")  # fmt: skip

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


def strays(storage: Path) -> list[str]:
    """Processes, mounts or loop devices left of a sandbox that is powered off."""
    found = []
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
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--work", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    work = args.work or Path(tempfile.mkdtemp(prefix="pvpy-soak."))
    try:
        Soak(work, seed, say=lambda s: print(s, flush=True)).run(args.steps)
    except SoakFailure:
        print(f"(work dir kept: {work})")
        return 1
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
